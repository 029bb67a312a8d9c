//! Writing small images: an OCI layout or a `docker save` archive from layers given as
//! tar bytes. For tests and examples (wisp never needs to write an image itself).

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use serde_json::json;

use crate::digest::sha256_of;

/// One file of a layer.
#[derive(Clone, Copy)]
pub enum Item<'a> {
    /// A directory with its mode.
    Dir(&'a str, u32),
    /// A regular file: path, contents, mode, uid (gid alike).
    File(&'a str, &'a [u8], u32, u64),
    /// A symlink: path, target.
    Symlink(&'a str, &'a str),
    /// A hard link: path, target path.
    HardLink(&'a str, &'a str),
    /// A whiteout of the named path (`.wh.` entry next to it).
    Whiteout(&'a str),
    /// An opaque marker for the named directory.
    Opaque(&'a str),
}

/// A userland layer for tests: the host's `/bin/busybox` (Debian's busybox-static) with
/// a symlink in `bin/` per applet, `etc/passwd` and `etc/group` as given, `srv` and a
/// world-writable `tmp`, then `extra`.
pub fn busybox_layer(
    applets: &[&str],
    passwd: &[u8],
    group: &[u8],
    extra: &[Item<'_>],
) -> io::Result<Vec<u8>> {
    let busybox = fs::read("/bin/busybox").map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("/bin/busybox (busybox-static, scripts/install-deps.sh): {e}"),
        )
    })?;
    let names: Vec<String> = applets.iter().map(|a| format!("bin/{a}")).collect();
    let mut items = vec![
        Item::Dir("bin", 0o755),
        Item::File("bin/busybox", &busybox, 0o755, 0),
        Item::Dir("etc", 0o755),
        Item::File("etc/passwd", passwd, 0o644, 0),
        Item::File("etc/group", group, 0o644, 0),
        Item::Dir("srv", 0o755),
        Item::Dir("tmp", 0o1777),
    ];
    items.extend(names.iter().map(|n| Item::Symlink(n, "busybox")));
    items.extend(extra.iter().copied());
    tar(&items)
}

/// A layer as uncompressed tar bytes.
pub fn tar(items: &[Item<'_>]) -> io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for item in items {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        let (path, data): (String, &[u8]) = match item {
            Item::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                (format!("{p}/"), &[])
            }
            Item::File(p, data, mode, uid) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*uid);
                h.set_size(data.len() as u64);
                (p.to_string(), data)
            }
            Item::Symlink(p, target) | Item::HardLink(p, target) => {
                h.set_entry_type(if matches!(item, Item::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_mode(0o777);
                b.append_link(&mut h, p, target)?;
                continue;
            }
            Item::Whiteout(p) | Item::Opaque(p) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                let path = Path::new(p);
                let dir = if matches!(item, Item::Opaque(_)) {
                    path.to_path_buf()
                } else {
                    path.parent().unwrap_or(Path::new("")).to_path_buf()
                };
                let name = match item {
                    Item::Opaque(_) => ".wh..wh..opq".to_string(),
                    _ => format!(
                        ".wh.{}",
                        path.file_name()
                            .map(|n| n.to_string_lossy())
                            .unwrap_or_default()
                    ),
                };
                (dir.join(name).to_string_lossy().into_owned(), &[])
            }
        };
        b.append_data(&mut h, path, data)?;
    }
    b.into_inner()
}

/// gzip of `data`.
pub fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data)?;
    gz.finish()
}

/// An image config: `config` is its `config` object (Cmd, Env, ...); `diff_ids` are
/// the uncompressed layers' digests.
pub fn config(config: serde_json::Value, layers: &[Vec<u8>]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256_of(l)))
        .collect();
    json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    })
    .to_string()
    .into_bytes()
}

fn put_blob(dir: &Path, data: &[u8]) -> io::Result<(String, usize)> {
    let hex = sha256_of(data);
    fs::write(dir.join("blobs/sha256").join(&hex), data)?;
    Ok((format!("sha256:{hex}"), data.len()))
}

/// Writes an OCI layout at `dir` with one image tagged `tag`: `config_blob` (see
/// [`config`]) and `layers` as stored (compressed or not).
pub fn oci_layout(dir: &Path, tag: &str, config_blob: &[u8], layers: &[Vec<u8>]) -> io::Result<()> {
    fs::create_dir_all(dir.join("blobs/sha256"))?;
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let (cd, cs) = put_blob(dir, config_blob)?;
    let mut descs = Vec::new();
    for l in layers {
        let (d, s) = put_blob(dir, l)?;
        let media = if l.starts_with(&[0x1f, 0x8b]) {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        descs.push(json!({ "mediaType": media, "digest": d, "size": s }));
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs },
        "layers": descs,
    })
    .to_string();
    let (md, ms) = put_blob(dir, manifest.as_bytes())?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": ms,
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    fs::write(dir.join("index.json"), index.to_string())
}

/// Writes a `docker save` archive at `file`, layers uncompressed: the classic layout
/// (`<id>.json`, `<n>/layer.tar`, `manifest.json`).
pub fn docker_archive(
    file: &Path,
    tag: &str,
    config_blob: &[u8],
    layers: &[Vec<u8>],
) -> io::Result<()> {
    docker_archive_as(file, tag, config_blob, layers, false)
}

/// [`docker_archive`], or with `blobs` the layout Docker 25 and later write: an OCI
/// layout inside the tar (`blobs/sha256/<hex>`) that `manifest.json` points into.
pub fn docker_archive_as(
    file: &Path,
    tag: &str,
    config_blob: &[u8],
    layers: &[Vec<u8>],
    blobs: bool,
) -> io::Result<()> {
    let mut b = tar::Builder::new(fs::File::create(file)?);
    let mut add = |name: &str, data: &[u8]| -> io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data)
    };
    let config_name = if blobs {
        format!("blobs/sha256/{}", sha256_of(config_blob))
    } else {
        format!("{}.json", sha256_of(config_blob))
    };
    add(&config_name, config_blob)?;
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let name = if blobs {
            format!("blobs/sha256/{}", sha256_of(l))
        } else {
            format!("layer{i}/layer.tar")
        };
        add(&name, l)?;
        names.push(name);
    }
    let manifest = json!([{ "Config": config_name, "RepoTags": [tag], "Layers": names }]);
    add("manifest.json", manifest.to_string().as_bytes())?;
    b.into_inner()?.flush()
}
