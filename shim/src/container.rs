//! One container as one wisp VM. Create mounts the rootfs containerd gives and checks
//! the bundle; Start runs `wisp run --image bundle:DIR` with the container's stdio
//! FIFOs as its console, in the container's network namespace if it names one, and
//! returns once the VM answers on its control socket; the VM's exit status (the
//! process's) ends the task. Pause and resume go through the control socket; kill stops
//! the VM. Everything the VM leaves (control socket, wisp's runtime files, its log) is
//! in one work directory, removed on delete.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm::api::{self, Request};
use wisp_image::Bundle;

use crate::netns::{self, NetnsError, Plan};
use crate::rootfs::{self, RootfsError};

/// The annotation CRI puts on a pod's sandbox container.
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// How long Start waits for the VM's control socket (packing a big rootfs included).
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// wisp's last stderr lines kept for a failed Start.
const KEEP_LINES: usize = 20;

/// Why a container operation failed.
#[derive(Debug, Error)]
pub enum ContainerError {
    /// The bundle cannot become a VM.
    #[error(transparent)]
    Bundle(#[from] wisp_image::ImageError),
    /// Its network namespace cannot be handed to the VM.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Mounting the rootfs failed.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// The operation does not fit the task's state.
    #[error("{0}")]
    State(String),
    /// wisp did not start the VM.
    #[error("the VM did not start: {0}")]
    Start(String),
    /// The VM's control socket refused or failed.
    #[error("the VM's control socket: {0}")]
    Api(#[from] api::ApiError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Io { what, source }
}

/// Where a task is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Created, not started.
    Created,
    /// Its VM runs.
    Running,
    /// Its VM is paused.
    Paused,
    /// It ended.
    Stopped,
}

/// The stdio containerd passes (FIFO paths; empty: none).
#[derive(Clone, Debug, Default)]
pub struct Stdio3 {
    /// The process's input.
    pub stdin: String,
    /// Its output.
    pub stdout: String,
    /// Its error output (the guest's console carries both; see README).
    pub stderr: String,
    /// Whether the process has a terminal.
    pub terminal: bool,
}

/// What changes over a task's life.
struct Life {
    status: Status,
    pid: u32,
    exit_status: u32,
    exited_at: Option<std::time::SystemTime>,
    killed_by: Option<u32>,
    /// The FIFOs the shim holds open for the VM's life (stderr: see README).
    held: Vec<File>,
    /// wisp's last stderr lines.
    last_lines: VecDeque<String>,
}

/// One container.
pub struct Container {
    /// containerd's id.
    pub id: String,
    /// The bundle directory.
    pub bundle: PathBuf,
    /// Its stdio.
    pub stdio: Stdio3,
    spec: Bundle,
    work: PathBuf,
    sandbox: bool,
    mounted: bool,
    life: Mutex<Life>,
    changed: Condvar,
}

/// The work directory of container `id` in `namespace`: short, since it holds the
/// control socket (a unix socket path has at most 107 bytes).
pub fn work_dir(namespace: &str, id: &str) -> PathBuf {
    let base = std::env::var_os("WISP_SHIM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/wisp/containerd"));
    let h = wisp_image::digest::sha256_of(format!("{namespace}/{id}").as_bytes());
    base.join(&h[..16])
}

/// The VM's name: the container id when wisp takes it, else a digest of it.
fn vm_name(id: &str) -> String {
    let ok = id.len() <= 64
        && !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        id.to_string()
    } else {
        format!(
            "ctr-{}",
            &wisp_image::digest::sha256_of(id.as_bytes())[..16]
        )
    }
}

