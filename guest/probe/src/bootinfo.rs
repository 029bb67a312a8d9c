//! Boot information from either entry path, parsed into one [`BootInfo`].
//!
//! * PVH: `struct hvm_start_info` (Xen public/arch-x86/hvm/start_info.h).
//! * Linux 64-bit boot protocol: `struct boot_params` (the zero page).
//!
//! Everything read from the VMM is bounds-checked: pointers must lie in
//! the identity-mapped 0..4 GiB, counts are clamped, the cmdline is at
//! most [`MAX_CMDLINE`] bytes.

use core::fmt;

/// Protocol id passed by the PVH entry path (entry.rs).
pub const BOOT_PVH: u32 = 1;
/// Protocol id passed by the Linux 64-bit entry path (entry.rs).
pub const BOOT_LINUX64: u32 = 2;

/// Longest cmdline kept (bytes, without the NUL).
pub const MAX_CMDLINE: usize = 4096;
/// Most memory map entries kept (the zero page holds 128).
pub const MAX_MEM_REGIONS: usize = 128;
/// End of the guest-physical range the probe's page tables identity-map.
pub const MAPPED_LIMIT: u64 = 4 << 30;
/// E820 / PVH memory map type of usable RAM.
pub const E820_RAM: u32 = 1;

const PVH_MAGIC: u32 = 0x336e_c578;
const PVH_V0_SIZE: u64 = 40;
const PVH_V1_SIZE: u64 = 56;
const PVH_OFF_MAGIC: u64 = 0;
const PVH_OFF_VERSION: u64 = 4;
const PVH_OFF_CMDLINE: u64 = 24;
const PVH_OFF_MEMMAP: u64 = 40;
const PVH_OFF_MEMMAP_ENTRIES: u64 = 48;
const PVH_MEMMAP_ENTRY_SIZE: u64 = 24;

const ZERO_PAGE_SIZE: u64 = 4096;
const BP_OFF_EXT_CMD_LINE_PTR: u64 = 0x0c8;
const BP_OFF_E820_ENTRIES: u64 = 0x1e8;
const BP_OFF_CMD_LINE_PTR: u64 = 0x228;
const BP_OFF_E820_TABLE: u64 = 0x2d0;
const E820_ENTRY_SIZE: u64 = 20;

/// How the probe was entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// PVH (32-bit entry from the ELF note).
    Pvh,
    /// Linux 64-bit boot protocol (ELF `e_entry`).
    Linux64,
}

impl Protocol {
    /// Short name, as printed by the `boot` command.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pvh => "pvh",
            Protocol::Linux64 => "linux64",
        }
    }
}

/// One memory map entry.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemRegion {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Boot information common to both protocols.
pub struct BootInfo {
    pub protocol: Protocol,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// The cmdline had no NUL within [`MAX_CMDLINE`] bytes (or ran into
    /// [`MAPPED_LIMIT`]) and was cut.
    pub cmdline_truncated: bool,
    regions: [MemRegion; MAX_MEM_REGIONS],
    region_count: usize,
    /// Entry count the VMM announced (may exceed what was kept).
    pub regions_announced: u64,
}

impl BootInfo {
    /// Reads `n` (at most [`MAX_MEM_REGIONS`]) memory-map entries laid out `stride`
    /// bytes apart from `base`, each starting {addr: u64, size: u64, type: u32}.
    ///
    /// # Safety
    /// The caller has checked that all `n` entries are mapped guest memory.
    unsafe fn read_regions(&mut self, base: u64, stride: u64, n: usize) {
        let n = n.min(MAX_MEM_REGIONS);
        for i in 0..n {
            let e = base + i as u64 * stride;
            // SAFETY: guaranteed by the caller.
            self.regions[i] = unsafe {
                MemRegion {
                    addr: read_phys(e),
                    size: read_phys(e + 8),
                    kind: read_phys(e + 16),
                }
            };
        }
        self.region_count = n;
    }

    fn new(protocol: Protocol) -> Self {
        BootInfo {
            protocol,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            cmdline_truncated: false,
            regions: [MemRegion::default(); MAX_MEM_REGIONS],
            region_count: 0,
            regions_announced: 0,
        }
    }

    /// The kernel command line (without NUL; not necessarily UTF-8).
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    /// The memory map, in the VMM's order.
    pub fn memory_map(&self) -> &[MemRegion] {
        &self.regions[..self.region_count]
    }

    /// Total bytes of RAM (type 1) entries.
    pub fn ram_bytes(&self) -> u64 {
        self.memory_map()
            .iter()
            .filter(|r| r.kind == E820_RAM)
            .fold(0u64, |acc, r| acc.saturating_add(r.size))
    }
}

/// Why boot information could not be used.
#[derive(Debug)]
pub enum Error {
    UnknownProtocol(u64),
    NullPointer(&'static str),
    OutOfRange {
        what: &'static str,
        addr: u64,
        len: u64,
    },
    BadMagic(u32),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnknownProtocol(p) => write!(f, "unknown boot protocol id {p}"),
            Error::NullPointer(what) => write!(f, "{what} pointer is null"),
            Error::OutOfRange { what, addr, len } => {
                write!(f, "{what} at {addr:#x} (+{len:#x}) is outside 0..4 GiB")
            }
            Error::BadMagic(m) => write!(f, "hvm_start_info magic {m:#x} != {PVH_MAGIC:#x}"),
        }
    }
}

