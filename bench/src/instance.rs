//! A running instance: the process the bench started (a VMM, `runc run`, ...), its
//! output watched for the ready marker (time-stamped where it is read), and how to take
//! it down again.

use std::io::{self, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Output kept for error messages and for the lines the bench parses.
const KEEP: usize = 64 << 10;

/// A started instance.
pub struct Instance {
    child: Child,
    /// When the process was spawned.
    pub spawned: Instant,
    marker: Receiver<Instant>,
    output: Arc<Mutex<String>>,
    /// Commands that take the instance down before its process is killed (e.g.
    /// `runc delete --force ID`).
    teardown: Vec<Command>,
    /// The process whose tree is the instance: the spawned one, or for a launcher that
    /// exits once the instance runs (`runc run -d`) the one it started.
    root: u32,
    /// CPU time of a launcher that has exited (and of the children it waited for), ms.
    launcher_cpu_ms: f64,
    /// Set once the launcher has been reaped (by [`Instance::detach`]).
    detached: bool,
    /// Finds the instance's root once it is ready, for a launcher that stays attached
    /// while a daemon's child runs the instance (`ctr run`, a containerd shim).
    root_finder: Option<RootFinder>,
    /// Processes outside the root's tree whose CPU time counts towards the instance's,
    /// each with the CPU time (ms) it had spent before the instance started.
    also_cpu: Vec<(u32, f64)>,
    /// How long the launcher may take to exit by itself after the teardown commands
    /// (cleaning up after the instance) before it is killed.
    stop_grace: Duration,
}

/// See [`Instance::find_root_when_ready`].
pub type RootFinder = Box<dyn FnOnce() -> Result<u32, String> + Send>;

impl Instance {
    /// Spawns `cmd` with stdout and stderr watched for `marker`.
    pub fn spawn(mut cmd: Command, marker: &'static str) -> io::Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut child = cmd.spawn()?;
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let streams: [Option<Box<dyn Read + Send>>; 2] = [
            child.stdout.take().map(|s| Box::new(s) as _),
            child.stderr.take().map(|s| Box::new(s) as _),
        ];
        for stream in streams.into_iter().flatten() {
            let (tx, output) = (tx.clone(), Arc::clone(&output));
            std::thread::spawn(move || watch(stream, marker, &tx, &output));
        }
        let root = child.id();
        Ok(Self {
            child,
            spawned,
            marker: rx,
            output,
            teardown: Vec::new(),
            root,
            launcher_cpu_ms: 0.0,
            detached: false,
            root_finder: None,
            also_cpu: Vec::new(),
            stop_grace: Duration::ZERO,
        })
    }

    /// For a launcher that exits once the instance runs: waits up to `limit` for it to
    /// exit successfully, keeps its CPU time, and makes the process whose id it wrote to
    /// `pid_file` the instance's root.
    pub fn detach(&mut self, pid_file: &std::path::Path, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let pid = self.child.id() as libc::pid_t;
        loop {
            let mut status = 0;
            // SAFETY: all-zero is a valid rusage, which wait4 fills in.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: waits for our own child `pid` without blocking; the pointers are
            // to live locals.
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
            if r == pid {
                self.detached = true;
                let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
                self.launcher_cpu_ms = ms(usage.ru_utime) + ms(usage.ru_stime);
                if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
                    return Err(self.why_not_ready(&format!("it failed (wait status {status:#x})")));
                }
                break;
            }
            if r < 0 {
                return Err(format!(
                    "cannot wait for the launcher: {}",
                    io::Error::last_os_error()
                ));
            }
            if Instant::now() >= deadline {
                return Err(
                    self.why_not_ready(&format!("it did not finish within {} s", limit.as_secs()))
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let text = std::fs::read_to_string(pid_file)
            .map_err(|e| format!("no pid file {}: {e}", pid_file.display()))?;
        self.root = text
            .trim()
            .parse()
            .map_err(|_| format!("pid file {} holds {text:?}", pid_file.display()))?;
        Ok(())
    }

    /// For a launcher that stays attached while the instance is a daemon's child: once
    /// the marker is seen, `find` names the instance's root, and from then on the
    /// launcher's CPU time counts as a launcher's (its memory does not: it is a client).
    pub fn find_root_when_ready(&mut self, find: RootFinder) {
        self.root_finder = Some(find);
    }

    /// Counts the CPU time process `pid` spends from now on (it had spent `since_ms`
    /// before) towards the instance's: a daemon working for it.
    pub fn count_cpu_of(&mut self, pid: u32, since_ms: f64) {
        self.also_cpu.push((pid, since_ms));
    }

    /// Gives the launcher up to `limit` to exit by itself after the teardown commands,
    /// before [`Instance::stop`] kills it.
    pub fn stop_grace(&mut self, limit: Duration) {
        self.stop_grace = limit;
    }

    /// The CPU time of a launcher that exited (see [`Instance::detach`]), or of one that
    /// stays attached (see [`Instance::find_root_when_ready`]), and of the processes
    /// counted with [`Instance::count_cpu_of`], ms.
    pub fn launcher_cpu_ms(&self) -> f64 {
        let also: f64 = self
            .also_cpu
            .iter()
            .map(|(pid, since)| (crate::procfs::cpu_ms(&[*pid]) - since).max(0.0))
            .sum();
        self.launcher_cpu_ms + also
    }

    /// Runs the root finder, if there is one, now that the instance is ready.
    fn adopt_root(&mut self) -> Result<(), String> {
        let Some(find) = self.root_finder.take() else {
            return Ok(());
        };
        let root = find().map_err(|why| self.why_not_ready(&why))?;
        self.also_cpu.push((self.child.id(), 0.0));
        self.root = root;
        Ok(())
    }

    /// Adds a command to run when the instance is stopped.
    pub fn on_stop(&mut self, cmd: Command) {
        self.teardown.push(cmd);
    }

    /// The root of the instance's process tree.
    pub fn pid(&self) -> u32 {
        self.root
    }

    /// Waits up to `limit` for the marker; returns when it was seen. `Err` says why not
    /// (the process exited, or time ran out), with the end of its output.
    pub fn wait_marker(&mut self, limit: Duration) -> Result<Instant, String> {
        let deadline = Instant::now() + limit;
        loop {
            match self.marker.recv_timeout(Duration::from_millis(100)) {
                Ok(at) => return self.adopt_root().map(|()| at),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.why_not_ready("its output ended"))
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if !self.running() {
                // Output may still be in the pipe: one last look.
                if let Ok(at) = self.marker.recv_timeout(Duration::from_millis(200)) {
                    return self.adopt_root().map(|()| at);
                }
                return Err(self.why_not_ready("it exited"));
            }
            if crate::interrupted() {
                return Err("interrupted".into());
            }
            if Instant::now() >= deadline {
                return Err(
                    self.why_not_ready(&format!("no ready marker within {} s", limit.as_secs()))
                );
            }
        }
    }

    /// Whether the instance is still running (while its launcher stays attached:
    /// whether the launcher is).
    pub fn running(&mut self) -> bool {
        if self.detached {
            crate::procfs::alive(self.root)
        } else {
            matches!(self.child.try_wait(), Ok(None))
        }
    }

    /// Waits up to `limit` for the instance to end by itself; whether it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.running() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Everything the process printed so far (the last 64 KiB).
    pub fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// `why`, and the last meaningful line of output.
    pub fn why_not_ready(&self, why: &str) -> String {
        let out = self.output();
        match out.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
            Some(line) => format!("{why}; last output: {line}"),
            None => format!("{why}, printing nothing"),
        }
    }

    /// Takes the instance down: its teardown commands, then (after the launcher's stop
    /// grace) SIGKILL, then reaps it.
    pub fn stop(mut self) {
        for mut cmd in std::mem::take(&mut self.teardown) {
            let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
        if !self.detached {
            let deadline = Instant::now() + self.stop_grace;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn watch(
    mut stream: Box<dyn Read + Send>,
    marker: &str,
    tx: &mpsc::Sender<Instant>,
    output: &Mutex<String>,
) {
    let mut buf = [0u8; 4096];
    let mut recent = String::new();
    let mut seen = false;
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        let at = Instant::now();
        let text = String::from_utf8_lossy(&buf[..n]);
        recent.push_str(&text);
        if !seen && recent.contains(marker) {
            seen = true;
            let _ = tx.send(at);
        }
        // Keep only what a marker split across reads needs.
        if recent.len() > marker.len() * 2 {
            let cut = recent.len() - marker.len();
            let cut = (cut..recent.len())
                .find(|i| recent.is_char_boundary(*i))
                .unwrap_or(recent.len());
            recent.drain(..cut);
        }
        if let Ok(mut out) = output.lock() {
            out.push_str(&text);
            if out.len() > KEEP {
                let cut = out.len() - KEEP / 2;
                let cut = (cut..out.len())
                    .find(|i| out.is_char_boundary(*i))
                    .unwrap_or(out.len());
                out.drain(..cut);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_split_across_writes_is_seen() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "printf 'boot WISP-BE'; sleep 0.2; printf 'NCH-READY\\n'; sleep 5",
        ]);
        let mut i = Instance::spawn(cmd, "WISP-BENCH-READY").unwrap();
        let at = i.wait_marker(Duration::from_secs(10)).unwrap();
        assert!(at.duration_since(i.spawned) >= Duration::from_millis(150));
        assert!(i.running());
        i.stop();
    }

    #[test]
    fn a_root_found_when_ready_becomes_the_instance() {
        let other = Command::new("sleep").arg("5").spawn().unwrap();
        let other_pid = other.id();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo WISP-BENCH-READY; sleep 5"]);
        let mut i = Instance::spawn(cmd, "WISP-BENCH-READY").unwrap();
        let launcher = i.pid();
        i.find_root_when_ready(Box::new(move || Ok(other_pid)));
        i.wait_marker(Duration::from_secs(10)).unwrap();
        assert_eq!(i.pid(), other_pid);
        assert_eq!(i.also_cpu, [(launcher, 0.0)]);
        assert!(i.running(), "the launcher still runs");
        i.stop();
        let mut other = other;
        let _ = other.kill();
        let _ = other.wait();

        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo WISP-BENCH-READY; sleep 5"]);
        let mut i = Instance::spawn(cmd, "WISP-BENCH-READY").unwrap();
        i.find_root_when_ready(Box::new(|| Err("no shim for it".into())));
        let why = i.wait_marker(Duration::from_secs(10)).unwrap_err();
        assert!(why.starts_with("no shim for it"), "{why}");
        i.stop();
    }

    #[test]
    fn an_exit_without_the_marker_says_why() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo 'crun: cgroups in hybrid mode not supported' >&2; exit 1",
        ]);
        let mut i = Instance::spawn(cmd, "WISP-BENCH-READY").unwrap();
        let why = i.wait_marker(Duration::from_secs(10)).unwrap_err();
        assert!(why.contains("hybrid mode"), "{why}");
        i.stop();
    }
}
