//! Virtio device state for snapshots (and live migration), as plain serde structs.
//!
//! [`MmioTransport::save`] captures the register file, every queue (including the
//! registers of queues the driver has not enabled yet, so a VM snapshotted mid-probe
//! restores too) and the device's own state ([`VirtioDevice::save`]).
//!
//! A snapshot is untrusted input. [`MmioTransport::restore`] validates all of it against
//! the device it is restored into (a freshly created one, opened with the same
//! configuration) before it changes anything, and leaves that device as it was if it
//! returns an error.

use std::mem;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};

use super::mmio::{status, MmioTransport, QueueRegs};
use super::net::MacAddr;
use super::{rings_in_memory, DeviceError, F_EVENT_IDX, F_VERSION_1, INT_CONFIG, INT_VRING};

/// One virtqueue: the driver's configuration and the device's ring positions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// The largest size the device offers (must match the device restored into).
    pub max_size: u16,
    /// The size the driver wrote (checked only if the queue is ready).
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
    /// The next available-ring entry the device will read.
    pub next_avail: u16,
    /// The next used-ring entry the device will write.
    pub next_used: u16,
    /// VIRTIO_F_EVENT_IDX is in effect on this queue.
    pub event_idx: bool,
}

/// A virtio-mmio transport and the device behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// Virtio device type.
    pub device_type: u32,
    /// The device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver wrote (a subset of the device's).
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The interrupt status register (ISR bits not yet acknowledged).
    pub interrupt_status: u32,
    /// Every queue, in virtio order.
    pub queues: Vec<QueueState>,
    /// The device-specific part.
    pub device: DeviceState,
}

/// The device-specific state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceState {
    /// virtio-blk.
    Block(BlockState),
    /// virtio-net.
    Net(NetState),
}

impl DeviceState {
    /// A short name for the kind of device, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Block(_) => "block",
            Self::Net(_) => "net",
        }
    }

    /// The features the device was told the driver accepted.
    pub fn acked_features(&self) -> u64 {
        match self {
            Self::Block(s) => s.acked_features,
            Self::Net(s) => s.acked_features,
        }
    }
}

/// virtio-blk state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Disk size in 512-byte sectors; restore refuses a disk whose size changed.
    pub capacity: u64,
}

/// virtio-net state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The card's address (must match the device restored into).
    pub mac: MacAddr,
    /// Link status as the driver sees it.
    pub link_up: bool,
    /// The guest was asked to announce itself and has not acknowledged yet.
    #[serde(default)]
    pub announce: bool,
    /// A frame (with its virtio-net header) already read from the backend but not yet
    /// delivered to the guest; empty if none.
    pub rx_pending: Vec<u8>,
}

