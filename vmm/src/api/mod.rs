//! The control socket: every `wisp run` listens on a unix socket (mode 0600) for
//! one-line JSON requests, answered with one line of JSON. The README's "Control
//! socket" section documents it.
//!
//! Requests: `{"op":"status"}`, `{"op":"pause"}`, `{"op":"resume"}`, `{"op":"stop"}`,
//! `{"op":"snapshot","to":"/abs/dir","force":false,"stop":false}`.
//! Answers: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//!
//! This file is the protocol and the client side; `server.rs` is the listening side
//! (binding the socket safely, and serving many clients at once on the VMM thread).

mod server;

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use server::{ApiServer, Connections, Reply, MAX_CLIENTS};

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;

/// Errors of the control socket.
#[derive(Debug, Error)]
pub enum ApiError {
    /// A directory for the socket cannot be created or opened.
    #[error("cannot create the control socket directory {}: {source}", path.display())]
    Dir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// wisp's runtime directory belongs to someone else or is open to others.
    #[error("{} is not a private directory of this user ({why}); remove it, or set XDG_RUNTIME_DIR", path.display())]
    UnsafeDir {
        /// Directory.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A VM with this name is already running.
    #[error("a VM is already running with control socket {}; pick another --name, or stop it with `wisp stop`", .0.display())]
    InUse(PathBuf),
    /// The path exists and is not a socket wisp could have left.
    #[error("{} exists and is {kind}, not a control socket; wisp replaces only a stale socket: choose another --api path", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
        /// What it is ("a regular file", "a directory", ...).
        kind: &'static str,
    },
    /// bind failed.
    #[error("cannot listen on {}: {source}", path.display())]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Client side: nothing at that path.
    #[error("no running VM {name:?} (no control socket at {}): see `wisp ls`", path.display())]
    NotRunning {
        /// The name or path asked for.
        name: String,
        /// Socket path.
        path: PathBuf,
    },
    /// Client side: a socket file that nobody listens on.
    #[error("no running VM {name:?}: its control socket {} is stale (the wisp that made it is gone, e.g. killed); `wisp ls` removes stale sockets", path.display())]
    Stale {
        /// The name or path asked for.
        name: String,
        /// Socket path.
        path: PathBuf,
    },
    /// Client side: no answer in time.
    #[error("VM {name:?} did not answer in {} s (control socket {})", timeout.as_secs(), path.display())]
    Timeout {
        /// The name or path asked for.
        name: String,
        /// Socket path.
        path: PathBuf,
        /// How long the client waited.
        timeout: Duration,
    },
    /// Client side: the exchange failed.
    #[error("control socket {}: {source}", path.display())]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Client side: the VM said no.
    #[error("{0}")]
    Refused(String),
}

/// A request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// State, vCPUs, memory, uptime.
    Status,
    /// Stop the vCPUs and device processing.
    Pause,
    /// Undo pause.
    Resume,
    /// End the VM (exit status 0).
    Stop,
    /// Pause, write a snapshot to `to`, then resume (or stop with `stop`, or stay
    /// paused if the VM was paused already).
    Snapshot {
        /// The snapshot directory (absolute: the VM's working directory is not the
        /// client's).
        to: PathBuf,
        /// Replace `to` if it exists.
        #[serde(default)]
        force: bool,
        /// Stop the VM once the snapshot is written.
        #[serde(default)]
        stop: bool,
    },
    /// Move the VM to another wisp (`wisp receive`). The answer comes at once; the
    /// connection then carries one [`MigrationEvent`] line per round and a last one.
    Migrate {
        /// `tcp:HOST:PORT` or `unix:PATH`.
        to: String,
        /// The pause the VM may see, in milliseconds.
        #[serde(default = "default_downtime_ms")]
        downtime_ms: u64,
        /// How long pre-copy may take, in seconds.
        #[serde(default = "default_timeout_s")]
        timeout_s: u64,
        /// `abort` or `stop-copy`.
        #[serde(default)]
        on_timeout: crate::migration::OnTimeout,
        /// At most this many MB/s.
        #[serde(default)]
        bandwidth_mbps: Option<u64>,
    },
    /// Stop a running migration; the VM keeps running here.
    #[serde(rename = "migrate-cancel")]
    MigrateCancel,
}

fn default_downtime_ms() -> u64 {
    30
}

fn default_timeout_s() -> u64 {
    300
}

/// What a migration's connection carries after the answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum MigrationEvent {
    /// Where it is.
    Progress {
        /// The figures.
        progress: crate::migration::Progress,
    },
    /// It succeeded: the VM runs on the destination, and this wisp exits.
    Done {
        /// The figures.
        summary: crate::migration::Summary,
    },
    /// It failed; the VM keeps running here.
    Failed {
        /// Why.
        error: String,
    },
}

