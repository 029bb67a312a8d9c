//! wisp `probe`: a tiny test guest for the wisp VMM.
//!
//! Boots through PVH (ELF note) or the Linux 64-bit protocol (`e_entry`),
//! does a minimal CPL0 setup from prebuilt tables (entry.rs), then runs
//! everything in CPL3 with IOPL=3, talking to devices by port I/O, MMIO
//! (virtio) and polling. See `status` for the exit-status contract.

#![no_std]
#![no_main]

#[macro_use]
mod serial;

mod blk;
mod blkhold;
mod blkseq;
mod bootinfo;
mod cmd;
mod counter;
mod cpu;
mod entry;
mod flood;
mod io;
mod mem;
mod mix;
mod net;
mod netproto;
mod tsc;
mod virtio;
mod virtqueue;

/// Exit statuses written to the VMM's exit port ([`io::EXIT_PORT`]).
pub mod status {
    /// All commands ran.
    pub const OK: u8 = 0;
    /// Unknown command or bad argument.
    pub const USAGE: u8 = 2;
    /// Rust panic in the probe.
    pub const PANIC: u8 = 3;
    /// Boot information unusable (bad magic, pointer outside 0..4 GiB, ...).
    pub const BAD_BOOT_INFO: u8 = 4;
    /// A `blk-*` / `net-*` command found no such virtio device.
    pub const NO_DEVICE: u8 = 5;
    /// A virtio device did not answer within the poll bound.
    pub const TIMEOUT: u8 = 6;
    /// A virtio device misbehaved: init failed, DEVICE_NEEDS_RESET
    /// outside `blk-bad`, or a bad used-ring entry.
    pub const DEVICE_ERROR: u8 = 7;
    /// A data check failed (`blk-verify` mismatch, `net-recv` gap,
    /// `counter` corruption, `net-dhcp` NAK).
    pub const CHECK_FAILED: u8 = 8;
    /// CPU exception: status is `EXCEPTION_BASE + vector` (vector 0..31,
    /// so 0xe0..=0xff; e.g. page fault = 0xee = 238).
    pub const EXCEPTION_BASE: u8 = 0xe0;
}

/// First Rust code, called in CPL3 by entry.rs with the protocol id and
/// the boot info pointer it received.
extern "C" fn probe_main(protocol: u64, info: u64) -> ! {
    println!("probe: start");
    // SAFETY: the arguments are exactly what the entry path passed, and
    // the probe's page tables identity-map 0..4 GiB.
    let boot = match unsafe { bootinfo::parse(protocol, info) } {
        Ok(b) => b,
        Err(e) => {
            println!("probe: bad boot info: {e}");
            io::exit(status::BAD_BOOT_INFO)
        }
    };
    if boot.cmdline_truncated {
        println!(
            "probe: warning: cmdline truncated to {} bytes",
            bootinfo::MAX_CMDLINE
        );
    }
    if boot.regions_announced > boot.memory_map().len() as u64 {
        println!(
            "probe: warning: memory map has {} entries, kept {}",
            boot.regions_announced,
            boot.memory_map().len()
        );
    }
    cmd::run_list(cmd::find_list(boot.cmdline()), &boot);
    io::exit(status::OK)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("probe: panic: {info}");
    io::exit(status::PANIC)
}
