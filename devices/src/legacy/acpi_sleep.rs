//! The ACPI sleep control and status registers of a hardware-reduced ACPI machine
//! (ACPI 6.x, 4.8.3.7). Writing SLP_TYP(S5) | SLP_EN to the control register powers the
//! VM off; other sleep states are not supported and are ignored.

use crate::bus::BusDevice;
use crate::stop::{StopCallback, StopReason};

/// Sleep control register port.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// Sleep status register port.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// The SLP_TYP value wisp's DSDT gives \_S5.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// Both registers; inserted on the bus at each port.
pub struct AcpiSleep {
    on_stop: StopCallback,
}

impl AcpiSleep {
    /// A device that reports power-off through `on_stop`.
    pub fn new(on_stop: StopCallback) -> Self {
        Self { on_stop }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // No wake events ever: status reads as 0, and so does control.
        data.fill(0);
    }

    fn write(&mut self, base: u64, _offset: u64, data: &[u8]) {
        let (true, [value]) = (base == u64::from(SLEEP_CONTROL_PORT), data) else {
            return;
        };
        if value & SLP_EN == 0 {
            return;
        }
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if sleep_type == S5_SLEEP_TYPE {
            (self.on_stop)(StopReason::PowerOff);
        } else {
            log::warn!(
                "ACPI: guest asked for sleep type {sleep_type}, which wisp does not support"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn s5_with_slp_en_powers_off() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut d = AcpiSleep::new(Arc::new(move |r| s.lock().unwrap().push(r)));
        let ctl = u64::from(SLEEP_CONTROL_PORT);
        d.write(ctl, 0, &[S5_SLEEP_TYPE << 2]); // no SLP_EN
        d.write(ctl, 0, &[(3 << 2) | SLP_EN]); // S3: unsupported
        d.write(u64::from(SLEEP_STATUS_PORT), 0, &[(5 << 2) | SLP_EN]); // wrong register
        assert!(seen.lock().unwrap().is_empty());
        d.write(ctl, 0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(*seen.lock().unwrap(), vec![StopReason::PowerOff]);
        let mut b = [0xff];
        d.read(ctl, 0, &mut b);
        assert_eq!(b, [0]);
    }
}
