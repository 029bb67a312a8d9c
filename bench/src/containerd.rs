//! A private containerd: a daemon of the caller's own, with its root, state, socket and
//! config in one directory, so that the bench (or a test) never talks to, or disturbs, a
//! system containerd. [`Containerd::start`] writes a minimal `config.toml` (the CRI
//! plugin disabled, nothing outside the directory), starts `containerd --config` with
//! the given directories first on its PATH (where it looks for `containerd-shim-*-v2`
//! binaries: `ctr run --runtime io.containerd.wisp.v2` makes it start
//! `containerd-shim-wisp-v2`), and waits until it answers. Dropping it deletes every
//! task and container it holds, stops the daemon, unmounts what is left under the
//! directory and removes it.
//!
//! containerd 1.6 puts its shims' sockets in `/run/containerd/s/` whatever its config
//! says; the shims remove them when they exit. Those of the containers
//! [`Containerd::track`] was told about that a shim left behind (nothing listens on
//! them) go when the daemon does, and the directory too if the daemon made it (an empty
//! directory only: a system containerd's is left alone). The
//! empty cgroups named after the namespace go too.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thiserror::Error;

/// The containerd namespace everything of the bench's lives in.
pub const NAMESPACE: &str = "wisp-bench";

/// Where containerd 1.6 keeps shim sockets, whatever its config says.
const SYSTEM_RUN_DIR: &str = "/run/containerd";

/// Where cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How long the daemon may take to answer.
const START_LIMIT: Duration = Duration::from_secs(30);

/// How long the daemon may take to stop after SIGTERM before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// The longest path a unix socket can have (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The PATH a daemon gets when this process has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A private containerd could not be set up or used.
#[derive(Debug, Error)]
pub enum ContainerdError {
    /// The directory, the config or another file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The socket would not fit a unix socket address.
    #[error("the socket path {} is too long for a unix socket ({MAX_SOCKET_PATH} bytes with `.ttrpc`): use a shorter work directory", .0.display())]
    SocketPath(PathBuf),
    /// A program could not be started.
    #[error("cannot run {what}: {source} (Debian: apt-get install containerd)")]
    Spawn {
        /// The program.
        what: String,
        /// Cause.
        source: io::Error,
    },
    /// The daemon exited or did not answer in time.
    #[error("the private containerd {why}; its log says: {tail}")]
    NotReady {
        /// What happened.
        why: String,
        /// The log's last error line, or its last line.
        tail: String,
    },
    /// A `ctr` command failed.
    #[error("`{cmd}` failed: {why}")]
    Ctr {
        /// The command line (without the address and namespace).
        cmd: String,
        /// Its error output.
        why: String,
    },
}

/// A TOML basic string holding `s`.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Where a daemon in `dir` keeps what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The directory everything is in.
    pub dir: PathBuf,
    /// Persistent data (content, snapshots, metadata).
    pub root: PathBuf,
    /// Runtime state (task bundles, the shims' state).
    pub state: PathBuf,
    /// The gRPC socket `ctr --address` takes.
    pub socket: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// The daemon's log.
    pub log: PathBuf,
}

impl Layout {
    /// The layout of a daemon in `dir` (absolute).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            root: dir.join("root"),
            state: dir.join("state"),
            socket: dir.join("containerd.sock"),
            config: dir.join("config.toml"),
            log: dir.join("containerd.log"),
        }
    }

    /// The daemon's config.toml: version 2, root, state and socket in the directory,
    /// the CRI plugin disabled, the `opt` plugin's directory in it too (it would be
    /// /opt/containerd), and the wisp runtime declared for CRI users of the same config
    /// (`ctr run --runtime io.containerd.wisp.v2` needs no declaration: containerd
    /// finds `containerd-shim-wisp-v2` on its PATH).
    pub fn config_toml(&self) -> String {
        let p = |path: &Path| toml_str(&path.to_string_lossy());
        format!(
            "# A private containerd of wisp bench's: nothing outside {dir}.\n\
             version = 2\n\
             root = {root}\n\
             state = {state}\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             \n\
             [grpc]\n\
             \x20 address = {socket}\n\
             \n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n\
             \x20 path = {opt}\n\
             \n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.wisp]\n\
             \x20 runtime_type = \"io.containerd.wisp.v2\"\n",
            dir = self.dir.display(),
            root = p(&self.root),
            state = p(&self.state),
            socket = p(&self.socket),
            opt = p(&self.dir.join("opt")),
        )
    }
}

