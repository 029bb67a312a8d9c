//! A built VM's machine-level parts, which outlive the boot or restore that made them:
//! the VM fd, guest memory, the configuration and the devices the VMM thread uses
//! directly, and the capture of its [`MachineState`] while the vCPUs are paused.

use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::legacy::{SerialDevice, I8042};
use devices::virtio::mmio::MmioTransport;
use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::VmFd;
use thiserror::Error;

use crate::arch::vm_state::{self, VmStateError};
use crate::config::VmConfig;
use crate::memory::GuestMemory;
use crate::run_control::{SaveStatesError, VcpuThreads};
use crate::state::{DevicesState, MachineState};

/// Why the state could not be captured.
#[derive(Debug, Error)]
pub enum SaveError {
    /// The vCPUs could not report their state.
    #[error("cannot save the vCPUs: {0}")]
    Vcpus(#[from] SaveStatesError),
    /// The VM state could not be read.
    #[error("cannot save the VM: {0}")]
    Vm(#[from] VmStateError),
}

/// The VM, its memory, configuration and the devices the VMM thread reaches directly.
pub struct Machine {
    /// The VM (irqchip, PIT, clock); shared with a migration job for the dirty log.
    pub vm_fd: Arc<VmFd>,
    /// Guest RAM.
    pub mem: GuestMemory,
    /// The configuration, MACs resolved.
    pub config: VmConfig,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The i8042.
    pub i8042: Arc<Mutex<I8042>>,
    /// vCPU 0's CPUID, as the guest sees it (a migration offers its features).
    pub guest_cpuid: Vec<kvm_cpuid_entry2>,
}

impl Machine {
    /// Guest RAM as (guest address, length) regions.
    pub fn mem_layout(&self) -> Vec<(u64, u64)> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect()
    }

    /// Captures the state of the paused VM: every vCPU (each saved by its own thread),
    /// the in-kernel devices and clock, and every device.
    pub fn save_state(
        &self,
        vcpus: &VcpuThreads,
        transports: &[Arc<Mutex<MmioTransport>>],
    ) -> Result<MachineState, SaveError> {
        let vcpus = vcpus.save_states()?;
        let vm = vm_state::save(&self.vm_fd)?;
        let devices = DevicesState {
            serial: lock(&self.serial).snapshot(),
            i8042: lock(&self.i8042).snapshot(),
            virtio: transports.iter().map(|t| lock(t).save()).collect(),
        };
        Ok(MachineState {
            wisp_version: env!("CARGO_PKG_VERSION").to_string(),
            config: self.config.clone(),
            vm,
            vcpus,
            devices,
        })
    }
}
