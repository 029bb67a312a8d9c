//! virtio-mmio transport (virtio 1.x "modern", spec 4.2.2), shared by
//! blk.rs and net.rs; the split virtqueues are in virtqueue.rs.
//!
//! Devices sit in 4 KiB windows at [`MMIO_BASE`] + slot * [`SLOT_SIZE`].
//! Register accesses are plain 32-bit volatile loads and stores: from CPL3
//! they go straight to the VMM as MMIO exits (no #GP detour as for ports).
//! No interrupts: drivers poll (see virtqueue.rs).

use core::fmt;
use core::ptr;

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
const STATUS_NEEDS_RESET: u32 = 0x40;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

/// Status reads while waiting for a reset to complete.
const RESET_POLLS: u32 = 1000;

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

    /// Writes the descriptor table, driver (avail) and device (used)
    /// ring addresses of the selected queue.
    pub fn set_queue_addrs(&self, addrs: [u64; 3]) {
        let regs = [REG_QUEUE_DESC, REG_QUEUE_DRIVER, REG_QUEUE_DEVICE];
        for (reg, a) in regs.into_iter().zip(addrs) {
            self.write(reg, a as u32);
            self.write(reg + 4, (a >> 32) as u32);
        }
    }

    /// Writes QueueNotify.
    pub fn notify(&self, queue: u16) {
        self.write(REG_QUEUE_NOTIFY, u32::from(queue));
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
                    println!(
                        "probe: virtio slot={slot} device={id} version={}",
                        d.version()
                    );
                }
            }
            m => println!("probe: virtio slot={slot} magic={m:#x}"),
        }
    }
    println!("probe: virtio devices={count}");
}
