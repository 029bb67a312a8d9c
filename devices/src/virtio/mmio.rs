//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2 of the spec).
//!
//! The register file sits on the MMIO bus (vCPU threads); queue and backend events come
//! from the VMM's event loop. Both go through the same `Mutex<MmioTransport>`. Queue
//! configuration is validated when the driver sets QueueReady: a bad size or ring
//! address leaves the queue not ready and the device in DEVICE_NEEDS_RESET.

use std::os::fd::RawFd;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{rings_in_memory, F_VERSION_1, INT_CONFIG};
use super::{DeviceError, GuestMemory, Interrupt, QueueContext, VirtioDevice, F_EVENT_IDX};
use crate::bus::BusDevice;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// "virt", little endian.
const MAGIC: u32 = 0x7472_6976;
/// Modern virtio-mmio.
const VERSION: u32 = 2;
/// "WISP", little endian.
const VENDOR: u32 = 0x5053_4957;

/// Offset of QueueNotify, where the VMM attaches one ioeventfd per queue.
pub const QUEUE_NOTIFY: u64 = 0x50;
const CONFIG_START: u64 = 0x100;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// The status bits a driver may set (NEEDS_RESET is the device's).
const DRIVER_STATUS: u32 =
    status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK | status::FEATURES_OK | status::FAILED;

/// Queue registers as the driver wrote them, checked only at QueueReady.
#[derive(Clone, Copy, Default)]
pub(super) struct QueueRegs {
    pub(super) size: u16,
    pub(super) desc: u64,
    pub(super) avail: u64,
    pub(super) used: u64,
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// One virtio device behind its MMIO register window.
///
/// Snapshot support ([`MmioTransport::save`], [`MmioTransport::restore`]) lives in
/// [`super::persist`].
pub struct MmioTransport {
    pub(super) device: Box<dyn VirtioDevice>,
    pub(super) mem: GuestMemory,
    pub(super) irq: Interrupt,
    pub(super) queues: Vec<Queue>,
    pub(super) regs: Vec<QueueRegs>,
    pub(super) queue_evts: Vec<EventFd>,
    pub(super) status: u32,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) driver_features: u64,
    pub(super) queue_sel: u32,
    pub(super) config_generation: u32,
}

fn new_queues(device: &dyn VirtioDevice) -> Result<Vec<Queue>, virtio_queue::Error> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| Queue::new(max))
        .collect()
}

