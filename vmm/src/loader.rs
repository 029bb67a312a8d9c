//! Kernel and initrd loading.
//!
//! - ELF `vmlinux`: the PVH entry when the ELF note is present, otherwise the 64-bit
//!   entry at `e_entry`;
//! - `bzImage`: the 64-bit boot protocol (protected-mode kernel at 1 MiB, entry at +0x200);
//! - initrd: page-aligned at the top of low RAM, below the kernel's `initrd_addr_max`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use devices::host_file;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::arch::layout::{low_ram_end, HIMEM_START};
use crate::arch::regs::EntryPoint;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
const BZIMAGE_VERSION_OFFSET: usize = 0x206;
const BZIMAGE_XLOADFLAGS_OFFSET: usize = 0x236;
const XLF_KERNEL_64: u16 = 1;
const BOOT_PROTOCOL_64BIT_ENTRY: u16 = 0x20c;
const STARTUP_64_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 0x1000;
const HEADER_PROBE_LEN: usize = 0x240;
const PT_LOAD: u32 = 1;
/// More program headers than any kernel has: a corrupt header.
const MAX_PHDRS: u64 = 128;
const BZIMAGE_SETUP_SECTS_OFFSET: usize = 0x1f1;
const BZIMAGE_SYSSIZE_OFFSET: usize = 0x1f4;

/// Errors loading the kernel or initrd.
#[derive(Debug, Error)]
pub enum LoaderError {
    /// The file cannot be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("{0} is not a kernel: expected an x86_64 ELF vmlinux or a bzImage")]
    NotAKernel(PathBuf),
    /// An ELF for another machine or class.
    #[error("{0} is an ELF file but not an x86_64 (64-bit) kernel")]
    WrongElf(PathBuf),
    /// A bzImage too old for the 64-bit boot protocol.
    #[error("{0} is a bzImage without a 64-bit entry point (boot protocol 2.12+ needed)")]
    No64BitEntry(PathBuf),
    /// The file is shorter than its own headers say.
    #[error("kernel {} is truncated: its headers describe {need} bytes, the file has {have}; copy or build it again", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the headers cover.
        need: u64,
        /// The file's size.
        have: u64,
    },
    /// linux-loader refused the image, usually because it does not fit in guest memory.
    #[error("cannot load kernel {path} into {mem_mib} MiB of guest memory ({source}); is --memory large enough?")]
    Load {
        /// The file.
        path: PathBuf,
        /// Guest memory size.
        mem_mib: u64,
        /// Cause.
        source: linux_loader::loader::Error,
    },
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel; raise --memory")]
    InitrdTooBig {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// A kernel in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Where the vCPU starts.
    pub entry: EntryPoint,
    /// First address after the kernel image (including its bss).
    pub end: u64,
    /// The bzImage setup header, which goes into the zero page.
    pub header: Option<setup_header>,
    /// Highest address the initrd may occupy.
    pub initrd_addr_max: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Format {
    Elf,
    BzImage,
}

fn read_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> LoaderError + 'a {
    move |source| LoaderError::Read {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn detect(path: &Path, head: &[u8]) -> Result<Format, LoaderError> {
    if head.starts_with(&ELF_MAGIC) {
        let class = head.get(4).copied();
        let machine = head.get(18..20).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if class != Some(ELFCLASS64) || machine != Some(EM_X86_64) {
            return Err(LoaderError::WrongElf(path.to_path_buf()));
        }
        return Ok(Format::Elf);
    }
    if head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(BZIMAGE_MAGIC) {
        let field = |off: usize| {
            head.get(off..off + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        let version = field(BZIMAGE_VERSION_OFFSET).unwrap_or(0);
        let xloadflags = field(BZIMAGE_XLOADFLAGS_OFFSET).unwrap_or(0);
        if version < BOOT_PROTOCOL_64BIT_ENTRY || xloadflags & XLF_KERNEL_64 == 0 {
            return Err(LoaderError::No64BitEntry(path.to_path_buf()));
        }
        return Ok(Format::BzImage);
    }
    Err(LoaderError::NotAKernel(path.to_path_buf()))
}

fn le(bytes: &[u8], off: usize, len: usize) -> Option<u64> {
    let b = bytes.get(off..off + len)?;
    Some(
        b.iter()
            .rev()
            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x)),
    )
}

/// How many bytes of the file the image's headers say it has: for an ELF, the end of
/// its last loadable segment; for a bzImage, setup sectors plus the protected-mode
/// kernel. None if the headers cannot be read (the loader then says why).
fn image_extent(file: &mut File, format: &Format, head: &[u8]) -> Option<u64> {
    match format {
        Format::BzImage => {
            let setup = match le(head, BZIMAGE_SETUP_SECTS_OFFSET, 1)? {
                0 => 4,
                n => n,
            };
            let syssize = le(head, BZIMAGE_SYSSIZE_OFFSET, 4)?;
            Some((setup + 1) * 512 + syssize * 16)
        }
        Format::Elf => {
            let phoff = le(head, 0x20, 8)?;
            let phentsize = le(head, 0x36, 2)?;
            let phnum = le(head, 0x38, 2)?;
            if phentsize < 56 || phnum > MAX_PHDRS {
                return None;
            }
            let mut phdrs = vec![0u8; (phentsize * phnum) as usize];
            file.seek(SeekFrom::Start(phoff)).ok()?;
            file.read_exact(&mut phdrs).ok()?;
            phdrs
                .chunks_exact(phentsize as usize)
                .filter(|p| le(p, 0, 4) == Some(u64::from(PT_LOAD)))
                .map(|p| le(p, 8, 8)?.checked_add(le(p, 32, 8)?))
                .try_fold(0u64, |end, e| Some(end.max(e?)))
        }
    }
}

/// Checks that `path` is a kernel wisp can boot (its format, a 64-bit entry, not cut
/// short) without loading it: `wisp run` asks before anything slow or noisy.
pub fn check_kernel(path: &Path) -> Result<(), LoaderError> {
    open_kernel(path).map(drop)
}

/// Opens the kernel at `path` and checks its headers: the file at its start, and its
/// format.
fn open_kernel(path: &Path) -> Result<(File, Format), LoaderError> {
    let mut file = host_file::open_regular(path).map_err(read_err("kernel", path))?;
    let mut head = Vec::with_capacity(HEADER_PROBE_LEN);
    (&mut file)
        .take(HEADER_PROBE_LEN as u64)
        .read_to_end(&mut head)
        .map_err(read_err("kernel", path))?;
    let format = detect(path, &head)?;
    let have = file.metadata().map_err(read_err("kernel", path))?.len();
    match image_extent(&mut file, &format, &head) {
        Some(need) if need > have => {
            return Err(LoaderError::Truncated {
                path: path.to_path_buf(),
                need,
                have,
            })
        }
        _ => {}
    }
    file.seek(SeekFrom::Start(0))
        .map_err(read_err("kernel", path))?;
    Ok((file, format))
}

/// Loads the kernel at `path` into `mem` (of `mem_size` bytes).
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    path: &Path,
) -> Result<LoadedKernel, LoaderError> {
    let (mut file, format) = open_kernel(path)?;
    let load_err = |source| LoaderError::Load {
        path: path.to_path_buf(),
        mem_mib: mem_size >> 20,
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        Format::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryPoint::Pvh(addr.0),
                _ => EntryPoint::Linux64(r.kernel_load.0),
            };
            Ok(LoadedKernel {
                entry,
                end: r.kernel_end,
                header: None,
                initrd_addr_max: u64::from(u32::MAX),
            })
        }
        Format::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            let header = r.setup_header;
            let max = header.map_or(0x37ff_ffff, |h| u64::from(h.initrd_addr_max));
            Ok(LoadedKernel {
                entry: EntryPoint::Linux64(r.kernel_load.0 + STARTUP_64_OFFSET),
                end: r.kernel_end,
                header,
                initrd_addr_max: max,
            })
        }
    }
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as allowed.
fn initrd_address(size: u64, mem_size: u64, kernel: &LoadedKernel) -> Option<u64> {
    let top = low_ram_end(mem_size).min(kernel.initrd_addr_max.saturating_add(1));
    let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel.end && size > 0).then_some(addr)
}

