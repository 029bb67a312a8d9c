//! A virtio-net backend over a stream socket in QEMU's "stream" framing, which passt
//! speaks: each frame is a 4-byte big-endian length followed by the Ethernet frame.
//!
//! No offloads cross this link, so the virtio-net header is all zeros on RX and
//! dropped on TX. TX reuses the header's last four bytes for the length prefix, so a
//! frame goes out with one `write` and no copy; a partial write keeps the rest (at most
//! one frame) until the socket is writable again, which is the only buffering here.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use super::backend::Backend;
use super::tap::VNET_HDR_LEN;

/// Largest frame accepted from the stream (an Ethernet frame within 64 KiB).
const MAX_STREAM_FRAME: usize = 65_535;
const RX_BUFFER: usize = 256 << 10;
const LEN_PREFIX: usize = 4;

/// Gets a new connection when the old one died (e.g. a new passt), without blocking:
/// the answer arrives later, when [`Reconnect::fd`] turns readable.
pub trait Reconnect: Send {
    /// Asks for a new connection; returns at once.
    fn request(&mut self) -> io::Result<()>;
    /// The descriptor that turns readable when an answer waits.
    fn fd(&self) -> RawFd;
    /// The answer, if it came: `Ok(Some)` a new connection, `Ok(None)` not yet.
    fn answer(&mut self) -> io::Result<Option<UnixStream>>;
}

/// A length-prefixed stream backend.
pub struct StreamBackend {
    label: String,
    stream: UnixStream,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    tx_pending: Vec<u8>,
    tx_pos: usize,
    reconnect: Box<dyn Reconnect>,
    /// A new connection was asked for and has not come yet.
    reconnecting: bool,
}

impl StreamBackend {
    /// A backend on `stream` (made non-blocking here); `label` names the peer in logs,
    /// `reconnect` replaces a dead connection.
    pub fn new(
        label: String,
        stream: UnixStream,
        reconnect: Box<dyn Reconnect>,
    ) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            label,
            stream,
            rx: vec![0; RX_BUFFER],
            rx_start: 0,
            rx_end: 0,
            tx_pending: Vec::new(),
            tx_pos: 0,
            reconnect,
            reconnecting: false,
        })
    }
}

impl Backend for StreamBackend {
    fn describe(&self) -> String {
        self.label.clone()
    }

    fn fd(&self) -> RawFd {
        if self.reconnecting {
            self.reconnect.fd()
        } else {
            self.stream.as_raw_fd()
        }
    }

    fn supports_offloads(&self) -> bool {
        false
    }

