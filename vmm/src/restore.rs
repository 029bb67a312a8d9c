//! Building a VM from a saved [`MachineState`] and its guest memory: the same machine
//! as `wisp run` builds, with every piece of state loaded back instead of a kernel
//! being booted.
//!
//! Two steps, so that a migration's destination can do the slow one while memory
//! still arrives: [`Vm::prepare`] makes the machine of a configuration (VM, memory
//! slots, devices and their backends, vCPUs), [`Prepared::load`] loads the state into
//! it. `wisp restore` does both at once ([`Vm::restore`]).

use std::time::Instant;

use devices::bus::lock;
use devices::legacy::serial::SerialOutput;
use devices::legacy::SerialStateError;
use devices::virtio::persist::PersistError;
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;

use crate::arch::vm_state::{self, VmStateError};
use crate::config::VmConfig;
use crate::device_manager::DiskLocks;
use crate::memory::{self, GuestMemory};
use crate::state::MachineState;
use crate::vcpu::Vcpu;
use crate::vm::{create_vcpus, create_vm, wire_devices, Parts, Vm, VmError, Wired};

/// A part of the state that could not be loaded into the new VM.
#[derive(Debug, Error)]
pub enum RestoreError {
    /// The irqchip, PIT or clock.
    #[error(transparent)]
    VmState(#[from] VmStateError),
    /// COM1.
    #[error("serial: {0}")]
    Serial(#[from] SerialStateError),
    /// A virtio device.
    #[error(transparent)]
    Device(#[from] PersistError),
    /// A device could not take its host resources (a disk's image lock).
    #[error("{device}: {source}")]
    Claim {
        /// The device.
        device: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// How to restore beyond what the state says.
pub struct RestoreOptions {
    /// wisp's process start.
    pub start: Instant,
    /// Where guest serial output goes.
    pub serial_output: SerialOutput,
}

/// The machine of a configuration, with no state loaded yet.
pub struct Prepared {
    kvm: Kvm,
    vm_fd: VmFd,
    mem: GuestMemory,
    config: VmConfig,
    wired: Wired,
    vcpus: Vec<Vcpu>,
    start: Instant,
}

impl Vm {
    /// Builds the VM saved in `state` (its configuration possibly changed by the user:
    /// name, disk paths, network backends) on `mem`, which holds its RAM, ready to
    /// continue where it stopped. The caller has validated the state.
    pub fn restore(
        kvm: Kvm,
        state: MachineState,
        mem: GuestMemory,
        opts: RestoreOptions,
    ) -> Result<Self, VmError> {
        Self::prepare(kvm, state.config.clone(), mem, opts, DiskLocks::Now)?.load(&state)
    }

    /// Makes the machine of `config` on `mem` (validated by the caller): the VM and its
    /// memory slots, the devices with their backends (disk images locked as
    /// `disk_locks` says), and the vCPUs, not configured.
    pub fn prepare(
        kvm: Kvm,
        config: VmConfig,
        mem: GuestMemory,
        opts: RestoreOptions,
        disk_locks: DiskLocks,
    ) -> Result<Prepared, VmError> {
        let vm_fd = create_vm(&kvm)?;
        memory::register(&vm_fd, &mem)?;
        let wired = wire_devices(
            &vm_fd,
            &mem,
            &config,
            opts.start,
            opts.serial_output,
            disk_locks,
        )?;
        let vcpus = create_vcpus(&kvm, &vm_fd, config.cpus, &wired, &mem)?;
        Ok(Prepared {
            kvm,
            vm_fd,
            mem,
            config,
            wired,
            vcpus,
            start: opts.start,
        })
    }
}

impl Prepared {
    /// The configuration it was made for.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The guest memory the state's RAM goes into.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Has every device take its host resources (disk image locks) that it was
    /// prepared without.
    pub fn claim_host(&self) -> Result<(), VmError> {
        for t in &self.wired.virtio.transports {
            let mut t = lock(t);
            t.claim_host().map_err(|source| RestoreError::Claim {
                device: t.name().to_string(),
                source,
            })?;
        }
        Ok(())
    }

    /// Loads `state` (validated by the caller, for this configuration) and returns the
    /// VM ready to run.
    pub fn load(self, state: &MachineState) -> Result<Vm, VmError> {
        let Prepared {
            kvm,
            vm_fd,
            mem,
            config,
            wired,
            vcpus,
            start,
        } = self;
        // KVM state first, then devices: a device restore may raise its interrupt,
        // which must land in the restored irqchip and LAPICs, not be overwritten by them.
        vm_state::restore(&vm_fd, &state.vm).map_err(RestoreError::from)?;
        for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
            vcpu.restore(saved)?;
        }
        lock(&wired.serial)
            .load(&state.devices.serial)
            .map_err(RestoreError::from)?;
        wired.connect_serial(&vm_fd)?;
        lock(&wired.i8042).restore(&state.devices.i8042);
        for (transport, saved) in wired.virtio.transports.iter().zip(&state.devices.virtio) {
            lock(transport).restore(saved).map_err(RestoreError::from)?;
        }
        log::debug!(
            "restored {}: {} vCPU(s), {} MiB, {} device(s)",
            config.name,
            config.cpus,
            config.memory_mib,
            state.devices.virtio.len()
        );
        let guest_cpuid = state
            .vcpus
            .first()
            .map(|v| v.cpuid.clone())
            .unwrap_or_default();
        Ok(Vm::assemble(Parts {
            kvm,
            vm_fd,
            mem,
            config,
            wired,
            vcpus,
            guest_cpuid,
            entry: None,
            start,
        }))
    }
}
