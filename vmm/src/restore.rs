//! Building a VM from a saved [`MachineState`] and its guest memory (mapped from a
//! snapshot's memory file): the same machine as `wisp run` builds, with every piece of
//! state loaded back instead of a kernel being booted.

use std::time::Instant;

use devices::bus::lock;
use devices::legacy::serial::SerialOutput;
use devices::legacy::SerialStateError;
use devices::virtio::persist::PersistError;
use kvm_ioctls::Kvm;
use thiserror::Error;

use crate::arch::vm_state::{self, VmStateError};
use crate::memory::{self, GuestMemory};
use crate::state::MachineState;
use crate::vm::{create_vcpus, create_vm, wire_devices, Vm, VmError};

/// A part of the snapshot that could not be loaded into the new VM.
#[derive(Debug, Error)]
pub enum RestoreError {
    /// The irqchip, PIT or clock.
    #[error(transparent)]
    VmState(#[from] VmStateError),
    /// COM1.
    #[error("serial: {0}")]
    Serial(SerialStateError),
    /// A virtio device.
    #[error(transparent)]
    Device(#[from] PersistError),
}

/// How to restore beyond what the snapshot says.
pub struct RestoreOptions {
    /// wisp's process start.
    pub start: Instant,
    /// Where guest serial output goes.
    pub serial_output: SerialOutput,
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
        let config = &state.config;
        let vm_fd = create_vm(&kvm)?;
        memory::register(&vm_fd, &mem)?;
        let wired = wire_devices(
            &vm_fd,
            &mem,
            config,
            opts.start,
            opts.serial_output,
            Some(&state.devices.serial),
        )?;
        // KVM state first, then devices: a device restore may raise its interrupt,
        // which must land in the restored irqchip and LAPICs, not be overwritten by them.
        let vcpus = create_vcpus(&kvm, &vm_fd, config.cpus, &wired, &mem)?;
        vm_state::restore(&vm_fd, &state.vm).map_err(RestoreError::from)?;
        for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
            vcpu.restore(saved)?;
        }
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
        Ok(Self::assemble(
            kvm, vm_fd, mem, config, wired, vcpus, None, opts.start,
        ))
    }
}