    fn set_offloads(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.reconnecting {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        loop {
            let avail = self.rx_end - self.rx_start;
            if avail >= LEN_PREFIX {
                let p = self.rx_start;
                let len = u32::from_be_bytes([
                    self.rx[p],
                    self.rx[p + 1],
                    self.rx[p + 2],
                    self.rx[p + 3],
                ]) as usize;
                if !(14..=MAX_STREAM_FRAME).contains(&len) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{} sent a frame length of {len}", self.label),
                    ));
                }
                if avail >= LEN_PREFIX + len {
                    let out = buf.get_mut(..VNET_HDR_LEN + len).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, "RX buffer too small")
                    })?;
                    out[..VNET_HDR_LEN].fill(0);
                    out[VNET_HDR_LEN..]
                        .copy_from_slice(&self.rx[p + LEN_PREFIX..p + LEN_PREFIX + len]);
                    self.rx_start += LEN_PREFIX + len;
                    return Ok(VNET_HDR_LEN + len);
                }
            }
            if self.rx_start > 0 {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            match self.stream.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.rx_end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes out what is left of a partially written frame.
    fn flush(&mut self) -> io::Result<()> {
        if self.reconnecting {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        while self.tx_pos < self.tx_pending.len() {
            match self.stream.write(&self.tx_pending[self.tx_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.tx_pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.tx_pending.clear();
        self.tx_pos = 0;
        Ok(())
    }

    fn write_frame(&mut self, frame: &mut [u8]) -> io::Result<()> {
        self.flush()?;
        let len = frame.len().checked_sub(VNET_HDR_LEN).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "frame shorter than its header")
        })?;
        let start = VNET_HDR_LEN - LEN_PREFIX;
        frame[start..VNET_HDR_LEN].copy_from_slice(&(len as u32).to_be_bytes());
        let data = &frame[start..];
        loop {
            match self.stream.write(data) {
                Ok(n) if n == data.len() => return Ok(()),
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_pending.clear();
                    self.tx_pending.extend_from_slice(&data[n..]);
                    self.tx_pos = 0;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn start_reconnect(&mut self) -> io::Result<()> {
        if !self.reconnecting {
            self.reconnect.request()?;
            self.reconnecting = true;
        }
        Ok(())
    }

    fn finish_reconnect(&mut self) -> io::Result<bool> {
        if !self.reconnecting {
            return Ok(true);
        }
        let answer = self.reconnect.answer();
        let stream = match answer {
            Ok(None) => return Ok(false),
            Ok(Some(stream)) => stream,
            Err(e) => {
                self.reconnecting = false;
                return Err(e);
            }
        };
        self.reconnecting = false;
        stream.set_nonblocking(true)?;
        self.stream = stream;
        self.rx_start = 0;
        self.rx_end = 0;
        self.tx_pending.clear();
        self.tx_pos = 0;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;

    /// Answers a request with `next`, once the test says it came (`ready`).
    struct FakeReconnect {
        asked: Arc<AtomicU32>,
        ready: Arc<AtomicBool>,
        next: Option<UnixStream>,
        wake: UnixStream,
    }

    impl Reconnect for FakeReconnect {
        fn request(&mut self) -> io::Result<()> {
            self.asked.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn fd(&self) -> RawFd {
            self.wake.as_raw_fd()
        }
        fn answer(&mut self) -> io::Result<Option<UnixStream>> {
            if !self.ready.load(Ordering::Relaxed) {
                return Ok(None);
            }
            self.next
                .take()
                .map(Some)
                .ok_or_else(|| io::Error::other("no more connections"))
        }
    }

    struct Fake {
        be: StreamBackend,
        peer: UnixStream,
        asked: Arc<AtomicU32>,
        ready: Arc<AtomicBool>,
    }

    fn backend(next: Option<UnixStream>) -> Fake {
        let (a, peer) = UnixStream::pair().unwrap();
        let (wake, _) = UnixStream::pair().unwrap();
        let (asked, ready) = (Arc::default(), Arc::default());
        let fake = FakeReconnect {
            asked: Arc::clone(&asked),
            ready: Arc::clone(&ready),
            next,
            wake,
        };
        let be = StreamBackend::new("test".into(), a, Box::new(fake)).unwrap();
        Fake {
            be,
            peer,
            asked,
            ready,
        }
    }

    fn pair() -> (StreamBackend, UnixStream) {
        let f = backend(None);
        (f.be, f.peer)
    }

    #[test]
    fn a_reconnect_waits_for_its_answer_then_swaps_the_connection() {
        let (new_ours, mut new_peer) = UnixStream::pair().unwrap();
        let new_fd = new_ours.as_raw_fd();
        let Fake {
            mut be,
            peer,
            asked,
            ready,
        } = backend(Some(new_ours));
        drop(peer);
        let old_fd = be.fd();
        be.start_reconnect().unwrap();
        be.start_reconnect().unwrap();
        assert_ne!(be.fd(), old_fd, "watch the answer's descriptor meanwhile");
        let mut buf = vec![0u8; 70_000];
        assert_eq!(
            be.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "nothing is read from the dead connection"
        );
        assert!(!be.finish_reconnect().unwrap(), "no answer yet");
        assert_eq!(asked.load(Ordering::Relaxed), 1, "one request, not two");
        ready.store(true, Ordering::Relaxed);
        assert!(be.finish_reconnect().unwrap());
        assert_eq!(be.fd(), new_fd);
        let mut frame = vec![0x55u8; VNET_HDR_LEN + 20];
        be.write_frame(&mut frame).unwrap();
        let mut got = vec![0u8; 24];
        new_peer.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], &20u32.to_be_bytes());
    }

    #[test]
    fn frames_are_unframed_across_partial_reads() {
        let (mut be, mut peer) = pair();
        let frame: Vec<u8> = (0..60u8).collect();
        let mut wire = (frame.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&frame);
        let mut buf = vec![0xffu8; 70_000];
        peer.write_all(&wire[..10]).unwrap();
        assert_eq!(
            be.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        peer.write_all(&wire[10..]).unwrap();
        peer.write_all(&wire).unwrap();
        for _ in 0..2 {
            let n = be.read_frame(&mut buf).unwrap();
            assert_eq!(n, VNET_HDR_LEN + 60);
            assert!(buf[..VNET_HDR_LEN].iter().all(|&b| b == 0));
            assert_eq!(&buf[VNET_HDR_LEN..n], frame.as_slice());
        }
    }

    #[test]
    fn frames_are_framed_in_place() {
        let (mut be, mut peer) = pair();
        let mut frame = vec![0xaau8; VNET_HDR_LEN + 100];
        be.write_frame(&mut frame).unwrap();
        let mut got = vec![0u8; 104];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], &100u32.to_be_bytes());
        assert!(got[4..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn bad_lengths_and_eof_are_disconnects() {
        let (mut be, mut peer) = pair();
        let mut buf = vec![0u8; 70_000];
        peer.write_all(&1_000_000u32.to_be_bytes()).unwrap();
        let e = be.read_frame(&mut buf).unwrap_err();
        assert!(super::super::backend::is_disconnect(&e), "{e}");
        let (mut be, peer) = pair();
        drop(peer);
        let e = be.read_frame(&mut buf).unwrap_err();
        assert!(super::super::backend::is_disconnect(&e), "{e}");
    }

    #[test]
    fn a_full_socket_applies_backpressure_without_losing_frames() {
        let (mut be, mut peer) = pair();
        let mut sent = 0usize;
        loop {
            let mut frame = vec![7u8; VNET_HDR_LEN + 1500];
            match be.write_frame(&mut frame) {
                Ok(()) => sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(sent < 100_000, "never blocked");
        }
        // Drain the peer: every taken frame arrives whole.
        peer.set_nonblocking(true).unwrap();
        let mut wire = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        loop {
            let n = peer.read(&mut chunk).unwrap_or(0);
            wire.extend_from_slice(&chunk[..n]);
            let flushed = be.flush().is_ok();
            if n == 0 && flushed {
                break;
            }
        }
        assert_eq!(wire.len(), sent * 1504);
    }
}