/// `dirs` first, then `current` (this process's PATH), as a PATH value.
fn path_with(dirs: &[PathBuf], current: Option<&std::ffi::OsStr>) -> std::ffi::OsString {
    let mut parts: Vec<PathBuf> = dirs.to_vec();
    let rest = current.map_or_else(|| DEFAULT_PATH.into(), |c| c.to_os_string());
    parts.extend(std::env::split_paths(&rest));
    std::env::join_paths(parts).unwrap_or(rest)
}

/// The mount points in /proc/self/mountinfo text `mountinfo` that are `dir` or under
/// it, deepest first (the order to unmount them in).
fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mount_path(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    out.dedup();
    out
}

/// A mountinfo path with its octal escapes (`\040` for a space, ...) undone.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last line of `text` that says something, or "(empty)".
fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(empty)")
        .to_string()
}

/// What a containerd log says went wrong: its last error line, or its last line.
fn log_tail(log: &str) -> String {
    log.lines()
        .rev()
        .find(|l| l.contains("level=fatal") || l.contains("level=error"))
        .map_or_else(|| last_line(log), |l| l.trim().to_string())
}

/// The version word of `containerd --version` (`containerd github.com/containerd/containerd
/// 1.6.20~ds1 ...`), or the whole first line.
pub fn version_of(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default().trim();
    line.split_whitespace()
        .nth(2)
        .map_or_else(|| line.to_string(), str::to_string)
}

/// The socket a containerd 1.6 shim (containerd's own, or one written with the Rust
/// `containerd-shim` crate) of container `id` listens on, for the daemon at `socket`:
/// /run/containerd/s/ and the SHA-256 of `SOCKET/NAMESPACE/ID`.
fn shim_socket_of(socket: &Path, id: &str) -> PathBuf {
    let key = format!("{}/{NAMESPACE}/{id}", socket.display());
    Path::new(SYSTEM_RUN_DIR)
        .join("s")
        .join(wisp_image::digest::sha256_of(key.as_bytes()))
}

/// A running private containerd (see the module's documentation).
pub struct Containerd {
    child: Child,
    layout: Layout,
    /// Whether /run/containerd did not exist before (it may go again if empty).
    made_run_dir: bool,
    /// The containers started on it (whose shims' sockets are looked after).
    tracked: Mutex<Vec<String>>,
}

