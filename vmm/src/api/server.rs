//! The listening side of the control socket.
//!
//! Binding follows rules that keep wisp from touching what it did not make:
//! - an existing path is replaced only if it is a stale socket (nobody listening); a
//!   live one means the name is taken, anything else (a file, a directory) is refused;
//! - the check and the bind run under a lock on the directory, so two wisps racing for
//!   one name, or `wisp ls` removing stale sockets, cannot step on each other;
//! - wisp's runtime directory is created private (0700) when missing and must be this
//!   user's and not writable by others when present; missing parents of an `--api`
//!   path are created private and removed again at exit; no existing directory's mode
//!   is ever changed;
//! - at exit the socket is removed only if it is still the one this wisp bound.
//!
//! Clients are served by [`Connections`] on the VMM thread: each connection is
//! watched by the event loop and read as bytes arrive, so a client that is slow, idle
//! or stuck delays nobody else; it is dropped after [`REQUEST_TIMEOUT`], and when all
//! [`MAX_CLIENTS`] slots are taken the longest-waiting one makes room.

use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{current_uid, socket_dir, socket_path, ApiError, Request, Response, MAX_REQUEST};

/// How long a client may take to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients served at once.
pub const MAX_CLIENTS: usize = 32;
/// How long binding waits for another wisp's lock on the socket directory.
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn is_socket(m: &Metadata) -> bool {
    m.file_type().is_socket()
}

fn describe(m: &Metadata) -> &'static str {
    devices::host_file::describe(m.file_type())
}

/// The directory a socket path lives in.
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// An exclusive lock on a directory (flock on its descriptor), released on drop.
struct DirLock {
    _dir: File,
}

impl DirLock {
    fn new(dir: &Path) -> Result<Self, ApiError> {
        let dir_err = |source| ApiError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        let f = File::open(dir).map_err(dir_err)?;
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Self { _dir: f });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) || Instant::now() >= deadline {
                return Err(dir_err(e));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Removes the socket at `path` (in `dir`) if nobody listens on it; true if it did.
pub(super) fn remove_if_stale(dir: &Path, path: &Path) -> Result<bool, ApiError> {
    let _lock = DirLock::new(dir)?;
    let is_sock = path.symlink_metadata().is_ok_and(|m| is_socket(&m));
    let refused = |e: &io::Error| e.raw_os_error() == Some(libc::ECONNREFUSED);
    if is_sock && UnixStream::connect(path).is_err_and(|e| refused(&e)) {
        std::fs::remove_file(path).map_err(|source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        return Ok(true);
    }
    Ok(false)
}

/// Creates the missing directories leading to `dir` (mode 0700); returns them,
/// outermost first. Existing directories are left exactly as they are.
fn create_missing(dir: &Path) -> Result<Vec<PathBuf>, ApiError> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| {
            !a.as_os_str().is_empty()
                && matches!(a.symlink_metadata(), Err(e) if e.kind() == io::ErrorKind::NotFound)
        })
        .collect();
    let mut created = Vec::new();
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => created.push(d.to_path_buf()),
            // Made meanwhile, or a `..` that resolves now that its parent exists.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(source) => {
                remove_dirs(&created);
                return Err(ApiError::Dir {
                    path: d.to_path_buf(),
                    source,
                });
            }
        }
    }
    Ok(created)
}

/// Removes `dirs` (outermost first), innermost first, each only if empty.
fn remove_dirs(dirs: &[PathBuf]) {
    for d in dirs.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

/// Makes sure wisp's runtime directory exists, is this user's, and is not open to
/// others (they could replace sockets in it).
pub(super) fn runtime_dir(dir: &Path) -> Result<(), ApiError> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(ApiError::Dir {
                path: dir.to_path_buf(),
                source,
            })
        }
    }
    let unsafe_dir = |why: String| ApiError::UnsafeDir {
        path: dir.to_path_buf(),
        why,
    };
    let m = dir.symlink_metadata().map_err(|source| ApiError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    if !m.file_type().is_dir() {
        return Err(unsafe_dir(format!("it is {}", describe(&m))));
    }
    if m.uid() != current_uid() {
        return Err(unsafe_dir(format!("it belongs to uid {}", m.uid())));
    }
    if m.permissions().mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "mode {:o} lets others write to it",
            m.permissions().mode() & 0o777
        )));
    }
    Ok(())
}

/// The listening side, removed from the file system when dropped.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    /// The socket's (device, inode), to remove it only if it is still ours.
    id: (u64, u64),
    /// Directories made for the socket, removed (if empty) when dropped.
    created: Vec<PathBuf>,
}

impl ApiServer {
    /// Listens on VM `name`'s default socket in wisp's runtime directory.
    pub fn bind_default(name: &str) -> Result<Self, ApiError> {
        runtime_dir(&socket_dir())?;
        Self::bind_at(&socket_path(name), Vec::new())
    }

