//! The machine's state as data: what a snapshot stores and a live migration sends.
//!
//! [`MachineState`] is captured by [`crate::machine::Machine::save_state`] while the VM
//! is paused, and loaded by [`crate::restore`]; where it goes (a snapshot directory, a
//! migration stream) is the business of the code that writes it. [`format`] is the
//! encoding both use (header, CRC-64, JSON body).

pub mod format;
pub mod pages;

use devices::legacy::serial::SerialSnapshot;
use devices::legacy::I8042State;
use devices::virtio::persist::TransportState;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::arch::vcpu_state::VcpuState;
use crate::arch::vm_state::VmState;
use crate::config::VmConfig;

/// A state whose parts contradict each other (only a buggy or hostile writer gets past
/// the checksum with one).
#[derive(Debug, Error)]
#[error("the state is inconsistent: {0}")]
pub struct InconsistentState(pub String);

/// Every device's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialSnapshot,
    /// The i8042 controller.
    pub i8042: I8042State,
    /// The virtio devices, in slot order (disks, then network cards).
    pub virtio: Vec<TransportState>,
}

/// Everything about a paused VM except its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// The wisp that wrote it (informational).
    pub wisp_version: String,
    /// The machine configuration, as `wisp run` was given it (MACs resolved).
    pub config: VmConfig,
    /// In-kernel irqchip, PIT and clock.
    pub vm: VmState,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Every device.
    pub devices: DevicesState,
}

impl MachineState {
    /// Checks that the parts agree with the configuration (the configuration itself is
    /// checked by [`VmConfig::validate`]).
    pub fn check(&self) -> Result<(), InconsistentState> {
        let c = &self.config;
        let bad = |m: String| Err(InconsistentState(m));
        if self.vcpus.len() != usize::from(c.cpus) {
            return bad(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                c.cpus
            ));
        }
        if let Some((i, v)) = self
            .vcpus
            .iter()
            .enumerate()
            .find(|(i, v)| usize::from(v.index) != *i)
        {
            return bad(format!("vCPU state {i} is for vCPU {}", v.index));
        }
        let devices = c.disks.len() + c.nets.len();
        if self.devices.virtio.len() != devices {
            return bad(format!(
                "{} virtio device states for {devices} devices",
                self.devices.virtio.len()
            ));
        }
        Ok(())
    }

    /// The guest RAM layout the configuration implies, as (guest address, length)
    /// pairs; refused if the size overflows.
    pub fn ram_layout(&self) -> Result<Vec<(u64, u64)>, InconsistentState> {
        let mib = self.config.memory_mib;
        mib.checked_mul(1 << 20)
            .map(crate::arch::layout::ram_ranges)
            .ok_or_else(|| InconsistentState(format!("{mib} MiB of RAM")))
    }
}
