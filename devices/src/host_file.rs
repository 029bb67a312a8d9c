//! Opening host files that wisp reads or writes as data (kernels, disk images,
//! snapshot files, console logs) without blocking on something that is not a file.
//!
//! open(2) on a FIFO waits for the other end, possibly forever, and a device node may
//! read without end. Every open here is non-blocking, the descriptor's type is checked
//! with fstat against what the caller accepts, and only then is the descriptor made
//! blocking again for ordinary use.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What a caller accepts besides a regular file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accept {
    /// Regular files only (kernels, initrds, snapshot files).
    Regular,
    /// Regular files and block devices (disk images).
    RegularOrBlock,
    /// Anything but a directory or a socket: regular files, devices such as /dev/null,
    /// and FIFOs that have a reader (console output).
    Output,
}

/// What a file type is, for messages: "a directory", "a FIFO", ...
pub fn describe(t: std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "of an unknown kind"
    }
}

/// Opens `path` with `options` (non-blocking while it is checked) and returns it if
/// its type is one `accept` allows; otherwise an `InvalidInput` error that says what
/// the path is.
pub fn open(path: &Path, options: &mut OpenOptions, accept: Accept) -> io::Result<File> {
    let file = options
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // Opening a FIFO for writing without a reader.
            Some(libc::ENXIO) => io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is a FIFO that no process has open for reading",
            ),
            _ => e,
        })?;
    let t = file.metadata()?.file_type();
    let ok = match accept {
        Accept::Regular => t.is_file(),
        Accept::RegularOrBlock => t.is_file() || t.is_block_device(),
        Accept::Output => !t.is_dir() && !t.is_socket(),
    };
    if !ok {
        let wanted = match accept {
            Accept::Regular => "a regular file",
            Accept::RegularOrBlock => "an image file or a block device",
            Accept::Output => "a file or a device to write to",
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it is {}, not {wanted}", describe(t)),
        ));
    }
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL touch no memory.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Opens `path` read-only as a regular file.
pub fn open_regular(path: &Path) -> io::Result<File> {
    open(path, OpenOptions::new().read(true), Accept::Regular)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_the_caller_accepts_opens_and_nothing_blocks() {
        let dir = std::env::temp_dir().join(format!("wisp-host-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(open_regular(&file).is_ok());
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&fifo).unwrap_err();
        assert!(e.to_string().contains("it is a FIFO"), "{e}");
        let e = open(&fifo, OpenOptions::new().append(true), Accept::Output).unwrap_err();
        assert!(e.to_string().contains("no process has open"), "{e}");
        let e = open_regular(&dir).unwrap_err();
        assert!(e.to_string().contains("it is a directory"), "{e}");
        let e = open_regular(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let null = open(
            Path::new("/dev/null"),
            OpenOptions::new().append(true),
            Accept::Output,
        );
        assert!(null.is_ok());
        let e = open(
            Path::new("/dev/zero"),
            OpenOptions::new().read(true),
            Accept::RegularOrBlock,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("image file or a block device"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
