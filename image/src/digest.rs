//! Content digests: `sha256:<hex>` strings, and a reader that hashes what passes
//! through it so a blob is checked against its digest as it is read, not after.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

/// A `sha256:` digest's hex part, checked for form.
pub fn sha256_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_of(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Wraps a reader, hashing every byte read; [`Hashing::finish`] gives the hex digest
/// and the byte count.
pub struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> Hashing<R> {
    /// Hashes what is read from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// Reads what is left (a consumer may stop before the end, e.g. at a tar's
    /// end-of-archive blocks), then returns the digest and the length of everything.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((hex(&self.hasher.finalize()), self.len))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked_for_form() {
        let good = format!("sha256:{}", "ab".repeat(32));
        assert!(sha256_hex(&good).is_some());
        assert!(sha256_hex("sha256:AB").is_none());
        assert!(sha256_hex(&format!("sha512:{}", "ab".repeat(32))).is_none());
        assert!(sha256_hex(&format!("sha256:{}", "g".repeat(64))).is_none());
        assert!(sha256_hex(&format!("sha256:../{}", "a".repeat(61))).is_none());
    }

    #[test]
    fn a_hashing_reader_hashes_all_of_it() {
        let data = b"hello world".to_vec();
        let mut r = Hashing::new(&data[..]);
        let mut first = [0u8; 5];
        r.read_exact(&mut first).unwrap();
        let (d, n) = r.finish().unwrap();
        assert_eq!(n, 11);
        assert_eq!(d, sha256_of(&data));
        assert_eq!(
            d,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
    }
}