/// Loads the initrd at `path`; returns its (address, size).
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<(u64, u64), LoaderError> {
    let mut file = host_file::open_regular(path).map_err(read_err("initrd", path))?;
    let size = file.metadata().map_err(read_err("initrd", path))?.len();
    let addr = initrd_address(size, mem_size, kernel).ok_or_else(|| LoaderError::InitrdTooBig {
        path: path.to_path_buf(),
        size,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| LoaderError::Read {
            what: "initrd",
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(end: u64) -> LoadedKernel {
        LoadedKernel {
            entry: EntryPoint::Linux64(0x100_0000),
            end,
            header: None,
            initrd_addr_max: u64::from(u32::MAX),
        }
    }

    #[test]
    fn detects_formats() {
        let p = Path::new("k");
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(&ELF_MAGIC);
        elf[4] = ELFCLASS64;
        elf[18] = 62;
        assert_eq!(detect(p, &elf).unwrap(), Format::Elf);
        elf[18] = 3; // i386
        assert!(matches!(detect(p, &elf), Err(LoaderError::WrongElf(_))));
        let mut bz = vec![0u8; HEADER_PROBE_LEN];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        bz[0x236] = 1;
        assert_eq!(detect(p, &bz).unwrap(), Format::BzImage);
        bz[0x236] = 0;
        assert!(matches!(detect(p, &bz), Err(LoaderError::No64BitEntry(_))));
        assert!(matches!(
            detect(p, b"#!/bin/sh\n"),
            Err(LoaderError::NotAKernel(_))
        ));
        assert!(matches!(detect(p, b""), Err(LoaderError::NotAKernel(_))));
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let mem = 128u64 << 20;
        let k = kernel(0x200_0000);
        let addr = initrd_address(0x1234, mem, &k).unwrap();
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + 0x1234 <= mem);
        assert!(addr + 0x1234 + PAGE_SIZE > mem);
        // Respects the kernel's limit.
        let mut low = kernel(0x200_0000);
        low.initrd_addr_max = 0x3ff_ffff;
        assert!(initrd_address(0x1000, mem, &low).unwrap() + 0x1000 <= 0x400_0000);
        // Does not fit above the kernel.
        assert_eq!(initrd_address(127 << 20, mem, &k), None);
        assert_eq!(initrd_address(0, mem, &k), None);
        // Large guests: stays below the MMIO gap.
        let big = 8u64 << 30;
        assert!(initrd_address(0x1000, big, &k).unwrap() < crate::arch::layout::MMIO_GAP_START);
    }

    #[test]
    fn missing_and_bogus_kernels_give_clear_errors() {
        let mem = crate::memory::create(16 << 20).unwrap();
        let e = load_kernel(&mem, 16 << 20, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot read kernel /nonexistent/vmlinux"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("wisp-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("notakernel");
        std::fs::write(&f, b"hello world, definitely not a kernel").unwrap();
        let e = load_kernel(&mem, 16 << 20, &f).unwrap_err();
        assert!(e.to_string().contains("is not a kernel"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
