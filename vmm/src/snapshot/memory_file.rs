//! The memory file: guest RAM, regions back to back in guest-physical order, sparse.
//!
//! Pages that are all zero are not written, so they stay holes: a guest that touched
//! 30 MiB of 256 MiB costs about 30 MiB of disk. The state records a digest of the file:
//! CRC-64/XZ over, for each non-zero 4 KiB page in file order, its file offset (8 bytes,
//! little endian) followed by its contents. Zero pages do not contribute, so the digest
//! does not depend on where the file system keeps holes, and checking it reads only the
//! file's data extents: its cost follows the memory the guest used, not its size.
//!
//! A restore maps the file MAP_PRIVATE: pages load on first touch and guest writes stay
//! in the process, so one snapshot can be restored any number of times.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{GuestRegionMmap, MmapRegion};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;
use crate::state::format::crc64_digest;
use crate::state::pages::{self, is_zero, PAGE};

/// Bytes copied out of guest memory (or read from the file) at a time.
const CHUNK: usize = 1 << 20;

/// Errors writing, checking or mapping a memory file.
#[derive(Debug, Error)]
pub enum MemoryFileError {
    /// Host I/O on the file.
    #[error("memory file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The file does not have the size the state records.
    #[error("memory file {path} is {got} bytes, the snapshot expects {want} (truncated or from another snapshot)")]
    Size {
        /// The file.
        path: PathBuf,
        /// Its size.
        got: u64,
        /// The recorded size.
        want: u64,
    },
    /// The contents changed since the snapshot was written.
    #[error("memory file {path} is corrupt (digest mismatch)")]
    Digest {
        /// The file.
        path: PathBuf,
    },
    /// The recorded layout is not one wisp could have written.
    #[error("the snapshot's memory layout is invalid: {0}")]
    Layout(String),
    /// Guest memory could not be read.
    #[error("cannot read guest memory: {0}")]
    Guest(vm_memory::GuestMemoryError),
    /// Mapping the file failed.
    #[error("cannot map memory file {path}: {why}")]
    Map {
        /// The file.
        path: PathBuf,
        /// Cause.
        why: String,
    },
}

/// One RAM region and where it sits in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What the state records about the memory file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// The regions, in file order (the file offset of each is the sum of the lengths
    /// before it).
    pub regions: Vec<RegionInfo>,
    /// Non-zero pages written.
    pub data_pages: u64,
    /// The digest described in the module documentation.
    pub digest: u64,
}

