//! How a device asks the VMM to end the VM (guest reset, power-off, debug exit).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why a device asked the VM to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// The guest asked for a reset (i8042 pulse, ACPI reset). wisp ends the VM.
    Reset,
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest wrote a status to the debug-exit port.
    ExitCode(u8),
}

/// Called by a device, on the vCPU thread that made the access, to end the VM.
/// The VMM decides what "ending" means; the device only reports.
pub type StopCallback = Arc<dyn Fn(StopReason) + Send + Sync>;
