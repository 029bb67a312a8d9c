//! Boot structures handed to the guest: Linux `boot_params` (64-bit boot protocol) and
//! the PVH `hvm_start_info`, both carrying the cmdline, the e820 map, the initrd and the
//! ACPI RSDP address.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{linux::LinuxBootConfigurator, BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::layout::{
    e820_map, CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Errors writing boot structures.
#[derive(Debug, Error)]
pub enum BootError {
    /// The e820 map does not fit in the zero page.
    #[error("the memory map has {0} entries, more than the boot protocol allows")]
    TooManyE820Entries(usize),
    /// Writing to guest memory failed.
    #[error("cannot write boot structures to guest memory: {0}")]
    Write(#[from] linux_loader::configurator::Error),
}

/// What the boot structures describe.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// Length of the command line at `CMDLINE_START`, without the NUL.
    pub cmdline_len: usize,
    /// Initrd (address, size), if any.
    pub initrd: Option<(u64, u64)>,
    /// ACPI RSDP address, if the VMM wrote ACPI tables.
    pub rsdp: Option<u64>,
}

/// Writes Linux's zero page at `ZERO_PAGE_START`. `header` is the bzImage setup header
/// (`None` for an ELF vmlinux, for which wisp fills the header fields the kernel checks).
pub fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    info: &BootInfo,
    header: Option<setup_header>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    match header {
        Some(h) => params.hdr = h,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    // Addresses below 4 GiB by construction (layout constants).
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if let Some(rsdp) = info.rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    let map = e820_map(info.mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820Entries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<M>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )?;
    Ok(())
}

/// Writes the PVH start info, memory map and module list.
pub fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    info: &BootInfo,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(info.mem_size)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let mut start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: info.rsdp.unwrap_or(0),
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = info
        .initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    if !modules.is_empty() {
        start.nr_modules = modules.len() as u32;
        start.modlist_paddr = PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&start, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<M>(&params, mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const MIB: u64 = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (16 * MIB) as usize)]).unwrap()
    }

    fn info() -> BootInfo {
        BootInfo {
            mem_size: 256 * MIB,
            cmdline_len: 42,
            initrd: Some((0x0800_0000, 0x1234)),
            rsdp: Some(0xe0000),
        }
    }

    #[test]
    fn zero_page_fields() {
        let m = mem();
        write_boot_params(&m, &info(), None).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x0800_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 2);
        let e1 = p.e820_table[1];
        assert_eq!(
            ({ e1.addr }, { e1.size }, { e1.r#type }),
            (MIB, 255 * MIB, 1)
        );
    }

    #[test]
    fn bzimage_header_is_kept() {
        let m = mem();
        let h = setup_header {
            version: 0x20f,
            header: KERNEL_HDR_MAGIC,
            ..Default::default()
        };
        write_boot_params(&m, &info(), Some(h)).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.version }, 0x20f);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
    }

    #[test]
    fn pvh_start_info_fields() {
        let m = mem();
        write_pvh_start_info(&m, &info()).unwrap();
        let s: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(s.magic, XEN_HVM_START_MAGIC);
        assert_eq!(s.cmdline_paddr, CMDLINE_START);
        assert_eq!((s.memmap_paddr, s.memmap_entries), (PVH_MEMMAP_START, 2));
        assert_eq!((s.nr_modules, s.modlist_paddr), (1, PVH_MODLIST_START));
        assert_eq!(s.rsdp_paddr, 0xe0000);
        let e: hvm_memmap_table_entry = m.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!((e.addr, e.size, e.type_), (MIB, 255 * MIB, 1));
        let md: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((md.paddr, md.size), (0x0800_0000, 0x1234));
    }
}
