//! Initial vCPU register state for the two entry protocols:
//! - Linux 64-bit boot protocol: long mode, identity paging of 0..4 GiB, flat
//!   `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18), `rsi` = zero page;
//! - PVH: 32-bit protected mode, paging off, flat segments, `rbx` = `hvm_start_info`.
//!
//! Plus what every vCPU needs whatever the entry: FPU, boot MSRs, LAPIC LINT0/LINT1.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::gdt::{segment_from_gdt, CODE32, CODE64, DATA, TSS};
use super::layout::{
    BOOT_GDT_START, BOOT_STACK_POINTER, PDPT_START, PD_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PDE_PRESENT_RW: u64 = 0x3;
const PDE_HUGE: u64 = 0x80;
const PAGE_TABLE_ENTRIES: u64 = 512;
const IDENTITY_MAPPED_GIB: u64 = 4;

/// GDT for the 64-bit boot protocol: `__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18, TSS at 0x20.
pub const GDT_LINUX64: [u64; 5] = [0, 0, CODE64, DATA, TSS];
/// GDT for PVH: CS 0x8, DS 0x10, TSS 0x18.
pub const GDT_PVH: [u64; 4] = [0, CODE32, DATA, TSS];

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors setting up registers.
#[derive(Debug, Error)]
pub enum RegsError {
    /// Guest memory write failed.
    #[error("cannot write boot page tables or GDT: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// The MSR list could not be built.
    #[error("cannot build the boot MSR list")]
    Msrs,
}

/// How the vCPU enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// Linux 64-bit boot protocol at this address.
    Linux64(u64),
    /// PVH 32-bit entry at this address.
    Pvh(u64),
}

/// Writes the identity page tables (0..4 GiB, 2 MiB pages) for the 64-bit entry.
pub fn write_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), RegsError> {
    mem.write_obj(PDPT_START | PDE_PRESENT_RW, GuestAddress(PML4_START))?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PD_START + gib * 0x1000;
        mem.write_obj(pd | PDE_PRESENT_RW, GuestAddress(PDPT_START + gib * 8))?;
        let entries: Vec<u8> = (0..PAGE_TABLE_ENTRIES)
            .flat_map(|i| {
                let addr = (gib << 30) | (i << 21);
                (addr | PDE_PRESENT_RW | PDE_HUGE).to_le_bytes()
            })
            .collect();
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(())
}

fn write_gdt<M: GuestMemoryBackend>(mem: &M, gdt: &[u64]) -> Result<(), RegsError> {
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_START))?;
    Ok(())
}

/// Special registers for `entry`, starting from the vCPU's current `sregs`. Writes the
/// GDT (and for the 64-bit entry the page tables) into guest memory.
pub fn setup_sregs<M: GuestMemoryBackend>(
    mem: &M,
    entry: EntryPoint,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let (gdt, code, data, tss): (&[u64], u8, u8, u8) = match entry {
        EntryPoint::Linux64(_) => (&GDT_LINUX64, 2, 3, 4),
        EntryPoint::Pvh(_) => (&GDT_PVH, 1, 2, 3),
    };
    write_gdt(mem, gdt)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let data_seg = segment_from_gdt(gdt[usize::from(data)], data);
    sregs.cs = segment_from_gdt(gdt[usize::from(code)], code);
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = segment_from_gdt(gdt[usize::from(tss)], tss);
    match entry {
        EntryPoint::Linux64(_) => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryPoint::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// General registers for `entry`.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    match entry {
        EntryPoint::Linux64(rip) => kvm_regs {
            rflags: 0x2,
            rip,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        EntryPoint::Pvh(rip) => kvm_regs {
            rflags: 0x2,
            rip,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    }
}

/// FPU state after reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs every vCPU starts with.
pub fn boot_msrs() -> Result<Msrs, RegsError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ];
    Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs)
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = lapic.regs[offset + i] as u8;
    }
    u32::from_le_bytes(b)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as _;
    }
}

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Configures LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI, as firmware would.
pub fn setup_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, set_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, set_delivery_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn long_mode_sregs_and_tables() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_sregs(&m, EntryPoint::Linux64(0x100_0000), &mut s).unwrap();
        assert_eq!(s.cs.selector, 0x10, "__BOOT_CS");
        assert_eq!(s.ds.selector, 0x18, "__BOOT_DS");
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPT_START | 3);
        // Last 2 MiB page below 4 GiB maps to itself.
        let last: u64 = m
            .read_obj(GuestAddress(PD_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last, 0xffe0_0000 | 0x83);
        let gdt2: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 16)).unwrap();
        assert_eq!(gdt2, CODE64);
        let r = boot_regs(EntryPoint::Linux64(0x100_0000));
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0000, ZERO_PAGE_START, 2));
    }

    #[test]
    fn pvh_sregs_are_flat_protected_mode_without_paging() {
        let m = mem();
        let mut s = kvm_sregs {
            cr0: X86_CR0_PG,
            ..Default::default()
        };
        setup_sregs(&m, EntryPoint::Pvh(0x20_0000), &mut s).unwrap();
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((s.cs.db, s.cs.l, s.cs.limit), (1, 0, 0xffff_ffff));
        assert_eq!((s.tr.limit, s.tr.type_), (0x67, 0xb));
        assert_eq!(s.efer, 0);
        let r = boot_regs(EntryPoint::Pvh(0x20_0000));
        assert_eq!((r.rip, r.rbx), (0x20_0000, PVH_INFO_START));
    }

    #[test]
    fn lint_delivery_modes() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0700);
        setup_lint(&mut l);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x0001_0700);
        assert_eq!((lapic_reg(&l, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
        assert!(boot_msrs().unwrap().as_slice().len() > 5);
    }
}
