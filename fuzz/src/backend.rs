//! An in-memory virtio-net backend whose every answer comes from the fuzzer: frames to
//! receive, whether a read, write or flush succeeds, would block, or fails as a dead
//! connection or otherwise, and how a reconnection goes. Frames it takes are checked against the contract
//! (a header and at most `MAX_FRAME` bytes).

use std::io;
use std::os::fd::RawFd;

use devices::virtio::net::backend::Backend;
use devices::virtio::net::tap::VNET_HDR_LEN;
use devices::virtio::net::MAX_FRAME;

/// A scripted backend.
pub struct ScriptedBackend {
    script: Vec<u8>,
    pos: usize,
    offloads: bool,
}

impl ScriptedBackend {
    /// A backend that answers from `script`; `offloads`: whether it supports them.
    pub fn new(script: &[u8], offloads: bool) -> Self {
        Self {
            script: script.to_vec(),
            pos: 0,
            offloads,
        }
    }

    fn next(&mut self) -> u8 {
        let b = self.script.get(self.pos).copied().unwrap_or(0);
        self.pos = self.pos.saturating_add(1);
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.next(), self.next()])
    }

    /// An outcome other than success: 0 would block, 1 interrupted, 2 the connection
    /// is gone, 3 another error. Past the script's end, everything would block.
    fn failure(&mut self, op: u8) -> io::Error {
        match op % 4 {
            0 => io::ErrorKind::WouldBlock.into(),
            1 => io::ErrorKind::Interrupted.into(),
            2 => io::Error::new(io::ErrorKind::BrokenPipe, "peer gone"),
            _ => io::Error::other("backend error"),
        }
    }
}

impl Backend for ScriptedBackend {
    fn describe(&self) -> String {
        "fuzz backend".into()
    }

    /// Nothing to watch: the target delivers backend events itself.
    fn fd(&self) -> RawFd {
        -1
    }

    fn supports_offloads(&self) -> bool {
        self.offloads
    }

    fn set_offloads(&mut self, _flags: u32) -> io::Result<()> {
        match self.next() {
            0xff => Err(io::Error::other("TUNSETOFFLOAD refused")),
            _ => Ok(()),
        }
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        assert!(buf.len() >= MAX_FRAME, "read_frame buffer of {}", buf.len());
        let op = self.next();
        if self.pos > self.script.len() || op < 4 {
            // 0 to 3: a failure (past the end: no frame, it would block).
            return Err(self.failure(if self.pos > self.script.len() { 0 } else { op }));
        }
        // Otherwise a frame: its length (a header at least, MAX_FRAME at most), then
        // a fill byte; the header's bytes come from the script too.
        let len = VNET_HDR_LEN + usize::from(self.u16()) % (MAX_FRAME - VNET_HDR_LEN + 1);
        let fill = self.next();
        let frame = &mut buf[..len];
        frame.fill(fill);
        for b in frame.iter_mut().take(VNET_HDR_LEN) {
            *b = self.next();
        }
        Ok(len)
    }

    fn write_frame(&mut self, frame: &mut [u8]) -> io::Result<()> {
        assert!(
            (VNET_HDR_LEN..=MAX_FRAME).contains(&frame.len()),
            "the device sent a {}-byte frame",
            frame.len()
        );
        match self.next() {
            op @ 0..=3 => Err(self.failure(op)),
            _ => Ok(()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.next() {
            op @ 0..=3 => Err(self.failure(op)),
            _ => Ok(()),
        }
    }

    fn start_reconnect(&mut self) -> io::Result<()> {
        match self.next() {
            0 => Err(io::Error::other("no supervisor")),
            _ => Ok(()),
        }
    }

    /// 0: not yet (also past the script's end), 1: failed, else connected.
    fn finish_reconnect(&mut self) -> io::Result<bool> {
        match self.next() {
            0 => Ok(false),
            1 => Err(io::Error::other("the new connection failed")),
            _ => Ok(true),
        }
    }
}
