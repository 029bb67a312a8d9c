//! The passt supervisor: a small process of its own (`wisp __passt CONFIG`), started
//! before the VM runs, that starts passt, forwards its log lines, and starts a new one
//! when asked, handing wisp its end of each new connection over a `SOCK_SEQPACKET`
//! socketpair (`SCM_RIGHTS`).
//!
//! So no thread of the VMM ever forks, execs or waits for a child to get ready: the
//! network card asks for a new passt with one non-blocking write
//! ([`Reconnect::request`]) and the event loop takes the answer when it arrives. The
//! seccomp filters of the VMM's threads stay small, and the supervisor, which never
//! sees guest data, is the only process that needs fork and exec.
//!
//! Messages: wisp sends `start`; the supervisor answers `ok PID` with the descriptor,
//! or `error REASON`. The supervisor exits (killing and reaping passt) when wisp's end
//! closes, and gets SIGTERM if wisp dies (parent-death signal).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devices::virtio::net::stream::Reconnect;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::passt::Passt;
use super::{UserNetConfig, UserNetError};

/// The descriptor the supervisor finds its end of the socketpair on.
const CHANNEL_FD: RawFd = 3;
/// The one request.
const START: &[u8] = b"start";
/// Longest answer (`error ...` with passt's reason).
const MAX_ANSWER: usize = 4096;
/// How long the first start may take (passt's own limit is 5 s).
const FIRST_START: Duration = Duration::from_secs(10);
/// How long the supervisor gets to exit once its channel closes.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// A connected socketpair of `SOCK_SEQPACKET` sockets (message boundaries kept, and
/// end-of-file when the peer closes), both close-on-exec.
fn seqpacket_pair() -> io::Result<(UnixStream, UnixStream)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the 2-element array on success.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    Ok(unsafe {
        (
            UnixStream::from_raw_fd(fds[0]),
            UnixStream::from_raw_fd(fds[1]),
        )
    })
}