/// A snapshot that cannot be restored into this device. Every message names the
/// device (its log name) and the problem.
#[derive(Debug, Error)]
pub enum PersistError {
    /// Restore needs a freshly created device.
    #[error("{name}: cannot restore into a device the guest already uses (status {status:#x})")]
    NotFresh {
        /// The device's log name.
        name: String,
        /// Its status register.
        status: u32,
    },
    /// The snapshot is of another type of device.
    #[error("{name}: snapshot is of virtio device type {snapshot}, the device is type {device}")]
    DeviceType {
        /// The device's log name.
        name: String,
        /// Type in the snapshot.
        snapshot: u32,
        /// Type of the device.
        device: u32,
    },
    /// The device-specific state is of another kind of device.
    #[error("{name}: snapshot holds {snapshot} device state, the device is {device}")]
    Kind {
        /// The device's log name.
        name: String,
        /// Kind in the snapshot.
        snapshot: &'static str,
        /// Kind of the device.
        device: &'static str,
    },
    /// The number of queues differs.
    #[error("{name}: snapshot has {snapshot} queues, the device has {device}")]
    QueueCount {
        /// The device's log name.
        name: String,
        /// Queues in the snapshot.
        snapshot: usize,
        /// Queues of the device.
        device: usize,
    },
    /// A queue's state is invalid.
    #[error("{name}: snapshot queue {index}: {problem}")]
    Queue {
        /// The device's log name.
        name: String,
        /// The queue.
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// Feature bits the device does not offer.
    #[error("{name}: snapshot {what} {features:#x} include bits the device does not offer ({unknown:#x})")]
    Features {
        /// The device's log name.
        name: String,
        /// Which feature set ("driver features", "acked features").
        what: &'static str,
        /// The features in the snapshot.
        features: u64,
        /// The bits the device does not offer.
        unknown: u64,
    },
    /// The acked features disagree with the negotiation recorded in the transport.
    #[error("{name}: snapshot device acked features {acked:#x}, but the transport negotiated {negotiated:#x}")]
    AckedFeatures {
        /// The device's log name.
        name: String,
        /// The device's acked features in the snapshot.
        acked: u64,
        /// What the transport's status and driver features imply.
        negotiated: u64,
    },
    /// The status register is impossible.
    #[error("{name}: snapshot device status {status:#x}: {problem}")]
    Status {
        /// The device's log name.
        name: String,
        /// The status in the snapshot.
        status: u32,
        /// What is wrong.
        problem: &'static str,
    },
    /// The interrupt status has bits no device sets.
    #[error("{name}: snapshot interrupt status {value:#x} has unknown bits")]
    InterruptStatus {
        /// The device's log name.
        name: String,
        /// The value in the snapshot.
        value: u32,
    },
    /// The disk changed size.
    #[error("{name}: snapshot disk has {snapshot} sectors, the disk now has {device}; restore needs the image the snapshot was taken with")]
    Capacity {
        /// The device's log name.
        name: String,
        /// Sectors in the snapshot.
        snapshot: u64,
        /// Sectors of the disk now.
        device: u64,
    },
    /// The MAC address differs.
    #[error("{name}: snapshot MAC is {snapshot}, the device is configured with {device}")]
    Mac {
        /// The device's log name.
        name: String,
        /// MAC in the snapshot.
        snapshot: MacAddr,
        /// MAC of the device.
        device: MacAddr,
    },
    /// The pending RX frame cannot be a frame.
    #[error("{name}: snapshot pending RX frame is {len} bytes; it must be empty or {min} to {max} bytes")]
    RxPending {
        /// The device's log name.
        name: String,
        /// Its length.
        len: usize,
        /// Shortest possible frame (its header).
        min: usize,
        /// Longest possible frame.
        max: usize,
    },
    /// The restored device could not be activated.
    #[error("{name}: cannot activate the restored device: {source}")]
    Activate {
        /// The device's log name.
        name: String,
        /// Cause.
        source: DeviceError,
    },
}

impl PersistError {
    /// Refuses `features` (`what`: "driver features", "acked features") with bits the
    /// device `name` does not offer.
    pub fn check_features(
        name: &str,
        what: &'static str,
        features: u64,
        offered: u64,
    ) -> Result<(), PersistError> {
        let unknown = features & !offered;
        if unknown != 0 {
            return Err(PersistError::Features {
                name: name.to_string(),
                what,
                features,
                unknown,
            });
        }
        Ok(())
    }
}

/// Status bits a driver (or the device, for NEEDS_RESET) can set.
const KNOWN_STATUS: u32 = status::ACKNOWLEDGE
    | status::DRIVER
    | status::DRIVER_OK
    | status::FEATURES_OK
    | status::NEEDS_RESET
    | status::FAILED;

/// The transport's scalar registers, to put back if a restore fails late.
struct Registers {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    interrupt_status: u32,
}

impl MmioTransport {
    /// The transport's and the device's state. Take it with the vCPUs paused and the
    /// event loop not processing this device (hold its lock).
    pub fn save(&self) -> TransportState {
        let queues = self
            .queues
            .iter()
            .zip(&self.regs)
            .map(|(q, r)| QueueState {
                max_size: q.max_size(),
                // The registers hold what the driver wrote; once a queue is ready they
                // equal the queue's own configuration (they are frozen while ready).
                size: r.size,
                ready: q.ready(),
                desc_table: r.desc,
                avail_ring: r.avail,
                used_ring: r.used,
                next_avail: q.next_avail(),
                next_used: q.next_used(),
                event_idx: q.event_idx_enabled(),
            })
            .collect();
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.irq.status(),
            queues,
            device: self.device.save(),
        }
    }

