//! Helpers for integration tests: they spawn the real `wisp` binary.
#![allow(dead_code)]

pub mod linux_snapshot;
pub mod workloads;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// The wisp binary under test.
pub fn wisp() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wisp"))
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ has a parent")
        .to_path_buf()
}

/// A file from the guest build; fails with the command that builds it.
pub fn guest_file(name: &str) -> PathBuf {
    let p = repo_root().join("target/guest").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/build-guest.sh first",
        p.display()
    );
    p
}

/// The probe test guest.
pub fn probe() -> PathBuf {
    guest_file("probe")
}

/// A finished wisp run.
#[derive(Debug)]
pub struct Output {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// stderr lines that are errors (wisp prints exactly one per failure).
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("wisp: error:") || l.starts_with("error:"))
            .collect()
    }
}

/// Runs `cmd` with `stdin` fed in, killing it after `timeout`.
pub fn run_cmd(mut cmd: Command, stdin: &[u8], timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = thread::spawn(move || {
        // The guest may exit before reading everything; a broken pipe is fine.
        let _ = input.write_all(&data);
    });
    let out = reader(child.stdout.take().expect("stdout"));
    let err = reader(child.stderr.take().expect("stderr"));
    let status = wait_timeout(&mut child, timeout);
    let _ = writer.join();
    let output = Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    };
    assert!(
        output.status.is_some(),
        "wisp did not finish within {timeout:?}: {output:#?}"
    );
    output
}

/// Runs `wisp ARGS` (a client command such as `stop` or `snapshot`) in `dir` (default:
/// the test's) to completion: exit code, stdout, stderr.
pub fn wisp_cmd_in(args: &[&str], dir: Option<&Path>) -> (i32, String, String) {
    let mut cmd = Command::new(wisp());
    cmd.args(args);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd.output().expect("run wisp");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`wisp_cmd_in`] in the test's directory.
pub fn wisp_cmd(args: &[&str]) -> (i32, String, String) {
    wisp_cmd_in(args, None)
}

/// Runs `wisp ARGS`, failing the test unless it succeeds; returns its stdout.
pub fn wisp_ok(args: &[&str]) -> String {
    let (code, out, err) = wisp_cmd(args);
    assert_eq!(code, 0, "wisp {args:?}: {err}");
    out
}

/// A benchmark's option: the number after `name` on its command line, or `default`.
pub fn option_arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a whole number, not {v:?}"))
        })
        .unwrap_or(default)
}

