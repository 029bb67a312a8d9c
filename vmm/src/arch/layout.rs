//! Guest physical memory layout.
//!
//! ```text
//! 0x0000_0500  GDT (boot)            0x0000_9000  PML4, 0xa000 PDPT, 0xb000.. PDs (4 GiB)
//! 0x0000_6000  PVH start info        0x0002_0000  kernel cmdline
//! 0x0000_7000  boot_params / memmap  0x0009_fc00  EBDA: MP table
//! 0x0000_8ff0  boot stack            0x0010_0000  high memory: kernel, initrd
//! 0xd000_0000  32-bit MMIO gap (virtio-mmio devices, IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000)
//! 0x1_0000_0000  RAM above the gap, for guests larger than 3.25 GiB
//! ```

/// GDT used at boot (both the 64-bit and the PVH entry).
pub const BOOT_GDT_START: u64 = 0x500;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page tables for the 64-bit entry: PML4, PDPT, then four page directories.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_START: u64 = 0xa000;
/// First of the four page directories (identity map of 0..4 GiB with 2 MiB pages).
pub const PD_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, including the NUL (Linux x86's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area: the MP floating pointer and table live here.
pub const EBDA_START: u64 = 0x9fc00;
/// End of the legacy reserved area (VGA, BIOS) below 1 MiB.
pub const SYSTEM_AREA_END: u64 = 0x10_0000;
/// Start of high memory, where kernels and the initrd are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// First address above 4 GiB.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (3 pages) for real-mode emulation on Intel: inside the gap, unused by devices.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Start of the window for virtio-mmio devices (one 4 KiB page each).
pub const MMIO_DEVICES_START: u64 = MMIO_GAP_START;

/// The RAM ranges for a guest of `mem_size` bytes: below the gap, then above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (FIRST_ADDR_PAST_32BITS, mem_size - MMIO_GAP_START),
        ]
    }
}

/// Type of an e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved.
    Reserved = 2,
}

/// One entry of the guest's memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Kind of memory.
    pub kind: E820Type,
}

/// The e820 map: RAM below the EBDA, RAM from 1 MiB to the gap, RAM above 4 GiB.
/// Everything else (EBDA, VGA/BIOS hole, MMIO gap) is absent, i.e. not RAM.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![E820Entry {
        addr: 0,
        size: EBDA_START,
        kind: E820Type::Ram,
    }];
    for (start, size) in ram_ranges(mem_size) {
        let (start, size) = if start == 0 {
            (HIMEM_START, size.saturating_sub(HIMEM_START))
        } else {
            (start, size)
        };
        if size > 0 {
            map.push(E820Entry {
                addr: start,
                size,
                kind: E820Type::Ram,
            });
        }
    }
    map
}

/// The highest address (exclusive) of RAM below 4 GiB.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(128 * MIB), vec![(0, 128 * MIB)]);
        let map = e820_map(128 * MIB);
        assert_eq!(map.len(), 2);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820Type::Ram
            }
        );
        assert_eq!(map[1].addr, 0x10_0000);
        assert_eq!(map[1].addr + map[1].size, 128 * MIB);
    }

    #[test]
    fn large_guest_is_split_around_the_gap() {
        let size = 4096 * MIB;
        let ranges = ram_ranges(size);
        assert_eq!(
            ranges,
            vec![(0, MMIO_GAP_START), (1 << 32, size - MMIO_GAP_START)]
        );
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(total, size);
        let map = e820_map(size);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1].addr + map[1].size, MMIO_GAP_START);
        assert_eq!(map[2].addr, 1 << 32);
        // No RAM overlaps the gap or the APICs.
        for e in &map {
            assert!(e.addr + e.size <= MMIO_GAP_START || e.addr >= 1 << 32);
        }
        assert_eq!(low_ram_end(size), MMIO_GAP_START);
    }

    #[test]
    fn ram_seen_by_guest_rounds_up_to_configured_size() {
        for mib in [16u64, 128, 256, 3328, 5000] {
            let ram: u64 = e820_map(mib * MIB).iter().map(|e| e.size).sum();
            assert!(ram < mib * MIB);
            assert_eq!(ram.div_ceil(MIB), mib);
        }
    }
}