/// What the supervisor answered.
fn parse_answer(text: &str, fd: Option<File>) -> Result<(u32, UnixStream), String> {
    if let Some(reason) = text.strip_prefix("error ") {
        return Err(reason.to_string());
    }
    let pid = text
        .strip_prefix("ok ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("the passt supervisor sent {text:?}"))?;
    let fd = fd.ok_or("the passt supervisor sent no connection")?;
    let fd = OwnedFd::from(fd);
    // SAFETY: F_SETFD on a descriptor this process owns.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok((pid, UnixStream::from(fd)))
}

/// wisp's handle on the supervisor process.
pub struct Supervisor {
    child: Child,
    channel: UnixStream,
}

impl Supervisor {
    /// Starts the supervisor and, through it, the first passt; returns wisp's end of
    /// passt's connection. Blocks until passt is ready or failed.
    pub fn start(cfg: &UserNetConfig) -> Result<(Supervisor, UnixStream), UserNetError> {
        let exe = std::env::current_exe().map_err(UserNetError::Spawn)?;
        let json = serde_json::to_string(cfg).map_err(|e| UserNetError::Spawn(e.into()))?;
        let (ours, theirs) = seqpacket_pair().map_err(UserNetError::Spawn)?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(exe);
        cmd.arg("__passt")
            .arg(json)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: the closure runs in the child between fork and exec and makes only
        // async-signal-safe calls (dup2, prctl) on a descriptor it inherited.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 clears close-on-exec on the copy.
                if libc::dup2(fd, CHANNEL_FD) < 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(UserNetError::Spawn)?;
        drop(theirs);
        let mut sup = Supervisor {
            child,
            channel: ours,
        };
        sup.channel.write_all(START).map_err(UserNetError::Spawn)?;
        sup.channel
            .set_read_timeout(Some(FIRST_START))
            .map_err(UserNetError::Spawn)?;
        let (pid, stream) = match sup.receive() {
            Ok(Some(answer)) => answer.map_err(UserNetError::Died)?,
            Ok(None) => return Err(UserNetError::Died("the passt supervisor exited".into())),
            Err(e) => return Err(UserNetError::Spawn(e)),
        };
        log::debug!("passt started (pid {pid}, supervisor {})", sup.child.id());
        sup.channel
            .set_nonblocking(true)
            .map_err(UserNetError::Spawn)?;
        Ok((sup, stream))
    }

    /// Reads one answer: `Ok(None)` if the supervisor is gone.
    #[allow(clippy::type_complexity)]
    fn receive(&mut self) -> io::Result<Option<Result<(u32, UnixStream), String>>> {
        let mut buf = vec![0u8; MAX_ANSWER];
        let (n, fd) = self.channel.recv_with_fd(&mut buf).map_err(|e| {
            let e = io::Error::from_raw_os_error(e.errno());
            if e.kind() == io::ErrorKind::WouldBlock {
                e
            } else {
                io::Error::other(format!("the passt supervisor: {e}"))
            }
        })?;
        if n == 0 {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&buf[..n]);
        Ok(Some(parse_answer(text.trim(), fd)))
    }
}

impl Reconnect for Supervisor {
    fn request(&mut self) -> io::Result<()> {
        self.channel.write_all(START)
    }

    fn fd(&self) -> RawFd {
        self.channel.as_raw_fd()
    }

    fn answer(&mut self) -> io::Result<Option<UnixStream>> {
        match self.receive() {
            Ok(Some(Ok((pid, stream)))) => {
                log::warn!("passt restarted (pid {pid})");
                Ok(Some(stream))
            }
            Ok(Some(Err(reason))) => Err(io::Error::other(reason)),
            Ok(None) => Err(io::Error::other("the passt supervisor exited")),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Closing the channel tells the supervisor to stop passt and exit.
        let _ = self.channel.shutdown(std::net::Shutdown::Both);
        let deadline = Instant::now() + EXIT_GRACE;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The supervisor process (`wisp __passt CONFIG`): starts a passt for every request on
/// its channel, until the channel closes.
pub fn helper_main(config: &str) -> Result<(), UserNetError> {
    let cfg: UserNetConfig = serde_json::from_str(config)
        .map_err(|e| UserNetError::Syntax(format!("supervisor configuration: {e}")))?;
    // SAFETY: wisp hands the channel over as descriptor 3 (Supervisor::start); nothing
    // else in this process owns it.
    let mut channel = unsafe { UnixStream::from_raw_fd(CHANNEL_FD) };
    let mut current: Option<Passt> = None;
    let mut buf = [0u8; 64];
    loop {
        match channel.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if &buf[..n] == START => {}
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        // Reap the old one first (it may still run if only the socket broke).
        drop(current.take());
        let sent = match Passt::spawn(&cfg) {
            Ok((passt, stream)) => {
                let msg = format!("ok {}", passt.pid());
                current = Some(passt);
                channel
                    .send_with_fd(msg.as_bytes(), stream.as_raw_fd())
                    .map(drop)
                    .map_err(|e| io::Error::from_raw_os_error(e.errno()))
            }
            Err(e) => {
                let mut msg = format!("error {e}");
                msg.truncate(MAX_ANSWER);
                channel.write_all(msg.as_bytes())
            }
        };
        if sent.is_err() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_strictly() {
        let (a, _b) = UnixStream::pair().unwrap();
        let file = File::from(OwnedFd::from(a));
        let (pid, _) = parse_answer("ok 42", Some(file)).unwrap();
        assert_eq!(pid, 42);
        assert_eq!(
            parse_answer("error port busy", None).unwrap_err(),
            "port busy"
        );
        assert!(parse_answer("ok 42", None).is_err(), "no descriptor");
        assert!(parse_answer("ok x", None).is_err());
        assert!(parse_answer("hello", None).is_err());
    }

    #[test]
    fn seqpackets_keep_boundaries_and_report_the_peer_gone() {
        let (mut a, mut b) = seqpacket_pair().unwrap();
        a.write_all(b"start").unwrap();
        a.write_all(b"start").unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(b.read(&mut buf).unwrap(), 5);
        assert_eq!(b.read(&mut buf).unwrap(), 5);
        drop(a);
        assert_eq!(b.read(&mut buf).unwrap(), 0);
    }
}