    /// Listens on `path` (`--api`); missing parent directories are created (mode 0700)
    /// and removed again when the server is dropped.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let created = create_missing(parent_of(path))?;
        match Self::bind_at(path, created.clone()) {
            Ok(s) => Ok(s),
            Err(e) => {
                remove_dirs(&created);
                Err(e)
            }
        }
    }

    fn bind_at(path: &Path, created: Vec<PathBuf>) -> Result<Self, ApiError> {
        let bind_err = |source: io::Error| match source.raw_os_error() {
            Some(libc::EADDRINUSE) => ApiError::InUse(path.to_path_buf()),
            _ => ApiError::Bind {
                path: path.to_path_buf(),
                source,
            },
        };
        let lock = DirLock::new(parent_of(path))?;
        match path.symlink_metadata() {
            Ok(m) if is_socket(&m) => match UnixStream::connect(path) {
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    log::debug!("replacing stale control socket {}", path.display());
                    std::fs::remove_file(path).map_err(bind_err)?;
                }
                // Listening (EAGAIN: listening with a full backlog).
                _ => return Err(ApiError::InUse(path.to_path_buf())),
            },
            Ok(m) => {
                return Err(ApiError::NotASocket {
                    path: path.to_path_buf(),
                    kind: describe(&m),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        let m = path.symlink_metadata().map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        drop(lock);
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            id: (m.dev(), m.ino()),
            created,
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
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let ours = self
            .path
            .symlink_metadata()
            .is_ok_and(|m| is_socket(&m) && (m.dev(), m.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
        remove_dirs(&self.created);
    }
}

/// The means to answer one request.
pub struct Reply(UnixStream);

impl AsRawFd for Reply {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Reply {
    /// Writes `r` as one line (best effort: the client may be gone or not reading).
    pub fn send(mut self, r: &Response) {
        self.line(r);
    }

    /// Writes `value` as one more line; false if the client is gone or does not keep
    /// up (the socket is non-blocking: a client that stops reading is dropped, it never
    /// blocks the VMM thread).
    pub fn line<T: serde::Serialize>(&mut self, value: &T) -> bool {
        let mut line = match serde_json::to_string(value) {
            Ok(l) => l,
            Err(_) => return false,
        };
        line.push('\n');
        match self.0.write_all(line.as_bytes()) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("control socket: answer not delivered: {e}");
                false
            }
        }
    }
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

/// The control socket's connected clients, each in a slot the event loop watches.
#[derive(Default)]
pub struct Connections {
    slots: Vec<Option<Conn>>,
}

impl Connections {
    /// Accepts every waiting client of `server`; `watch(fd, slot)` registers each new
    /// connection with the event loop. With all slots taken, the client waiting
    /// longest is told so and dropped.
    pub fn accept(
        &mut self,
        server: &ApiServer,
        mut watch: impl FnMut(RawFd, usize) -> io::Result<()>,
    ) -> io::Result<()> {
        loop {
            let stream = match server.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, say: the client goes, the VM stays.
                    log::warn!("control socket: accept: {e}");
                    return Ok(());
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let slot = self.free_slot();
            let fd = stream.as_raw_fd();
            self.slots[slot] = Some(Conn {
                stream,
                buf: Vec::new(),
                deadline: Instant::now() + REQUEST_TIMEOUT,
            });
            watch(fd, slot)?;
        }
    }

    fn free_slot(&mut self) -> usize {
        if let Some(i) = self.slots.iter().position(Option::is_none) {
            return i;
        }
        if self.slots.len() < MAX_CLIENTS {
            self.slots.push(None);
            return self.slots.len() - 1;
        }
        let oldest = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, c.as_ref()?.deadline)))
            .min_by_key(|&(_, d)| d)
            .map_or(0, |(i, _)| i);
        if let Some(c) = self.slots[oldest].take() {
            Reply(c.stream).send(&Response::refused(format!(
                "too many control connections ({MAX_CLIENTS}); this one waited longest without a request"
            )));
        }
        oldest
    }

    /// Reads what the client in `slot` sent. A complete request line is returned with
    /// the means to answer it; a bad one is answered here.
    pub fn read(&mut self, slot: usize) -> Option<(Reply, Request)> {
        let conn = self.slots.get_mut(slot)?.as_mut()?;
        let mut chunk = [0u8; 1024];
        let eof = loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => {
                    conn.buf.extend_from_slice(&chunk[..n]);
                    if conn.buf.contains(&b'\n') || conn.buf.len() > MAX_REQUEST {
                        break false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        let conn = self.slots[slot].take()?;
        let line = match conn.buf.iter().position(|&b| b == b'\n') {
            Some(end) => &conn.buf[..end],
            None if eof && conn.buf.is_empty() => return None,
            None => &conn.buf[..],
        };
        let reply = Reply(conn.stream);
        let parsed = if line.len() > MAX_REQUEST {
            Err(format!(
                "request longer than {MAX_REQUEST} bytes; send one line like {{\"op\":\"status\"}}"
            ))
        } else {
            Request::parse(String::from_utf8_lossy(line).trim())
        };
        match parsed {
            Ok(req) => Some((reply, req)),
            Err(why) => {
                reply.send(&Response::refused(why));
                None
            }
        }
    }

    /// Drops the clients that have not sent a request line in time.
    pub fn expire(&mut self, now: Instant) {
        for slot in &mut self.slots {
            if slot.as_ref().is_some_and(|c| c.deadline <= now) {
                if let Some(c) = slot.take() {
                    Reply(c.stream).send(&Response::refused(format!(
                        "no complete request line within {} s",
                        REQUEST_TIMEOUT.as_secs()
                    )));
                }
            }
        }
    }

    /// When the next client runs out of time.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.slots.iter().flatten().map(|c| c.deadline).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wisp-api-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn socket_is_private_stale_ones_are_replaced_live_ones_refused() {
        let dir = temp("bind");
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
        drop(server);
        assert!(!path.exists(), "socket removed on drop");
        assert!(!dir.exists(), "directories wisp made are removed on drop");
        // A stale socket file is replaced.
        std::fs::create_dir_all(&dir).unwrap();
        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let again = ApiServer::bind(&stale).unwrap();
        drop(again);
        assert!(dir.exists(), "a directory wisp did not make stays");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn what_wisp_did_not_make_is_left_alone() {
        let dir = temp("foreign");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = dir.join("notes.txt");
        std::fs::write(&file, b"keep me").unwrap();
        let e = ApiServer::bind(&file)
            .err()
            .expect("a regular file is refused");
        assert!(e.to_string().contains("is a regular file"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let e = ApiServer::bind(&dir).err().expect("a directory is refused");
        assert!(e.to_string().contains("is a directory"), "{e}");
        // `..` through a directory wisp creates: no existing directory changes mode.
        let odd = dir.join("x").join("..").join("vm.sock");
        let s = ApiServer::bind(&odd).unwrap();
        assert!(dir.join("vm.sock").exists());
        drop(s);
        assert!(!dir.join("x").exists() && !dir.join("vm.sock").exists());
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        // A socket replaced by someone else is not removed by the first owner.
        let sock = dir.join("vm.sock");
        let s = ApiServer::bind(&sock).unwrap();
        std::fs::remove_file(&sock).unwrap();
        let other = UnixListener::bind(&sock).unwrap();
        drop(s);
        assert!(sock.exists(), "another program's socket stays");
        drop(other);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn racing_binds_give_one_winner_and_in_use_for_the_rest() {
        let dir = temp("race");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.sock");
        for _ in 0..20 {
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let racers: Vec<_> = (0..8)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        ApiServer::bind(&path)
                    })
                })
                .collect();
            let results: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
            let winners = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(winners, 1);
            for r in &results {
                if let Err(e) = r {
                    assert!(matches!(e, ApiError::InUse(_)), "{e}");
                }
            }
            drop(results);
            assert!(!path.exists());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn many_clients_are_served_and_slow_ones_dropped() {
        let dir = temp("clients");
        let path = dir.join("vm.sock");
        let server = ApiServer::bind(&path).unwrap();
        let mut conns = Connections::default();
        let mut watched = Vec::new();
        let accept = |conns: &mut Connections, watched: &mut Vec<usize>| {
            conns
                .accept(&server, |_, slot| {
                    watched.push(slot);
                    Ok(())
                })
                .unwrap()
        };
        // More idle clients than slots: the oldest make room, nobody blocks.
        let idle: Vec<UnixStream> = (0..MAX_CLIENTS + 5)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        accept(&mut conns, &mut watched);
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"{\"op\":").unwrap();
        accept(&mut conns, &mut watched);
        let slot = *watched.last().unwrap();
        assert!(conns.read(slot).is_none(), "half a request: wait for more");
        c.write_all(b"\"status\"}\n").unwrap();
        let (reply, req) = conns.read(slot).expect("request");
        assert_eq!(req, Request::Status);
        reply.send(&Response::refused("test".into()));
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line).unwrap();
        assert!(line.contains("\"error\":\"test\""), "{line}");
        // Garbage gets an answer, not silence.
        let mut bad = UnixStream::connect(&path).unwrap();
        bad.write_all(b"[\"status\"]\n").unwrap();
        accept(&mut conns, &mut watched);
        assert!(conns.read(*watched.last().unwrap()).is_none());
        let mut line = String::new();
        BufReader::new(&bad).read_line(&mut line).unwrap();
        assert!(line.contains("not a JSON object"), "{line}");
        // Expiry drops the idle ones.
        assert!(conns.next_deadline().is_some());
        conns.expire(Instant::now() + REQUEST_TIMEOUT);
        assert!(conns.next_deadline().is_none());
        drop(idle);
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
