//! Image to ext4 disk: the layers applied in order into a staging root (each by a
//! helper process chrooted there, so no path in a layer reaches outside), then
//! `mke2fs -d` packs the root into `rootfs.ext4`, and the cache entry is renamed into
//! place. A second conversion of the same image finds the entry and does nothing.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cache::{self, Entry};
use crate::digest::Hashing;
use crate::source::{Image, LayerBlob};
use crate::ImageError;

/// What [`ensure`] did.
#[derive(Debug)]
pub struct Converted {
    /// The cache entry.
    pub entry: Entry,
    /// Whether it converted (false: the entry was already there).
    pub converted: bool,
    /// How long it took.
    pub took: Duration,
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes sure `image` is converted in `cache_dir`. `helper(root, limit)` is the command
/// that applies one layer, read from its stdin, onto `root` chrooted, refusing it past
/// `limit` uncompressed bytes (see [`helper_main`]);
/// `progress` gets a line per step.
pub fn ensure(
    image: &Image,
    cache_dir: &Path,
    helper: &dyn Fn(&Path, u64) -> Command,
    progress: &mut dyn FnMut(&str),
) -> Result<Converted, ImageError> {
    let t0 = Instant::now();
    let entry = Entry::new(cache_dir, &image.id);
    if entry.present() {
        return Ok(Converted {
            entry,
            converted: false,
            took: t0.elapsed(),
        });
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ImageError::Convert(format!(
            "converting {} keeps its files' owners, which needs root: run wisp as root \
             (later runs use the converted disk in {})",
            image.reference,
            cache_dir.display()
        )));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(cache_dir)
        .map_err(write_err(cache_dir))?;
    let lock_path = cache_dir.join(format!("{}.lock", image.id));
    let lock = File::create(&lock_path).map_err(write_err(&lock_path))?;
    // SAFETY: flock on a descriptor we own; it blocks until another wisp converting
    // the same image is done.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(write_err(&lock_path)(io::Error::last_os_error()));
    }
    if entry.present() {
        return Ok(Converted {
            entry,
            converted: false,
            took: t0.elapsed(),
        });
    }
    remove_stale_partials(cache_dir, &image.id);
    let staging = cache_dir.join(format!("{}.partial-{}", image.id, std::process::id()));
    let result = build(image, &staging, helper, progress)
        .and_then(|()| fs::rename(&staging, &entry.dir).map_err(write_err(&entry.dir)));
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result?;
    Ok(Converted {
        entry,
        converted: true,
        took: t0.elapsed(),
    })
}

/// Removes `<id>.partial-PID` directories of conversions that died (we hold the
/// image's lock, so none of them is running).
fn remove_stale_partials(cache_dir: &Path, id: &str) {
    let prefix = format!("{id}.partial-");
    let Ok(rd) = fs::read_dir(cache_dir) else {
        return;
    };
    for e in rd.flatten() {
        let is_partial = e.file_name().to_string_lossy().starts_with(&prefix);
        if is_partial && e.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn build(
    image: &Image,
    staging: &Path,
    helper: &dyn Fn(&Path, u64) -> Command,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let _ = fs::remove_dir_all(staging);
    let root = staging.join("root");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&root)
        .map_err(write_err(&root))?;
    let n = image.layers.len();
    for (i, layer) in image.layers.iter().enumerate() {
        progress(&format!(
            "image: layer {}/{n} ({}, {})",
            i + 1,
            layer.short(),
            mib(layer.len)
        ));
        let name = format!("{}/{n} ({})", i + 1, layer.short());
        check_blob(layer, &name)?;
        let diff = apply_in_helper(helper, &root, layer, &name)?;
        if diff != layer.diff_id {
            return Err(ImageError::DigestMismatch {
                what: format!("layer {name}, uncompressed"),
                want: format!("sha256:{}", layer.diff_id),
                got: format!("sha256:{diff}"),
            });
        }
    }
    for (from, to) in [("etc/passwd", "passwd"), ("etc/group", "group")] {
        copy_plain_file(&root, from, &staging.join(to))?;
    }
    let config = staging.join("config.json");
    let json = serde_json::to_vec_pretty(&image.config)
        .map_err(|e| ImageError::Convert(format!("cannot encode the image config: {e}")))?;
    fs::write(&config, json).map_err(write_err(&config))?;
    let (bytes, inodes) = usage(&root);
    progress(&format!(
        "image: packing {} in {inodes} files into ext4",
        mib(bytes)
    ));
    let disk = staging.join("rootfs.ext4");
    mke2fs(&root, &disk, bytes, inodes)?;
    fs::remove_dir_all(&root).map_err(write_err(&root))?;
    Ok(())
}

/// Checks a layer's stored bytes against their digest, before any of it is applied.
fn check_blob(layer: &LayerBlob, name: &str) -> Result<(), ImageError> {
    let Some(want) = &layer.digest else {
        return Ok(());
    };
    let read = |source| ImageError::Read {
        what: format!("layer {name} ({})", layer.file.display()),
        source,
    };
    let (got, len) = Hashing::new(layer.open().map_err(read)?)
        .finish()
        .map_err(read)?;
    if len != layer.len {
        return Err(ImageError::Layer {
            layer: name.to_string(),
            why: format!("truncated: {len} of {} bytes", layer.len),
        });
    }
    if &got != want {
        return Err(ImageError::DigestMismatch {
            what: format!("layer {name}"),
            want: format!("sha256:{want}"),
            got: format!("sha256:{got}"),
        });
    }
    Ok(())
}

fn apply_in_helper(
    helper: &dyn Fn(&Path, u64) -> Command,
    root: &Path,
    layer: &LayerBlob,
    name: &str,
) -> Result<String, ImageError> {
    let failed = |why: String| ImageError::Layer {
        layer: name.to_string(),
        why,
    };
    let mut child = helper(root, unpack_limit(root))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot start the unpacking helper: {e}")))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| failed("no stdin".into()))?;
    let mut blob = layer
        .open()
        .map_err(|e| failed(format!("cannot read {}: {e}", layer.file.display())))?;
    let feeder = std::thread::spawn(move || -> io::Result<()> {
        io::copy(&mut blob, &mut stdin)?;
        stdin.flush()
    });
    let out = child
        .wait_with_output()
        .map_err(|e| failed(format!("unpacking helper: {e}")))?;
    // A helper that failed stops reading: the feeder's broken pipe says nothing more.
    let _ = feeder.join();
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let why = why.trim().trim_start_matches("wisp: error: ").to_string();
        return Err(failed(if why.is_empty() {
            format!("unpacking helper failed ({})", out.status)
        } else {
            why
        }));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The helper's side: chroots into `root`, applies the layer on stdin there, and
/// prints the SHA-256 of its uncompressed tar. Only for a process of its own (it
/// changes the process's root).
pub fn helper_main(root: &Path, limit: u64) -> Result<(), ImageError> {
    let c = std::ffi::CString::new(root.as_os_str().as_encoded_bytes())
        .map_err(|_| ImageError::Convert("root path holds a NUL".into()))?;
    // SAFETY: chroot and chdir take a NUL-terminated path that outlives the calls.
    let rc = unsafe { libc::chroot(c.as_ptr()) };
    if rc != 0 || std::env::set_current_dir("/").is_err() {
        return Err(ImageError::Convert(format!(
            "cannot chroot into {}: {}",
            root.display(),
            io::Error::last_os_error()
        )));
    }
    // The parent names the layer in its message; only the reason goes back to it.
    let diff = crate::layer::apply(Path::new("/"), io::stdin().lock(), "stdin", limit).map_err(
        |e| match e {
            ImageError::Layer { why, .. } => ImageError::Convert(why),
            other => other,
        },
    )?;
    println!("{diff}");
    Ok(())
}

/// How much one layer may unpack to: half the space free where `root` is (the packed
/// disk needs about as much again).
fn unpack_limit(root: &Path) -> u64 {
    let Ok(c) = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs fills the struct we pass; the path is NUL-terminated and lives
    // across the call.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return u64::MAX;
        }
        (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) / 2
    }
}

