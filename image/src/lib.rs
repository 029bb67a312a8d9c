//! OCI and Docker images as ext4 disks for wisp microVMs: read an image (an OCI
//! layout or a `docker save` archive, every blob checked against its digest), apply its
//! layers with their whiteouts, and pack the result into an ext4 image, cached by the
//! image's id so a second run converts nothing.

pub mod bundle;
pub mod cache;
pub mod convert;
pub mod cpio;
pub mod digest;
pub mod fixture;
pub mod layer;
pub mod process;
pub mod reference;
pub mod source;

use std::io;
use std::path::PathBuf;

use thiserror::Error;

pub use bundle::Bundle;
pub use reference::{ImageRef, RefError};
pub use source::Image;

/// Why an image cannot be used.
#[derive(Debug, Error)]
pub enum ImageError {
    /// REF does not parse.
    #[error(transparent)]
    Ref(#[from] RefError),
    /// REF names nothing usable (no layout, no such tag).
    #[error("{0}")]
    NotFound(String),
    /// A file could not be read.
    #[error("cannot read {what}: {source}")]
    Read {
        /// What.
        what: String,
        /// Cause.
        source: io::Error,
    },
    /// A blob does not hash to its digest.
    #[error("{what} is corrupt: its digest is {got}, the image says {want}")]
    DigestMismatch {
        /// Which blob.
        what: String,
        /// The digest the image gives.
        want: String,
        /// The digest of the bytes.
        got: String,
    },
    /// The image's JSON is not what OCI or Docker write.
    #[error("{what}: {why}")]
    Malformed {
        /// Which part.
        what: String,
        /// What is wrong.
        why: String,
    },
    /// The image is for another OS or CPU.
    #[error("image {image} is for {platform}; wisp runs linux/amd64 images")]
    Platform {
        /// The image.
        image: String,
        /// Its platform.
        platform: String,
    },
    /// A layer could not be applied.
    #[error("layer {layer}: {why}")]
    Layer {
        /// Which layer.
        layer: String,
        /// What went wrong.
        why: String,
    },
    /// Converting needs root (file owners), or a host tool failed.
    #[error("{0}")]
    Convert(String),
    /// A cache file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}