impl Request {
    /// How long a client waits for the answer.
    fn timeout(&self) -> Duration {
        match self {
            // Writing guest memory takes time on slow disks.
            Request::Snapshot { .. } => Duration::from_secs(600),
            _ => Duration::from_secs(30),
        }
    }

    /// Parses one request line: a JSON object with an `op` (serde alone would also
    /// take an array such as `["status"]`).
    pub fn parse(line: &str) -> Result<Self, String> {
        let bad = |e: &dyn std::fmt::Display| {
            format!("bad request {line:?}: {e}; send one line like {{\"op\":\"status\"}}")
        };
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(&e))?;
        if !value.is_object() {
            return Err(bad(&"not a JSON object"));
        }
        serde_json::from_value(value).map_err(|e| bad(&e))
    }
}

/// What `status` reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// VM name.
    pub name: String,
    /// `running`, `paused`, `migrating` or `stopping`.
    pub state: String,
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Seconds since wisp started.
    pub uptime_s: f64,
    /// wisp's process id.
    pub pid: u32,
    /// Where a running migration is.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub migration: Option<crate::migration::Progress>,
}

/// An answer: `ok`, an optional status, an optional error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// The VM's status (every successful answer carries it).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<Status>,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// What a snapshot wrote.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub snapshot: Option<crate::snapshot::SnapshotSummary>,
}

impl Response {
    /// A request that was not carried out, and why.
    pub fn refused(error: String) -> Self {
        Response {
            ok: false,
            status: None,
            error: Some(error),
            snapshot: None,
        }
    }
}

/// wisp's runtime directory, where control sockets live: `$XDG_RUNTIME_DIR/wisp`, else
/// `/run/wisp` for root, else `/tmp/wisp-$UID`.
pub fn socket_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("wisp");
    }
    let uid = current_uid();
    if uid == 0 {
        PathBuf::from("/run/wisp")
    } else {
        PathBuf::from(format!("/tmp/wisp-{uid}"))
    }
}

fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

/// wisp's runtime directory ([`socket_dir`]), created private if missing; refused if
/// it belongs to someone else or others may write to it.
pub fn runtime_dir() -> Result<PathBuf, ApiError> {
    let dir = socket_dir();
    server::runtime_dir(&dir)?;
    Ok(dir)
}

/// The default control socket of VM `name` (a name [`crate::config::check_name`]
/// accepted: no '/', so it stays inside [`socket_dir`]).
pub fn socket_path(name: &str) -> PathBuf {
    socket_dir().join(format!("{name}.sock"))
}

/// A NAME from the CLI: a path if it has a '/', else a VM name.
pub fn resolve(name_or_path: &str) -> PathBuf {
    if name_or_path.contains('/') {
        PathBuf::from(name_or_path)
    } else {
        socket_path(name_or_path)
    }
}

/// Connects to the control socket at `path`; `name` is what the user called it.
fn connect(name: &str, path: &Path) -> Result<UnixStream, ApiError> {
    UnixStream::connect(path).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => ApiError::NotRunning {
            name: name.to_string(),
            path: path.to_path_buf(),
        },
        Some(libc::ECONNREFUSED) => ApiError::Stale {
            name: name.to_string(),
            path: path.to_path_buf(),
        },
        _ => ApiError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })
}

/// Client side: sends `req` to the VM at `name_or_path` and returns its answer.
pub fn call(name_or_path: &str, req: &Request) -> Result<Response, ApiError> {
    call_within(name_or_path, req, req.timeout())
}

/// [`call`], waiting at most `timeout` for the answer.
fn call_within(name_or_path: &str, req: &Request, timeout: Duration) -> Result<Response, ApiError> {
    let path = resolve(name_or_path);
    let io_err = |source| ApiError::Io {
        path: path.clone(),
        source,
    };
    let mut stream = connect(name_or_path, &path)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let mut line = serde_json::to_string(req).map_err(|e| io_err(io::Error::other(e)))?;
    line.push('\n');
    let timed_out = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ApiError::Timeout {
            name: name_or_path.to_string(),
            path: path.clone(),
            timeout,
        },
        _ => io_err(e),
    };
    stream.write_all(line.as_bytes()).map_err(timed_out)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(timed_out)?;
    let r: Response = serde_json::from_str(reply.trim())
        .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    match (r.ok, &r.status, &r.error) {
        (true, Some(_), _) => Ok(r),
        (_, _, Some(e)) => Err(ApiError::Refused(e.clone())),
        _ => Err(io_err(io::Error::new(
            io::ErrorKind::InvalidData,
            "answer without status",
        ))),
    }
}