impl Container {
    /// Mounts the rootfs and checks the bundle; on an error nothing stays mounted.
    pub fn create(
        namespace: &str,
        id: &str,
        bundle: &Path,
        rootfs: &[containerd_shim::protos::types::mount::Mount],
        stdio: Stdio3,
    ) -> Result<Container, ContainerError> {
        let mounted = rootfs::mount_all(rootfs, &bundle.join("rootfs"))?;
        let checked = Bundle::open(bundle)
            .map_err(ContainerError::from)
            .and_then(|spec| {
                if stdio.terminal != spec.process.terminal {
                    return Err(ContainerError::State(format!(
                        "the task asks for terminal={} but config.json has process.terminal={}",
                        stdio.terminal, spec.process.terminal
                    )));
                }
                Ok(spec)
            });
        let spec = match checked {
            Ok(s) => s,
            Err(e) => {
                if mounted {
                    rootfs::unmount(bundle);
                }
                return Err(e);
            }
        };
        let work = work_dir(namespace, id);
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work).map_err(io_err(format!("cannot create {}", work.display())))?;
        let _ = fs::write(
            work.join("owner"),
            format!("{namespace}/{id}\n{}\n", bundle.display()),
        );
        Ok(Container {
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
            stdio,
            sandbox: spec.annotations.get(CONTAINER_TYPE).map(String::as_str) == Some("sandbox"),
            spec,
            work,
            mounted,
            life: Mutex::new(Life {
                status: Status::Created,
                pid: 0,
                exit_status: 0,
                exited_at: None,
                killed_by: None,
                held: Vec::new(),
                last_lines: VecDeque::new(),
            }),
            changed: Condvar::new(),
        })
    }

    fn life(&self) -> MutexGuard<'_, Life> {
        self.life.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Status, pid, exit status and time.
    pub fn state(&self) -> (Status, u32, u32, Option<std::time::SystemTime>) {
        let l = self.life();
        (l.status, l.pid, l.exit_status, l.exited_at)
    }

    fn api_sock(&self) -> PathBuf {
        self.work.join("api.sock")
    }

    fn open_stdio(&self) -> Result<(Stdio, Stdio, Vec<File>), ContainerError> {
        let s = &self.stdio;
        let input = if s.stdin.is_empty() {
            Stdio::null()
        } else {
            // Read-write: the open does not wait for a writer, and no end of file
            // arrives before containerd's copy starts.
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&s.stdin)
                .map_err(io_err(format!("cannot open stdin {}", s.stdin)))?;
            Stdio::from(f)
        };
        let output = if s.stdout.is_empty() {
            Stdio::null()
        } else {
            let f = OpenOptions::new()
                .write(true)
                .open(&s.stdout)
                .map_err(io_err(format!("cannot open stdout {}", s.stdout)))?;
            Stdio::from(f)
        };
        let mut held = Vec::new();
        if !s.stderr.is_empty() {
            // Read-write: a write-only open fails (ENXIO) while containerd has not
            // opened its end yet.
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&s.stderr)
                .map_err(io_err(format!("cannot open stderr {}", s.stderr)))?;
            held.push(f);
        }
        Ok((input, output, held))
    }

    /// The `wisp run` command of this container.
    fn wisp_command(&self, plan: Option<&Plan>) -> Result<Command, ContainerError> {
        let exe = std::env::current_exe().map_err(io_err("cannot find the shim's binary"))?;
        let wisp = exe.canonicalize().unwrap_or(exe).with_file_name("wisp");
        if !wisp.is_file() {
            return Err(ContainerError::Start(format!(
                "{} is missing: the shim runs the wisp binary next to it (cargo build --release)",
                wisp.display()
            )));
        }
        let mut c = Command::new(wisp);
        c.arg("run")
            .arg("--image")
            .arg(format!("bundle:{}", self.bundle.display()))
            .arg("--name")
            .arg(vm_name(&self.id))
            .arg("--api")
            .arg(self.api_sock())
            .args(["--cpus", &self.spec.cpus.to_string()])
            .args(["--memory", &self.spec.memory_mib.to_string()])
            .args(["--console", "stdio"])
            // wisp's runtime files (the run's disk and initramfs) go to the work dir.
            .env("XDG_RUNTIME_DIR", &self.work)
            .env(
                "WISP_LOG",
                std::env::var("WISP_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("WISP_LOG_STYLE", "never");
        match plan {
            Some(p) => {
                c.arg("--net")
                    .arg(format!("bridge={},mac={}", netns::BRIDGE, p.mac))
                    .arg("--cmdline")
                    .arg(p.cmdline());
            }
            None => {
                c.args(["--net", "user"]);
            }
        }
        Ok(c)
    }

    /// Starts the VM and waits until it answers on its control socket. Returns its pid.
    /// If it does not start, the task has ended with status 1 (or the VM's).
    pub fn start(self: &Arc<Self>) -> Result<u32, ContainerError> {
        if self.life().status != Status::Created {
            return Err(ContainerError::State(format!(
                "task {} was started already",
                self.id
            )));
        }
        let started = self.spawn();
        if started.is_err() {
            // Nothing runs: the task has ended (containerd's Wait returns, Delete works).
            let l = self.life();
            if l.status == Status::Created {
                self.end(l, 1);
            }
        }
        started
    }

    fn spawn(self: &Arc<Self>) -> Result<u32, ContainerError> {
        let (input, output, held) = self.open_stdio()?;
        let ns_file = match &self.spec.netns {
            Some(p) => Some(File::open(p).map_err(io_err(format!(
                "cannot open the network namespace {}",
                p.display()
            )))?),
            None => None,
        };
        let mut cmd = if self.sandbox {
            // A pod's sandbox: no VM, a process holding its network namespace for the
            // pod's containers (they join /proc/PID/ns/net).
            let exe = std::env::current_exe().map_err(io_err("cannot find the shim's binary"))?;
            let mut c = Command::new(exe);
            c.arg(crate::HOLD_ARG);
            c
        } else {
            let plan = match &self.spec.netns {
                Some(ns) => {
                    let plan = Plan::read(ns, self.id.as_bytes())?;
                    // Written first: a crash from here on is undone by `delete`.
                    let _ = fs::write(self.work.join("net.json"), plan.to_json());
                    if let Err(e) = plan.apply() {
                        self.restore_net();
                        return Err(e.into());
                    }
                    Some(plan)
                }
                None => None,
            };
            self.wisp_command(plan.as_ref())?
        };
        if let Some(f) = &ns_file {
            let fd = f.as_raw_fd();
            // SAFETY: between fork and exec only setns runs, an async-signal-safe
            // system call on a descriptor that stays open until the spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.stdin(input).stdout(output).stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                self.restore_net();
                return Err(io_err("cannot start wisp")(e));
            }
        };
        drop(ns_file);
        let pid = child.id();
        let _ = fs::write(self.work.join("pid"), pid.to_string());
        {
            let mut l = self.life();
            l.status = Status::Running;
            l.pid = pid;
            l.held = held;
        }
        if let Some(err) = child.stderr.take() {
            let me = Arc::clone(self);
            std::thread::spawn(move || me.read_log(err));
        }
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            let code = match child.wait() {
                Ok(s) => s
                    .code()
                    .or_else(|| s.signal().map(|sig| 128 + sig))
                    .unwrap_or(255),
                Err(e) => {
                    log::warn!("{}: cannot wait for wisp: {e}", me.id);
                    255
                }
            };
            me.exited(code);
        });
        if !self.sandbox {
            self.wait_ready()?;
        }
        Ok(pid)
    }

    /// wisp's stderr: into the shim's log, the last lines kept for errors.
    fn read_log(&self, err: std::process::ChildStderr) {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            log::info!("{}: {line}", self.id);
            let mut l = self.life();
            if l.last_lines.len() == KEEP_LINES {
                l.last_lines.pop_front();
            }
            l.last_lines.push_back(line);
        }
    }

    fn wait_ready(&self) -> Result<(), ContainerError> {
        let t0 = Instant::now();
        let sock = self.api_sock();
        let sock = sock.to_string_lossy();
        loop {
            if self.life().status == Status::Stopped {
                // Give the log reader a moment to take wisp's last words.
                std::thread::sleep(Duration::from_millis(100));
                let l = self.life();
                let why = l
                    .last_lines
                    .iter()
                    .rev()
                    .find(|s| s.contains("error"))
                    .or(l.last_lines.back())
                    .cloned()
                    .unwrap_or_else(|| format!("wisp exited with status {}", l.exit_status));
                return Err(ContainerError::Start(why));
            }
            if api::call(&sock, &Request::Status).is_ok() {
                return Ok(());
            }
            if t0.elapsed() > START_TIMEOUT {
                // It failed to start: it ends here, before the error goes back.
                let pid = self.life().pid as i32;
                // SAFETY: kill has no memory effects; the pid is our child, not yet
                // reaped (the status is not Stopped).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                self.wait();
                return Err(ContainerError::Start(format!(
                    "no answer on {sock} after {} s",
                    START_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Puts the network namespace back, if the shim changed it.
    fn restore_net(&self) {
        let net = self.work.join("net.json");
        if let Some(plan) = fs::read_to_string(&net)
            .ok()
            .and_then(|t| Plan::from_json(&t))
        {
            plan.restore();
            let _ = fs::remove_file(net);
        }
    }

    fn exited(&self, code: i32) {
        self.restore_net();
        let l = self.life();
        let status = match l.killed_by {
            Some(sig) => 128 + sig,
            None => u32::try_from(code).unwrap_or(255),
        };
        self.end(l, status);
    }

    /// The task has ended with `exit_status`: Stopped, the FIFOs it held closed, and
    /// every [`Container::wait`] woken.
    fn end(&self, mut l: MutexGuard<'_, Life>, exit_status: u32) {
        l.exit_status = exit_status;
        l.exited_at = Some(std::time::SystemTime::now());
        l.status = Status::Stopped;
        l.held.clear();
        drop(l);
        self.changed.notify_all();
    }

    /// Blocks until the task has ended; its exit status and time.
    pub fn wait(&self) -> (u32, Option<std::time::SystemTime>) {
        let mut l = self.life();
        while l.status != Status::Stopped {
            l = self.changed.wait(l).unwrap_or_else(|p| p.into_inner());
        }
        (l.exit_status, l.exited_at)
    }

    /// Signal `sig`: the VM is stopped (SIGTERM to wisp, which stops it cleanly), and the
    /// exit status is 128 + `sig`, as for a process the signal ended. A created task
    /// just ends.
    pub fn kill(&self, sig: u32) -> Result<(), ContainerError> {
        let mut l = self.life();
        match l.status {
            Status::Stopped => Err(ContainerError::State(format!(
                "task {} is not running",
                self.id
            ))),
            Status::Created => {
                self.end(l, 128 + sig);
                Ok(())
            }
            Status::Running | Status::Paused => {
                l.killed_by.get_or_insert(sig);
                // The sandbox holder ends on the signal itself; wisp stops the VM cleanly
                // on SIGTERM, and a SIGKILL (containerd's last word) is passed on.
                let s = if self.sandbox || sig == libc::SIGKILL as u32 {
                    libc::SIGKILL
                } else {
                    libc::SIGTERM
                };
                // SAFETY: kill has no memory effects; the pid is our child, not yet reaped
                // (the status is not Stopped).
                if unsafe { libc::kill(l.pid as i32, s) } != 0 {
                    return Err(io_err("cannot signal wisp")(std::io::Error::last_os_error()));
                }
                Ok(())
            }
        }
    }

    /// Pauses (`true`) or resumes the VM.
    pub fn pause(&self, pause: bool) -> Result<(), ContainerError> {
        let status = self.life().status;
        let want = if pause {
            Status::Running
        } else {
            Status::Paused
        };
        if status != want || self.sandbox {
            return Err(ContainerError::State(format!(
                "task {} is {status:?}: it cannot be {}",
                self.id,
                if pause { "paused" } else { "resumed" }
            )));
        }
        let req = if pause {
            Request::Pause
        } else {
            Request::Resume
        };
        api::call(&self.api_sock().to_string_lossy(), &req)?;
        self.life().status = if pause {
            Status::Paused
        } else {
            Status::Running
        };
        Ok(())
    }

    /// CPU time (ns: total, user, kernel) and resident memory (bytes) of the VM's
    /// process, and the VM's memory size.
    pub fn usage(&self) -> Result<(u64, u64, u64, u64, u64), ContainerError> {
        let pid = self.life().pid;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_err(io_err(format!("cannot read /proc/{pid}/stat")))?;
        // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|w| w.parse().unwrap_or(0))
            .collect();
        // SAFETY: sysconf has no preconditions.
        let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let ns = |t: u64| t.saturating_mul(1_000_000_000 / tick);
        let (user, kernel) = (ns(*f.get(11).unwrap_or(&0)), ns(*f.get(12).unwrap_or(&0)));
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss_kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        Ok((
            user + kernel,
            user,
            kernel,
            rss_kb * 1024,
            self.spec.memory_mib << 20,
        ))
    }

    /// After the task ended (or never started): the rootfs unmounted, the work
    /// directory removed.
    pub fn cleanup(&self) -> Result<(), ContainerError> {
        if matches!(self.life().status, Status::Running | Status::Paused) {
            return Err(ContainerError::State(format!(
                "task {} is running: kill it first",
                self.id
            )));
        }
        if self.mounted {
            rootfs::unmount(&self.bundle);
        }
        remove_work(&self.work);
        Ok(())
    }
}

/// Removes a work directory (wisp has exited: nothing in it is in use).
pub fn remove_work(work: &Path) {
    if let Err(e) = fs::remove_dir_all(work) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("cannot remove {}: {e}", work.display());
        }
    }
}

/// `containerd-shim-wisp-v2 delete`, run by containerd when a shim died: the VM it
/// left is stopped, its namespace restored, the rootfs unmounted, its files removed.
/// Returns the VM's pid (0 if none was running).
pub fn cleanup_after_crash(namespace: &str, id: &str, bundle: &Path) -> u32 {
    let work = work_dir(namespace, id);
    let pid = fs::read_to_string(work.join("pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        .unwrap_or(0);
    if pid > 0 && is_ours(pid) {
        // SAFETY: kill has no memory effects; the pid was checked to be the VM's wisp
        // or a sandbox's holder.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t0 = Instant::now();
        while alive(pid) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    if let Some(plan) = fs::read_to_string(work.join("net.json"))
        .ok()
        .and_then(|t| Plan::from_json(&t))
    {
        plan.restore();
    }
    rootfs::unmount(bundle);
    remove_work(&work);
    pid.max(0) as u32
}

/// Removes a shim's socket file (`unix://PATH` or PATH): this shim's own (`ours`), or a
/// dead shim's if nothing listens on it.
pub fn remove_socket(address: &str, ours: bool) {
    let path = Path::new(address.strip_prefix("unix://").unwrap_or(address));
    let is_socket = fs::symlink_metadata(path)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
    if address.is_empty() || !is_socket {
        return;
    }
    if !ours && std::os::unix::net::UnixStream::connect(path).is_ok() {
        // Another shim serves it (containerd reuses a shim per grouping).
        return;
    }
    if let Err(e) = fs::remove_file(path) {
        log::warn!("cannot remove {}: {e}", path.display());
    }
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.trim_start().starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// Whether `pid` is a wisp or a sandbox holder (`containerd-shim-wisp-v2 __hold-netns`):
/// the pid file may be stale, and the pid reused.
fn is_ours(pid: i32) -> bool {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut args = cmdline.split(|b| *b == 0);
    let exe = args.next().unwrap_or_default();
    exe.ends_with(b"/wisp") || args.next() == Some(crate::HOLD_ARG.as_bytes())
}
