//! Minimal ACPI tables: RSDP, XSDT, a hardware-reduced FADT whose sleep control register
//! is wisp's power-off port, a DSDT that declares S5 (soft off), and a MADT with the
//! local APICs and the IOAPIC.
//!
//! With these, an ACPI kernel finds its CPUs in the MADT and `poweroff` writes
//! SLP_TYP(S5) | SLP_EN to the sleep control register, which ends the VM. Kernels without
//! ACPI ignore the tables and use the MP table.

use thiserror::Error;

use super::checksum;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{APIC_START, IOAPIC_START};

/// Where the RSDP goes (inside the BIOS area Linux also scans).
pub const RSDP_START: u64 = 0x000e_0000;
/// The sleep control register (I/O port), handled by `devices::legacy::AcpiSleep`.
pub const SLEEP_CONTROL_PORT: u16 = devices::legacy::acpi_sleep::SLEEP_CONTROL_PORT;
/// The sleep status register (I/O port).
pub const SLEEP_STATUS_PORT: u16 = devices::legacy::acpi_sleep::SLEEP_STATUS_PORT;
/// The SLP_TYP value the DSDT declares for S5.
pub const S5_SLEEP_TYPE: u8 = devices::legacy::acpi_sleep::S5_SLEEP_TYPE;

const OEM_ID: &[u8; 6] = b"WISP  ";
const OEM_TABLE_ID: &[u8; 8] = b"WISPVM  ";
const CREATOR_ID: &[u8; 4] = b"WISP";
const HEADER_LEN: usize = 36;
const FADT_LEN: usize = 276;
const FADT_REVISION: u8 = 6;
const FADT_MINOR_REVISION: u8 = 5;
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
const FADT_PWR_BUTTON: u32 = 1 << 4;
const FADT_SLP_BUTTON: u32 = 1 << 5;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
const GAS_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_BYTE: u8 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_CPU_ENABLED: u32 = 1;

/// Errors writing ACPI tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// Guest memory write failed.
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// A system description table: header plus body, with length and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = (HEADER_LEN + body.len()) as u32;
    let mut t = Vec::with_capacity(len as usize);
    t.extend_from_slice(signature);
    t.extend_from_slice(&len.to_le_bytes());
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure for a one-byte I/O port register.
fn gas_io_byte(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = GAS_SYSTEM_IO;
    g[1] = 8; // bit width
    g[2] = 0; // bit offset
    g[3] = GAS_ACCESS_BYTE;
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// AML PkgLength encoding of a package whose contents (after the PkgLength) are `len`
/// bytes long; the encoded length counts its own bytes too.
fn pkg_length(len: usize) -> Vec<u8> {
    if len + 1 < 0x40 {
        return vec![(len + 1) as u8];
    }
    // Enough for anything wisp emits: up to 2^20 bytes.
    let mut n = 2;
    while len + n >= 1 << (4 + 8 * (n - 1)) {
        n += 1;
    }
    let total = len + n;
    let mut out = vec![(((n - 1) as u8) << 6) | (total & 0xf) as u8];
    for i in 0..n - 1 {
        out.push((total >> (4 + 8 * i)) as u8);
    }
    out
}

/// `op pkglength contents`.
fn aml_package(op: &[u8], contents: &[u8]) -> Vec<u8> {
    let mut v = op.to_vec();
    v.extend(pkg_length(contents.len()));
    v.extend_from_slice(contents);
    v
}

/// `Name (name, value)`.
fn aml_name(name: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08];
    v.extend_from_slice(name);
    v.extend_from_slice(value);
    v
}

/// COM1 as an ACPI device (PNP0501) with its ports and IRQ, so that an ACPI kernel in
/// hardware-reduced mode (no legacy PIC, no implicit ISA IRQs) routes IRQ 4 to the UART.
fn aml_com1() -> Vec<u8> {
    let resources = [
        0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, // IO (Decode16, 0x3f8, 0x3f8, 1, 8)
        0x22, 0x10, 0x00, // IRQNoFlags () {4}
        0x79, 0x00, // end tag
    ];
    let mut buffer = vec![0x0a, resources.len() as u8];
    buffer.extend_from_slice(&resources);
    let mut body = b"COM1".to_vec();
    body.extend(aml_name(b"_HID", &[0x0c, 0x41, 0xd0, 0x05, 0x01])); // EisaId ("PNP0501")
    body.extend(aml_name(b"_UID", &[0x00]));
    body.extend(aml_name(b"_CRS", &aml_package(&[0x11], &buffer)));
    let device = aml_package(&[0x5b, 0x82], &body);
    let mut scope = b"\\_SB_".to_vec();
    scope.extend(device);
    aml_package(&[0x10], &scope)
}