impl MemoryInfo {
    /// The file's length: all regions.
    pub fn file_len(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> MemoryFileError + '_ {
    move |source| MemoryFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `mem` to a new file at `path` (mode 0600), leaving zero pages as holes.
/// The vCPUs and devices must be paused.
pub fn write(mem: &GuestMemory, path: &Path) -> Result<MemoryInfo, MemoryFileError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    let mut digest = crc64_digest();
    let mut data_pages = 0u64;
    pages::walk(
        mem,
        None,
        |run| {
            // Write each stretch of non-zero pages with one call.
            let mut stretch: Option<(u64, usize)> = None;
            for (i, page) in run.pages().enumerate() {
                if page.zero {
                    if let Some((at, from)) = stretch.take() {
                        file.write_all_at(&run.data[from..i * PAGE], at)
                            .map_err(io_err(path))?;
                    }
                    continue;
                }
                digest.update(&page.offset.to_le_bytes());
                digest.update(page.data);
                data_pages += 1;
                stretch.get_or_insert((page.offset, i * PAGE));
            }
            if let Some((at, from)) = stretch {
                file.write_all_at(&run.data[from..], at)
                    .map_err(io_err(path))?;
            }
            Ok(())
        },
        MemoryFileError::Guest,
    )?;
    let regions: Vec<RegionInfo> = mem
        .iter()
        .map(|r| RegionInfo {
            guest_addr: r.start_addr().0,
            len: r.len(),
        })
        .collect();
    let file_off: u64 = regions.iter().map(|r| r.len).sum();
    // Trailing zero pages: extend the file without writing them.
    file.set_len(file_off).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    Ok(MemoryInfo {
        regions,
        data_pages,
        digest: digest.finalize(),
    })
}

/// `lseek` with SEEK_DATA or SEEK_HOLE; None past the last data (ENXIO).
fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let from = libc::off_t::try_from(from).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek on a descriptor we own; it touches no memory.
    let r = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// Opens the memory file at `path` and checks its size and digest against `info`.
pub fn open_and_verify(path: &Path, info: &MemoryInfo) -> Result<File, MemoryFileError> {
    check_layout(info)?;
    let file = devices::host_file::open_regular(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let want = info.file_len();
    if len != want {
        return Err(MemoryFileError::Size {
            path: path.to_path_buf(),
            got: len,
            want,
        });
    }
    let mut digest = crc64_digest();
    let mut pages = 0u64;
    let mut buf = vec![0u8; CHUNK];
    // Pages before `cursor` are done (extents may share a page on small-block file
    // systems once aligned).
    let mut cursor = 0u64;
    let page = PAGE as u64;
    while cursor < len {
        let Some(data) = seek(&file, cursor, libc::SEEK_DATA).map_err(io_err(path))? else {
            break;
        };
        let start = (data / page * page).max(cursor);
        let hole = seek(&file, data, libc::SEEK_HOLE)
            .map_err(io_err(path))?
            .unwrap_or(len);
        let end = hole.div_ceil(page).saturating_mul(page).min(len);
        let mut off = start;
        while off < end {
            let n = (end - off).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            file.read_exact_at(chunk, off).map_err(io_err(path))?;
            for (i, p) in chunk.chunks(PAGE).enumerate() {
                if !is_zero(p) {
                    digest.update(&(off + (i * PAGE) as u64).to_le_bytes());
                    digest.update(p);
                    pages += 1;
                }
            }
            off += n as u64;
        }
        cursor = end.max(start + page);
    }
    if pages != info.data_pages || digest.finalize() != info.digest {
        return Err(MemoryFileError::Digest {
            path: path.to_path_buf(),
        });
    }
    Ok(file)
}

/// Regions must be page-aligned, sorted and non-overlapping.
fn check_layout(info: &MemoryInfo) -> Result<(), MemoryFileError> {
    if info.regions.is_empty() {
        return Err(MemoryFileError::Layout("no regions".into()));
    }
    let mut prev_end = 0u64;
    for r in &info.regions {
        let end = r.guest_addr.checked_add(r.len);
        let aligned = r.guest_addr.is_multiple_of(PAGE as u64) && r.len.is_multiple_of(PAGE as u64);
        match end {
            Some(end) if aligned && r.len > 0 && r.guest_addr >= prev_end => prev_end = end,
            _ => {
                return Err(MemoryFileError::Layout(format!(
                    "region {:#x}+{:#x}",
                    r.guest_addr, r.len
                )))
            }
        }
    }
    Ok(())
}

/// Guest memory backed by `file` (checked by [`open_and_verify`]) with copy-on-write:
/// MAP_PRIVATE, so the file never changes.
pub fn map_private(
    file: File,
    path: &Path,
    info: &MemoryInfo,
) -> Result<GuestMemory, MemoryFileError> {
    let map_err = |why: String| MemoryFileError::Map {
        path: path.to_path_buf(),
        why,
    };
    let file = Arc::new(file);
    let mut regions = Vec::with_capacity(info.regions.len());
    let mut file_off = 0u64;
    for r in &info.regions {
        let len = usize::try_from(r.len).map_err(|_| map_err("region too large".into()))?;
        let mapping = MmapRegion::<AtomicBitmap>::build(
            Some(FileOffset::from_arc(file.clone(), file_off)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| map_err("region wraps around".into()))?;
        regions.push(region);
        file_off += r.len;
    }
    GuestMemory::from_regions(regions).map_err(|e| map_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wisp-memfile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn guest() -> GuestMemory {
        let mem = crate::memory::create(16 << 20).unwrap();
        mem.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x50_0fff)).unwrap();
        mem.write_slice(&[7u8; 3 * PAGE], GuestAddress(0xa0_0000))
            .unwrap();
        mem
    }

    #[test]
    fn sparse_write_verify_and_private_map() {
        let dir = temp_dir("ok");
        let path = dir.join("memory");
        let mem = guest();
        let info = write(&mem, &path).unwrap();
        assert_eq!(info.data_pages, 5);
        assert_eq!(info.file_len(), 16 << 20);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 16 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "file is not sparse: {} blocks",
            meta.blocks()
        );
        let file = open_and_verify(&path, &info).unwrap();
        let restored = map_private(file, &path, &info).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0x1234_5678
        );
        assert_eq!(
            restored.read_obj::<u8>(GuestAddress(0x50_0fff)).unwrap(),
            0xff
        );
        // Writes stay private: the file keeps the snapshot.
        restored.write_obj(1u8, GuestAddress(0x2000)).unwrap();
        assert!(open_and_verify(&path, &info).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corruption_size_and_layout_are_caught() {
        let dir = temp_dir("bad");
        let path = dir.join("memory");
        let info = write(&guest(), &path).unwrap();
        let original = std::fs::read(&path).unwrap();
        // A flipped byte in a data page and in a hole.
        for at in [0x1001u64, 0x80_0000] {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&[original[at as usize] ^ 0x40], at).unwrap();
            let e = open_and_verify(&path, &info).unwrap_err();
            assert!(matches!(e, MemoryFileError::Digest { .. }), "{at:#x}: {e}");
            f.write_all_at(&[original[at as usize]], at).unwrap();
        }
        assert!(open_and_verify(&path, &info).is_ok());
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        let e = open_and_verify(&path, &info).unwrap_err();
        assert!(e.to_string().contains("expects 16777216"), "{e}");
        let mut bad = info.clone();
        bad.regions[0].len = 123;
        assert!(matches!(
            open_and_verify(&path, &bad).unwrap_err(),
            MemoryFileError::Layout(_)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fully_written_copy_verifies_too() {
        // `cp --sparse=never` turns every hole into data; the digest must not care.
        let dir = temp_dir("dense");
        let path = dir.join("memory");
        let info = write(&guest(), &path).unwrap();
        let dense = dir.join("dense");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::File::create(&dense)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        assert!(open_and_verify(&dense, &info).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