/// Checks that `addr..addr+len` is non-null and inside the identity map.
fn check(what: &'static str, addr: u64, len: u64) -> Result<(), Error> {
    if addr == 0 {
        return Err(Error::NullPointer(what));
    }
    match addr.checked_add(len) {
        Some(end) if end <= MAPPED_LIMIT => Ok(()),
        _ => Err(Error::OutOfRange { what, addr, len }),
    }
}

/// Reads a `T` at guest-physical `addr` (unaligned allowed).
///
/// # Safety
/// `addr..addr+size_of::<T>()` must have passed [`check`] (so it is
/// identity-mapped and cannot fault), and `T` must be valid for any bits.
unsafe fn read_phys<T: Copy>(addr: u64) -> T {
    let ptr = core::ptr::with_exposed_provenance::<T>(addr as usize);
    // SAFETY: per this function's contract the range is mapped (guest
    // physical memory identity-mapped by the probe's page tables, which
    // Rust does not otherwise use) and any bit pattern is a valid T.
    unsafe { core::ptr::read_unaligned(ptr) }
}

/// Parses the boot information handed over by entry.rs.
///
/// # Safety
/// `protocol` and `info` must be what the entry path passed to CPL3, and
/// the probe's identity map of 0..4 GiB must be live.
pub unsafe fn parse(protocol: u64, info: u64) -> Result<BootInfo, Error> {
    match protocol {
        p if p == u64::from(BOOT_PVH) => {
            // SAFETY: forwarded contract.
            unsafe { parse_pvh(info) }
        }
        p if p == u64::from(BOOT_LINUX64) => {
            // SAFETY: forwarded contract.
            unsafe { parse_linux64(info) }
        }
        p => Err(Error::UnknownProtocol(p)),
    }
}

/// # Safety
/// As for [`parse`].
unsafe fn parse_pvh(info: u64) -> Result<BootInfo, Error> {
    let mut bi = BootInfo::new(Protocol::Pvh);
    check("hvm_start_info", info, PVH_V0_SIZE)?;
    // SAFETY: the v0 header range was checked above.
    let (magic, version, cmdline) = unsafe {
        (
            read_phys::<u32>(info + PVH_OFF_MAGIC),
            read_phys::<u32>(info + PVH_OFF_VERSION),
            read_phys::<u64>(info + PVH_OFF_CMDLINE),
        )
    };
    if magic != PVH_MAGIC {
        return Err(Error::BadMagic(magic));
    }
    if cmdline != 0 {
        // SAFETY: read_cmdline bounds-checks the address itself.
        unsafe { bi.read_cmdline(cmdline)? };
    }
    // The memory map fields exist from version 1 on.
    if version >= 1 {
        check("hvm_start_info", info, PVH_V1_SIZE)?;
        // SAFETY: the v1 header range was checked above.
        let (memmap, entries) = unsafe {
            (
                read_phys::<u64>(info + PVH_OFF_MEMMAP),
                read_phys::<u32>(info + PVH_OFF_MEMMAP_ENTRIES),
            )
        };
        bi.regions_announced = u64::from(entries);
        let n = (entries as usize).min(MAX_MEM_REGIONS);
        if n > 0 {
            check("PVH memmap", memmap, n as u64 * PVH_MEMMAP_ENTRY_SIZE)?;
            // SAFETY: all n entries were checked above.
            unsafe { bi.read_regions(memmap, PVH_MEMMAP_ENTRY_SIZE, n) };
        }
    }
    Ok(bi)
}

/// # Safety
/// As for [`parse`].
unsafe fn parse_linux64(info: u64) -> Result<BootInfo, Error> {
    let mut bi = BootInfo::new(Protocol::Linux64);
    check("boot_params", info, ZERO_PAGE_SIZE)?;
    // SAFETY: the whole zero page was checked above.
    let (cmd_lo, cmd_hi, entries) = unsafe {
        (
            read_phys::<u32>(info + BP_OFF_CMD_LINE_PTR),
            read_phys::<u32>(info + BP_OFF_EXT_CMD_LINE_PTR),
            read_phys::<u8>(info + BP_OFF_E820_ENTRIES),
        )
    };
    let cmdline = u64::from(cmd_lo) | (u64::from(cmd_hi) << 32);
    if cmdline != 0 {
        // SAFETY: read_cmdline bounds-checks the address itself.
        unsafe { bi.read_cmdline(cmdline)? };
    }
    bi.regions_announced = u64::from(entries);
    let n = usize::from(entries).min(MAX_MEM_REGIONS);
    // SAFETY: 0x2d0 + 128 * 20 <= 4096: inside the checked zero page.
    unsafe { bi.read_regions(info + BP_OFF_E820_TABLE, E820_ENTRY_SIZE, n) };
    Ok(bi)
}

impl BootInfo {
    /// Copies the NUL-terminated cmdline at `addr`, at most
    /// [`MAX_CMDLINE`] bytes and never past [`MAPPED_LIMIT`].
    ///
    /// # Safety
    /// The probe's identity map of 0..4 GiB must be live.
    unsafe fn read_cmdline(&mut self, addr: u64) -> Result<(), Error> {
        check("cmdline", addr, 1)?;
        let limit = (MAPPED_LIMIT - addr).min(MAX_CMDLINE as u64) as usize;
        let mut len = 0;
        while len < limit {
            // SAFETY: addr + len < addr + limit <= MAPPED_LIMIT, checked.
            let b: u8 = unsafe { read_phys(addr + len as u64) };
            if b == 0 {
                break;
            }
            self.cmdline[len] = b;
            len += 1;
        }
        self.cmdline_len = len;
        self.cmdline_truncated = len == limit;
        Ok(())
    }
}
