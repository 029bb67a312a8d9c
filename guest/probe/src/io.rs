//! x86 port I/O from CPL3, and the VMM's control ports.
//!
//! The probe runs with RFLAGS.IOPL=3, so `in`/`out` work directly in CPL3
//! on KVM. The nested KVM of the project's machines does not honour IOPL
//! for guest CPL3: there each access raises #GP and entry.rs's #GP handler
//! performs it in CPL0 (a few emulated instructions). Only the `dx` forms
//! below are emulated: keep all port I/O in this module.

/// Writing status N here makes the VMM exit with process status N.
pub const EXIT_PORT: u16 = 0x500;
/// Writing BOOTDONE_VALUE here tells the VMM the guest has booted.
pub const BOOTDONE_PORT: u16 = 0x501;
/// Value written to BOOTDONE_PORT.
pub const BOOTDONE_VALUE: u8 = 0x7b;

/// Writes a byte to an I/O port.
///
/// # Safety
/// Port writes can have arbitrary device side effects; the caller must
/// know what the device at `port` does with `val`.
#[inline(always)]
pub unsafe fn outb(port: u16, val: u8) {
    // SAFETY: the caller upholds this function's contract. `out` touches
    // no memory; if it traps (see module doc), the handler runs on the CPL0
    // stack and restores RFLAGS.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") val,
                         options(nomem, nostack, preserves_flags))
    };
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// Port reads can have device side effects (e.g. clearing status).
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let val: u8;
    // SAFETY: as for outb.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") val,
                         options(nomem, nostack, preserves_flags))
    };
    val
}

/// Asks the VMM to exit with `status`; spins if it does not.
pub fn exit(status: u8) -> ! {
    // SAFETY: EXIT_PORT is the VMM's exit device; writing it only ends
    // the VM (or is ignored, e.g. under QEMU).
    unsafe { outb(EXIT_PORT, status) };
    loop {
        core::hint::spin_loop();
    }
}

/// Signals boot completion to the VMM.
pub fn boot_done() {
    // SAFETY: BOOTDONE_PORT is the VMM's boot-complete device; the write
    // only records an event.
    unsafe { outb(BOOTDONE_PORT, BOOTDONE_VALUE) };
}
