//! Applying a layer (a tar, maybe gzip- or zstd-compressed) onto a root directory, with
//! the OCI whiteouts: `.wh.NAME` removes NAME of the layers below, `.wh..wh..opq` hides
//! everything the layers below put in its directory. Modes, owners, symlinks, hard
//! links, device nodes and xattrs are kept.
//!
//! The entries' paths come from an untrusted image. [`apply`] keeps them under `root`
//! lexically (no `..`, no absolute paths), but a symlink an earlier entry made could
//! still lead out; so wisp runs it in a process of its own, chrooted into the root
//! (`wisp` re-executes itself, see [`crate::convert`]), where every path, symlink
//! or not, ends inside.

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use crate::digest::Hashing;
use crate::ImageError;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// What a layer's stream is compressed with, from its first bytes.
fn decompress<'a, R: BufRead + 'a>(mut r: R) -> io::Result<Box<dyn Read + 'a>> {
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r)?)
    } else {
        Box::new(r)
    })
}

/// An entry's path as components under the root; `None` for the root itself. `..`
/// and anything but plain names are refused.
fn relative(path: &Path) -> Result<Option<PathBuf>, String> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("path {} leaves the image's root", path.display()))
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// An error with the causes it wraps (the tar crate puts the reason in a cause).
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            text = format!("{text}: {t}");
        }
        cause = c.source();
    }
    text
}

