//! Intel MultiProcessor Specification 1.4 table, so that kernels without ACPI (and ACPI
//! kernels that find no MADT) bring up every vCPU.
//!
//! Layout: the floating pointer structure at the start of the EBDA, the configuration
//! table right after it. The region up to 1 MiB is not RAM in the e820 map.

use thiserror::Error;

use super::checksum;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START, SYSTEM_AREA_END};

/// Most vCPUs an MP table can describe: APIC IDs are 8 bits, 0xff is broadcast, and the
/// IOAPIC takes the ID after the last CPU.
pub const MAX_CPUS: u8 = 254;
/// IOAPIC input pins (KVM's in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u8 = 24;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = 0x201; // FPU, APIC

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Errors building the MP table.
#[derive(Debug, Error)]
pub enum MptableError {
    /// Zero or too many CPUs.
    #[error("an MP table describes 1 to {MAX_CPUS} vCPUs, not {0}")]
    CpuCount(u8),
    /// The table does not fit below 1 MiB.
    #[error("the MP table does not fit in the EBDA area")]
    TooBig,
    /// Guest memory write failed.
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Serialises the table for `cpus` vCPUs, for placement at `EBDA_START`.
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::CpuCount(cpus));
    }
    let ioapic_id = cpus;
    let table_addr = EBDA_START + FLOATING_LEN as u64;

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    // ISA IRQ n -> IOAPIC pin n, matching KVM's default GSI routing.
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    // LINT0 = ExtINT (legacy PIC), LINT1 = NMI, on every local APIC.
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
        count += 1;
    }

    let table_len = HEADER_LEN + entries.len();
    if table_addr + table_len as u64 > SYSTEM_AREA_END {
        return Err(MptableError::TooBig);
    }
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"WISP    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended length, checksum, reserved
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn setup<M: GuestMemoryBackend>(mem: &M, cpus: u8) -> Result<(), MptableError> {
    mem.write_slice(&build(cpus)?, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU_ENTRY_LEN: usize = 20;
    const SMALL_ENTRY_LEN: usize = 8;

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u8, 2, 16, MAX_CPUS] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(checksum(&t[..16]), 0, "floating pointer checksum");
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(checksum(table), 0, "table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count as usize, cpus as usize + 2 + 24 + 2);
            // Physical pointer points just past the floating structure.
            let ptr = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
            assert_eq!(u64::from(ptr), EBDA_START + 16);
        }
    }

    #[test]
    fn processor_entries_have_sequential_apic_ids_and_one_bsp() {
        let t = build(4).unwrap();
        let entries = &t[16 + HEADER_LEN..];
        for id in 0..4usize {
            let e = &entries[id * CPU_ENTRY_LEN..(id + 1) * CPU_ENTRY_LEN];
            assert_eq!(e[0], ENTRY_PROCESSOR);
            assert_eq!(e[1], id as u8);
            assert_eq!(e[3] & CPU_BSP != 0, id == 0);
        }
        let ioapic = &entries[4 * CPU_ENTRY_LEN + SMALL_ENTRY_LEN..];
        assert_eq!(ioapic[0], ENTRY_IOAPIC);
        assert_eq!(ioapic[1], 4, "IOAPIC id follows the CPUs");
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert!(matches!(build(0), Err(MptableError::CpuCount(0))));
        assert!(matches!(build(255), Err(MptableError::CpuCount(255))));
    }
}