/// A path as the `&str` wisp's arguments take.
pub fn arg(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `text` up to and including its last newline: the lines a guest has finished.
pub fn complete_lines(text: &str) -> &str {
    &text[..text.rfind('\n').map_or(0, |i| i + 1)]
}

/// Stops the VM of `session` through its control socket `api`; fails the test unless
/// wisp then exits with status 0. Returns wisp's stderr.
pub fn stop_vm(session: Session, api: &Path, timeout: Duration) -> String {
    wisp_ok(&["stop", arg(api)]);
    let (status, stderr) = session.wait(timeout);
    assert_eq!(status, Some(0), "stderr:\n{stderr}");
    stderr
}

/// Runs `wisp ARGS` with `stdin`.
pub fn wisp_run(args: &[&str], stdin: &[u8], timeout: Duration) -> Output {
    let mut cmd = Command::new(wisp());
    cmd.args(args);
    run_cmd(cmd, stdin, timeout)
}

/// Starts the probe as a VM named `name` with `probe.cmd=CMDS`, its control socket at
/// DIR/NAME.sock, with `extra` wisp arguments and `env` variables.
pub fn start_probe(
    dir: &TempDir,
    name: &str,
    cmds: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Session, PathBuf) {
    let api = dir.0.join(format!("{name}.sock"));
    let cmdline = format!("probe.cmd={cmds}");
    let kernel = probe();
    let mut args = vec![
        "run",
        "--name",
        name,
        "--api",
        arg(&api),
        "--kernel",
        arg(&kernel),
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra);
    (Session::start_env(&args, env), api)
}

/// Runs the probe with `probe.cmd=CMDS` and extra wisp args.
pub fn run_probe(cmds: &str, extra: &[&str]) -> Output {
    let probe = probe();
    let cmdline = format!("probe.cmd={cmds}");
    let mut args = vec!["run", "--kernel", probe.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--cmdline", &cmdline]);
    wisp_run(&args, b"", Duration::from_secs(60))
}

fn reader<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait().expect("wait") {
            Some(status) => return status.code(),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// An interactive wisp session: write to the console, wait for patterns in its output.
pub struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    chunks: Receiver<Vec<u8>>,
    pub seen: String,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Session {
    /// Starts `wisp ARGS`.
    pub fn start(args: &[&str]) -> Session {
        Session::start_env(args, &[])
    }

    /// Starts `wisp ARGS` with extra environment variables.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Session {
        let mut child = Command::new(wisp())
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wisp");
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let stderr = reader(child.stderr.take().expect("stderr"));
        Session {
            child,
            stdin,
            chunks: rx,
            seen: String::new(),
            stderr: Some(stderr),
        }
    }

    /// Reads more output, failing the test at `deadline` or if wisp exits.
    fn read_more(&mut self, deadline: Instant, waiting_for: &str) {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.chunks.recv_timeout(left) {
            Ok(c) => self.seen.push_str(&String::from_utf8_lossy(&c)),
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "timed out waiting for {waiting_for}; output:\n{}",
                    self.seen
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                let stderr = self
                    .stderr
                    .take()
                    .map(|h| h.join().unwrap_or_default())
                    .unwrap_or_default();
                panic!(
                    "wisp exited while waiting for {waiting_for}; output:\n{}\nstderr:\n{stderr}",
                    self.seen
                )
            }
        }
    }

    /// Waits until `pattern` appears in the output after position `from`; returns the
    /// position just past it.
    pub fn expect_from(&mut self, from: usize, pattern: &str, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.seen.get(from..).and_then(|s| s.find(pattern)) {
                return from + i + pattern.len();
            }
            self.read_more(deadline, &format!("{pattern:?}"));
        }
    }

    /// Takes in whatever output arrives within `timeout` (nothing is an answer too).
    pub fn poll(&mut self, timeout: Duration) {
        if let Ok(c) = self.chunks.recv_timeout(timeout) {
            self.seen.push_str(&String::from_utf8_lossy(&c));
        }
    }

    /// Whether wisp has exited (its status is kept for [`Session::wait`]).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// wisp's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one line to the guest console.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to wisp");
        stdin.flush().expect("flush");
    }

    /// Writes `data` to the guest console from a thread of its own, as fast as wisp
    /// takes it (the test can meanwhile watch the output, and is not stuck in a write
    /// if the console stalls).
    pub fn feed(&mut self, data: Vec<u8>) -> thread::JoinHandle<()> {
        use std::os::fd::AsFd;
        let fd = self
            .stdin
            .as_ref()
            .expect("stdin open")
            .as_fd()
            .try_clone_to_owned()
            .expect("dup stdin");
        let mut f = std::fs::File::from(fd);
        thread::spawn(move || {
            let _ = f.write_all(&data);
        })
    }

    /// Runs `command` in the guest shell and returns its output, read from a line
    /// `MARK=<output>` (the echo of the typed command shows `MARK=$(` instead).
    pub fn query(&mut self, mark: &str, command: &str, timeout: Duration) -> String {
        let start = self.seen.len();
        self.send_line(&format!("echo {mark}=$({command})"));
        let prefix = format!("{mark}=");
        let deadline = Instant::now() + timeout;
        loop {
            let complete = &self.seen[start..self.seen.rfind('\n').unwrap_or(start).max(start)];
            let found = complete
                .lines()
                .filter_map(|l| l.trim_end_matches('\r').strip_prefix(prefix.as_str()))
                .find(|v| !v.starts_with("$("));
            if let Some(v) = found {
                return v.trim().to_string();
            }
            self.read_more(deadline, &format!("the answer to {command:?}"));
        }
    }

    /// Waits for wisp to exit; returns its status and stderr.
    pub fn wait(mut self, timeout: Duration) -> (Option<i32>, String) {
        drop(self.stdin.take());
        let status = wait_timeout(&mut self.child, timeout);
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().expect("stderr reader"))
            .unwrap_or_default();
        (status, stderr)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `len` pseudo-random bytes (xorshift from `seed`): every byte value, in an order no
