//! A newc ("070701") cpio archive writer: the initramfs format Linux unpacks. Entries
//! are owned by root with mtime 0, so the same tree gives the same bytes.

/// One archive member.
pub enum Entry<'a> {
    /// A directory.
    Dir {
        /// Path without a leading '/'.
        path: &'a str,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Path without a leading '/'.
        path: &'a str,
        /// Permission bits.
        mode: u32,
        /// Contents.
        data: &'a [u8],
    },
    /// A symbolic link.
    Symlink {
        /// Path without a leading '/'.
        path: &'a str,
        /// Where it points.
        target: &'a str,
    },
    /// A character device node (created without privileges: it is only bytes here).
    CharDev {
        /// Path without a leading '/'.
        path: &'a str,
        /// Permission bits.
        mode: u32,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes `entries` (parents before children) and the trailer.
pub fn archive(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        let (path, mode, data, rdev) = match e {
            Entry::Dir { path, mode } => (*path, S_IFDIR | mode, &[][..], (0, 0)),
            Entry::File { path, mode, data } => (*path, S_IFREG | mode, *data, (0, 0)),
            Entry::Symlink { path, target } => (*path, S_IFLNK | 0o777, target.as_bytes(), (0, 0)),
            Entry::CharDev {
                path,
                mode,
                major,
                minor,
            } => (*path, S_IFCHR | mode, &[][..], (*major, *minor)),
        };
        let nlink = if matches!(e, Entry::Dir { .. }) { 2 } else { 1 };
        member(&mut out, ino, mode, nlink, path, data, rdev);
    }
    member(&mut out, 0, 0, 1, "TRAILER!!!", &[], (0, 0));
    out
}

fn member(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    name: &str,
    data: &[u8],
    (rmajor, rminor): (u32, u32),
) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rmajor,
        rminor,
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_aligned_and_end_with_the_trailer() {
        let a = archive(&[
            Entry::Dir {
                path: "bin",
                mode: 0o755,
            },
            Entry::File {
                path: "bin/x",
                mode: 0o755,
                data: b"hello",
            },
            Entry::Symlink {
                path: "bin/sh",
                target: "x",
            },
            Entry::CharDev {
                path: "console",
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        ]);
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        // The file's header: mode 0100755, size 5, name "bin/x" (6 with NUL).
        let second = &a[a.windows(6).skip(1).position(|w| w == b"070701").unwrap() + 1..];
        let field = |h: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                .unwrap()
        };
        assert_eq!(field(second, 1), 0o100_755);
        assert_eq!(field(second, 6), 5);
        assert_eq!(field(second, 11), 6);
        assert_eq!(&second[110..116], b"bin/x\0");
        let trailer = b"TRAILER!!!\0";
        assert!(a.windows(trailer.len()).any(|w| w == trailer));
        // The device node carries its numbers in rdevmajor/rdevminor.
        let pos = a.windows(8).position(|w| w == b"console\0").unwrap();
        let h = &a[pos - 110..];
        assert_eq!((field(h, 9), field(h, 10)), (5, 1));
    }
}