/// The contents of `root/rel` (at most 4 MiB) if it is a plain file reached through
/// plain directories: never through a symlink, which could point anywhere on the host.
pub fn read_plain(root: &Path, rel: &str) -> Option<Vec<u8>> {
    let mut p = root.to_path_buf();
    for part in rel.split('/') {
        p.push(part);
        if fs::symlink_metadata(&p).ok()?.file_type().is_symlink() {
            return None;
        }
    }
    let m = fs::symlink_metadata(&p).ok()?;
    (m.is_file() && m.len() < (4 << 20)).then(|| fs::read(&p).ok())?
}

/// Copies `root/rel` to `to` if [`read_plain`] reads it.
fn copy_plain_file(root: &Path, rel: &str, to: &Path) -> Result<(), ImageError> {
    match read_plain(root, rel) {
        Some(bytes) => fs::write(to, bytes).map_err(write_err(to)),
        None => Ok(()),
    }
}

/// Bytes in regular files and the number of inodes under `root` (not following links).
fn usage(root: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut inodes = 1;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            inodes += 1;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                // Hard links share blocks; counting them twice only adds slack.
                bytes += m.blocks() * 512;
            }
        }
    }
    (bytes, inodes)
}

/// `mke2fs -d root` into a new `disk` with room for `bytes` in `inodes` files.
fn mke2fs(root: &Path, disk: &Path, bytes: u64, inodes: u64) -> Result<(), ImageError> {
    // Room for metadata (inode tables, directories) and a quarter to spare; no journal
    // (VMs mount it read-only) and no blocks reserved for root.
    let inode_size = 256;
    let size_kib = (bytes + bytes / 4 + inodes * (inode_size + 4096) + (16 << 20)) / 1024;
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0"])
        .args(["-I", &inode_size.to_string()])
        .args(["-N", &(inodes + inodes / 4 + 64).to_string()])
        .args(["-L", "wisp-image", "-d"])
        .arg(root)
        .arg(disk)
        .arg(format!("{size_kib}k"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            ImageError::Convert(format!("cannot run mke2fs (Debian package e2fsprogs): {e}"))
        })?;
    if !out.status.success() {
        return Err(ImageError::Convert(format!(
            "mke2fs failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Packs the directory `root` (an unpacked image, not cached) into a new ext4 `disk`.
pub fn pack_dir(root: &Path, disk: &Path) -> Result<(), ImageError> {
    let (bytes, inodes) = usage(root);
    let _ = fs::remove_file(disk);
    mke2fs(root, disk, bytes, inodes)
}

/// Cache directory default, for callers.
pub fn default_cache() -> PathBuf {
    cache::dir()
}