/// How long a migration client waits for the next event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Client side: starts the migration `req` ([`Request::Migrate`]) on the VM at
/// `name_or_path` and follows it: `on_event` sees every progress event; the result is
/// the final summary, or the VM's reason for the failure.
pub fn migrate(
    name_or_path: &str,
    req: &Request,
    mut on_event: impl FnMut(&crate::migration::Progress),
) -> Result<crate::migration::Summary, ApiError> {
    let path = resolve(name_or_path);
    let io_err = |source| ApiError::Io {
        path: path.clone(),
        source,
    };
    let mut stream = connect(name_or_path, &path)?;
    stream
        .set_read_timeout(Some(EVENT_TIMEOUT))
        .map_err(io_err)?;
    let mut line = serde_json::to_string(req).map_err(|e| io_err(io::Error::other(e)))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io_err)?;
    let timed_out = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ApiError::Timeout {
            name: name_or_path.to_string(),
            path: path.clone(),
            timeout: EVENT_TIMEOUT,
        },
        _ => io_err(e),
    };
    let mut lines = BufReader::new(stream);
    let mut first = String::new();
    lines.read_line(&mut first).map_err(timed_out)?;
    let answer: Response = serde_json::from_str(first.trim())
        .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    if let Some(e) = answer.error.filter(|_| !answer.ok) {
        return Err(ApiError::Refused(e));
    }
    loop {
        let mut line = String::new();
        if lines.read_line(&mut line).map_err(timed_out)? == 0 {
            return Err(io_err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the VM closed the connection before the migration ended",
            )));
        }
        let event: MigrationEvent = serde_json::from_str(line.trim())
            .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        match event {
            MigrationEvent::Progress { progress } => on_event(&progress),
            MigrationEvent::Done { summary } => return Ok(summary),
            MigrationEvent::Failed { error } => return Err(ApiError::Refused(error)),
        }
    }
}

/// What `wisp ls` found in [`socket_dir`].
#[derive(Debug, Default)]
pub struct Listing {
    /// Every VM that answered `status`, by name.
    pub running: Vec<(PathBuf, Status)>,
    /// Stale sockets (nobody listening) that were removed.
    pub removed: Vec<PathBuf>,
    /// Sockets that could not be asked, and why.
    pub failed: Vec<(PathBuf, ApiError)>,
}

/// Every control socket in [`socket_dir`]: the VMs that answer `status`; stale sockets
/// (left by a wisp that was killed) are removed.
pub fn list() -> Listing {
    let mut out = Listing::default();
    let dir = socket_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    let uid = current_uid();
    for path in entries.flatten().map(|e| e.path()) {
        let ours = path
            .symlink_metadata()
            .is_ok_and(|m| server::is_socket(&m) && m.uid() == uid);
        if !ours || path.extension().is_none_or(|x| x != "sock") {
            continue;
        }
        let Some(p) = path.to_str() else { continue };
        match call(p, &Request::Status) {
            Ok(Response {
                status: Some(s), ..
            }) => out.running.push((path, s)),
            Ok(_) => {}
            Err(ApiError::Stale { .. }) => match server::remove_if_stale(&dir, &path) {
                Ok(true) => out.removed.push(path),
                Ok(false) => {}
                Err(e) => out.failed.push((path, e)),
            },
            Err(e) => out.failed.push((path, e)),
        }
    }
    out.running.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_that_does_not_answer_is_named_with_the_time_waited() {
        let dir = std::env::temp_dir().join(format!("wisp-api-silent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("silent.sock");
        // Listens, never answers.
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let e = call_within(
            path.to_str().unwrap(),
            &Request::Status,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(e.to_string().contains("did not answer in 1 s"), "{e}");
        drop(listener);
        let e = call(path.to_str().unwrap(), &Request::Status).unwrap_err();
        assert!(e.to_string().contains("is stale"), "{e}");
        std::fs::remove_file(&path).unwrap();
        let e = call(path.to_str().unwrap(), &Request::Status).unwrap_err();
        assert!(e.to_string().contains("no control socket"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn requests_are_one_json_object() {
        assert_eq!(
            serde_json::to_string(&Request::Pause).unwrap(),
            r#"{"op":"pause"}"#
        );
        assert_eq!(Request::parse(r#"{"op":"status"}"#), Ok(Request::Status));
        for bad in [r#"{"op":"reboot"}"#, r#"["status"]"#, "\"status\"", "{", ""] {
            let e = Request::parse(bad).unwrap_err();
            assert!(e.contains("bad request") && e.contains("op"), "{bad}: {e}");
        }
    }
}
