//! Creating the virtio-mmio devices of a VM: one 4 KiB MMIO window and one GSI each,
//! an irqfd for the interrupt and one ioeventfd per queue on QueueNotify.
//!
//! Slot `i` lives at `MMIO_DEVICES_START + i * 4 KiB` with GSI `FIRST_VIRTIO_GSI + i`;
//! disks come first (in `--disk` order, so the first is /dev/vda), then network cards.
//! ACPI kernels find the devices in the DSDT (`LNRO0005`, the ID Linux's virtio_mmio
//! driver matches); kernels booted with `acpi=off` get `virtio_mmio.device=` entries
//! on the command line instead (see [`cmdline_entries`]).

use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::virtio::block::{Block, BlockError};
use devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use devices::virtio::net::backend::Backend;
use devices::virtio::net::stream::StreamBackend;
use devices::virtio::net::tap::{Tap, TapError};
use devices::virtio::net::{MacAddr, Net};
use devices::virtio::{DeviceError, VirtioDevice};
use devices::BusError;
use kvm_ioctls::{IoEventAddress, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::MMIO_DEVICES_START;
use crate::config::{NetBackend, VmConfig};
use crate::memory::GuestMemory;
use crate::usernet::{self, UserNetError};

/// GSI of virtio slot 0 (ISA IRQs 0-4 are the PIT, i8042, cascade, COM2 and COM1).
pub const FIRST_VIRTIO_GSI: u32 = 5;
/// Name template for TAPs wisp creates in bridge mode (the kernel fills in %d).
const BRIDGE_TAP_TEMPLATE: &str = "wisp%d";

/// Errors creating devices.
#[derive(Debug, Error)]
pub enum DeviceManagerError {
    /// A disk image.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A TAP.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// User-mode networking.
    #[error(transparent)]
    UserNet(#[from] UserNetError),
    /// A KVM ioctl.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// The MMIO bus.
    #[error("virtio MMIO window: {0}")]
    Bus(#[from] BusError),
    /// The transport.
    #[error("virtio transport: {0}")]
    Device(#[from] DeviceError),
    /// eventfd.
    #[error("eventfd: {0}")]
    Io(#[from] std::io::Error),
}

/// Where one device sits in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Base of its MMIO window.
    pub base: u64,
    /// Its GSI (IOAPIC pin).
    pub gsi: u32,
}

impl VirtioSlot {
    /// Slot `index`.
    pub fn new(index: usize) -> Self {
        Self {
            base: MMIO_DEVICES_START + index as u64 * MMIO_WINDOW,
            gsi: FIRST_VIRTIO_GSI + index as u32,
        }
    }
}

/// A VM's virtio devices.
#[derive(Default)]
pub struct VirtioDevices {
    /// The transports, shared with the MMIO bus.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Their slots, in the same order.
    pub slots: Vec<VirtioSlot>,
}

/// The `virtio_mmio.device=SIZE@BASE:GSI` words for kernels without ACPI.
pub fn cmdline_entries(slots: &[VirtioSlot]) -> String {
    slots
        .iter()
        .map(|s| format!("virtio_mmio.device=4K@{:#x}:{}", s.base, s.gsi))
        .collect::<Vec<_>>()
        .join(" ")
}

/// When disk images are locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskLocks {
    /// When they are opened (`wisp run`, `wisp restore`).
    Now,
    /// When each device claims its host resources (`VirtioDevice::claim_host`): a
    /// migration's destination, whose source holds the locks until the hand-over.
    AtClaim,
}

/// Checks what can be checked of `config`'s backends without creating them, so a
/// missing disk or TAP is one error line before wisp measures the host or logs
/// anything: each disk opens (as it will be opened, without its lock), each TAP and
/// bridge exists, passt is installed and each forward's host port is free.
pub fn check_backends(config: &VmConfig) -> Result<(), DeviceManagerError> {
    for (i, disk) in config.disks.iter().enumerate() {
        drop(Block::open_unlocked(disk, format!("virtio-blk{i}"))?);
    }
    for net in &config.nets {
        match &net.backend {
            NetBackend::Tap(name) => Tap::check_exists(name)?,
            NetBackend::Bridge(br) => Tap::check_bridge(br)?,
            NetBackend::User(user) => usernet::check(user)?,
        }
    }
    Ok(())
}

fn create_devices(
    config: &VmConfig,
    disk_locks: DiskLocks,
) -> Result<Vec<Box<dyn VirtioDevice>>, DeviceManagerError> {
    let mut out: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let name = format!("virtio-blk{i} ({})", disk.path.display());
        out.push(Box::new(match disk_locks {
            DiskLocks::Now => Block::open(disk, name)?,
            DiskLocks::AtClaim => Block::open_unlocked(disk, name)?,
        }));
    }
    for (i, net) in config.nets.iter().enumerate() {
        let backend: Box<dyn Backend> = match &net.backend {
            NetBackend::Tap(name) => Box::new(Tap::open(name)?),
            NetBackend::Bridge(br) => {
                let tap = Tap::create_on_bridge(BRIDGE_TAP_TEMPLATE, br)?;
                log::info!("created TAP {} on bridge {br}", tap.name());
                Box::new(tap)
            }
            NetBackend::User(user) => {
                let (stream, reconnect) = usernet::start(user)?;
                Box::new(StreamBackend::new("passt".into(), stream, reconnect)?)
            }
        };
        let mac = net
            .mac
            .unwrap_or_else(|| MacAddr::derived(&format!("{}/{i}", config.name)));
        let name = format!("virtio-net{i} ({}, {mac})", backend.describe());
        out.push(Box::new(Net::new(name, backend, mac)));
    }
    Ok(out)
}

/// Opens the backends of `config`'s disks and network cards, and wires each device into
/// `mmio_bus` and KVM.
pub fn attach(
    vm_fd: &VmFd,
    mem: &GuestMemory,
    mmio_bus: &mut Bus,
    config: &VmConfig,
    disk_locks: DiskLocks,
) -> Result<VirtioDevices, DeviceManagerError> {
    let mut out = VirtioDevices::default();
    for (index, device) in create_devices(config, disk_locks)?.into_iter().enumerate() {
        let slot = VirtioSlot::new(index);
        let irqfd = EventFd::new(EFD_NONBLOCK)?;
        vm_fd
            .register_irqfd(&irqfd, slot.gsi)
            .map_err(|e| DeviceManagerError::Kvm("KVM_IRQFD (virtio)", e))?;
        let transport = MmioTransport::new(device, mem.clone(), irqfd)?;
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            vm_fd
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY),
                    q as u32,
                )
                .map_err(|e| DeviceManagerError::Kvm("KVM_IOEVENTFD", e))?;
        }
        log::debug!("{} at {:#x}, GSI {}", transport.name(), slot.base, slot.gsi);
        let transport = Arc::new(Mutex::new(transport));
        mmio_bus.insert(transport.clone(), slot.base, MMIO_WINDOW)?;
        out.transports.push(transport);
        out.slots.push(slot);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_cmdline() {
        let slots = [VirtioSlot::new(0), VirtioSlot::new(1)];
        assert_eq!(slots[1].base, 0xd000_1000);
        assert_eq!(slots[1].gsi, 6);
        assert_eq!(
            cmdline_entries(&slots),
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        // The last slot's GSI is still an IOAPIC pin.
        assert!(VirtioSlot::new(crate::config::MAX_VIRTIO_DEVICES - 1).gsi < 24);
    }
}
