//! virtio-mmio transport (virtio 1.x "modern", spec 4.2.2) and polled
//! split virtqueues (spec 2.7), shared by blk.rs and net.rs.
//!
//! Devices sit in 4 KiB windows at [`MMIO_BASE`] + slot * [`SLOT_SIZE`].
//! Register accesses are plain 32-bit volatile loads and stores: from CPL3
//! they go straight to the VMM as MMIO exits (no #GP detour as for ports).
//! Rings and buffers are statics ([`Dma`]): the probe's identity map makes
//! their addresses guest-physical addresses. No interrupts: the driver
//! polls the used ring, with a bounded poll count.

use core::cell::UnsafeCell;
use core::fmt;
use core::ptr;
use core::sync::atomic::{fence, Ordering};

use crate::{io, status};

/// Guest-physical address of slot 0.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of one device window.
pub const SLOT_SIZE: u64 = 0x1000;
/// Number of slots.
pub const SLOTS: u8 = 16;
/// MagicValue of a present device ("virt").
pub const MAGIC: u32 = 0x7472_6976;
/// DeviceID of a network device.
pub const DEVICE_NET: u32 = 1;
/// DeviceID of a block device.
pub const DEVICE_BLK: u32 = 2;

const REG_MAGIC: usize = 0x000;
const REG_VERSION: usize = 0x004;
const REG_DEVICE_ID: usize = 0x008;
const REG_DEVICE_FEATURES: usize = 0x010;
const REG_DEVICE_FEATURES_SEL: usize = 0x014;
const REG_DRIVER_FEATURES: usize = 0x020;
const REG_DRIVER_FEATURES_SEL: usize = 0x024;
/// QueueSel.
pub const REG_QUEUE_SEL: usize = 0x030;
/// QueueNumMax.
pub const REG_QUEUE_NUM_MAX: usize = 0x034;
/// QueueNum.
pub const REG_QUEUE_NUM: usize = 0x038;
/// QueueReady.
pub const REG_QUEUE_READY: usize = 0x044;
const REG_QUEUE_NOTIFY: usize = 0x050;
const REG_STATUS: usize = 0x070;
const REG_QUEUE_DESC: usize = 0x080;
const REG_QUEUE_DRIVER: usize = 0x090;
const REG_QUEUE_DEVICE: usize = 0x0a0;
const REG_CONFIG_GENERATION: usize = 0x0fc;
const REG_CONFIG: usize = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
/// Status bit DEVICE_NEEDS_RESET.
pub const STATUS_NEEDS_RESET: u32 = 0x40;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

/// Descriptor flag: the chain continues at `next`.
pub const DESC_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_WRITE: u16 = 2;
/// used.flags bit VIRTQ_USED_F_NO_NOTIFY.
const USED_NO_NOTIFY: u16 = 1;

/// Largest queue size the probe uses (also the capacity of [`Ring`]).
pub const QSIZE: usize = 64;

/// Used-ring polls before a device operation counts as timed out (each
/// poll is a memory read plus `pause`: ~25 s on this project's machines).
pub const POLLS: u64 = 1 << 30;
/// Polls between two Status reads (an MMIO exit each) while waiting.
const STATUS_EVERY: u64 = 1 << 16;
/// Status reads while waiting for a reset to complete.
const RESET_POLLS: u32 = 1000;

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

/// Why a device could not be initialised.
#[derive(Debug)]
pub enum InitError {
    Version(u32),
    ResetStuck(u32),
    NoVersion1,
    FeaturesRejected(u32),
    NoQueue(u16),
    QueueNotReady(u16),
    NeedsReset,
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::Version(v) => write!(f, "version {v} (need 2)"),
            InitError::ResetStuck(s) => write!(f, "status {s:#x} after reset"),
            InitError::NoVersion1 => write!(f, "VIRTIO_F_VERSION_1 not offered"),
            InitError::FeaturesRejected(s) => write!(f, "FEATURES_OK not kept (status {s:#x})"),
            InitError::NoQueue(q) => write!(f, "queue {q} has QueueNumMax 0"),
            InitError::QueueNotReady(q) => write!(f, "queue {q} QueueReady reads 0"),
            InitError::NeedsReset => write!(f, "DEVICE_NEEDS_RESET during init"),
        }
    }
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

/// Ends the run for a device that failed to initialise.
pub fn init_failed(cmd: &str, e: InitError) -> ! {
    println!("probe: {cmd} init failed: {e}");
    io::exit(status::DEVICE_ERROR)
}

/// One virtio-mmio device window.
#[derive(Clone, Copy)]
pub struct Device {
    base: u64,
}

impl Device {
    pub fn at(slot: u8) -> Device {
        Device {
            base: MMIO_BASE + u64::from(slot) * SLOT_SIZE,
        }
    }

    fn reg<T>(&self, off: usize) -> *mut T {
        ptr::with_exposed_provenance_mut::<T>(self.base as usize + off)
    }

    pub fn read(&self, off: usize) -> u32 {
        // SAFETY: the window is identity-mapped MMIO below 4 GiB; a read
        // is a VM exit the VMM answers (zeros for an empty slot).
        unsafe { ptr::read_volatile(self.reg::<u32>(off)) }
    }

    pub fn write(&self, off: usize, v: u32) {
        // SAFETY: as for `read`; callers follow the virtio init protocol.
        unsafe { ptr::write_volatile(self.reg::<u32>(off), v) }
    }

    pub fn magic(&self) -> u32 {
        self.read(REG_MAGIC)
    }

    pub fn version(&self) -> u32 {
        self.read(REG_VERSION)
    }