/// One virtio-mmio device: `_HID "LNRO0005"` (what Linux's virtio_mmio driver matches),
/// a 4 KiB `Memory32Fixed` window and an edge-triggered, active-high GSI.
fn aml_virtio(index: usize, base: u64, gsi: u32) -> Vec<u8> {
    let mut resources = vec![0x86, 0x09, 0x00, 0x01]; // Memory32Fixed (ReadWrite, ...)
    resources.extend_from_slice(&(base as u32).to_le_bytes());
    resources.extend_from_slice(&0x1000u32.to_le_bytes());
    // Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }
    resources.extend_from_slice(&[0x89, 0x06, 0x00, 0x03, 0x01]);
    resources.extend_from_slice(&gsi.to_le_bytes());
    resources.extend_from_slice(&[0x79, 0x00]);
    let mut buffer = vec![0x0a, resources.len() as u8];
    buffer.extend_from_slice(&resources);
    let mut body = format!("VR{index:02X}").into_bytes();
    let mut hid = vec![0x0d];
    hid.extend_from_slice(b"LNRO0005\0");
    body.extend(aml_name(b"_HID", &hid));
    body.extend(aml_name(b"_UID", &[0x0a, index as u8]));
    body.extend(aml_name(b"_CRS", &aml_package(&[0x11], &buffer)));
    aml_package(&[0x5b, 0x82], &body)
}

