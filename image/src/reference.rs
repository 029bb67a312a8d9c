//! What `--image REF` names: an OCI image layout, a `docker save` archive, or an
//! unpacked root file system.

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

/// A REF that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RefError {
    /// No known transport prefix.
    #[error(
        "image {0:?}: say which kind it is: oci:DIR[:TAG] (an OCI layout), \
         docker-archive:FILE (docker save), dir:PATH (an unpacked root) or \
         bundle:DIR (an OCI runtime bundle, as runc runs)"
    )]
    NoTransport(String),
    /// A prefix without a path.
    #[error("image {0:?}: the path after the prefix is missing")]
    NoPath(String),
}

/// An image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// An OCI image layout directory and, optionally, the tag of the image in it.
    Oci {
        /// The layout's directory (holding `oci-layout` and `index.json`).
        dir: PathBuf,
        /// `org.opencontainers.image.ref.name` of the manifest; `None`: the only one.
        tag: Option<String>,
    },
    /// A `docker save` / `podman save` tar file.
    DockerArchive(PathBuf),
    /// An unpacked root file system (no image config: the command must be given).
    Dir(PathBuf),
    /// An OCI runtime bundle: `config.json` (the process) and its root file system.
    Bundle(PathBuf),
}

impl ImageRef {
    /// Parses REF.
    pub fn parse(text: &str) -> Result<Self, RefError> {
        let (kind, rest) = text
            .split_once(':')
            .ok_or_else(|| RefError::NoTransport(text.to_string()))?;
        let need = |p: &str| {
            if p.is_empty() {
                Err(RefError::NoPath(text.to_string()))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        match kind {
            "oci" => {
                // The tag is what follows the last ':' unless that leaves a '/' in it
                // (a directory name with a colon): skopeo reads `oci:DIR:TAG` alike.
                let (dir, tag) = match rest.rsplit_once(':') {
                    Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, Some(t)),
                    _ => (rest, None),
                };
                Ok(ImageRef::Oci {
                    dir: need(dir)?,
                    tag: tag.filter(|t| !t.is_empty()).map(str::to_string),
                })
            }
            "docker-archive" => Ok(ImageRef::DockerArchive(need(rest)?)),
            "dir" => Ok(ImageRef::Dir(need(rest)?)),
            "bundle" => Ok(ImageRef::Bundle(need(rest)?)),
            _ => Err(RefError::NoTransport(text.to_string())),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Oci { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            ImageRef::Oci { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            ImageRef::DockerArchive(p) => write!(f, "docker-archive:{}", p.display()),
            ImageRef::Dir(p) => write!(f, "dir:{}", p.display()),
            ImageRef::Bundle(p) => write!(f, "bundle:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_kinds_parse() {
        assert_eq!(
            ImageRef::parse("oci:/img/alpine:3.19").unwrap(),
            ImageRef::Oci {
                dir: "/img/alpine".into(),
                tag: Some("3.19".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci:layout").unwrap(),
            ImageRef::Oci {
                dir: "layout".into(),
                tag: None
            }
        );
        assert_eq!(
            ImageRef::parse("oci:./a:b/c").unwrap(),
            ImageRef::Oci {
                dir: "./a:b/c".into(),
                tag: None
            }
        );
        assert_eq!(
            ImageRef::parse("docker-archive:x.tar").unwrap(),
            ImageRef::DockerArchive("x.tar".into())
        );
        assert_eq!(
            ImageRef::parse("dir:/srv/root").unwrap(),
            ImageRef::Dir("/srv/root".into())
        );
        for r in ["oci:/img/alpine:3.19", "docker-archive:x.tar", "dir:/r"] {
            assert_eq!(ImageRef::parse(r).unwrap().to_string(), r);
        }
    }

    #[test]
    fn bad_refs_say_what_to_write() {
        for bad in [
            "alpine",
            "docker://alpine",
            "oci:",
            "dir:",
            "docker-archive:",
        ] {
            let e = ImageRef::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        assert!(ImageRef::parse("alpine")
            .unwrap_err()
            .to_string()
            .contains("oci:DIR[:TAG]"));
    }
}