impl MmioTransport {
    /// Wraps `device`; `irqfd` is its interrupt (registered with KVM by the caller).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irqfd: EventFd,
    ) -> Result<Self, DeviceError> {
        let queues = new_queues(device.as_ref())?;
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DeviceError::Protocol(format!("cannot create a queue eventfd: {e}")))?;
        Ok(Self {
            regs: vec![QueueRegs::default(); queues.len()],
            queues,
            queue_evts,
            device,
            mem,
            irq: Interrupt::new(irqfd),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
        })
    }

    /// The device's log name.
    pub fn name(&self) -> &str {
        self.device.name()
    }

    /// Virtio device type.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// One eventfd per queue: the VMM registers each as a KVM ioeventfd on
    /// [`QUEUE_NOTIFY`] (matching the queue index) and watches it in the event loop.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The backend fd to watch, if the device has one.
    pub fn backend_fd(&self) -> Option<RawFd> {
        self.device.backend_fd()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Changes whenever the backend fd is replaced.
    pub fn backend_generation(&self) -> u64 {
        self.device.backend_generation()
    }

    /// See [`VirtioDevice::release_host`].
    pub fn release_host(&mut self) -> std::io::Result<()> {
        self.device.release_host()
    }

    /// See [`VirtioDevice::claim_host`].
    pub fn claim_host(&mut self) -> std::io::Result<()> {
        self.device.claim_host()
    }

    pub(super) fn running(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::NEEDS_RESET == 0
    }

    pub(super) fn ctx(&mut self) -> (&mut dyn VirtioDevice, QueueContext<'_>) {
        (
            self.device.as_mut(),
            QueueContext {
                mem: &self.mem,
                queues: &mut self.queues,
                irq: &mut self.irq,
                config_generation: &mut self.config_generation,
            },
        )
    }

    /// Puts the device into DEVICE_NEEDS_RESET and tells the driver.
    fn fail(&mut self, why: &DeviceError) {
        log::warn!(
            "{}: {why}; the device stops until the driver resets it",
            self.device.name()
        );
        self.status |= status::NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            self.irq.trigger(INT_CONFIG);
        }
    }

    /// The eventfd of queue `index` fired (the driver notified it).
    pub fn queue_event(&mut self, index: usize) {
        let Some(evt) = self.queue_evts.get(index) else {
            return;
        };
        // The count only wakes us; a failed read means nothing was pending.
        let _ = evt.read();
        // A queue the driver did not enable (a network card's control queue without
        // VIRTIO_NET_F_CTRL_VQ) has nothing to process; DRIVER_OK and a restore signal
        // every queue anyway.
        if !self.running() || !self.queues.get(index).is_some_and(|q| q.ready()) {
            return;
        }
        let (dev, ctx) = self.ctx();
        if let Err(e) = dev.sync_host().and_then(|()| dev.queue_event(ctx, index)) {
            self.fail(&e);
        }
    }

    /// The backend fd reported `events` (an epoll mask).
    pub fn backend_event(&mut self, events: u32) {
        if !self.running() {
            return;
        }
        let (dev, ctx) = self.ctx();
        if let Err(e) = dev
            .sync_host()
            .and_then(|()| dev.backend_event(ctx, events))
        {
            self.fail(&e);
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        match new_queues(self.device.as_ref()) {
            Ok(q) => self.queues = q,
            Err(e) => log::error!("{}: cannot reset queues: {e}", self.device.name()),
        }
        self.regs = vec![QueueRegs::default(); self.queues.len()];
        self.irq.ack(u32::MAX);
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
    }

    fn selected(&self) -> Option<usize> {
        let i = self.queue_sel as usize;
        (i < self.queues.len()).then_some(i)
    }

    /// Validates and enables the selected queue (QueueReady = 1).
    fn enable_queue(&mut self, i: usize) {
        let r = self.regs[i];
        let q = &mut self.queues[i];
        let checked = q
            .try_set_size(r.size)
            .and_then(|()| q.try_set_desc_table_address(GuestAddress(r.desc)))
            .and_then(|()| q.try_set_avail_ring_address(GuestAddress(r.avail)))
            .and_then(|()| q.try_set_used_ring_address(GuestAddress(r.used)));
        q.set_ready(true);
        let why = checked
            .map_err(|e| e.to_string())
            .and_then(|()| rings_in_memory(q, &self.mem))
            .err();
        if let Some(why) = why {
            q.set_ready(false);
            let e = DeviceError::Protocol(format!(
                "queue {i} configuration rejected (size {}, desc {:#x}, avail {:#x}, used {:#x}): {why}",
                r.size, r.desc, r.avail, r.used
            ));
            self.fail(&e);
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Reserved bits are ignored: kept, they would be saved into a snapshot that no
        // restore accepts.
        let v = v & DRIVER_STATUS;
        let new = v & !self.status;
        if new & status::FEATURES_OK != 0 {
            if self.driver_features & F_VERSION_1 == 0 {
                log::warn!(
                    "{}: driver did not accept VIRTIO_F_VERSION_1; legacy drivers are not supported",
                    self.device.name()
                );
                self.status |= v & !status::FEATURES_OK & !status::DRIVER_OK;
                return;
            }
            self.device.set_acked_features(self.driver_features);
            let event_idx = self.driver_features & F_EVENT_IDX != 0;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
        }
        if new & status::DRIVER_OK != 0 && (self.status | v) & status::FEATURES_OK == 0 {
            log::warn!(
                "{}: DRIVER_OK before FEATURES_OK ignored",
                self.device.name()
            );
            return;
        }
        // Bits only ever get set by the driver.
        self.status |= v;
        if new & status::DRIVER_OK != 0 && self.status & status::NEEDS_RESET == 0 {
            let (dev, ctx) = self.ctx();
            if let Err(e) = dev.activate(ctx) {
                self.fail(&e);
                return;
            }
            // Buffers may already wait in the rings: let the event loop look at every
            // queue (this runs on a vCPU thread, which never processes queues itself).
            for evt in &self.queue_evts {
                let _ = evt.write(1);
            }
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self
                .selected()
                .map_or(0, |i| u32::from(self.queues[i].max_size())),
            0x44 => self
                .selected()
                .map_or(0, |i| u32::from(self.queues[i].ready())),
            0x60 => self.irq.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let configurable = self.status & status::DRIVER_OK == 0;
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => {
                if self.status & status::FEATURES_OK == 0 {
                    let offered = self.device.features();
                    match self.driver_features_sel {
                        0 => set_low(&mut self.driver_features, v),
                        1 => set_high(&mut self.driver_features, v),
                        _ => {}
                    }
                    self.driver_features &= offered;
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => {
                if let Some(i) = self.selected().filter(|&i| !self.queues[i].ready()) {
                    self.regs[i].size = u16::try_from(v).unwrap_or(0);
                }
            }
            0x44 => {
                if let Some(i) = self.selected() {
                    if v == 1 && !self.queues[i].ready() {
                        self.enable_queue(i);
                    } else if v == 0 {
                        self.queues[i].set_ready(false);
                    }
                }
            }
            QUEUE_NOTIFY => {
                // Normally KVM's ioeventfd catches this write; only odd widths or values
                // get here. Hand valid ones to the event loop like KVM would.
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            0x64 => self.irq.ack(v),
            0x70 => self.write_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                let Some(i) = self
                    .selected()
                    .filter(|&i| !self.queues[i].ready() && configurable)
                else {
                    return;
                };
                let r = &mut self.regs[i];
                match offset {
                    0x80 => set_low(&mut r.desc, v),
                    0x84 => set_high(&mut r.desc, v),
                    0x90 => set_low(&mut r.avail, v),
                    0x94 => set_high(&mut r.avail, v),
                    0xa0 => set_low(&mut r.used, v),
                    _ => set_high(&mut r.used, v),
                }
            }
            _ => log::debug!(
                "{}: write {v:#x} to read-only or unknown register {offset:#x}",
                self.device.name()
            ),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            self.device.read_config(offset - CONFIG_START, data);
            return;
        }
        let v = if data.len() == 4 && offset.is_multiple_of(4) {
            self.read_reg(offset)
        } else {
            log::debug!(
                "{}: {}-byte read of register {offset:#x} ignored",
                self.device.name(),
                data.len()
            );
            0
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_START {
            self.device.write_config(offset - CONFIG_START, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(b) if offset.is_multiple_of(4) => self.write_reg(offset, u32::from_le_bytes(b)),
            _ => log::debug!(
                "{}: {}-byte write of register {offset:#x} ignored",
                self.device.name(),
                data.len()
            ),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
