//! Reading an image from where REF points: its config and its layers, every blob
//! checked against its digest. No network: an OCI layout or a `docker save` archive.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, Os};
use serde::Deserialize;

use crate::digest::{self, sha256_hex};
use crate::reference::ImageRef;
use crate::ImageError;

/// Largest manifest, index or config the reader takes (they are JSON of a few KiB).
const JSON_LIMIT: u64 = 16 << 20;
/// The annotation that names a manifest in an OCI layout's index.
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Where one layer's bytes are, and what they must hash to.
#[derive(Clone, Debug)]
pub struct LayerBlob {
    /// The file holding them.
    pub file: PathBuf,
    /// Their offset in it.
    pub offset: u64,
    /// Their length.
    pub len: u64,
    /// SHA-256 (hex) of those bytes, when the image says it (an OCI descriptor or a
    /// blob named by its digest).
    pub digest: Option<String>,
    /// SHA-256 (hex) of the uncompressed tar: the config's `rootfs.diff_ids`.
    pub diff_id: String,
}

impl LayerBlob {
    /// Opens the layer's bytes (as stored: maybe compressed).
    pub fn open(&self) -> io::Result<io::Take<File>> {
        let mut f = File::open(&self.file)?;
        f.seek(SeekFrom::Start(self.offset))?;
        Ok(f.take(self.len))
    }

    /// Short name for messages.
    pub fn short(&self) -> String {
        format!("sha256:{}", &self.diff_id[..self.diff_id.len().min(12)])
    }
}

/// An image: its config and its layers, lowest first.
#[derive(Clone, Debug)]
pub struct Image {
    /// What REF named.
    pub reference: ImageRef,
    /// The image's config.
    pub config: ImageConfiguration,
    /// SHA-256 (hex) of the config blob: the image's id, and the cache key.
    pub id: String,
    /// The layers, applied in this order.
    pub layers: Vec<LayerBlob>,
}

/// Reads the image REF names (an OCI layout or a docker archive; `dir:` and `bundle:`
/// have no image).
pub fn open(reference: &ImageRef) -> Result<Image, ImageError> {
    let (config_bytes, id, layers) = match reference {
        ImageRef::Oci { dir, tag } => oci_layout(dir, tag.as_deref())?,
        ImageRef::DockerArchive(file) => docker_archive(file)?,
        ImageRef::Dir(_) | ImageRef::Bundle(_) => {
            return Err(ImageError::Malformed {
                what: reference.to_string(),
                why: "a directory has no image config".into(),
            })
        }
    };
    let config =
        ImageConfiguration::from_reader(&config_bytes[..]).map_err(|e| ImageError::Malformed {
            what: format!("{reference}: config"),
            why: e.to_string(),
        })?;
    if *config.os() != Os::Linux || *config.architecture() != Arch::Amd64 {
        return Err(ImageError::Platform {
            image: reference.to_string(),
            platform: format!("{}/{}", config.os(), config.architecture()),
        });
    }
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != layers.len() {
        return Err(ImageError::Malformed {
            what: reference.to_string(),
            why: format!(
                "{} layers, but its config lists {} diff_ids",
                layers.len(),
                diff_ids.len()
            ),
        });
    }
    let layers = layers
        .into_iter()
        .zip(diff_ids)
        .map(|((file, offset, len, digest), diff)| {
            let diff_id = sha256_hex(diff).ok_or_else(|| ImageError::Malformed {
                what: reference.to_string(),
                why: format!("diff_id {diff:?} is not a sha256 digest"),
            })?;
            Ok(LayerBlob {
                file,
                offset,
                len,
                digest,
                diff_id: diff_id.to_string(),
            })
        })
        .collect::<Result<Vec<_>, ImageError>>()?;
    Ok(Image {
        reference: reference.clone(),
        config,
        id,
        layers,
    })
}

/// (file, offset, length, digest) of a layer's bytes.
type Placed = (PathBuf, u64, u64, Option<String>);

fn read_limited(mut r: impl Read, what: &str) -> Result<Vec<u8>, ImageError> {
    let mut buf = Vec::new();
    (&mut r)
        .take(JSON_LIMIT + 1)
        .read_to_end(&mut buf)
        .map_err(|source| ImageError::Read {
            what: what.to_string(),
            source,
        })?;
    if buf.len() as u64 > JSON_LIMIT {
        return Err(ImageError::Malformed {
            what: what.to_string(),
            why: format!("larger than {} MiB", JSON_LIMIT >> 20),
        });
    }
    Ok(buf)
}

