//! One passt process: started over a socketpair, watched until it is ready, its log
//! lines forwarded, killed and reaped when dropped. This runs in the supervisor process
//! (supervisor.rs), never on a thread of the VMM.

use std::io::{self, BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use super::{find_on_path, passt_args, UserNetConfig, UserNetError, PASST};

/// How long passt may take to start (it is usually ready in milliseconds).
const START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A running passt.
pub struct Passt {
    child: Child,
}

impl Passt {
    /// Starts passt for `cfg`; returns it and wisp's end of the connection.
    pub fn spawn(cfg: &UserNetConfig) -> Result<(Passt, UnixStream), UserNetError> {
        static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let prog = find_on_path(PASST).ok_or(UserNetError::NotInstalled)?;
        let (ours, theirs) = UnixStream::pair().map_err(UserNetError::Spawn)?;
        let fd = theirs.as_raw_fd();
        // passt writes its pid file once it is set up (ports bound, sandbox entered).
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid_file =
            std::env::temp_dir().join(format!("wisp-{}-passt-{n}.pid", std::process::id()));
        let _ = std::fs::remove_file(&pid_file);
        let mut cmd = Command::new(prog);
        cmd.args(passt_args(cfg, fd))
            .arg("--pid")
            .arg(&pid_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the child between fork and exec and makes only
        // async-signal-safe calls (fcntl, prctl) on a descriptor it inherited.
        unsafe {
            cmd.pre_exec(move || {
                // Keep passt's end across exec, and stop passt if wisp dies.
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(UserNetError::Spawn)?;
        drop(theirs);
        let ready = wait_ready(&mut child, &pid_file);
        let _ = std::fs::remove_file(&pid_file);
        ready?;
        log::debug!("passt started (pid {})", child.id());
        if let Some(err) = child.stderr.take() {
            let pid = child.id();
            std::thread::Builder::new()
                .name("passt-log".into())
                .spawn(move || {
                    for line in BufReader::new(err).lines().map_while(Result::ok) {
                        if is_noise(&line) {
                            continue;
                        }
                        log::warn!("passt[{pid}]: {line}");
                    }
                })
                .map_err(UserNetError::Spawn)?;
        }
        Ok((Passt { child }, ours))
    }

    /// passt's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// passt lines not worth showing: it also tries syslog, which may not exist, and it
/// says so when it drops root for `nobody`.
fn is_noise(line: &str) -> bool {
    line.contains("to syslog") || line.contains("Changing to nobody")
}

/// Waits until passt has written its pid file; if it exits first, returns its reason.
fn wait_ready(child: &mut Child, pid_file: &std::path::Path) -> Result<(), UserNetError> {
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    loop {
        if std::fs::metadata(pid_file)
            .map(|m| m.len() > 0)
            .unwrap_or(false)
        {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut text = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = io::Read::read_to_string(&mut err, &mut text);
            }
            let reason = text
                .lines()
                .filter(|l| !is_noise(l))
                .map(str::trim)
                .rfind(|l| !l.is_empty())
                .map(str::to_string)
                .unwrap_or_else(|| format!("{status}"));
            let hint = if reason.contains("nterface") {
                " (user-mode networking needs a host interface with a default route)"
            } else {
                ""
            };
            return Err(UserNetError::Died(format!("{reason}{hint}")));
        }
        if std::time::Instant::now() > deadline {
            log::warn!("passt did not report ready within {START_TIMEOUT:?}; carrying on");
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        // A passt that already exited cannot be killed; reap it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
