//! The VM-wide KVM state as plain serde data: the in-kernel PICs and IOAPIC, the PIT
//! and the KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A VM-level KVM ioctl failed.
#[derive(Debug, Error)]
#[error("{what} failed: {source}")]
pub struct VmStateError {
    /// The ioctl.
    pub what: &'static str,
    /// Cause.
    pub source: kvm_ioctls::Error,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError { what, source }
}

/// The in-kernel devices' state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    #[serde(with = "super::kvm_serde::exact")]
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    #[serde(with = "super::kvm_serde::exact")]
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    #[serde(with = "super::kvm_serde::exact")]
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    #[serde(with = "super::kvm_serde::exact")]
    pub pit: kvm_pit_state2,
    /// The KVM clock (kvmclock's time base).
    #[serde(with = "super::kvm_serde::exact")]
    pub clock: kvm_clock_data,
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Reads the state of `vm` (its vCPUs must be outside KVM_RUN).
pub fn save(vm: &VmFd) -> Result<VmState, VmStateError> {
    Ok(VmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

/// Loads `state` into a VM whose irqchip and PIT exist.
pub fn restore(vm: &VmFd, state: &VmState) -> Result<(), VmStateError> {
    // The chip ids come from the file: force them, so a corrupt id cannot load one chip's
    // state into another.
    for (chip, id) in [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        let mut chip = *chip;
        chip.chip_id = id;
        vm.set_irqchip(&chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
    // The clock continues from the saved value: no flags, so KVM neither adds the time
    // that passed (KVM_CLOCK_REALTIME) nor expects a host TSC reference.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}
