//! The container's root file system as containerd's snapshotter describes it (one or
//! more mounts, e.g. an overlay of the image's layers), mounted at `BUNDLE/rootfs`
//! with mount(2) in the shim itself: wisp packs it into the VM's disk from there.

use std::ffi::CString;
use std::path::Path;

use containerd_shim::protos::types::mount::Mount;
use thiserror::Error;

/// The largest mount data the kernel takes (one page, less a margin).
const MAX_DATA: usize = 4000;

/// Why the rootfs cannot be mounted.
#[derive(Debug, Error)]
pub enum RootfsError {
    /// A mount failed.
    #[error("cannot mount the container's rootfs ({typ} {source_path}) at {target}: {why}")]
    Mount {
        /// The type.
        typ: String,
        /// The source.
        source_path: String,
        /// Where.
        target: String,
        /// Why.
        why: String,
    },
}

/// mount(8) option words that are flags rather than file-system data.
fn flag(word: &str) -> Option<(bool, libc::c_ulong)> {
    Some(match word {
        "ro" => (true, libc::MS_RDONLY),
        "rw" => (false, libc::MS_RDONLY),
        "nosuid" => (true, libc::MS_NOSUID),
        "suid" => (false, libc::MS_NOSUID),
        "nodev" => (true, libc::MS_NODEV),
        "dev" => (false, libc::MS_NODEV),
        "noexec" => (true, libc::MS_NOEXEC),
        "exec" => (false, libc::MS_NOEXEC),
        "sync" => (true, libc::MS_SYNCHRONOUS),
        "async" => (false, libc::MS_SYNCHRONOUS),
        "noatime" => (true, libc::MS_NOATIME),
        "atime" => (false, libc::MS_NOATIME),
        "nodiratime" => (true, libc::MS_NODIRATIME),
        "relatime" => (true, libc::MS_RELATIME),
        "norelatime" => (false, libc::MS_RELATIME),
        "strictatime" => (true, libc::MS_STRICTATIME),
        "bind" => (true, libc::MS_BIND),
        "rbind" => (true, libc::MS_BIND | libc::MS_REC),
        "remount" => (true, libc::MS_REMOUNT),
        _ => return None,
    })
}

/// Splits mount options into flags and the data string.
fn parse_options(options: &[String]) -> (libc::c_ulong, String) {
    let mut flags = 0;
    let mut data = Vec::new();
    for o in options {
        match flag(o) {
            Some((true, f)) => flags |= f,
            Some((false, f)) => flags &= !f,
            None => data.push(o.as_str()),
        }
    }
    (flags, data.join(","))
}

/// Mounts `mounts`, in order, at `target`; returns whether anything was mounted.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<bool, RootfsError> {
    for m in mounts {
        let fail = |why: String| RootfsError::Mount {
            typ: m.type_.clone(),
            source_path: m.source.clone(),
            target: target.display().to_string(),
            why,
        };
        std::fs::create_dir_all(target).map_err(|e| fail(e.to_string()))?;
        let (mut flags, data) = parse_options(&m.options);
        if m.type_ == "bind" {
            flags |= libc::MS_BIND;
        }
        if data.len() > MAX_DATA {
            return Err(fail(format!(
                "its options take {} bytes (too many layers); the kernel takes one page",
                data.len()
            )));
        }
        let c = |s: &str| CString::new(s).map_err(|_| fail("a NUL byte in the mount".into()));
        let source = c(&m.source)?;
        let typ = c(&m.type_)?;
        let dst = c(&target.to_string_lossy())?;
        let data = c(&data)?;
        // A read-only bind needs a remount to take the flag.
        let ro_bind = flags & libc::MS_BIND != 0 && flags & libc::MS_RDONLY != 0;
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let r = unsafe {
            libc::mount(
                source.as_ptr(),
                dst.as_ptr(),
                typ.as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(fail(std::io::Error::last_os_error().to_string()));
        }
        if ro_bind {
            // SAFETY: as above; a remount of the bind just made.
            let r = unsafe {
                libc::mount(
                    std::ptr::null(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    flags | libc::MS_REMOUNT,
                    std::ptr::null(),
                )
            };
            if r != 0 {
                return Err(fail(std::io::Error::last_os_error().to_string()));
            }
        }
    }
    Ok(!mounts.is_empty())
}

/// Unmounts everything at and under `bundle/rootfs` (lazily: wisp has its copy).
pub fn unmount(bundle: &Path) {
    let target = bundle.join("rootfs");
    if let Err(e) = containerd_shim::mount::umount_recursive(target.to_str(), libc::MNT_DETACH) {
        log::warn!("cannot unmount {}: {e}", target.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_data_are_told_apart() {
        let o = |w: &[&str]| parse_options(&w.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let (f, d) = o(&[
            "ro",
            "nosuid",
            "lowerdir=/a:/b",
            "upperdir=/u",
            "workdir=/w",
        ]);
        assert_eq!(f, libc::MS_RDONLY | libc::MS_NOSUID);
        assert_eq!(d, "lowerdir=/a:/b,upperdir=/u,workdir=/w");
        let (f, d) = o(&["rbind", "ro", "rw"]);
        assert_eq!((f, d.as_str()), (libc::MS_BIND | libc::MS_REC, ""));
    }
}
