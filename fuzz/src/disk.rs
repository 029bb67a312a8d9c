//! The disk image behind the block targets: a memfd (nothing left on the host's file
//! systems, fsync costs nothing), opened by `Block::open` through `/proc/self/fd`.
//! [`reset`] rewrites its contents before every run, so a write in one run is not seen
//! by the next.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

pub use devices::virtio::block::BlockConfig;
use devices::virtio::block::SECTOR_SIZE;

/// Sectors of the image.
pub const SECTORS: u64 = 16;

fn memfd() -> &'static File {
    static FILE: OnceLock<File> = OnceLock::new();
    FILE.get_or_init(|| {
        // SAFETY: the name is a NUL-terminated string; the call touches no other memory.
        let fd = unsafe { libc::memfd_create(c"wisp-fuzz-disk".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and nothing else owns it.
        unsafe { File::from_raw_fd(fd) }
    })
}

/// How to open the image.
pub fn config(read_only: bool) -> BlockConfig {
    BlockConfig {
        path: PathBuf::from(format!("/proc/self/fd/{}", memfd().as_raw_fd())),
        read_only,
        id: "fuzz-disk-01234567".into(),
    }
}

/// Writes the image's known contents (sector `i` filled with byte `i`, and a partial
/// sector after the last, which the guest must not see) and returns how to open it.
pub fn reset(read_only: bool) -> BlockConfig {
    let file = memfd();
    let mut content = vec![0u8; ((SECTORS + 1) * SECTOR_SIZE) as usize];
    for (i, b) in content.iter_mut().enumerate() {
        *b = (i as u64 / SECTOR_SIZE) as u8;
    }
    // A partial last sector: not part of the capacity.
    content.truncate(content.len() - 100);
    file.write_all_at(&content, 0)
        .expect("write the disk image");
    file.set_len(content.len() as u64)
        .expect("size the disk image");
    config(read_only)
}

/// The image's current contents.
pub fn contents() -> Vec<u8> {
    let file = memfd();
    let len = file.metadata().expect("stat the disk image").len() as usize;
    let mut out = vec![0u8; len];
    file.read_exact_at(&mut out, 0)
        .expect("read the disk image");
    out
}
