//! CPU structures shared with entry.rs, and the CPL0 exception handler.
//!
//! The GDT, TSS, IDT and page tables themselves are prebuilt data in
//! entry.rs; this module holds the constants they are built from and the
//! (CPL3) Rust side of the exception path.

use crate::{io, status};

/// Kernel 64-bit code segment selector.
pub const SEL_KCODE: u16 = 0x08;
/// Kernel data segment selector.
pub const SEL_KDATA: u16 = 0x10;
/// User data segment selector (RPL 0; OR in 3 to use it).
pub const SEL_UDATA: u16 = 0x18;
/// User 64-bit code segment selector (RPL 0; OR in 3 to use it).
pub const SEL_UCODE: u16 = 0x20;
/// 64-bit TSS selector.
pub const SEL_TSS: u16 = 0x28;

/// CPL0 stack (TSS.rsp0) size.
pub const KSTACK_SIZE: usize = 16 * 1024;
/// IST1 stack (NMI, #DF, #MC) size.
pub const IST_STACK_SIZE: usize = 16 * 1024;
/// CPL3 stack size.
pub const USTACK_SIZE: usize = 256 * 1024;

/// Stack of the CPL3 exception reporter.
pub const FAULT_STACK_SIZE: usize = 64 * 1024;

/// Exception vector of a page fault.
pub const VECTOR_PF: u64 = 14;

/// What the CPL0 exception path (entry.rs) saves for the reporter.
#[repr(C)]
pub struct FaultFrame {
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub cr2: u64,
}

const MNEMONICS: [&str; 32] = [
    "DE", "DB", "NMI", "BP", "OF", "BR", "UD", "NM", "DF", "CSO", "TS", "NP", "SS", "GP", "PF",
    "RSVD15", "MF", "AC", "MC", "XM", "VE", "CP", "RSVD22", "RSVD23", "RSVD24", "RSVD25", "RSVD26",
    "RSVD27", "HV", "VC", "SX", "RSVD31",
];

/// Entered in CPL3 (on its own stack) after any CPU exception, with the
/// frame the CPL0 stub saved. Prints one line and exits with status
/// `EXCEPTION_BASE + vector`.
pub extern "C" fn exception_report(frame: *const FaultFrame) -> ! {
    // SAFETY: entry.rs passes the address of probe_fault_frame, a static
    // FaultFrame that the CPL0 stub filled and nothing writes any more
    // (a second exception exits from CPL0 without touching it).
    let f = unsafe { &*frame };
    let vector = (f.vector & 0x1f) as u8;
    let cr2 = Cr2(f.vector == VECTOR_PF, f.cr2);
    println!(
        "probe: exception #{} vector={} error={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x}{cr2}",
        MNEMONICS[usize::from(vector)],
        vector,
        f.error,
        f.rip,
        f.cs,
        f.rflags,
        f.rsp,
    );
    io::exit(status::EXCEPTION_BASE + vector)
}

/// Prints ` cr2=...` for page faults only.
struct Cr2(bool, u64);

impl core::fmt::Display for Cr2 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 {
            write!(f, " cr2={:#x}", self.1)
        } else {
            Ok(())
        }
    }
}