/// simple pattern predicts.
pub fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// The host's md5sum of `data`, in hex.
pub fn md5(data: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(data)
        .expect("feed md5sum");
    let out = child.wait_with_output().expect("md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

/// Streams `data` through the console of a Linux guest's shell (`s`) into
/// `head -c LEN | md5sum` in raw mode, and waits up to `timeout` for the guest to print
/// the digest of exactly `data`; returns the time from the first byte to the digest.
pub fn console_stream(s: &mut Session, data: Vec<u8>, timeout: Duration) -> Duration {
    let want = md5(&data);
    let from = s.seen.len();
    s.send_line(&format!(
        "stty raw -echo; echo G''O; head -c {} | md5sum; stty sane",
        data.len()
    ));
    let at = s.expect_from(from, "GO", Duration::from_secs(60));
    let t0 = Instant::now();
    let writer = s.feed(data);
    s.expect_from(at, &want, timeout);
    let took = t0.elapsed();
    writer.join().expect("writer");
    took
}

/// Processes whose parent is `parent` and whose command name starts with `comm`
/// (Debian's passt re-executes itself as passt.avx2).
pub fn children_named(parent: u32, comm: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if name.starts_with(comm) && ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// Processes below `root` (children, grandchildren, ...) whose command name starts
/// with `comm`: wisp's passt is a child of its passt supervisor (`wisp __passt`).
pub fn descendants_named(root: u32, comm: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let mut parents = vec![root];
    while let Some(p) = parents.pop() {
        parents.extend(children_named(p, ""));
        out.extend(children_named(p, comm));
    }
    out
}

/// True if process `pid` exists and its name starts with `comm` (a zombie counts).
pub fn process_named(pid: u32, comm: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().starts_with(comm))
        .unwrap_or(false)
}

/// A minimal x86_64 ELF executable whose single segment (at 1 MiB + 0x1000) holds `code`
/// and whose entry point is the start of `code`. It has no PVH note, so wisp boots it
/// through the 64-bit entry, in long mode with its boot page tables.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_1000;
    const HDR: usize = 64 + 56;
    let mut e = Vec::new();
    e.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(LOAD + HDR as u64).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    e.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    e.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    e.extend_from_slice(&1u16.to_le_bytes()); // phnum
    e.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    let size = (HDR + code.len()) as u64;
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&7u32.to_le_bytes()); // RWX
    e.extend_from_slice(&0u64.to_le_bytes()); // offset
    e.extend_from_slice(&LOAD.to_le_bytes()); // vaddr
    e.extend_from_slice(&LOAD.to_le_bytes()); // paddr
    e.extend_from_slice(&size.to_le_bytes()); // filesz
    e.extend_from_slice(&size.to_le_bytes()); // memsz
    e.extend_from_slice(&0x1000u64.to_le_bytes()); // align
    assert_eq!(e.len(), HDR);
    e.extend_from_slice(code);
    e
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("wisp-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
pub mod netns;

/// Runs `wisp restore SNAP --name refused --api DIR/refused.sock --console file:...
/// EXTRA` on a snapshot that must be refused: within 30 s, one error line containing
/// `want`, exit status 1, no guest output, no control socket left.
pub fn restore_refused(dir: &TempDir, snap: &Path, extra: &[&str], want: &str) {
    let console = dir.0.join("console.out");
    let _ = std::fs::remove_file(&console);
    let api = dir.0.join("refused.sock");
    let console_arg = format!("file:{}", arg(&console));
    let mut args = vec![
        "restore",
        arg(snap),
        "--name",
        "refused",
        "--api",
        arg(&api),
        "--console",
        &console_arg,
    ];
    args.extend_from_slice(extra);
    let out = wisp_run(&args, b"", Duration::from_secs(30));
    let err = &out.stderr;
    assert_eq!(out.status, Some(1), "{want}: {err}");
    assert_eq!(err.lines().count(), 1, "{want}: one line: {err}");
    assert!(err.contains(want), "expected {want:?} in: {err}");
    assert!(
        std::fs::metadata(&console).map_or(true, |m| m.len() == 0),
        "{want}: the guest ran"
    );
    assert!(!api.exists(), "{want}: socket left behind");
}

/// Rewrites the state file of the snapshot in `snap` through `edit` on its JSON body,
/// with a valid header and checksum (a crafted snapshot, as a hostile author makes it).
pub fn craft_state(snap: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = snap.join("state");
    let bytes = std::fs::read(&path).expect("read state");
    let mut body: serde_json::Value = vmm::state::format::decode(&bytes).expect("decode state");
    edit(&mut body);
    let out = vmm::state::format::encode(&body).expect("encode state");
    std::fs::write(&path, out).expect("write state");
}

/// Copies snapshot directory `from` to `to`: the state file, and the memory file as a
/// hard link (the crafting edits only the state).
pub fn copy_snapshot(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir(to).expect("mkdir");
    std::fs::copy(from.join("state"), to.join("state")).expect("copy state");
    std::fs::hard_link(from.join("memory"), to.join("memory")).expect("link memory");
}
