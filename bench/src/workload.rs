//! The workload every kind runs: busybox with one tiny init that serves HTTP (busybox
//! httpd) and prints a ready marker, packed once as an initramfs for the VMs and as an
//! OCI root file system for the containers. Cached under the bench's work directory,
//! keyed on the busybox binary and this file's version of the workload.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use wisp_image::cpio::{self, Entry};

/// What the init prints once httpd listens.
pub const READY_MARKER: &str = "WISP-BENCH-READY";
/// What the served page says; every answer is checked for it.
pub const PAGE_TOKEN: &str = "wisp-bench-page";
/// Bumped whenever the workload's files change.
const VERSION: u32 = 1;

/// The init, the same file in VMs (PID 1 of the guest, where nothing is mounted, which
/// httpd does not need) and in containers (PID 1 of the container). httpd binds its port
/// before it goes to the background, so the marker means it answers.
const INIT: &str = "#!/bin/sh
# wisp bench workload: the same in VMs and containers.
busybox httpd -p 80 -h /www || exit 1
echo WISP-BENCH-READY
exec busybox sleep 2147483647
";

/// The built workload.
#[derive(Clone, Debug)]
pub struct Workload {
    /// The VMs' initramfs (uncompressed newc cpio: unpacking costs least that way).
    pub initramfs: PathBuf,
    /// The containers' root file system (read-only in the containers).
    pub rootfs: PathBuf,
    /// The directory both live in.
    pub dir: PathBuf,
}

/// Building the workload failed.
#[derive(Debug, Error)]
pub enum WorkloadError {
    /// busybox is missing or unreadable.
    #[error(
        "cannot read busybox at {path}: {source} (install busybox-static: scripts/install-deps.sh)"
    )]
    Busybox {
        /// Where it was looked for.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Writing the cache failed.
    #[error("cannot write the bench workload in {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

/// FNV-1a over `bytes`, as a cache key.
pub(crate) fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Builds the workload under `work_dir` from `busybox` unless it is already there.
pub fn prepare(busybox: &Path, work_dir: &Path) -> Result<Workload, WorkloadError> {
    let bb = fs::read(busybox).map_err(|source| WorkloadError::Busybox {
        path: busybox.to_path_buf(),
        source,
    })?;
    let key = fnv64(&[&bb[..], INIT.as_bytes(), &VERSION.to_le_bytes()].concat());
    let dir = work_dir.join(format!("workload-{key:016x}"));
    let w = Workload {
        initramfs: dir.join("initramfs.cpio"),
        rootfs: dir.join("rootfs"),
        dir: dir.clone(),
    };
    if dir.join("done").is_file() {
        return Ok(w);
    }
    let write = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WorkloadError::Write { path, source }
    };
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(write(&dir))?;
    }
    let page = format!("<html><body>{PAGE_TOKEN}</body></html>\n");
    let image = cpio::archive(&[
        Entry::Dir {
            path: "bin",
            mode: 0o755,
        },
        Entry::File {
            path: "bin/busybox",
            mode: 0o755,
            data: &bb,
        },
        Entry::Symlink {
            path: "bin/sh",
            target: "busybox",
        },
        Entry::Dir {
            path: "dev",
            mode: 0o755,
        },
        // The kernel opens it as init's stdin, stdout and stderr.
        Entry::CharDev {
            path: "dev/console",
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        Entry::File {
            path: "init",
            mode: 0o755,
            data: INIT.as_bytes(),
        },
        Entry::Dir {
            path: "www",
            mode: 0o755,
        },
        Entry::File {
            path: "www/index.html",
            mode: 0o644,
            data: page.as_bytes(),
        },
    ]);
    let root = &w.rootfs;
    for sub in ["bin", "dev", "proc", "sys", "tmp", "www"] {
        fs::create_dir_all(root.join(sub)).map_err(write(&root.join(sub)))?;
    }
    let files: [(&str, &[u8], u32); 3] = [
        ("bin/busybox", &bb, 0o755),
        ("init", INIT.as_bytes(), 0o755),
        ("www/index.html", page.as_bytes(), 0o644),
    ];
    for (name, data, mode) in files {
        let path = root.join(name);
        fs::write(&path, data).map_err(write(&path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(write(&path))?;
    }
    symlink("busybox", root.join("bin/sh")).map_err(write(&root.join("bin/sh")))?;
    fs::write(&w.initramfs, image).map_err(write(&w.initramfs))?;
    fs::write(dir.join("done"), b"").map_err(write(&dir))?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_once_and_both_forms_hold_the_same_files() {
        let tmp = std::env::temp_dir().join(format!("wisp-bench-wl-{}", std::process::id()));
        let fake_busybox = tmp.join("busybox");
        fs::create_dir_all(&tmp).unwrap();
        fs::write(&fake_busybox, b"\x7fELF not really").unwrap();
        let w = prepare(&fake_busybox, &tmp).unwrap();
        assert_eq!(fs::read(w.rootfs.join("init")).unwrap(), INIT.as_bytes());
        assert_eq!(
            fs::read_link(w.rootfs.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        let cpio = fs::read(&w.initramfs).unwrap();
        for name in [
            "bin/busybox\0",
            "init\0",
            "dev/console\0",
            "www/index.html\0",
        ] {
            assert!(
                cpio.windows(name.len()).any(|x| x == name.as_bytes()),
                "{name}"
            );
        }
        // Cached: a second call finds it; a different busybox makes a new one.
        let stamp = fs::metadata(&w.initramfs).unwrap().modified().unwrap();
        let again = prepare(&fake_busybox, &tmp).unwrap();
        assert_eq!(
            fs::metadata(&again.initramfs).unwrap().modified().unwrap(),
            stamp
        );
        fs::write(&fake_busybox, b"\x7fELF another").unwrap();
        assert_ne!(prepare(&fake_busybox, &tmp).unwrap().dir, w.dir);
        let missing = prepare(&tmp.join("nope"), &tmp).unwrap_err();
        assert!(missing.to_string().contains("busybox-static"), "{missing}");
        fs::remove_dir_all(&tmp).unwrap();
    }
}
