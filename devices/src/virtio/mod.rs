//! Virtio devices over the MMIO transport (virtio 1.x, MMIO version 2).
//!
//! [`mmio::MmioTransport`] owns the register file, the virtqueues and the interrupt; a
//! [`VirtioDevice`] (block, net) only implements the device-specific part and gets the
//! queues lent to it for each event. Queue processing runs on the VMM's event-loop
//! thread: guest notifications arrive through per-queue eventfds (KVM ioeventfds) and
//! interrupts leave through an irqfd.
//!
//! Everything the guest controls (register values, ring addresses, descriptor chains) is
//! validated. A chain that breaks the virtqueue rules puts the device into
//! `DEVICE_NEEDS_RESET` ([`DeviceError::Protocol`]); a well-formed request the device
//! cannot satisfy gets an error status in the guest's world.

pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod persist;

use std::os::fd::RawFd;

use thiserror::Error;
use virtio_queue::Queue;

use self::persist::{DeviceState, PersistError};
use vm_memory::bitmap::AtomicBitmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it: every device write marks pages dirty.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Virtio device type: network card.
pub const TYPE_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Virtio device type: block device.
pub const TYPE_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Feature bit: virtio 1.x ("modern") device.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: used/avail event indices for notification suppression.
pub const F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// Largest queue size any wisp device offers.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// Checks that a queue's rings lie in guest memory: the check virtio-queue's
/// `Queue::is_valid` makes, without its error log (neither a guest nor a snapshot may
/// write to wisp's log at will; the caller reports, once).
pub fn rings_in_memory(q: &Queue, mem: &GuestMemory) -> Result<(), String> {
    use virtio_queue::QueueT;
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    let size = u64::from(q.size());
    // Descriptors are 16 bytes; each ring has flags, index and an event word (6 bytes)
    // around 2-byte (available) or 8-byte (used) elements.
    for (what, addr, len) in [
        ("descriptor table", q.desc_table(), 16 * size),
        ("available ring", q.avail_ring(), 6 + 2 * size),
        ("used ring", q.used_ring(), 6 + 8 * size),
    ] {
        if !mem.check_range(GuestAddress(addr), len as usize) {
            return Err(format!(
                "{what} at {addr:#x} ({len} bytes) is outside guest memory"
            ));
        }
    }
    Ok(())
}

/// A device's virtqueues stopped making sense: the driver broke the rules.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A malformed descriptor chain or ring: the device needs a reset.
    #[error("driver error: {0}")]
    Protocol(String),
    /// The ring memory itself became unreachable.
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
}

/// The interrupt line of one device: the ISR bits and the irqfd that raises the GSI.
pub struct Interrupt {
    status: u32,
    irqfd: EventFd,
}

/// ISR bit: a used ring was updated.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// ISR bit: the configuration changed (also used for DEVICE_NEEDS_RESET).
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

impl Interrupt {
    /// An interrupt raised through `irqfd` (registered with KVM by the VMM).
    pub fn new(irqfd: EventFd) -> Self {
        Self { status: 0, irqfd }
    }

    /// Sets `bits` in the ISR and raises the interrupt.
    pub fn trigger(&mut self, bits: u32) {
        self.status |= bits;
        if let Err(e) = self.irqfd.write(1) {
            log::error!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// The ISR as the guest reads it.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The guest acknowledges `bits`.
    pub fn ack(&mut self, bits: u32) {
        self.status &= !bits;
    }
}

/// What a device gets for one event: guest memory, its queues and its interrupt.
pub struct QueueContext<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemory,
    /// The device's queues, in virtio order.
    pub queues: &'a mut [Queue],
    /// The device's interrupt.
    pub irq: &'a mut Interrupt,
    /// The transport's ConfigGeneration register.
    pub config_generation: &'a mut u32,
}

impl QueueContext<'_> {
    /// The device changed its configuration space (e.g. link status): bump the
    /// generation and raise a configuration interrupt.
    pub fn config_changed(&mut self) {
        *self.config_generation = self.config_generation.wrapping_add(1);
        self.irq.trigger(INT_CONFIG);
    }