    pub fn device_id(&self) -> u32 {
        self.read(REG_DEVICE_ID)
    }

    /// The `n`-th device (0-based, in slot order) with DeviceID `id`.
    pub fn find(id: u32, n: u8) -> Option<Device> {
        (0..SLOTS)
            .map(Device::at)
            .filter(|d| d.magic() == MAGIC && d.device_id() == id)
            .nth(usize::from(n))
    }

    pub fn status(&self) -> u32 {
        self.read(REG_STATUS)
    }

    pub fn needs_reset(&self) -> bool {
        self.status() & STATUS_NEEDS_RESET != 0
    }

    /// Writes Status 0 and waits (bounded) until it reads 0.
    pub fn reset(&self) -> Result<(), InitError> {
        self.write(REG_STATUS, 0);
        let mut s = self.status();
        for _ in 0..RESET_POLLS {
            if s == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
            s = self.status();
        }
        Err(InitError::ResetStuck(s))
    }

    /// DeviceFeatures, both 32-bit halves.
    pub fn device_features(&self) -> u64 {
        self.write(REG_DEVICE_FEATURES_SEL, 0);
        let lo = self.read(REG_DEVICE_FEATURES);
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        let hi = self.read(REG_DEVICE_FEATURES);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features (`wanted` & offered, which
    /// must include VERSION_1), FEATURES_OK and its check. Returns the
    /// offered features. Queues and DRIVER_OK follow separately.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, InitError> {
        let version = self.version();
        if version != 2 {
            return Err(InitError::Version(version));
        }
        self.reset()?;
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let offered = self.device_features();
        if offered & F_VERSION_1 == 0 {
            return Err(InitError::NoVersion1);
        }
        let features = offered & wanted;
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, features as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (features >> 32) as u32);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(REG_STATUS, s);
        let got = self.status();
        if got & STATUS_FEATURES_OK == 0 || got & STATUS_NEEDS_RESET != 0 {
            return Err(InitError::FeaturesRejected(got));
        }
        Ok(offered)
    }

    /// Writes the three ring addresses of the selected queue.
    pub fn set_queue_addrs(&self, ring: &Dma<Ring>) {
        let base = ring.addr();
        let parts = [
            (REG_QUEUE_DESC, core::mem::offset_of!(Ring, desc)),
            (REG_QUEUE_DRIVER, core::mem::offset_of!(Ring, avail)),
            (REG_QUEUE_DEVICE, core::mem::offset_of!(Ring, used)),
        ];
        for (reg, off) in parts {
            let a = base + off as u64;
            self.write(reg, a as u32);
            self.write(reg + 4, (a >> 32) as u32);
        }
    }

    /// Sets DRIVER_OK (after the queues).
    pub fn driver_ok(&self) -> Result<(), InitError> {
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.write(REG_STATUS, s);
        if self.needs_reset() {
            return Err(InitError::NeedsReset);
        }
        Ok(())
    }

    /// Reads config space through `f` until ConfigGeneration is stable
    /// around it (bounded; the last read wins).
    fn config_read<T>(&self, f: impl Fn() -> T) -> T {
        let mut v = f();
        for _ in 0..16 {
            let before = self.read(REG_CONFIG_GENERATION);
            v = f();
            if self.read(REG_CONFIG_GENERATION) == before {
                break;
            }
        }
        v
    }

    /// An 8-bit config access at `off`.
    pub fn config_u8(&self, off: usize) -> u8 {
        // SAFETY: as for `read`; config space allows 8-bit accesses.
        self.config_read(|| unsafe { ptr::read_volatile(self.reg::<u8>(REG_CONFIG + off)) })
    }

    /// A little-endian u64 at `off`, as two 32-bit accesses.
    pub fn config_u64(&self, off: usize) -> u64 {
        self.config_read(|| {
            let lo = self.read(REG_CONFIG + off);
            let hi = self.read(REG_CONFIG + off + 4);
            u64::from(lo) | (u64::from(hi) << 32)
        })
    }
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
        dev.write(REG_QUEUE_SEL, u32::from(index));
        let max = dev.read(REG_QUEUE_NUM_MAX).min(QSIZE as u32);
        if max == 0 {
            return Err(InitError::NoQueue(index));
        }
        let size = 1u16 << (31 - max.leading_zeros());
        dev.write(REG_QUEUE_NUM, u32::from(size));
        dev.set_queue_addrs(ring);
        dev.write(REG_QUEUE_READY, 1);
        if dev.read(REG_QUEUE_READY) != 1 {
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
            dev.write(REG_QUEUE_NOTIFY, u32::from(self.index));
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
        for n in 0..limit {
            if let Some(u) = self.pop_used()? {
                return Ok(u);
            }
            if n % STATUS_EVERY == STATUS_EVERY - 1 && dev.needs_reset() {
                return Err(WaitError::NeedsReset);
            }
            core::hint::spin_loop();
        }
        Err(WaitError::Timeout)
    }
}

/// The `virtio` command: one line per present device, then the count.
pub fn list() {
    let mut count = 0;
    for slot in 0..SLOTS {
        let d = Device::at(slot);
        match d.magic() {
            // Empty (all ones: a VMM without a device there).
            0 | u32::MAX => {}
            MAGIC => {
                // DeviceID 0: a placeholder without a device (spec 5).
                let id = d.device_id();
                if id != 0 {
                    count += 1;
                    println!("probe: virtio slot={slot} device={id} version={}", d.version());
                }
            }
            m => println!("probe: virtio slot={slot} magic={m:#x}"),
        }
    }
    println!("probe: virtio devices={count}");
}
