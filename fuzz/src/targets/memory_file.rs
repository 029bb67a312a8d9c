//! `memory_file`: the snapshot memory file's verifier
//! (`vmm::snapshot::memory_file::open_and_verify`, then `map_private`).
//!
//! Input: a mode byte; the regions (count byte, then 2 bytes each: page index, and
//! length in pages; bit 7 of either makes it unaligned); a file-length byte (below
//! 0xf0: the regions' total; else that many pages more or fewer); if mode bit 0, the
//! recorded data pages and digest (u64 each), else the right ones (with mode bit 1, off
//! by one bit); then pages to write (index byte, fill byte, offset u16 and a byte to
//! poke), leaving the rest holes. Oracle: the verifier accepts exactly when an
//! independent reading of the whole file agrees with the record, and the mapped
//! memory then holds the file.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use vm_memory::{Bytes, GuestAddress};
use vmm::snapshot::memory_file::{self, MemoryInfo, RegionInfo};
use vmm::state::format::crc64_digest;

use crate::input::Input;

const PAGE: u64 = 4096;
/// Largest region, in pages.
const MAX_PAGES: u64 = 16;

fn memfd() -> &'static File {
    static FILE: OnceLock<File> = OnceLock::new();
    FILE.get_or_init(|| {
        // SAFETY: the name is a NUL-terminated string; the call touches no other memory.
        let fd = unsafe { libc::memfd_create(c"wisp-fuzz-memory".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and nothing else owns it.
        unsafe { File::from_raw_fd(fd) }
    })
}

fn regions(input: &mut Input) -> Vec<RegionInfo> {
    let count = usize::from(input.u8() % 4);
    (0..count)
        .map(|_| {
            let (at, pages) = (input.u8(), input.u8());
            let odd = |b: u8| if b & 0x80 != 0 { 0x100 } else { 0 };
            RegionInfo {
                guest_addr: u64::from(at & 0x7f) * PAGE + odd(at),
                len: u64::from(pages & 0x7f) % (MAX_PAGES + 1) * PAGE + odd(pages),
            }
        })
        .collect()
}

/// The record's rules: page-aligned, non-empty, sorted, not overlapping regions.
fn layout_ok(regions: &[RegionInfo]) -> bool {
    let mut prev_end = 0;
    !regions.is_empty()
        && regions.iter().all(|r| {
            let ok = r.guest_addr % PAGE == 0
                && r.len % PAGE == 0
                && r.len > 0
                && r.guest_addr >= prev_end;
            prev_end = r.guest_addr + r.len;
            ok
        })
}

/// (data pages, digest) of `file` read page by page.
fn reference(file: &[u8]) -> (u64, u64) {
    let mut digest = crc64_digest();
    let mut pages = 0;
    for (i, p) in file.chunks(PAGE as usize).enumerate() {
        if p.iter().any(|&b| b != 0) {
            digest.update(&(i as u64 * PAGE).to_le_bytes());
            digest.update(p);
            pages += 1;
        }
    }
    (pages, digest.finalize())
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let regions = regions(&mut input);
    let total: u64 = regions.iter().map(|r| r.len).sum();
    let len = match input.u8() {
        b @ 0xf0..=0xff => (total as i64 + (i64::from(b) - 0xf8) * PAGE as i64).max(0) as u64,
        _ => total,
    };
    let recorded = (mode & 1 != 0).then(|| (input.u64(), input.u64()));
    let file = memfd();
    file.set_len(0).expect("empty the memory file");
    file.set_len(len).expect("size the memory file");
    while !input.is_empty() {
        let (page, fill) = (u64::from(input.u8()), input.u8());
        let (offset, poke) = (u64::from(input.u16()) % PAGE, input.u8());
        let at = page * PAGE;
        if at + PAGE <= len {
            let mut p = [fill; PAGE as usize];
            p[offset as usize] = poke;
            file.write_all_at(&p, at).expect("write a page");
        }
    }
    let mut contents = vec![0u8; len as usize];
    file.read_exact_at(&mut contents, 0)
        .expect("read the memory file");
    let (pages, digest) = reference(&contents);
    let (data_pages, digest_rec) = recorded.unwrap_or((pages, digest ^ u64::from(mode >> 1 & 1)));
    let info = MemoryInfo {
        regions,
        data_pages,
        digest: digest_rec,
    };
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let result = memory_file::open_and_verify(&path, &info);
    let want =
        layout_ok(&info.regions) && len == total && (pages, digest) == (data_pages, digest_rec);
    assert_eq!(
        result.is_ok(),
        want,
        "verify gave {result:?} for {info:?}, file of {len} bytes"
    );
    let Ok(opened) = result else {
        return;
    };
    let mem = memory_file::map_private(opened, &path, &info).expect("map a verified file");
    let mut off = 0usize;
    for r in &info.regions {
        let mut got = vec![0u8; r.len as usize];
        mem.read_slice(&mut got, GuestAddress(r.guest_addr))
            .expect("read guest memory");
        assert!(
            got == contents[off..off + got.len()],
            "region {r:?} maps other bytes"
        );
        off += got.len();
    }
}