    /// Raises a used-buffer interrupt for queue `index` if the driver wants one.
    pub fn notify(&mut self, index: usize) -> Result<(), DeviceError> {
        use virtio_queue::QueueT;
        if self.queues[index].needs_notification(self.mem)? {
            self.irq.trigger(INT_VRING);
        }
        Ok(())
    }
}

/// The device-specific half of a virtio device.
pub trait VirtioDevice: Send {
    /// Virtio device type ([`TYPE_NET`], [`TYPE_BLOCK`]).
    fn device_type(&self) -> u32;
    /// A short name for logs, e.g. `virtio-blk vda`.
    fn name(&self) -> &str;
    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// The driver accepted `features` (a subset of [`VirtioDevice::features`]); called
    /// when it sets FEATURES_OK.
    fn set_acked_features(&mut self, features: u64);
    /// The device configuration space, as the driver reads it.
    fn config_space(&self) -> &[u8];
    /// Reads the device configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config_space(), offset, data);
    }
    /// Writes the device configuration space; wisp's devices have no writable fields.
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("{}: config write at {offset:#x} ignored", self.name());
    }
    /// The driver set DRIVER_OK: get ready for the negotiated features. Runs on a vCPU
    /// thread, so it must neither process queues nor make host calls (its seccomp filter
    /// allows neither): the transport then signals every queue's eventfd, and the event
    /// loop does both in the next queue event ([`VirtioDevice::sync_host`] first).
    fn activate(&mut self, ctx: QueueContext) -> Result<(), DeviceError>;
    /// Makes the host side match what the driver last chose (a network card's TAP
    /// offloads after an activation or reset). The transport calls it on the event
    /// loop's thread before every queue and backend event, and right after a restore's
    /// activation. Default: nothing.
    fn sync_host(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The driver reset the device: forget any in-flight state tied to the queues. Runs
    /// on a vCPU thread, as [`VirtioDevice::activate`] does.
    fn reset(&mut self);
    /// The host file descriptor of the backend to watch (a TAP), if any.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// Changes whenever the backend fd is replaced (a reconnect), so the event loop
    /// knows to watch the new one.
    fn backend_generation(&self) -> u64 {
        0
    }
    /// The driver notified queue `index`.
    fn queue_event(&mut self, ctx: QueueContext, index: usize) -> Result<(), DeviceError>;
    /// The backend fd became readable or writable (`events` is an epoll mask).
    fn backend_event(&mut self, _ctx: QueueContext, _events: u32) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Hands what the device holds exclusively on the host over to another process (a
    /// migration's destination): finishes and flushes its writes and releases its
    /// locks (a disk's image lock). Runs while the VM is paused. Default: nothing.
    fn release_host(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Takes back (or takes for the first time) what [`VirtioDevice::release_host`]
    /// gave up; fails if another process holds it. Default: nothing.
    fn claim_host(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// The transport restored the device running (a snapshot's restore, a
    /// migration): it may tell the driver (a network card asks the guest to announce
    /// itself). Default: nothing.
    fn restored(&mut self, _ctx: QueueContext) {}
    /// The device-specific state, for a snapshot.
    fn save(&self) -> DeviceState;
    /// Takes the device-specific state `state` (untrusted: validated against this
    /// device's configuration). On error the device is unchanged. The transport calls
    /// this on a freshly opened device, before activating it.
    fn restore(&mut self, state: &DeviceState) -> Result<(), PersistError>;
}

/// Logs a device's complaints about guest behaviour: the first few at warn level, the
/// rest at debug, so a hostile guest cannot flood the host's log.
#[derive(Default)]
pub struct LogLimiter {
    count: u32,
}

impl LogLimiter {
    /// Warnings before the limiter drops to debug level.
    pub const LIMIT: u32 = 8;

    /// Logs `msg` for device `name`.
    pub fn warn(&mut self, name: &str, msg: &str) {
        self.count = self.count.saturating_add(1);
        if self.count <= Self::LIMIT {
            log::warn!("{name}: {msg}");
        } else {
            log::debug!("{name}: {msg}");
        }
    }
}

/// Copies `src` into `data` starting at `offset`, as a config-space read of `data.len()`
/// bytes; bytes beyond `src` read as zero.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
        *b = at.and_then(|at| src.get(at)).copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let src = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&src, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&src, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
