//! Polled split virtqueues (virtio spec 2.7) in static probe memory.
//!
//! Rings and buffers are statics ([`Dma`]): the probe's identity map makes
//! their addresses guest-physical addresses. No interrupts: the driver
//! polls the used ring, with a bounded poll count.

use core::cell::UnsafeCell;
use core::ptr;
use core::sync::atomic::{fence, Ordering};

use crate::virtio::{self, Device, InitError};
use crate::{io, status};

/// Descriptor flag: the chain continues at `next`.
pub const DESC_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_WRITE: u16 = 2;
/// used.flags bit VIRTQ_USED_F_NO_NOTIFY.
const USED_NO_NOTIFY: u16 = 1;

/// Largest queue size the probe uses (also the capacity of [`Ring`]).
pub const QSIZE: usize = 64;

/// Used-ring polls before a device operation counts as timed out (each
/// poll is a memory read plus `pause`: ~30 s on this project's machines).
pub const POLLS: u64 = 1 << 30;
/// Polls between two Status reads (an MMIO exit each) while waiting.
const STATUS_EVERY: u64 = 1 << 16;
/// Memory shared with devices: page-aligned, in .bss when `T` is zeros.
#[repr(C, align(4096))]
pub struct Dma<T>(UnsafeCell<T>);

// SAFETY: the probe is single-threaded; the only other party is the
// device, which is synchronised through the virtqueue protocol.
unsafe impl<T> Sync for Dma<T> {}

impl<T> Dma<T> {
    pub const fn new(v: T) -> Self {
        Dma(UnsafeCell::new(v))
    }

    pub fn ptr(&self) -> *mut T {
        self.0.get()
    }

    /// Guest-physical address (the probe's map is the identity).
    pub fn addr(&self) -> u64 {
        self.ptr().expose_provenance() as u64
    }
}

/// Split-virtqueue descriptor.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub const fn new(addr: u64, len: u32, flags: u16, next: u16) -> Desc {
        Desc {
            addr,
            len,
            flags,
            next,
        }
    }
}

#[repr(C)]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QSIZE],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C)]
struct UsedRing {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QSIZE],
    avail_event: u16,
}

/// The three parts of a split virtqueue of up to [`QSIZE`] entries
/// (descriptor table at offset 0, avail ring, then the 4-aligned used ring).
#[repr(C)]
pub struct Ring {
    desc: [Desc; QSIZE],
    avail: Avail,
    used: UsedRing,
}

impl Ring {
    /// Guest-physical addresses of the descriptor table, avail ring and
    /// used ring of `ring`.
    pub fn addrs(ring: &Dma<Ring>) -> [u64; 3] {
        let base = ring.addr();
        [
            base + core::mem::offset_of!(Ring, desc) as u64,
            base + core::mem::offset_of!(Ring, avail) as u64,
            base + core::mem::offset_of!(Ring, used) as u64,
        ]
    }

    pub const ZERO: Ring = Ring {
        desc: [Desc {
            addr: 0,
            len: 0,
            flags: 0,
            next: 0,
        }; QSIZE],
        avail: Avail {
            flags: 0,
            idx: 0,
            ring: [0; QSIZE],
            used_event: 0,
        },
        used: UsedRing {
            flags: 0,
            idx: 0,
            ring: [UsedElem { id: 0, len: 0 }; QSIZE],
            avail_event: 0,
        },
    };
}

/// Why waiting for a used buffer failed.
#[derive(Debug)]
pub enum WaitError {
    Timeout,
    NeedsReset,
    /// The device returned an id that is not a buffer the driver posted.
    BadUsed(u32),
}

/// Ends the run for a failed wait: `probe: <cmd> timeout` (status
/// TIMEOUT) or a device error line (status DEVICE_ERROR).
pub fn fail(cmd: &str, e: WaitError) -> ! {
    match e {
        WaitError::Timeout => {
            println!("probe: {cmd} timeout");
            io::exit(status::TIMEOUT)
        }
        WaitError::NeedsReset => println!("probe: {cmd} device needs reset"),
        WaitError::BadUsed(id) => println!("probe: {cmd} bad used id={id}"),
    }
    io::exit(status::DEVICE_ERROR)
}

/// Driver side of one split virtqueue whose memory is a static [`Ring`].
pub struct Queue {
    ring: *mut Ring,
    pub index: u16,
    /// Negotiated size: a power of two, at most [`QSIZE`].
    pub size: u16,
    /// Next avail.idx to publish.
    avail_idx: u16,
    /// Next used.idx to consume.
    used_idx: u16,
}

/// A buffer the device has returned.
#[derive(Clone, Copy)]
pub struct Used {
    pub id: u16,
    pub len: u32,
}

