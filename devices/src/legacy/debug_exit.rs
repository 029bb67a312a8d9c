//! The debug-exit port: the guest writes a byte N and the VM ends with process status N.
//!
//! Test guests use it to report a result without a full ACPI power-off path.

use crate::bus::BusDevice;
use crate::stop::{StopCallback, StopReason};

/// The I/O port of the debug-exit device.
pub const DEBUG_EXIT_PORT: u16 = 0x500;

/// Ends the VM with the status the guest wrote.
pub struct DebugExit {
    on_stop: StopCallback,
}

impl DebugExit {
    /// A device that reports through `on_stop`.
    pub fn new(on_stop: StopCallback) -> Self {
        Self { on_stop }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [code]) => (self.on_stop)(StopReason::ExitCode(*code)),
            _ => log::debug!("debug-exit: ignoring write {data:x?} at offset {offset}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn byte_write_requests_exit_with_that_code() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut d = DebugExit::new(Arc::new(move |r| s.lock().unwrap().push(r)));
        d.write(0x500, 0, &[0, 0]); // wrong width: ignored
        d.write(0x500, 0, &[3]);
        assert_eq!(*seen.lock().unwrap(), vec![StopReason::ExitCode(3)]);
    }
}
