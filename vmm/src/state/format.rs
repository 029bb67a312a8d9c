//! The state file: a fixed header, then the state as JSON.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "WISPSNAP"
//!      8     4  format version (little endian), FORMAT_VERSION
//!     12     4  flags, 0
//!     16     8  body length in bytes (little endian)
//!     24     8  CRC-64/XZ of the body (little endian)
//!     32     …  body: SnapshotState as JSON (KVM structures as byte arrays)
//! ```
//!
//! A reader checks, in order: length, magic, version, body length, checksum, and only
//! then parses the body. This is how a [`super::MachineState`] is written wherever it
//! goes (the body of a snapshot's state file adds the memory file's layout).

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// The file's first eight bytes.
pub const MAGIC: [u8; 8] = *b"WISPSNAP";
/// The format this wisp writes and the only one it reads.
/// Version 2: network cards have a control queue (guest announce), so a card's state
/// has three queues.
pub const FORMAT_VERSION: u32 = 2;
/// Header bytes before the body.
pub const HEADER_LEN: usize = 32;
/// Largest body accepted (a sanity bound against corrupt lengths).
const MAX_BODY: u64 = 64 << 20;
/// Longest state a reader needs to take in: header and largest body.
pub const MAX_STATE_LEN: u64 = HEADER_LEN as u64 + MAX_BODY;

/// Slice-by-16 tables: several times faster than byte-wise, which matters for the
/// memory file's digest.
const CRC: crc::Crc<u64, crc::Table<16>> = crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_XZ);

/// Why a state could not be encoded or decoded.
#[derive(Debug, Error)]
pub enum FormatError {
    /// Shorter than the header, or than the header says.
    #[error("truncated ({got} bytes, expected {want})")]
    Truncated {
        /// Bytes present.
        got: u64,
        /// Bytes needed.
        want: u64,
    },
    /// Not a wisp snapshot at all.
    #[error("not a wisp snapshot (bad magic)")]
    Magic,
    /// Written by a wisp with another format.
    #[error("snapshot format version {found}, but this wisp reads only version {FORMAT_VERSION}; restore it with the wisp version that wrote it")]
    Version {
        /// The file's version.
        found: u32,
    },
    /// Flags this wisp does not know.
    #[error("corrupt header (unknown flags {0:#x})")]
    Flags(u32),
    /// Bytes after the body.
    #[error("{0} unexpected bytes after the state")]
    Trailing(u64),
    /// The body length is absurd.
    #[error("corrupt header (body length {0})")]
    BodyLength(u64),
    /// The checksum does not match.
    #[error("corrupt (checksum mismatch: header {stored:#018x}, body {computed:#018x})")]
    Checksum {
        /// From the header.
        stored: u64,
        /// Of the body.
        computed: u64,
    },
    /// The body is not a valid state (only possible with a matching checksum if the
    /// writer had a bug).
    #[error("unreadable state: {0}")]
    Body(serde_json::Error),
    /// Encoding failed.
    #[error("cannot encode the state: {0}")]
    Encode(serde_json::Error),
}

/// CRC-64/XZ of `bytes`.
pub fn crc64(bytes: &[u8]) -> u64 {
    CRC.checksum(bytes)
}

/// A running CRC-64/XZ.
pub fn crc64_digest() -> crc::Digest<'static, u64, crc::Table<16>> {
    CRC.digest()
}

/// Header plus body for `state`.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, FormatError> {
    let body = serde_json::to_vec(state).map_err(FormatError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc64(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Checks the header of `bytes` and parses the body.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    let len = bytes.len() as u64;
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Truncated {
            got: len,
            want: HEADER_LEN as u64,
        });
    }
    if bytes[..8] != MAGIC {
        return Err(FormatError::Magic);
    }
    let version = le_u32(&bytes[8..12]);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    let flags = le_u32(&bytes[12..16]);
    if flags != 0 {
        return Err(FormatError::Flags(flags));
    }
    let body_len = le_u64(&bytes[16..24]);
    if body_len > MAX_BODY {
        return Err(FormatError::BodyLength(body_len));
    }
    let want = HEADER_LEN as u64 + body_len;
    if len < want {
        return Err(FormatError::Truncated { got: len, want });
    }
    if len > want {
        return Err(FormatError::Trailing(len - want));
    }
    let body = &bytes[HEADER_LEN..];
    let stored = le_u64(&bytes[24..32]);
    let computed = crc64(body);
    if stored != computed {
        return Err(FormatError::Checksum { stored, computed });
    }
    serde_json::from_slice(body).map_err(FormatError::Body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct S {
        a: u64,
        b: String,
    }

    fn sample() -> Vec<u8> {
        encode(&S {
            a: 7,
            b: "x".into(),
        })
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let s: S = decode(&sample()).unwrap();
        assert_eq!(
            s,
            S {
                a: 7,
                b: "x".into()
            }
        );
    }

    #[test]
    fn every_single_byte_flip_is_caught() {
        let good = sample();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            assert!(decode::<S>(&bad).is_err(), "flip at {i} not detected");
        }
    }

    #[test]
    fn truncation_version_and_trailing_bytes_are_named() {
        let good = sample();
        for cut in [0, 10, HEADER_LEN, good.len() - 1] {
            let e = decode::<S>(&good[..cut]).unwrap_err();
            assert!(matches!(e, FormatError::Truncated { .. }), "{cut}: {e}");
        }
        let mut other = good.clone();
        other[8] = (FORMAT_VERSION + 1) as u8;
        let e = decode::<S>(&other).unwrap_err();
        let want = format!("version {}", FORMAT_VERSION + 1);
        assert!(e.to_string().contains(&want), "{e}");
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            decode::<S>(&long).unwrap_err(),
            FormatError::Trailing(1)
        ));
        let mut magic = good;
        magic[0] = b'X';
        assert!(matches!(
            decode::<S>(&magic).unwrap_err(),
            FormatError::Magic
        ));
    }
}
