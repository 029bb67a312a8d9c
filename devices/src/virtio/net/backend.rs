//! The host side of a virtio-net card: a TAP, or a length-prefixed stream to a
//! user-mode network stack (passt).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use super::tap::{Tap, VNET_HDR_LEN};

/// What a virtio-net card needs from its host side. Frames cross with a 12-byte
/// `virtio_net_hdr_v1` in front.
pub trait Backend: Send {
    /// A short description for logs, e.g. `TAP tap0`.
    fn describe(&self) -> String;
    /// The descriptor to watch (edge-triggered, readable and writable).
    fn fd(&self) -> RawFd;
    /// Whether offload metadata (partial checksums, TSO) survives the trip, so the
    /// device may offer the offload features.
    fn supports_offloads(&self) -> bool;
    /// Tells the backend which offloads the guest accepts (`TUN_F_*`).
    fn set_offloads(&mut self, flags: u32) -> io::Result<()>;
    /// Reads one frame with its header into `buf` (at least [`super::MAX_FRAME`] bytes);
    /// `WouldBlock` when none is ready.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame with its header (the backend may overwrite the header bytes).
    /// `Ok` means the frame was taken; `WouldBlock` means retry once the fd is writable.
    fn write_frame(&mut self, frame: &mut [u8]) -> io::Result<()>;
    /// Writes out anything a previous `write_frame` left buffered; `WouldBlock` if some
    /// is still left.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// The connection is gone: ask for a new one, without waiting for it. From then on
    /// [`Backend::fd`] is the descriptor on which the answer arrives, and
    /// [`Backend::finish_reconnect`] takes it. Backends without a connection (TAPs)
    /// cannot reconnect.
    fn start_reconnect(&mut self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this backend cannot reconnect",
        ))
    }
    /// After [`Backend::start_reconnect`], on an event of [`Backend::fd`]: `Ok(true)`
    /// once the new connection is in place (and `fd` is its descriptor), `Ok(false)`
    /// while the answer is still to come.
    fn finish_reconnect(&mut self) -> io::Result<bool> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this backend cannot reconnect",
        ))
    }
}

/// True for errors that mean the backend's connection is gone (not just busy).
pub fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::InvalidData
            | io::ErrorKind::WriteZero
    )
}

impl Backend for Tap {
    fn describe(&self) -> String {
        format!("TAP {}", self.name())
    }

    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }

    fn supports_offloads(&self) -> bool {
        true
    }

    fn set_offloads(&mut self, flags: u32) -> io::Result<()> {
        self.set_offload(flags)
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = Tap::read_frame(self, buf)?;
        if n < VNET_HDR_LEN {
            // Only a closed or broken TAP returns less than its header.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("short read of {n} bytes"),
            ));
        }
        Ok(n)
    }

    fn write_frame(&mut self, frame: &mut [u8]) -> io::Result<()> {
        Tap::write_frame(self, frame).map(drop)
    }
}
