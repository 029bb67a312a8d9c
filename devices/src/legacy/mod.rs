//! Legacy PC devices on port I/O.

pub mod acpi_sleep;
pub mod boot_timer;
pub mod debug_exit;
pub mod i8042;
pub mod serial;

pub use acpi_sleep::AcpiSleep;
pub use boot_timer::{BootTimer, BOOT_COMPLETE_MAGIC, BOOT_COMPLETE_PORT};
pub use debug_exit::{DebugExit, DEBUG_EXIT_PORT};
pub use i8042::{I8042State, I8042, I8042_COMMAND_PORT, I8042_DATA_PORT};
pub use serial::{SerialDevice, SerialSnapshot, SerialStateError, SERIAL_FIFO_SIZE};
