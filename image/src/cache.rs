//! Where converted images are kept: `$XDG_CACHE_HOME/wisp/images/<image id>/` (default
//! `~/.cache/wisp/images/`), holding `rootfs.ext4`, the image's `config.json`, and its
//! `/etc/passwd` and `/etc/group` (to resolve a user name without opening the disk).
//! An entry appears whole (its directory is renamed into place), and is never written
//! after that: VMs get it read-only.

use std::path::{Path, PathBuf};

/// The cache directory.
pub fn dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("wisp/images")
}

/// One converted image in `cache`.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its directory.
    pub dir: PathBuf,
}

impl Entry {
    /// The entry of image `id` (hex) under `cache`.
    pub fn new(cache: &Path, id: &str) -> Self {
        Self {
            dir: cache.join(id),
        }
    }

    /// The ext4 disk.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }

    /// The image's config.
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The image's `/etc/passwd`, if it had one.
    pub fn passwd(&self) -> PathBuf {
        self.dir.join("passwd")
    }

    /// The image's `/etc/group`, if it had one.
    pub fn group(&self) -> PathBuf {
        self.dir.join("group")
    }

    /// Whether it is complete (only complete entries are ever in place).
    pub fn present(&self) -> bool {
        self.disk().is_file() && self.config().is_file()
    }
}
