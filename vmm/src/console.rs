//! The guest console: where serial output goes and where input comes from.
//!
//! `stdio` on a terminal puts the terminal in raw mode (restored on exit) and watches for
//! the escape sequence Ctrl-A x (quit); Ctrl-A Ctrl-A sends a literal Ctrl-A. On a pipe or
//! a file, every byte of stdin reaches the guest, paced by the UART's FIFO.

use std::fs::File;
use std::io::{self, IsTerminal};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::str::FromStr;

use devices::host_file::{self, Accept};
use devices::legacy::serial::SerialOutput;
use thiserror::Error;

/// The escape key: Ctrl-A.
pub const ESCAPE: u8 = 0x01;
/// After the escape key: quit.
pub const QUIT: u8 = b'x';

/// `--console` values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleSpec {
    /// The terminal or pipes wisp runs on.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Output discarded; no input.
    None,
}

impl FromStr for ConsoleSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                _ => Err(format!("expected stdio, file:PATH or none, not {s:?}")),
            },
        }
    }
}

/// Errors opening the console.
#[derive(Debug, Error)]
pub enum ConsoleError {
    /// The output file cannot be created.
    #[error("cannot open console file {0}: {1}")]
    File(PathBuf, io::Error),
    /// The terminal cannot be switched to raw mode.
    #[error("cannot put the terminal in raw mode: {0}")]
    RawMode(io::Error),
}

/// How input is read.
pub enum InputSource {
    /// A pollable descriptor (terminal, pipe, socket): read when epoll says so.
    Stream(RawFd),
    /// A regular file (not pollable): read whenever the guest has room.
    File(File),
}

/// Console input.
pub struct Input {
    /// Where bytes come from.
    pub source: InputSource,
    /// Whether to interpret the escape sequence (terminal only).
    pub escape: bool,
}

/// An open console.
pub struct Console {
    /// Guest output sink, handed to the UART.
    pub output: Option<SerialOutput>,
    /// Guest input, if any.
    pub input: Option<Input>,
    raw: Option<RawMode>,
}

impl Console {
    /// Opens the console described by `spec`.
    pub fn open(spec: &ConsoleSpec) -> Result<Self, ConsoleError> {
        match spec {
            ConsoleSpec::None => Ok(Self {
                output: Some(Box::new(io::sink())),
                input: None,
                raw: None,
            }),
            ConsoleSpec::File(path) => {
                let f = host_file::open(
                    path,
                    File::options().create(true).append(true),
                    Accept::Output,
                )
                .map_err(|e| ConsoleError::File(path.clone(), e))?;
                Ok(Self {
                    output: Some(Box::new(f)),
                    input: None,
                    raw: None,
                })
            }
            ConsoleSpec::Stdio => {
                let stdin = io::stdin();
                let tty = stdin.is_terminal();
                let raw = if tty {
                    Some(RawMode::enter(stdin.as_raw_fd()).map_err(ConsoleError::RawMode)?)
                } else {
                    None
                };
                Ok(Self {
                    output: Some(Box::new(io::stdout())),
                    input: Some(Input {
                        source: stdin_source(),
                        escape: tty,
                    }),
                    raw,
                })
            }
        }
    }

    /// True while the terminal is in raw mode (log lines then need "\r\n").
    pub fn is_raw(&self) -> bool {
        self.raw.is_some()
    }
}

fn stdin_source() -> InputSource {
    let fd = io::stdin().as_raw_fd();
    // Regular files and some devices (/dev/null) cannot be registered with epoll; read
    // them directly instead, whenever the guest has room.
    if !pollable(fd) {
        if let Ok(f) = File::open("/proc/self/fd/0") {
            return InputSource::File(f);
        }
    }
    InputSource::Stream(fd)
}

fn pollable(fd: RawFd) -> bool {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    Epoll::new()
        .and_then(|ep| ep.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0)))
        .is_ok()
}

/// Terminal raw mode, restored exactly on drop.
struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: RawFd) -> io::Result<Self> {
        // SAFETY: termios is plain data; zeroed is a valid value to be overwritten.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is stdin, open for the life of the process; `saved` is valid.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: as above.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restoring the attributes read in `enter` on the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Interprets the console escape sequence in terminal input.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    after_escape: bool,
}

impl EscapeFilter {
    /// Appends the bytes meant for the guest to `out`; returns true on the quit sequence
    /// (bytes after it are dropped).
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if self.after_escape {
                self.after_escape = false;
                match b {
                    QUIT => return true,
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.after_escape = true;
            } else {
                out.push(b);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_console_specs() {
        assert_eq!("stdio".parse(), Ok(ConsoleSpec::Stdio));
        assert_eq!("none".parse(), Ok(ConsoleSpec::None));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(ConsoleSpec::File("/tmp/x".into()))
        );
        assert!("file:".parse::<ConsoleSpec>().is_err());
        assert!("tty".parse::<ConsoleSpec>().is_err());
    }

    #[test]
    fn escape_sequence() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        assert!(!f.filter(b"ls\r", &mut out));
        assert_eq!(out, b"ls\r");
        out.clear();
        // Ctrl-A Ctrl-A is a literal Ctrl-A; Ctrl-A c passes both through.
        assert!(!f.filter(&[ESCAPE, ESCAPE, b'a', ESCAPE, b'c'], &mut out));
        assert_eq!(out, [ESCAPE, b'a', ESCAPE, b'c']);
        out.clear();
        // Split across reads.
        assert!(!f.filter(&[b'z', ESCAPE], &mut out));
        assert!(f.filter(&[QUIT, b'y'], &mut out));
        assert_eq!(out, b"z");
    }
}
