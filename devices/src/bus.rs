//! An address bus (port I/O or MMIO) that routes guest accesses to devices.
//!
//! Ranges are checked for overlap on insert, so a misconfigured machine fails at build
//! time instead of silently shadowing a device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device that can sit on a [`Bus`].
///
/// `base` is the start of the range the access hit (a device may be inserted at several
/// ranges), `offset` is relative to it. Accesses never extend past the end of the range.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// The guest writes `data`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A device shared between the bus (vCPU threads) and the VMM thread.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from building a bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of length zero.
    #[error("bus range at {0:#x} has zero length")]
    ZeroLength(u64),
    /// A range that runs past the end of the address space.
    #[error("bus range at {base:#x} with length {len:#x} overflows the address space")]
    Overflow {
        /// Start of the range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A range that overlaps one already on the bus.
    #[error("bus range {new:?} overlaps {existing:?}")]
    Overlap {
        /// The range being inserted.
        new: BusRange,
        /// The range already present.
        existing: BusRange,
    },
}

/// A half-open range `[base, base + len)` on a bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusRange {
    /// First address.
    pub base: u64,
    /// Length in bytes (never zero, never overflowing).
    pub len: u64,
}

impl BusRange {
    fn end(&self) -> u64 {
        // Cannot overflow: checked on insert.
        self.base + self.len
    }

    fn overlaps(&self, other: &BusRange) -> bool {
        self.base < other.end() && other.base < self.end()
    }
}

/// A set of non-overlapping device ranges.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, (BusRange, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`, refusing overlaps.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        if base.checked_add(len).is_none() {
            return Err(BusError::Overflow { base, len });
        }
        let new = BusRange { base, len };
        let below = self.ranges.range(..=base).next_back();
        let above = self.ranges.range(base..).next();
        for (_, (existing, _)) in below.into_iter().chain(above) {
            if existing.overlaps(&new) {
                return Err(BusError::Overlap {
                    new,
                    existing: *existing,
                });
            }
        }
        self.ranges.insert(base, (new, device));
        Ok(())
    }

    /// The range and device that contain the whole access `[addr, addr + len)`.
    fn resolve(&self, addr: u64, len: usize) -> Option<(BusRange, &SharedDevice)> {
        let (_, (range, device)) = self.ranges.range(..=addr).next_back()?;
        let end = addr.checked_add(len as u64)?;
        (addr >= range.base && end <= range.end()).then_some((*range, device))
    }

    /// Dispatches a guest read. Returns false when no device claims the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((range, device)) => {
                lock(device).read(range.base, addr - range.base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write. Returns false when no device claims the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((range, device)) => {
                lock(device).write(range.base, addr - range.base, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from poisoning: a device that panicked once must not take
/// the whole VMM down with it on the next access.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last = Some((base, offset, data.to_vec()));
        }
    }

    fn dev() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn insert_rejects_overlap_zero_and_overflow() {
        let mut bus = Bus::new();
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev(), 0x10f, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0xf8, 0x9),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0x0, 0x1000),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(
            bus.insert(dev(), 0x200, 0),
            Err(BusError::ZeroLength(0x200))
        );
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::Overflow { .. })
        ));
        // Adjacent ranges are fine.
        bus.insert(dev(), 0x110, 0x10).unwrap();
        bus.insert(dev(), 0xf0, 0x10).unwrap();
    }

    #[test]
    fn dispatch_uses_offsets_and_rejects_straddling_access() {
        let mut bus = Bus::new();
        let d = dev();
        bus.insert(d.clone(), 0x3f8, 8).unwrap();
        assert!(bus.write(0x3fb, &[7]));
        assert_eq!(d.lock().unwrap().last, Some((0x3f8, 3, vec![7])));
        let mut buf = [0u8; 2];
        assert!(bus.read(0x3fd, &mut buf));
        assert_eq!(buf, [5, 5]);
        // Straddles the end of the range.
        assert!(!bus.read(0x3ff, &mut buf));
        assert!(!bus.write(0x3f0, &[1]));
        assert!(!bus.write(u64::MAX, &[1, 2]));
    }
}
