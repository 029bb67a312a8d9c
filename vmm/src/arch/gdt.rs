//! Boot-time GDT entries and their `kvm_segment` equivalents.

use kvm_bindings::kvm_segment;

/// Builds a GDT descriptor from access/flags bits (`0xF0FF` mask: flags nibble, access
/// byte), a 32-bit base and a 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// 64-bit code, present, DPL0, readable (long-mode CS).
pub const CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
/// 32-bit code, 4 GiB flat (PVH CS).
pub const CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
/// Data, 4 GiB flat, writable.
pub const DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
/// A busy 32/64-bit TSS of 0x68 bytes at address 0.
pub const TSS: u64 = gdt_entry(0x008b, 0, 0x67);

fn bits(entry: u64, shift: u32, mask: u64) -> u8 {
    ((entry >> shift) & mask) as u8
}

/// The `kvm_segment` that loading selector `index * 8` from a GDT holding `entry` yields.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16);
    let raw_limit = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff)) as u32;
    let g = bits(entry, 55, 1);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bits(entry, 47, 1);
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: bits(entry, 40, 0xf),
        present,
        dpl: bits(entry, 45, 0x3),
        db: bits(entry, 54, 1),
        s: bits(entry, 44, 1),
        l: bits(entry, 53, 1),
        g,
        avl: bits(entry, 52, 1),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment() {
        let s = segment_from_gdt(CODE64, 2);
        assert_eq!(s.selector, 0x10);
        assert_eq!(
            (s.l, s.db, s.present, s.s, s.dpl, s.type_),
            (1, 0, 1, 1, 0, 0xb)
        );
        assert_eq!((s.base, s.limit, s.g), (0, 0xffff_ffff, 1));
    }

    #[test]
    fn flat_data_and_tss() {
        let d = segment_from_gdt(DATA, 3);
        assert_eq!(
            (d.selector, d.db, d.type_, d.limit, d.unusable),
            (0x18, 1, 3, 0xffff_ffff, 0)
        );
        let t = segment_from_gdt(TSS, 4);
        assert_eq!((t.type_, t.s, t.limit, t.g), (0xb, 0, 0x67, 0));
        let c = segment_from_gdt(CODE32, 1);
        assert_eq!((c.l, c.db), (0, 1));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn base_and_limit_roundtrip() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 1);
        assert_eq!((s.base, s.limit, s.g), (0x1234_5678, 0xabcde, 0));
    }
}