fn check_digest(bytes: &[u8], want: &str, what: &str) -> Result<(), ImageError> {
    let got = digest::sha256_of(bytes);
    if got != want {
        return Err(ImageError::DigestMismatch {
            what: what.to_string(),
            want: format!("sha256:{want}"),
            got: format!("sha256:{got}"),
        });
    }
    Ok(())
}

// ------------------------------------------------------------------ OCI layout

fn blob_path(dir: &Path, d: &Descriptor) -> Result<(PathBuf, String), ImageError> {
    let text = d.digest().to_string();
    let hex = sha256_hex(&text).ok_or_else(|| ImageError::Malformed {
        what: dir.display().to_string(),
        why: format!("digest {text:?} is not sha256:<64 hex digits>"),
    })?;
    Ok((dir.join("blobs/sha256").join(hex), hex.to_string()))
}

fn oci_blob(dir: &Path, d: &Descriptor, what: &str) -> Result<Vec<u8>, ImageError> {
    let (path, hex) = blob_path(dir, d)?;
    let f = File::open(&path).map_err(|source| ImageError::Read {
        what: format!("{what} ({})", path.display()),
        source,
    })?;
    let bytes = read_limited(f, what)?;
    check_digest(&bytes, &hex, what)?;
    Ok(bytes)
}

fn is_index(d: &Descriptor) -> bool {
    INDEX_TYPES.contains(&d.media_type().to_string().as_str())
}

fn oci_layout(dir: &Path, tag: Option<&str>) -> Result<(Vec<u8>, String, Vec<Placed>), ImageError> {
    let name = dir.display().to_string();
    if !dir.join("oci-layout").is_file() {
        return Err(ImageError::NotFound(format!(
            "{name} is not an OCI image layout (no oci-layout file); make one with \
             `skopeo copy docker-archive:FILE oci:{name}:TAG`"
        )));
    }
    let index_file = dir.join("index.json");
    let f = File::open(&index_file).map_err(|source| ImageError::Read {
        what: index_file.display().to_string(),
        source,
    })?;
    let index = ImageIndex::from_reader(&read_limited(f, "index.json")?[..]).map_err(|e| {
        ImageError::Malformed {
            what: index_file.display().to_string(),
            why: e.to_string(),
        }
    })?;
    let tag_of = |d: &Descriptor| {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .cloned()
    };
    let manifests = index.manifests();
    let chosen = match tag {
        Some(t) => manifests.iter().find(|d| tag_of(d).as_deref() == Some(t)),
        None if manifests.len() == 1 => manifests.first(),
        None => None,
    };
    let Some(mut desc) = chosen.cloned() else {
        let tags: Vec<String> = manifests.iter().filter_map(tag_of).collect();
        let have = if tags.is_empty() {
            "none".to_string()
        } else {
            tags.join(", ")
        };
        return Err(ImageError::NotFound(match tag {
            Some(t) => format!("{name} has no image tagged {t:?} (tags: {have})"),
            None => format!(
                "{name} holds {} images: name one with oci:{name}:TAG (tags: {have})",
                manifests.len()
            ),
        }));
    };
    // A multi-platform index: the linux/amd64 manifest in it.
    if is_index(&desc) {
        let nested = oci_blob(dir, &desc, "image index")?;
        let nested = ImageIndex::from_reader(&nested[..]).map_err(|e| ImageError::Malformed {
            what: format!("{name}: image index"),
            why: e.to_string(),
        })?;
        desc = nested
            .manifests()
            .iter()
            .find(|d| {
                d.platform()
                    .as_ref()
                    .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
            })
            .cloned()
            .ok_or_else(|| ImageError::Platform {
                image: name.clone(),
                platform: "no linux/amd64 manifest in its index".into(),
            })?;
    }
    let manifest = oci_blob(dir, &desc, "manifest")?;
    let manifest =
        ImageManifest::from_reader(&manifest[..]).map_err(|e| ImageError::Malformed {
            what: format!("{name}: manifest"),
            why: e.to_string(),
        })?;
    let config = oci_blob(dir, manifest.config(), "config")?;
    let (_, id) = blob_path(dir, manifest.config())?;
    let layers = manifest
        .layers()
        .iter()
        .map(|d| {
            let (path, hex) = blob_path(dir, d)?;
            Ok((path, 0, d.size(), Some(hex)))
        })
        .collect::<Result<Vec<_>, ImageError>>()?;
    Ok((config, id, layers))
}