/// DSDT: `Name (_S5, Package () { S5_SLEEP_TYPE, 0 })`, the COM1 device and the
/// virtio-mmio devices (`(base, gsi)` each).
fn dsdt(virtio: &[(u64, u32)]) -> Vec<u8> {
    let s5 = aml_package(&[0x12], &[0x02, 0x0a, S5_SLEEP_TYPE, 0x0a, 0x00]);
    let mut aml = aml_name(b"_S5_", &s5);
    aml.extend(aml_com1());
    if !virtio.is_empty() {
        let mut scope = b"\\_SB_".to_vec();
        for (i, &(base, gsi)) in virtio.iter().enumerate() {
            scope.extend(aml_virtio(i, base, gsi));
        }
        aml.extend(aml_package(&[0x10], &scope));
    }
    sdt(b"DSDT", 2, &aml)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = vec![0u8; FADT_LEN - HEADER_LEN];
    let at = |off: usize| off - HEADER_LEN;
    b[at(40)..at(44)].copy_from_slice(&(dsdt_addr as u32).to_le_bytes());
    let iapc = IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT;
    b[at(109)..at(111)].copy_from_slice(&iapc.to_le_bytes());
    let flags = FADT_HW_REDUCED_ACPI | FADT_PWR_BUTTON | FADT_SLP_BUTTON;
    b[at(112)..at(116)].copy_from_slice(&flags.to_le_bytes());
    b[at(131)] = FADT_MINOR_REVISION;
    b[at(140)..at(148)].copy_from_slice(&dsdt_addr.to_le_bytes());
    b[at(244)..at(256)].copy_from_slice(&gas_io_byte(SLEEP_CONTROL_PORT));
    b[at(256)..at(268)].copy_from_slice(&gas_io_byte(SLEEP_STATUS_PORT));
    b[at(268)..at(276)].copy_from_slice(b"WISPKVM\0");
    sdt(b"FACP", FADT_REVISION, &b)
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // no PC-AT 8259s in hardware-reduced mode
    for id in 0..cpus {
        b.extend_from_slice(&[MADT_LOCAL_APIC, 8, id, id]);
        b.extend_from_slice(&MADT_CPU_ENABLED.to_le_bytes());
    }
    b.extend_from_slice(&[MADT_IOAPIC, 12, cpus, 0]);
    b.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
                                              // LINT1 is NMI on every processor.
    b.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
    sdt(b"APIC", 5, &b)
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.extend_from_slice(&[0; 4]); // extended checksum, reserved
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

fn align8(v: u64) -> u64 {
    (v + 7) & !7
}

/// Serialises every table for `cpus` vCPUs and the virtio-mmio devices `virtio`
/// (`(base, gsi)` each), laid out from `RSDP_START`.
pub fn build(cpus: u8, virtio: &[(u64, u32)]) -> Vec<(u64, Vec<u8>)> {
    let dsdt = dsdt(virtio);
    let madt = madt(cpus);
    let dsdt_addr = RSDP_START + 64;
    let fadt_addr = align8(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align8(fadt_addr + fadt.len() as u64);
    let xsdt_addr = align8(madt_addr + madt.len() as u64);
    let mut entries = Vec::new();
    entries.extend_from_slice(&fadt_addr.to_le_bytes());
    entries.extend_from_slice(&madt_addr.to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &entries);
    vec![
        (RSDP_START, rsdp(xsdt_addr)),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (xsdt_addr, xsdt),
    ]
}

/// Writes the tables into guest memory; returns the RSDP address.
pub fn setup<M: GuestMemoryBackend>(
    mem: &M,
    cpus: u8,
    virtio: &[(u64, u32)],
) -> Result<u64, AcpiError> {
    for (addr, bytes) in build(cpus, virtio) {
        mem.write_slice(&bytes, GuestAddress(addr))?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn tables_are_consistent() {
        let tables = build(4, &[(0xd000_0000, 5)]);
        let (rsdp_addr, rsdp) = &tables[0];
        assert_eq!(*rsdp_addr, RSDP_START);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(checksum(&rsdp[..20]), 0);
        assert_eq!(checksum(rsdp), 0);
        let find = |addr: u64| {
            tables
                .iter()
                .find(|(a, _)| *a == addr)
                .map(|(_, t)| t)
                .unwrap()
        };
        let xsdt = find(u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let fadt = find(u64_at(xsdt, 36));
        let madt = find(u64_at(xsdt, 44));
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!(
            u32_at(fadt, 112) & FADT_HW_REDUCED_ACPI,
            FADT_HW_REDUCED_ACPI
        );
        assert_eq!(fadt[244], GAS_SYSTEM_IO);
        assert_eq!(u64_at(fadt, 248), u64::from(SLEEP_CONTROL_PORT));
        assert_eq!(u64_at(fadt, 260), u64::from(SLEEP_STATUS_PORT));
        let dsdt = find(u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(u64::from(u32_at(fadt, 40)), u64_at(fadt, 140));
        assert_eq!(&madt[..4], b"APIC");
        // 4 local APICs, an IOAPIC with the next id, one NMI entry.
        assert_eq!(madt.len(), HEADER_LEN + 8 + 4 * 8 + 12 + 6);
        assert_eq!(madt[44 + 3 * 8 + 3], 3, "last APIC id");
        assert_eq!(madt[44 + 4 * 8 + 2], 4, "IOAPIC id");
        for (_, t) in &tables[1..] {
            assert_eq!(u32_at(t, 4) as usize, t.len(), "length field");
            assert_eq!(
                checksum(t),
                0,
                "checksum of {:?}",
                std::str::from_utf8(&t[..4])
            );
        }
        // No overlap, and everything stays below 1 MiB.
        let mut spans: Vec<(u64, u64)> = tables
            .iter()
            .map(|(a, t)| (*a, *a + t.len() as u64))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0);
        }
        assert!(spans.last().unwrap().1 < 0x10_0000);
    }

    #[test]
    fn dsdt_declares_s5_and_com1() {
        let d = dsdt(&[]);
        let aml = &d[HEADER_LEN..];
        assert_eq!(&aml[1..5], b"_S5_");
        assert_eq!(aml[9], S5_SLEEP_TYPE);
        // PkgLength counts itself and everything after it in the package.
        assert_eq!(usize::from(aml[6]), 6);
        let com1 = &aml[12..];
        assert_eq!(com1[0], 0x10, "Scope");
        assert_eq!(usize::from(com1[1]), com1.len() - 1);
        assert_eq!(&com1[2..7], b"\\_SB_");
        assert_eq!(&com1[7..9], &[0x5b, 0x82], "Device");
        assert_eq!(usize::from(com1[9]), com1.len() - 9);
        assert_eq!(&com1[10..14], b"COM1");
        let find = |needle: &[u8]| com1.windows(needle.len()).any(|w| w == needle);
        assert!(find(&[0x0c, 0x41, 0xd0, 0x05, 0x01]), "PNP0501");
        assert!(find(&[0x22, 0x10, 0x00]), "IRQ 4");
    }

    #[test]
    fn dsdt_declares_virtio_devices() {
        let d = dsdt(&[(0xd000_1000, 6), (0xd000_2000, 7)]);
        let find = |needle: &[u8]| d.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(find(b"LNRO0005\0"), 2);
        assert_eq!(find(b"VR00"), 1);
        assert_eq!(find(b"VR01"), 1);
        // Memory32Fixed at 0xd0001000, length 0x1000; extended interrupt GSI 7.
        assert_eq!(
            find(&[0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xd0, 0x00, 0x10, 0, 0]),
            1
        );
        assert_eq!(find(&[0x89, 0x06, 0x00, 0x03, 0x01, 7, 0, 0, 0]), 1);
        assert_eq!(d.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
    }

    #[test]
    fn pkg_length_encodings() {
        assert_eq!(pkg_length(0), vec![1]);
        assert_eq!(pkg_length(0x3e), vec![0x3f]);
        // Two bytes: low nibble in byte 0, the rest in byte 1; total includes both.
        assert_eq!(pkg_length(0x3f), vec![0x41, 0x04]);
        assert_eq!(pkg_length(0x100), vec![0x42, 0x10]);
        assert_eq!(pkg_length(0xffd), vec![0x4f, 0xff]);
        assert_eq!(pkg_length(0xffe), vec![0x81, 0x00, 0x01]);
    }

    #[test]
    fn tables_fit_for_max_cpus() {
        let virtio: Vec<(u64, u32)> = (0..16)
            .map(|i| (0xd000_0000 + i * 0x1000, 5 + i as u32))
            .collect();
        let tables = build(super::super::mptable::MAX_CPUS, &virtio);
        let end = tables
            .iter()
            .map(|(a, t)| a + t.len() as u64)
            .max()
            .unwrap();
        assert!(end < 0x10_0000);
    }
}
