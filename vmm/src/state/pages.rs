//! Walking guest memory, for the snapshot's memory file and the migration stream alike.
//!
//! [`walk`] copies the selected pages out of guest memory in runs of consecutive pages
//! (at most [`RUN_PAGES`] at a time, into one reused buffer) and hands each run over;
//! [`Run::pages`] tells which of its pages are all zero. Selected means every page, or
//! the pages set in a [`DirtyBitmap`].
//!
//! Pages are addressed two ways: by guest-physical address, and by their offset in the
//! flat layout the memory file uses (regions back to back in guest-address order).

use vm_memory::{GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::{DirtyBitmap, GuestMemory};

/// The page size of walks and dirty bitmaps.
pub const PAGE: usize = 4096;
/// Pages copied out at a time (1 MiB).
pub const RUN_PAGES: usize = 256;

/// Whether `page` holds only zero bytes.
pub fn is_zero(page: &[u8]) -> bool {
    // OR-folding 64-byte blocks lets the compiler vectorise; most pages are decided in
    // the first block anyway.
    page.chunks(64)
        .all(|block| block.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// Consecutive pages copied out of guest memory.
pub struct Run<'a> {
    /// Guest-physical address of the first page.
    pub guest_addr: u64,
    /// Offset of the first page in the flat layout.
    pub offset: u64,
    /// The pages' bytes (a multiple of [`PAGE`]).
    pub data: &'a [u8],
}

/// One page of a [`Run`].
pub struct Page<'a> {
    /// Guest-physical address.
    pub guest_addr: u64,
    /// Offset in the flat layout.
    pub offset: u64,
    /// Its bytes.
    pub data: &'a [u8],
    /// Whether they are all zero.
    pub zero: bool,
}

impl<'a> Run<'a> {
    /// The run's pages, in order.
    pub fn pages(&self) -> impl Iterator<Item = Page<'a>> + '_ {
        self.data.chunks(PAGE).enumerate().map(|(i, data)| Page {
            guest_addr: self.guest_addr + (i * PAGE) as u64,
            offset: self.offset + (i * PAGE) as u64,
            data,
            zero: is_zero(data),
        })
    }
}

/// Page `i` is set in `bits`.
fn is_set(bits: &[u64], i: usize) -> bool {
    bits.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// How many pages `selected` selects.
pub fn count(selected: &DirtyBitmap) -> u64 {
    selected
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// Calls `f` with the pages `selected` selects (every page when None), in runs of
/// consecutive pages, in guest-address order. Returns the number of pages walked.
pub fn walk<E>(
    mem: &GuestMemory,
    selected: Option<&DirtyBitmap>,
    mut f: impl FnMut(Run<'_>) -> Result<(), E>,
    read_err: impl Fn(GuestMemoryError) -> E,
) -> Result<u64, E> {
    let mut buf = vec![0u8; RUN_PAGES * PAGE];
    let mut offset = 0u64;
    let mut walked = 0u64;
    for (r, region) in mem.iter().enumerate() {
        let pages = (region.len() as usize) / PAGE;
        let bits = selected.map(|s| s.get(r).map_or(&[][..], |b| &b[..]));
        let mut i = 0;
        while i < pages {
            // The next run: from the next selected page, while pages stay selected.
            if let Some(bits) = bits {
                if bits.get(i / 64) == Some(&0) {
                    i = (i / 64 + 1) * 64;
                    continue;
                }
                if !is_set(bits, i) {
                    i += 1;
                    continue;
                }
            }
            let mut n = 1;
            while n < RUN_PAGES && i + n < pages && bits.is_none_or(|b| is_set(b, i + n)) {
                n += 1;
            }
            let data = &mut buf[..n * PAGE];
            region
                .get_slice(MemoryRegionAddress((i * PAGE) as u64), n * PAGE)
                .map_err(&read_err)?
                .copy_to(data);
            f(Run {
                guest_addr: region.start_addr().0 + (i * PAGE) as u64,
                offset: offset + (i * PAGE) as u64,
                data,
            })?;
            walked += n as u64;
            i += n;
        }
        offset += region.len();
    }
    Ok(walked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn walks_every_page_in_runs() {
        let mem = crate::memory::create(16 << 20).unwrap();
        mem.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        mem.write_obj(2u8, GuestAddress(0x50_3000)).unwrap();
        let mut runs = Vec::new();
        let mut nonzero = Vec::new();
        let all = walk(
            &mem,
            None,
            |run| {
                runs.push(run.data.len());
                nonzero.extend(
                    run.pages()
                        .filter(|p| !p.zero)
                        .map(|p| (p.guest_addr, p.offset)),
                );
                Ok::<(), GuestMemoryError>(())
            },
            |e| e,
        )
        .unwrap();
        assert_eq!(all, (16 << 20) / PAGE as u64);
        assert_eq!(runs, vec![RUN_PAGES * PAGE; 16]);
        assert_eq!(nonzero, [(0x1000, 0x1000), (0x50_3000, 0x50_3000)]);
    }

    #[test]
    fn walks_the_selected_pages_across_regions() {
        // Two regions: below the MMIO gap and above 4 GiB (lazily allocated).
        let mem = crate::memory::create(0xd000_0000 + (8 << 20)).unwrap();
        mem.write_obj(2u8, GuestAddress((1 << 32) + 0x3000))
            .unwrap();
        // Pages 1, 2, 3 and 200 of region 0, page 3 of region 1.
        let mut sel: DirtyBitmap = mem
            .iter()
            .map(|r| vec![0u64; (r.len() as usize / PAGE).div_ceil(64)])
            .collect();
        sel[0][0] = 0b1110;
        sel[0][200 / 64] |= 1 << (200 % 64);
        sel[1][0] = 0b1000;
        assert_eq!(count(&sel), 5);
        let mut got = Vec::new();
        let n = walk(
            &mem,
            Some(&sel),
            |run| {
                let zero: Vec<bool> = run.pages().map(|p| p.zero).collect();
                got.push((run.guest_addr, run.offset, zero));
                Ok::<(), GuestMemoryError>(())
            },
            |e| e,
        )
        .unwrap();
        assert_eq!(n, 5);
        assert_eq!(
            got,
            [
                (0x1000, 0x1000, vec![true; 3]),
                (200 * 0x1000, 200 * 0x1000, vec![true]),
                ((1 << 32) + 0x3000, 0xd000_0000 + 0x3000, vec![false]),
            ]
        );
    }
}
