//! The control socket: every `wisp run` listens on a unix socket (mode 0600) for
//! one-line JSON requests, answered with one line of JSON. The README's "Control socket" section documents it.
//!
//! Requests: `{"op":"status"}`, `{"op":"pause"}`, `{"op":"resume"}`, `{"op":"stop"}`,
//! `{"op":"snapshot","to":"/abs/dir","force":false,"stop":false}`.
//! Answers: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;

/// Errors of the control socket.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The socket's directory cannot be made private.
    #[error("cannot create the control socket directory {}: {source}", path.display())]
    Dir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A VM with this name is already running.
    #[error("a VM is already running with control socket {}; pick another --name, or stop it with `wisp stop`", .0.display())]
    InUse(PathBuf),
    /// bind failed.
    #[error("cannot listen on {}: {source}", path.display())]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Client side: no VM answers there.
    #[error("no running VM {name:?} (no control socket at {}): see `wisp ls`", path.display())]
    NotRunning {
        /// The name or path asked for.
        name: String,
        /// Socket path.
        path: PathBuf,
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
}

/// What `status` reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// VM name.
    pub name: String,
    /// `running` or `paused`.
    pub state: String,
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Seconds since wisp started.
    pub uptime_s: f64,
    /// wisp's process id.
    pub pid: u32,
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

/// Where control sockets live: `$XDG_RUNTIME_DIR/wisp`, else `/run/wisp` for root,
/// else `/tmp/wisp-$UID`.
pub fn socket_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("wisp");
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from("/run/wisp")
    } else {
        PathBuf::from(format!("/tmp/wisp-{uid}"))
    }
}

/// The default control socket of VM `name`.
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

/// The listening side, removed from the file system when dropped.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiServer {
    /// Listens on `path` (mode 0600), creating its directory (mode 0700) if needed.
    /// A stale socket (nobody answering) is replaced; a live one is an error.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir)
                    .and_then(|()| {
                        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    })
                    .map_err(|source| ApiError::Dir {
                        path: dir.to_path_buf(),
                        source,
                    })?;
            }
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let bind_err = |source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening fd, for the event loop.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Accepts one pending client and reads its request. `None` when nobody is
    /// waiting; a client that sends garbage gets its error answer here.
    pub fn next_request(&self) -> Option<(UnixStream, Request)> {
        loop {
            let (stream, _) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("control socket: accept: {e}");
                    return None;
                }
            };
            match read_request(&stream) {
                Ok(r) => return Some((stream, r)),
                Err(why) => answer(stream, &Response::refused(why)),
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn read_request(stream: &UnixStream) -> Result<Request, String> {
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(REQUEST_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(io::Read::take(stream, MAX_REQUEST))
        .read_line(&mut line)
        .map_err(|e| format!("reading the request: {e}"))?;
    serde_json::from_str(line.trim()).map_err(|e| {
        format!(
            "bad request {:?}: {e}; send one line like {{\"op\":\"status\"}}",
            line.trim()
        )
    })
}

/// Writes `r` as one line to the client (best effort: the client may be gone).
pub fn answer(mut stream: UnixStream, r: &Response) {
    let mut line = serde_json::to_string(r).unwrap_or_else(|_| "{\"ok\":false}".into());
    line.push('\n');
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.write_all(line.as_bytes());
}

/// Client side: sends `req` to the VM at `name_or_path` and returns its answer.
pub fn call(name_or_path: &str, req: &Request) -> Result<Response, ApiError> {
    let path = resolve(name_or_path);
    let io_err = |source| ApiError::Io {
        path: path.clone(),
        source,
    };
    let mut stream = UnixStream::connect(&path).map_err(|_| ApiError::NotRunning {
        name: name_or_path.to_string(),
        path: path.clone(),
    })?;
    stream
        .set_read_timeout(Some(req.timeout()))
        .map_err(io_err)?;
    let mut line = serde_json::to_string(req).map_err(|e| io_err(io::Error::other(e)))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io_err)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(io_err)?;
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

/// Every control socket in [`socket_dir`] that answers `status`.
pub fn list() -> Vec<(PathBuf, Status)> {
    let Ok(dir) = std::fs::read_dir(socket_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Status)> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .filter_map(|p| {
            let s = call(p.to_str()?, &Request::Status).ok()?.status?;
            Some((p, s))
        })
        .collect();
    out.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line() {
        assert_eq!(
            serde_json::to_string(&Request::Pause).unwrap(),
            r#"{"op":"pause"}"#
        );
        let r: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(r, Request::Status);
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
    }

    #[test]
    fn socket_is_private_stale_ones_are_replaced_live_ones_refused() {
        let dir = std::env::temp_dir().join(format!("wisp-api-test-{}", std::process::id()));
        let path = dir.join("sub").join("vm.sock");
        let server = ApiServer::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dmode & 0o777, 0o700);
        assert!(matches!(ApiServer::bind(&path), Err(ApiError::InUse(_))));
        // A request, then garbage.
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"{\"op\":\"status\"}\n").unwrap();
        let (s, req) = server.next_request().unwrap();
        assert_eq!(req, Request::Status);
        drop(s);
        let mut bad = UnixStream::connect(&path).unwrap();
        bad.write_all(b"hello\n").unwrap();
        assert!(server.next_request().is_none());
        let mut reply = String::new();
        BufReader::new(bad).read_line(&mut reply).unwrap();
        assert!(
            reply.contains("\"ok\":false") && reply.contains("bad request"),
            "{reply}"
        );
        drop(server);
        assert!(!path.exists(), "removed on drop");
        // A stale socket file is replaced.
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let again = ApiServer::bind(&path).unwrap();
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = c.flush();
    }
}