impl Queue {
    /// Zeroes `ring`, then sets up queue `index` of `dev` on it (size:
    /// min(QueueNumMax, QSIZE) rounded down to a power of two) and checks
    /// that QueueReady reads 1.
    pub fn new(dev: &Device, index: u16, ring: &'static Dma<Ring>) -> Result<Queue, InitError> {
        // SAFETY: the device no longer uses the ring (it was reset), and
        // the Ring is plain data for which all-zero bytes are valid.
        unsafe { ptr::write_bytes(ring.ptr(), 0, 1) };
        // The zeroes before the (volatile) register writes that hand the
        // ring to the device.
        fence(Ordering::SeqCst);
        dev.write(virtio::REG_QUEUE_SEL, u32::from(index));
        let max = dev.read(virtio::REG_QUEUE_NUM_MAX).min(QSIZE as u32);
        if max == 0 {
            return Err(InitError::NoQueue(index));
        }
        let size = 1u16 << (31 - max.leading_zeros());
        dev.write(virtio::REG_QUEUE_NUM, u32::from(size));
        dev.set_queue_addrs(Ring::addrs(ring));
        dev.write(virtio::REG_QUEUE_READY, 1);
        if dev.read(virtio::REG_QUEUE_READY) != 1 {
            return Err(InitError::QueueNotReady(index));
        }
        Ok(Queue {
            ring: ring.ptr(),
            index,
            size,
            avail_idx: 0,
            used_idx: 0,
        })
    }

    /// Writes descriptor `i` (< size).
    pub fn set_desc(&mut self, i: u16, d: Desc) {
        assert!(i < self.size);
        // SAFETY: in bounds (i < size <= QSIZE) of the static ring; the
        // device reads descriptors only once their head is published.
        unsafe { ptr::write_volatile(&raw mut (*self.ring).desc[usize::from(i)], d) };
    }

    /// Publishes chain head `head` in the avail ring (no notification).
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: slot < size <= QSIZE; the device does not read this
        // entry before avail.idx covers it.
        unsafe { ptr::write_volatile(&raw mut (*self.ring).avail.ring[slot], head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Descriptors, buffers and the entry before the index.
        fence(Ordering::Release);
        // SAFETY: avail.idx of the static ring, written only by the driver.
        unsafe { ptr::write_volatile(&raw mut (*self.ring).avail.idx, self.avail_idx) };
    }

    /// Notifies the device unless it set VIRTQ_USED_F_NO_NOTIFY.
    pub fn kick(&self, dev: &Device) {
        fence(Ordering::SeqCst);
        // SAFETY: used.flags of the static ring (written by the device).
        let flags = unsafe { ptr::read_volatile(&raw const (*self.ring).used.flags) };
        if flags & USED_NO_NOTIFY == 0 {
            dev.notify(self.index);
        }
    }

    /// Buffers published and not yet returned.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.used_idx)
    }

    /// The next used buffer, if the device has returned one.
    pub fn pop_used(&mut self) -> Result<Option<Used>, WaitError> {
        // SAFETY: used.idx of the static ring (written by the device).
        let idx = unsafe { ptr::read_volatile(&raw const (*self.ring).used.idx) };
        if idx == self.used_idx {
            return Ok(None);
        }
        // The element and the buffer contents after the index.
        fence(Ordering::Acquire);
        let slot = usize::from(self.used_idx % self.size);
        // SAFETY: slot < QSIZE; the device wrote the element before idx.
        let e = unsafe { ptr::read_volatile(&raw const (*self.ring).used.ring[slot]) };
        if self.in_flight() == 0 || e.id >= u32::from(self.size) {
            return Err(WaitError::BadUsed(e.id));
        }
        self.used_idx = self.used_idx.wrapping_add(1);
        Ok(Some(Used {
            id: e.id as u16,
            len: e.len,
        }))
    }

    /// Polls (at most `limit` times) for the next used buffer, checking
    /// the device's DEVICE_NEEDS_RESET bit now and then.
    pub fn wait_used(&mut self, dev: &Device, limit: u64) -> Result<Used, WaitError> {
        let mut budget = limit;
        self.poll_used(dev, &mut budget)?.ok_or(WaitError::Timeout)
    }

    /// As [`Queue::wait_used`], but spends a poll budget that the caller
    /// can split across several waits: `None` once `*budget` is 0.
    pub fn poll_used(&mut self, dev: &Device, budget: &mut u64) -> Result<Option<Used>, WaitError> {
        loop {
            if let Some(u) = self.pop_used()? {
                return Ok(Some(u));
            }
            if *budget == 0 {
                return Ok(None);
            }
            *budget -= 1;
            if budget.is_multiple_of(STATUS_EVERY) && dev.needs_reset() {
                return Err(WaitError::NeedsReset);
            }
            core::hint::spin_loop();
        }
    }
}
