//! x86_64 machine description: memory layout, boot structures, CPU set-up.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod kvm_serde;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod vcpu_state;
pub mod vm_state;

/// The byte that makes `bytes` sum to zero (mod 256), as MP and ACPI tables require.
pub(crate) fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}