    /// Puts the transport and its device into `state` (untrusted: everything is
    /// checked). The transport must be freshly created (status 0), its device opened
    /// with the same configuration as the saved one, and guest memory must already have
    /// its layout. If the device was running, it is activated and every queue eventfd
    /// is signalled so the event loop looks at every ring; a pending interrupt is raised
    /// again. On error nothing changed.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), PersistError> {
        if self.status != 0 {
            return Err(PersistError::NotFresh {
                name: self.name().to_string(),
                status: self.status,
            });
        }
        let (queues, regs) = self.check(state)?;
        let before = self.device.save();
        // The device validates its part before changing anything; its acked features
        // are the negotiated ones (checked above), so it needs no set_acked_features.
        self.device.restore(&state.device)?;
        let old_queues = mem::replace(&mut self.queues, queues);
        let old_regs = mem::replace(&mut self.regs, regs);
        let old = self.set_registers(&Registers {
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            config_generation: state.config_generation,
            interrupt_status: state.interrupt_status,
        });
        if self.running() {
            let (dev, ctx) = self.ctx();
            // A restore runs before the VM does, on the VMM thread: the host side is
            // set up at once, so a backend that cannot follow refuses the state.
            if let Err(source) = dev.activate(ctx).and_then(|()| dev.sync_host()) {
                self.device.reset();
                if let Err(e) = self.device.restore(&before) {
                    log::error!("{}: cannot roll back a failed restore: {e}", self.name());
                }
                self.queues = old_queues;
                self.regs = old_regs;
                self.set_registers(&old);
                return Err(PersistError::Activate {
                    name: self.name().to_string(),
                    source,
                });
            }
            // Notifications may have been recorded but not processed when the snapshot
            // was taken: a look at every ring costs nothing, a lost one hangs a queue.
            for evt in &self.queue_evts {
                let _ = evt.write(1);
            }
            let (dev, ctx) = self.ctx();
            dev.restored(ctx);
        }
        if self.irq.status() != 0 {
            // Spurious interrupts are harmless; a lost one would hang the driver.
            self.irq.trigger(0);
        }
        Ok(())
    }

    /// Sets the scalar registers, returning the previous values.
    fn set_registers(&mut self, r: &Registers) -> Registers {
        let old = Registers {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.irq.status(),
        };
        self.status = r.status;
        self.device_features_sel = r.device_features_sel;
        self.driver_features_sel = r.driver_features_sel;
        self.driver_features = r.driver_features;
        self.queue_sel = r.queue_sel;
        self.config_generation = r.config_generation;
        self.irq.status = r.interrupt_status;
        old
    }

    /// Validates the transport part of `state` and builds its queues.
    fn check(&self, state: &TransportState) -> Result<(Vec<Queue>, Vec<QueueRegs>), PersistError> {
        let dev = self.device.as_ref();
        let name = || dev.name().to_string();
        if state.device_type != dev.device_type() {
            return Err(PersistError::DeviceType {
                name: name(),
                snapshot: state.device_type,
                device: dev.device_type(),
            });
        }
        let status_problem = if state.status & !KNOWN_STATUS != 0 {
            Some("unknown bits")
        } else if state.status & status::DRIVER_OK != 0 && state.status & status::FEATURES_OK == 0 {
            Some("DRIVER_OK without FEATURES_OK")
        } else if state.status & status::FEATURES_OK != 0
            && state.driver_features & F_VERSION_1 == 0
        {
            Some("FEATURES_OK without VIRTIO_F_VERSION_1")
        } else {
            None
        };
        if let Some(problem) = status_problem {
            return Err(PersistError::Status {
                name: name(),
                status: state.status,
                problem,
            });
        }
        PersistError::check_features(
            dev.name(),
            "driver features",
            state.driver_features,
            dev.features(),
        )?;
        let features_ok = state.status & status::FEATURES_OK != 0;
        let negotiated = if features_ok {
            state.driver_features
        } else {
            0
        };
        if state.device.acked_features() != negotiated {
            return Err(PersistError::AckedFeatures {
                name: name(),
                acked: state.device.acked_features(),
                negotiated,
            });
        }
        if state.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return Err(PersistError::InterruptStatus {
                name: name(),
                value: state.interrupt_status,
            });
        }
        let max_sizes = dev.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(PersistError::QueueCount {
                name: name(),
                snapshot: state.queues.len(),
                device: max_sizes.len(),
            });
        }
        let event_idx = features_ok && state.driver_features & F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut regs = Vec::with_capacity(max_sizes.len());
        for (index, (q, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
            let queue =
                self.check_queue(q, max, event_idx)
                    .map_err(|problem| PersistError::Queue {
                        name: name(),
                        index,
                        problem,
                    })?;
            queues.push(queue);
            regs.push(QueueRegs {
                size: q.size,
                desc: q.desc_table,
                avail: q.avail_ring,
                used: q.used_ring,
            });
        }
        Ok((queues, regs))
    }

    /// Builds one queue from its state, or says what is wrong with it.
    fn check_queue(&self, q: &QueueState, max: u16, event_idx: bool) -> Result<Queue, String> {
        if q.max_size != max {
            return Err(format!(
                "maximum size is {}, the device's is {max}",
                q.max_size
            ));
        }
        if q.event_idx != event_idx {
            return Err(format!(
                "EVENT_IDX {} disagrees with the negotiated features",
                if q.event_idx { "on" } else { "off" }
            ));
        }
        if !q.ready {
            // Registers the driver wrote but has not enabled: checked when it does.
            let mut queue = Queue::new(max).map_err(|e| e.to_string())?;
            queue.set_next_avail(q.next_avail);
            queue.set_next_used(q.next_used);
            queue.set_event_idx(event_idx);
            return Ok(queue);
        }
        let queue = Queue::try_from(virtio_queue::QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: true,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        })
        .map_err(|e| {
            format!(
                "size {}, desc {:#x}, avail {:#x}, used {:#x}: {e}",
                q.size, q.desc_table, q.avail_ring, q.used_ring
            )
        })?;
        rings_in_memory(&queue, &self.mem).map_err(|why| {
            format!(
                "rings (size {}, desc {:#x}, avail {:#x}, used {:#x}): {why}",
                q.size, q.desc_table, q.avail_ring, q.used_ring
            )
        })?;
        let in_flight = q.next_avail.wrapping_sub(q.next_used);
        if in_flight > q.size {
            return Err(format!(
                "{in_flight} buffers in flight (next_avail {}, next_used {}) in a queue of {}",
                q.next_avail, q.next_used, q.size
            ));
        }
        Ok(queue)
    }
}

#[cfg(test)]
mod tests;