impl Containerd {
    /// Starts a daemon in `dir` (created; absolute or relative to the current
    /// directory) with `path_dirs` first on its PATH, and waits until it answers.
    pub fn start(dir: &Path, path_dirs: &[PathBuf]) -> Result<Self, ContainerdError> {
        let write = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ContainerdError::Write { path, source }
        };
        let dir = std::path::absolute(dir).map_err(write(dir))?;
        let layout = Layout::new(&dir);
        if layout.socket.as_os_str().len() + ".ttrpc".len() > MAX_SOCKET_PATH {
            return Err(ContainerdError::SocketPath(layout.socket));
        }
        std::fs::create_dir_all(&dir).map_err(write(&dir))?;
        std::fs::write(&layout.config, layout.config_toml()).map_err(write(&layout.config))?;
        let log = std::fs::File::create(&layout.log).map_err(write(&layout.log))?;
        let log2 = log.try_clone().map_err(write(&layout.log))?;
        let made_run_dir = !Path::new(SYSTEM_RUN_DIR).exists();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&layout.config)
            .env(
                "PATH",
                path_with(path_dirs, std::env::var_os("PATH").as_deref()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|source| ContainerdError::Spawn {
                what: "containerd".into(),
                source,
            })?;
        // From here on, Drop stops it and removes the directory.
        let mut d = Self {
            child,
            layout,
            made_run_dir,
            tracked: Mutex::new(Vec::new()),
        };
        d.wait_ready()?;
        Ok(d)
    }

    fn not_ready(&self, why: String) -> ContainerdError {
        let text = std::fs::read_to_string(&self.layout.log).unwrap_or_default();
        ContainerdError::NotReady {
            why,
            tail: log_tail(&text),
        }
    }

    fn wait_ready(&mut self) -> Result<(), ContainerdError> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.not_ready(format!("exited at start ({status})")));
            }
            if self.layout.socket.exists() && self.ctr_ok(&["version"]).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!(
                    "did not answer on {} within {} s",
                    self.layout.socket.display(),
                    START_LIMIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where it keeps what.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A `ctr` command talking to this daemon, in [`NAMESPACE`].
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.layout.socket)
            .args(["--namespace", NAMESPACE]);
        cmd
    }

    /// Runs `ctr ARGS`; its standard output, or why it failed.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String, ContainerdError> {
        let cmd = format!("ctr {}", args.join(" "));
        let out = self
            .ctr()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ContainerdError::Spawn {
                what: "ctr".into(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(ContainerdError::Ctr {
                cmd,
                why: last_line(&String::from_utf8_lossy(&out.stderr)),
            })
        }
    }

    /// Imports the image archive `tar` (`docker save` or OCI layout, as a tar) and
    /// unpacks it.
    pub fn import(&self, tar: &Path) -> Result<(), ContainerdError> {
        let file = tar.to_string_lossy();
        self.ctr_ok(&["image", "import", &file]).map(|_| ())
    }

    /// Notes that container `id` is started on it: if its shim leaves its socket
    /// behind, the socket goes when the daemon does.
    pub fn track(&self, id: &str) {
        if let Ok(mut t) = self.tracked.lock() {
            t.push(id.to_string());
        }
    }

    /// Removes the sockets tracked containers' shims left behind (those nothing
    /// listens on any more).
    fn remove_stale_shim_sockets(&self) {
        let ids = self.tracked.lock().map(|t| t.clone()).unwrap_or_default();
        for id in ids {
            let path = shim_socket_of(&self.layout.socket, &id);
            let refused = std::os::unix::net::UnixStream::connect(&path)
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused);
            if refused {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Deletes every task (killing it) and every container of [`NAMESPACE`].
    pub fn remove_all(&self) {
        let ids = |what: &str| {
            self.ctr_ok(&[what, "ls", "-q"])
                .map(|o| o.lines().map(str::to_string).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        for t in ids("task") {
            let _ = self.ctr_ok(&["task", "delete", "--force", &t]);
        }
        for c in ids("container") {
            let _ = self.ctr_ok(&["container", "delete", &c]);
        }
    }

    /// Stops the daemon: SIGTERM, then SIGKILL if it lingers.
    fn stop_daemon(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill has no memory effects; `pid` is our own child, not yet
            // reaped (try_wait above), so the id cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_LIMIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        log::warn!("bench: the private containerd did not stop on SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes the cgroups named [`NAMESPACE`] right under `root` and under each
/// hierarchy mounted in it (containerd puts a namespace's containers in
/// `/NAMESPACE/ID`; runc removes `ID`, the parent stays): empty ones only, so those of
/// another bench still running stay.
fn remove_namespace_cgroups(root: &Path) {
    let _ = std::fs::remove_dir(root.join(NAMESPACE));
    if let Ok(dir) = std::fs::read_dir(root) {
        for e in dir.flatten() {
            let _ = std::fs::remove_dir(e.path().join(NAMESPACE));
        }
    }
}

/// Lazily unmounts `path` (detached from the tree now, freed when unused).
fn unmount(path: &Path) {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `c` is a NUL-terminated path that outlives the call; umount2 only reads it.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        log::warn!(
            "bench: cannot unmount {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_all();
        self.stop_daemon();
        self.remove_stale_shim_sockets();
        let dir = &self.layout.dir;
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            for m in mounts_under(&info, dir) {
                unmount(&m);
            }
        }
        if let Err(e) = std::fs::remove_dir_all(dir) {
            log::warn!("bench: cannot remove {}: {e}", dir.display());
        }
        remove_namespace_cgroups(Path::new(CGROUP_ROOT));
        if self.made_run_dir {
            // Only empty directories go: whatever else is there is someone else's.
            let _ = std::fs::remove_dir(Path::new(SYSTEM_RUN_DIR).join("s"));
            let _ = std::fs::remove_dir(SYSTEM_RUN_DIR);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_keeps_everything_in_the_directory() {
        let l = Layout::new(Path::new("/w/run-1/containerd-runc"));
        let t = l.config_toml();
        let lines: Vec<&str> = t.lines().map(str::trim).collect();
        for want in [
            "version = 2",
            "root = \"/w/run-1/containerd-runc/root\"",
            "state = \"/w/run-1/containerd-runc/state\"",
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]",
            "[grpc]",
            "address = \"/w/run-1/containerd-runc/containerd.sock\"",
            "[plugins.\"io.containerd.internal.v1.opt\"]",
            "path = \"/w/run-1/containerd-runc/opt\"",
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.wisp]",
            "runtime_type = \"io.containerd.wisp.v2\"",
        ] {
            assert!(lines.contains(&want), "{want} missing from\n{t}");
        }
        // Every path in it is under the directory.
        for l in lines.iter().filter(|l| l.contains("= \"/")) {
            assert!(l.contains("\"/w/run-1/containerd-runc/"), "{l}");
        }
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str("/a b/c"), "\"/a b/c\"");
        assert_eq!(toml_str("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
        assert_eq!(toml_str("\u{1}"), "\"\\u0001\"");
    }

    #[test]
    fn the_shim_directory_comes_first_on_path() {
        let p = path_with(
            &[PathBuf::from("/repo/target/release")],
            Some("/usr/bin:/bin".as_ref()),
        );
        assert_eq!(p, "/repo/target/release:/usr/bin:/bin");
        let p = path_with(&[PathBuf::from("/x")], None);
        assert_eq!(p.to_string_lossy(), format!("/x:{DEFAULT_PATH}"));
    }

    #[test]
    fn mounts_under_the_directory_deepest_first() {
        let info = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 22 0:40 / /w/d/state/t/ns/c1/rootfs rw - overlay overlay rw,lowerdir=/w/d/root/1
31 22 0:41 / /w/d/state/a\\040b rw - tmpfs tmpfs rw
32 30 0:42 / /w/d/state/t/ns/c1/rootfs/proc rw - proc proc rw
33 22 0:43 / /w/dx rw - tmpfs tmpfs rw
";
        let m = mounts_under(info, Path::new("/w/d"));
        assert_eq!(
            m,
            [
                PathBuf::from("/w/d/state/t/ns/c1/rootfs/proc"),
                PathBuf::from("/w/d/state/t/ns/c1/rootfs"),
                PathBuf::from("/w/d/state/a b"),
            ]
        );
        assert!(mounts_under(info, Path::new("/elsewhere")).is_empty());
    }

    #[test]
    fn shim_sockets_are_where_the_shims_put_them() {
        // Seen on this machine: the socket of wisp's shim for that container.
        let p = shim_socket_of(
            Path::new("/tmp/wb/target/bench/run-7726/containerd-wisp/containerd.sock"),
            "wb-containerd-wisp-0",
        );
        assert_eq!(
            p,
            Path::new(
                "/run/containerd/s/2bd2ce6322daabeabc24e3c1f24c74ed6df079c6fa4997afb26fa56edcd93ff2"
            )
        );
    }

    #[test]
    fn only_empty_namespace_cgroups_go() {
        let tmp = std::env::temp_dir().join(format!("wisp-bench-cg-{}", std::process::id()));
        let empty = tmp.join("memory").join(NAMESPACE);
        let busy = tmp.join("pids").join(NAMESPACE).join("c1");
        std::fs::create_dir_all(&empty).unwrap();
        std::fs::create_dir_all(&busy).unwrap();
        std::fs::create_dir_all(tmp.join(NAMESPACE)).unwrap();
        remove_namespace_cgroups(&tmp);
        assert!(!empty.exists() && !tmp.join(NAMESPACE).exists());
        assert!(busy.exists());
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn versions_and_last_lines() {
        assert_eq!(
            version_of(
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n"
            ),
            "1.6.20~ds1"
        );
        assert_eq!(version_of("odd"), "odd");
        assert_eq!(last_line("a\nctr: not found\n\n"), "ctr: not found");
        assert_eq!(last_line(""), "(empty)");
        let log = "level=info msg=a\nlevel=error msg=\"bad\"\nlevel=info msg=b\n";
        assert_eq!(log_tail(log), "level=error msg=\"bad\"");
        assert_eq!(log_tail("level=info msg=a\n"), "level=info msg=a");
    }

    #[test]
    fn a_socket_path_too_long_is_refused_before_anything_runs() {
        let long = PathBuf::from(format!("/tmp/{}", "d".repeat(120)));
        match Containerd::start(&long, &[]) {
            Err(ContainerdError::SocketPath(p)) => assert!(p.starts_with(&long)),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("started"),
        }
        assert!(!long.exists());
    }
}
