//! The boot-complete device: the guest writes one magic byte to one port when it is up,
//! and wisp records how long that took from its own process start.
//!
//! The time is taken on the vCPU thread at the moment of the port write's VM exit, so it
//! is exact to the resolution of the monotonic clock.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::bus::BusDevice;

/// The I/O port the guest writes to.
pub const BOOT_COMPLETE_PORT: u16 = 0x501;
/// The one value that counts as "boot complete" (123, as in Firecracker's boot timer).
pub const BOOT_COMPLETE_MAGIC: u8 = 0x7b;

/// Records the first boot-complete write.
pub struct BootTimer {
    start: Instant,
    done: Arc<OnceLock<Duration>>,
}

impl BootTimer {
    /// `start` is the instant wisp's process started (taken first thing in `main`).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            done: Arc::new(OnceLock::new()),
        }
    }

    /// A handle that yields the boot time once the guest has reported it.
    pub fn result(&self) -> Arc<OnceLock<Duration>> {
        self.done.clone()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset != 0 || data != [BOOT_COMPLETE_MAGIC] {
            log::debug!("boot timer: ignoring write {data:x?} at offset {offset}");
            return;
        }
        let elapsed = self.start.elapsed();
        if self.done.set(elapsed).is_ok() {
            log::info!(
                "guest boot complete: {:.3} ms after wisp started",
                elapsed.as_secs_f64() * 1000.0
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_magic_write_only() {
        let start = Instant::now();
        let mut t = BootTimer::new(start);
        let res = t.result();
        t.write(0x501, 0, &[0x7a]);
        assert!(res.get().is_none());
        t.write(0x501, 0, &[BOOT_COMPLETE_MAGIC, 0]);
        assert!(res.get().is_none());
        t.write(0x501, 0, &[BOOT_COMPLETE_MAGIC]);
        let first = *res.get().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        t.write(0x501, 0, &[BOOT_COMPLETE_MAGIC]);
        assert_eq!(*res.get().unwrap(), first);
        assert!(first <= start.elapsed());
    }
}