// --------------------------------------------------------------- docker archive

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveManifest {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

/// A file name's digest when it is named by one (`blobs/sha256/<hex>`, `<hex>.json`).
fn named_digest(name: &str) -> Option<String> {
    let base = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json"))?;
    sha256_hex(&format!("sha256:{base}")).map(str::to_string)
}

fn docker_archive(file: &Path) -> Result<(Vec<u8>, String, Vec<Placed>), ImageError> {
    let name = file.display().to_string();
    let read_err = |source| ImageError::Read {
        what: name.clone(),
        source,
    };
    if file.is_dir() {
        return Err(ImageError::NotFound(format!(
            "{name} is a directory: docker-archive: takes the tar file `docker save` writes \
             (for an OCI layout directory, write oci:{name})"
        )));
    }
    let f = File::open(file).map_err(read_err)?;
    // Where each member's bytes are: the layers are read from there later.
    let mut members: HashMap<String, (u64, u64)> = HashMap::new();
    let mut archive = tar::Archive::new(f);
    for entry in archive.entries().map_err(read_err)? {
        let entry = entry.map_err(|e| ImageError::Malformed {
            what: name.clone(),
            why: format!("not a tar archive: {e}"),
        })?;
        if entry.header().entry_type().is_file() {
            let path = entry.path().map_err(read_err)?;
            let path = path.to_string_lossy().trim_start_matches("./").to_string();
            members.insert(path, (entry.raw_file_position(), entry.size()));
        }
    }
    let member = |m: &str| -> Result<Vec<u8>, ImageError> {
        let &(offset, len) = members.get(m).ok_or_else(|| ImageError::Malformed {
            what: name.clone(),
            why: format!("{m} is missing from the archive"),
        })?;
        let mut f = File::open(file).map_err(read_err)?;
        f.seek(SeekFrom::Start(offset)).map_err(read_err)?;
        read_limited(f.take(len), m)
    };
    let manifests: Vec<ArchiveManifest> = serde_json::from_slice(&member("manifest.json")?)
        .map_err(|e| ImageError::Malformed {
            what: format!("{name}: manifest.json"),
            why: e.to_string(),
        })?;
    let m = match manifests.as_slice() {
        [one] => one,
        [] => {
            return Err(ImageError::Malformed {
                what: name,
                why: "manifest.json lists no image".into(),
            })
        }
        many => {
            return Err(ImageError::NotFound(format!(
                "{name} holds {} images; save one image per archive",
                many.len()
            )))
        }
    };
    let config = member(&m.config)?;
    let id = digest::sha256_of(&config);
    if let Some(want) = named_digest(&m.config) {
        check_digest(&config, &want, &m.config)?;
    }
    let layers =
        m.layers
            .iter()
            .map(|l| {
                let &(offset, len) = members.get(l.trim_start_matches("./")).ok_or_else(|| {
                    ImageError::Malformed {
                        what: name.clone(),
                        why: format!("layer {l} is missing from the archive"),
                    }
                })?;
                Ok((file.to_path_buf(), offset, len, named_digest(l)))
            })
            .collect::<Result<Vec<_>, ImageError>>()?;
    Ok((config, id, layers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{self, Item};

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wisp-source-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    use std::fs;

    fn layers() -> Vec<Vec<u8>> {
        vec![
            fixture::tar(&[Item::File("a", b"1", 0o644, 0)]).unwrap(),
            fixture::tar(&[Item::Whiteout("a")]).unwrap(),
        ]
    }

    #[test]
    fn an_oci_layout_and_a_docker_archive_read_alike() {
        let d = temp("read");
        let ls = layers();
        let cfg = fixture::config(serde_json::json!({"Cmd": ["true"]}), &ls);
        let stored = vec![fixture::gzip(&ls[0]).unwrap(), ls[1].clone()];
        fixture::oci_layout(&d.join("oci"), "v1", &cfg, &stored).unwrap();
        fixture::docker_archive(&d.join("img.tar"), "x:v1", &cfg, &ls).unwrap();
        let oci = open(&ImageRef::parse(&format!("oci:{}:v1", d.join("oci").display())).unwrap())
            .unwrap();
        let untagged =
            open(&ImageRef::parse(&format!("oci:{}", d.join("oci").display())).unwrap()).unwrap();
        let arch = open(
            &ImageRef::parse(&format!("docker-archive:{}", d.join("img.tar").display())).unwrap(),
        )
        .unwrap();
        assert_eq!(oci.id, crate::digest::sha256_of(&cfg));
        assert_eq!(
            (untagged.id.as_str(), arch.id.as_str()),
            (oci.id.as_str(), oci.id.as_str())
        );
        assert_eq!(oci.layers.len(), 2);
        assert!(oci.layers.iter().all(|l| l.digest.is_some()));
        assert_eq!(arch.layers[1].diff_id, crate::digest::sha256_of(&ls[1]));
        let mut got = Vec::new();
        arch.layers[0]
            .open()
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, ls[0], "a layer is read from its place in the archive");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_docker_archive_with_blobs_is_checked_by_their_names() {
        let d = temp("blobs");
        let ls = layers();
        let cfg = fixture::config(serde_json::json!({"Cmd": ["true"]}), &ls);
        let file = d.join("new.tar");
        fixture::docker_archive_as(&file, "x:v1", &cfg, &ls, true).unwrap();
        let r = ImageRef::parse(&format!("docker-archive:{}", file.display())).unwrap();
        let image = open(&r).unwrap();
        assert_eq!(image.layers.len(), 2);
        let want: Vec<Option<String>> = ls
            .iter()
            .map(|l| Some(crate::digest::sha256_of(l)))
            .collect();
        let got: Vec<Option<String>> = image.layers.iter().map(|l| l.digest.clone()).collect();
        assert_eq!(got, want, "layer digests come from the blob names");
        // A config whose bytes do not match its blob name is refused.
        let other = fixture::config(serde_json::json!({"Cmd": ["false"]}), &ls);
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        };
        let name = format!("blobs/sha256/{}", crate::digest::sha256_of(&cfg));
        add(&name, &other);
        let manifest = serde_json::json!([{ "Config": name, "Layers": [] }]).to_string();
        add("manifest.json", manifest.as_bytes());
        let bad = d.join("bad.tar");
        fs::write(&bad, b.into_inner().unwrap()).unwrap();
        let e = open(&ImageRef::parse(&format!("docker-archive:{}", bad.display())).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("is corrupt"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_tags_corrupt_blobs_and_other_platforms_are_refused() {
        let d = temp("bad");
        let ls = layers();
        let cfg = fixture::config(serde_json::json!({"Cmd": ["true"]}), &ls);
        let oci = d.join("oci");
        fixture::oci_layout(&oci, "v1", &cfg, &ls).unwrap();
        let r = |s: String| open(&ImageRef::parse(&s).unwrap()).unwrap_err().to_string();
        let e = r(format!("oci:{}:v2", oci.display()));
        assert!(
            e.contains("no image tagged \"v2\"") && e.contains("tags: v1"),
            "{e}"
        );
        let e = r(format!("oci:{}", d.display()));
        assert!(e.contains("not an OCI image layout"), "{e}");
        // The config blob changed on disk: its digest no longer matches.
        let cfg_path = oci
            .join("blobs/sha256")
            .join(crate::digest::sha256_of(&cfg));
        fs::write(&cfg_path, b"{}").unwrap();
        let e = r(format!("oci:{}:v1", oci.display()));
        assert!(e.contains("config is corrupt"), "{e}");
        // An arm64 image.
        let arm = String::from_utf8(cfg.clone())
            .unwrap()
            .replace("amd64", "arm64");
        fixture::oci_layout(&d.join("arm"), "v1", arm.as_bytes(), &ls).unwrap();
        let e = r(format!("oci:{}:v1", d.join("arm").display()));
        assert!(
            e.contains("linux/arm64") && e.contains("linux/amd64"),
            "{e}"
        );
        let e = r(format!("docker-archive:{}", d.join("none.tar").display()));
        assert!(e.contains("cannot read"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }
}
