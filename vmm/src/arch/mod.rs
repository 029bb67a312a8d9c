//! x86_64 machine description: memory layout, boot structures, CPU set-up.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;