/// Removes what is at `path` (not following a symlink there).
fn remove(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A reader that fails once more than `left` bytes came through (a layer that would
/// unpack to more than the disk has room for).
struct Limited<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::other(format!(
                "it unpacks to more than {} MiB, half the free space of the image cache",
                self.limit >> 20
            )));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Applies the tar stream `layer` (maybe compressed) onto `root`, refusing it once its
/// uncompressed tar passes `limit` bytes. `name` is for messages. Returns the SHA-256
/// (hex) of the uncompressed tar, to check against the layer's diff_id.
pub fn apply(root: &Path, layer: impl Read, name: &str, limit: u64) -> Result<String, ImageError> {
    let bad = |why: String| ImageError::Layer {
        layer: name.to_string(),
        why,
    };
    let io_bad = |what: &str, e: io::Error| bad(format!("{what}: {}", with_causes(&e)));
    let tar_stream = Hashing::new(Limited {
        inner: decompress(BufReader::new(layer)).map_err(|e| io_bad("reading", e))?,
        left: limit,
        limit,
    });
    let mut archive = tar::Archive::new(tar_stream);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    // What this layer made: whiteouts only hide what the layers below made.
    let mut made: HashSet<PathBuf> = HashSet::new();
    let entries = archive
        .entries()
        .map_err(|e| io_bad("not a tar archive", e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| io_bad("not a tar archive", e))?;
        let raw = entry
            .path()
            .map_err(|e| io_bad("entry name", e))?
            .into_owned();
        let Some(rel) = relative(&raw).map_err(bad)? else {
            continue; // the root directory itself
        };
        let file_name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = rel.parent().unwrap_or(Path::new(""));
        if file_name == OPAQUE {
            let dir = root.join(parent);
            if let Ok(children) = fs::read_dir(&dir) {
                for c in children.flatten() {
                    if !made.contains(&parent.join(c.file_name())) {
                        remove(&c.path())
                            .map_err(|e| io_bad(&format!("opaque {}", dir.display()), e))?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT) {
            let target = parent.join(hidden);
            if !made.contains(&target) {
                remove(&root.join(&target))
                    .map_err(|e| io_bad(&format!("whiteout of {}", target.display()), e))?;
            }
            continue;
        }
        let dst = root.join(&rel);
        let kind = entry.header().entry_type();
        // Whatever a lower layer left at this path goes, except a directory that
        // stays one (its contents carry on, as in overlayfs).
        let keep = kind.is_dir() && fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir());
        if !keep {
            remove(&dst).map_err(|e| io_bad(&format!("replacing {}", rel.display()), e))?;
        }
        if let Some(p) = dst.parent() {
            fs::create_dir_all(p)
                .map_err(|e| io_bad(&format!("directory of {}", rel.display()), e))?;
        }
        if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| io_bad("link name", e))?
                .ok_or_else(|| bad(format!("hard link {} names no target", rel.display())))?;
            let target = relative(&target)
                .map_err(bad)?
                .ok_or_else(|| bad(format!("hard link {} to the root", rel.display())))?;
            fs::hard_link(root.join(&target), &dst).map_err(|e| {
                io_bad(
                    &format!("hard link {} to {}", rel.display(), target.display()),
                    e,
                )
            })?;
        } else {
            entry
                .unpack(&dst)
                .map_err(|e| io_bad(&rel.display().to_string(), e))?;
        }
        made.insert(rel);
    }
    let (diff, _) = archive
        .into_inner()
        .finish()
        .map_err(|e| io_bad("reading", e))?;
    Ok(diff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A layer as tar bytes: (path, contents or symlink/hardlink target, kind, mode, uid).
    pub(crate) fn layer(entries: &[(&str, &str, tar::EntryType, u32, u64)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data, kind, mode, uid) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(*mode);
            h.set_uid(*uid);
            h.set_gid(*uid);
            h.set_mtime(1_700_000_000);
            if kind.is_symlink() || kind.is_hard_link() {
                h.set_size(0);
                b.append_link(&mut h, path, data).unwrap();
            } else {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, data.as_bytes()).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wisp-image-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as S};

    #[test]
    fn whiteouts_opaque_dirs_links_modes_and_owners() {
        let root = temp("apply");
        let lower = layer(&[
            ("etc/", "", D, 0o755, 0),
            ("etc/gone", "x", F, 0o644, 0),
            ("etc/kept", "k", F, 0o644, 0),
            ("opq/", "", D, 0o755, 0),
            ("opq/old", "o", F, 0o644, 0),
            ("bin/", "", D, 0o755, 0),
            ("bin/tool", "#!tool", F, 0o4755, 1000),
            ("bin/alias", "tool", S, 0o777, 0),
            ("bin/hard", "bin/tool", H, 0o4755, 1000),
        ]);
        let upper = layer(&[
            ("etc/.wh.gone", "", F, 0o644, 0),
            ("opq/.wh..wh..opq", "", F, 0o644, 0),
            ("opq/new", "n", F, 0o644, 0),
            ("etc/kept", "replaced", F, 0o600, 0),
        ]);
        let d1 = apply(&root, &lower[..], "lower", u64::MAX).unwrap();
        assert_eq!(d1, crate::digest::sha256_of(&lower));
        apply(&root, &upper[..], "upper", u64::MAX).unwrap();
        assert!(!root.join("etc/gone").exists());
        assert_eq!(
            fs::read_to_string(root.join("etc/kept")).unwrap(),
            "replaced"
        );
        assert!(!root.join("opq/old").exists());
        assert_eq!(fs::read_to_string(root.join("opq/new")).unwrap(), "n");
        let tool = fs::metadata(root.join("bin/tool")).unwrap();
        assert_eq!(tool.permissions().mode() & 0o7777, 0o4755);
        assert_eq!((tool.uid(), tool.gid()), (1000, 1000));
        assert_eq!(
            fs::read_link(root.join("bin/alias")).unwrap(),
            Path::new("tool")
        );
        let hard = fs::metadata(root.join("bin/hard")).unwrap();
        assert_eq!(hard.ino(), tool.ino(), "hard link is a copy");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_opaque_dir_keeps_what_its_own_layer_made_and_gzip_works() {
        let root = temp("opq");
        apply(
            &root,
            &layer(&[("d/a", "a", F, 0o644, 0)])[..],
            "l1",
            u64::MAX,
        )
        .unwrap();
        let tar = layer(&[
            ("d/b", "b", F, 0o644, 0),
            ("d/.wh..wh..opq", "", F, 0o644, 0),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).unwrap();
        let diff = apply(&root, &gz.finish().unwrap()[..], "l2", u64::MAX).unwrap();
        assert_eq!(
            diff,
            crate::digest::sha256_of(&tar),
            "diff_id is of the tar"
        );
        assert!(!root.join("d/a").exists());
        assert!(root.join("d/b").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_directory_in_two_layers_merges_and_takes_the_upper_mode() {
        let root = temp("merge");
        apply(
            &root,
            &layer(&[("etc/", "", D, 0o755, 0), ("etc/a", "a", F, 0o644, 0)])[..],
            "l1",
            u64::MAX,
        )
        .unwrap();
        apply(
            &root,
            &layer(&[("etc/", "", D, 0o700, 0), ("etc/b", "b", F, 0o644, 0)])[..],
            "l2",
            u64::MAX,
        )
        .unwrap();
        assert!(root.join("etc/a").exists() && root.join("etc/b").exists());
        let m = fs::metadata(root.join("etc")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o700);
        // A file where a directory was, and a directory where a file was.
        apply(
            &root,
            &layer(&[("etc", "now a file", F, 0o644, 0), ("x/", "", D, 0o755, 0)])[..],
            "l3",
            u64::MAX,
        )
        .unwrap();
        assert_eq!(fs::read_to_string(root.join("etc")).unwrap(), "now a file");
        apply(
            &root,
            &layer(&[("etc/", "", D, 0o755, 0)])[..],
            "l4",
            u64::MAX,
        )
        .unwrap();
        assert!(root.join("etc").is_dir());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn xattrs_in_pax_headers_are_kept() {
        let root = temp("xattr");
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("SCHILY.xattr.user.wisp", &b"kept"[..])])
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(F);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(1);
        b.append_data(&mut h, "x", &b"x"[..]).unwrap();
        apply(&root, &b.into_inner().unwrap()[..], "xattr", u64::MAX).unwrap();
        let path =
            std::ffi::CString::new(root.join("x").into_os_string().into_encoded_bytes()).unwrap();
        let mut buf = [0u8; 16];
        // SAFETY: lgetxattr writes at most buf.len() bytes into buf; both strings are
        // NUL-terminated.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                c"user.wisp".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(n, 4, "{}", io::Error::last_os_error());
        assert_eq!(&buf[..4], b"kept");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_layer_past_the_limit_is_refused() {
        let root = temp("limit");
        let big = "x".repeat(64 << 10);
        let tar = layer(&[("big", &big, F, 0o644, 0)]);
        let e = apply(&root, &tar[..], "big", 16 << 10).unwrap_err();
        assert!(e.to_string().contains("unpacks to more than"), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_zstd_layer_applies() {
        let root = temp("zstd");
        let tar = layer(&[("z/file", "zstd", F, 0o640, 7)]);
        let packed = zstd::stream::encode_all(&tar[..], 3).unwrap();
        let diff = apply(&root, &packed[..], "zstd", u64::MAX).unwrap();
        assert_eq!(diff, crate::digest::sha256_of(&tar));
        let m = fs::metadata(root.join("z/file")).unwrap();
        assert_eq!((m.permissions().mode() & 0o777, m.uid()), (0o640, 7));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn paths_out_of_the_root_are_refused() {
        let root = temp("escape");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(F);
        h.set_size(1);
        h.set_mode(0o644);
        // The builder refuses `..`; write the name into the header by hand.
        h.as_old_mut().name[..13].copy_from_slice(b"../escaped-by");
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let e = apply(&root, &b.into_inner().unwrap()[..], "evil", u64::MAX).unwrap_err();
        assert!(e.to_string().contains("leaves the image's root"), "{e}");
        assert!(!root.parent().unwrap().join("escaped-by").exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
