//! The source side: a thread that runs one migration while the event loop goes on
//! serving the VM.
//!
//! 1. Connect, send HELLO, wait for ACCEPT (the destination checked the offer and built
//!    the machine).
//! 2. Turn on dirty logging, then round 0: every non-zero page (the destination's
//!    memory starts zeroed, so zero pages are not sent at all).
//! 3. Rounds 1..: the pages dirtied since the previous round (zero ones as markers),
//!    until what is left, at the rate measured in this migration, fits the downtime
//!    target; or the timeout, then abort or stop-copy.
//! 4. Switch-over: the VMM thread pauses the VM, has the devices hand over their host
//!    resources (disks flushed, image locks released) and captures the state; this
//!    thread sends the last dirty pages and the state, and waits for RUNNING.
//!
//! Any failure before RUNNING sends CANCEL (best effort) and reports the error; the
//! VMM thread then takes the devices' resources back and resumes the VM if it paused
//! it. Cancelling shuts the connection down, which unblocks a send or a wait.

use std::io::{self, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::protocol::{self, Hello, Kind, PageBatch, PageDigest, ProtocolError};
use super::{Address, MigrateOptions, OnTimeout, Progress, Summary};
use crate::memory::{self, DirtyBitmap, GuestMemory, MemoryError};
use crate::state::pages::{self, PAGE};
use crate::state::MachineState;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write or read may block before the other side counts as gone.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the destination may take from the state to RUNNING.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(30);
/// How often progress is reported during a long round.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Why a migration failed. The VM keeps running on the source in every case.
#[derive(Debug, Error)]
pub enum MigrateError {
    /// No connection.
    #[error("cannot connect to {to}: {source}")]
    Connect {
        /// The destination.
        to: String,
        /// Cause.
        source: io::Error,
    },
    /// The destination said no, and why.
    #[error("the destination refused: {0}")]
    Refused(String),
    /// The stream broke or made no sense.
    #[error("{0}")]
    Protocol(ProtocolError),
    /// Cancelled by the user.
    #[error("cancelled")]
    Cancelled,
    /// Pre-copy did not converge in time, and `--on-timeout abort`.
    #[error("did not converge in {timeout_s} s ({dirty_mb:.1} MB still dirty at {rate_mbps:.1} MB/s: a downtime of about {downtime_ms:.0} ms, the target is {target_ms} ms); raise --downtime-ms or --timeout-s, or pass --on-timeout stop-copy")]
    Timeout {
        /// The limit.
        timeout_s: u64,
        /// What was left.
        dirty_mb: f64,
        /// The measured rate.
        rate_mbps: f64,
        /// What stopping would have cost.
        downtime_ms: f64,
        /// The target.
        target_ms: u64,
    },
    /// Dirty logging.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Guest memory could not be read.
    #[error("cannot read guest memory: {0}")]
    Read(vm_memory::GuestMemoryError),
    /// The VMM thread could not pause and capture the VM.
    #[error("cannot switch over: {0}")]
    Switchover(String),
    /// The destination did not say it runs.
    #[error("the destination did not confirm that the VM runs there within {0:?}")]
    NoConfirmation(Duration),
    /// The job's channel to the VMM thread is gone (wisp is stopping).
    #[error("the VM is stopping")]
    VmGone,
}

impl From<ProtocolError> for MigrateError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Refused(why) => MigrateError::Refused(why),
            other => MigrateError::Protocol(other),
        }
    }
}

impl From<io::Error> for MigrateError {
    fn from(e: io::Error) -> Self {
        MigrateError::Protocol(ProtocolError::Io(e))
    }
}

/// A connection to the destination.
pub enum Conn {
    /// TCP.
    Tcp(TcpStream),
    /// A unix socket.
    Unix(UnixStream),
}

impl Conn {
    /// Connects to `to`.
    pub fn connect(to: &Address) -> io::Result<Self> {
        match to {
            Address::Unix(p) => UnixStream::connect(p).map(Conn::Unix),
            Address::Tcp(hp) => {
                let mut last = io::Error::from(io::ErrorKind::AddrNotAvailable);
                for addr in hp.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Conn::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    /// A second handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    /// Shuts the connection down both ways (a blocked read or write returns).
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// Read and write timeouts.
    pub fn set_timeouts(&self, read: Duration, write: Duration) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
        }
    }
}

impl io::Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

/// What the job tells the VMM thread (which it wakes with `JobLink::wake`).
pub enum JobEvent {
    /// New progress (read it from the shared [`Progress`]).
    Progress,
    /// Pause the VM, hand over the devices' host resources, capture the state and
    /// answer through the job's reply channel.
    Switchover,
    /// The migration ended.
    Finished(Result<Summary, MigrateError>),
}

/// The job's end of its link to the VMM thread.
pub struct JobLink {
    /// Events for the VMM thread.
    pub events: Sender<JobEvent>,
    /// Wakes the VMM thread's event loop after each event.
    pub wake: EventFd,
    /// The VMM thread's answers to [`JobEvent::Switchover`].
    pub replies: Receiver<Result<MachineState, String>>,
}

impl JobLink {
    fn post(&self, e: JobEvent) -> Result<(), MigrateError> {
        self.events.send(e).map_err(|_| MigrateError::VmGone)?;
        let _ = self.wake.write(1);
        Ok(())
    }
}

/// Everything the sender thread needs.
pub struct SendJob {
    /// How to migrate.
    pub options: MigrateOptions,
    /// What to offer.
    pub hello: Hello,
    /// The VM, for its dirty log.
    pub vm_fd: Arc<VmFd>,
    /// Guest memory.
    pub mem: GuestMemory,
    /// Set by the VMM thread to cancel.
    pub cancel: Arc<AtomicBool>,
    /// Shared with the VMM thread for `status` and the migrate client.
    pub progress: Arc<Mutex<Progress>>,
    /// Where the VMM thread finds the connection to shut down on cancel.
    pub conn: Arc<Mutex<Option<Conn>>>,
    /// The link to the VMM thread.
    pub link: JobLink,
}

/// The sending half in the middle of a migration.
struct PageSender<'a> {
    job: &'a SendJob,
    conn: Conn,
    batch: PageBatch,
    digest: PageDigest,
    started: Instant,
    sent_bytes: u64,
    data_pages: u64,
    zero_pages: u64,
    /// Time spent sending page data, for the rate.
    send_time: Duration,
    last_report: Instant,
    /// The current round.
    round: u32,
    /// Dirty bytes when last counted.
    dirty_bytes: u64,
}

impl SendJob {
    /// Runs the migration and reports its end to the VMM thread.
    pub fn run(self) {
        let result = self.migrate();
        if result.is_err() {
            if let Err(e) = memory::set_dirty_logging(&self.vm_fd, &self.mem, false) {
                log::warn!("migration: cannot turn dirty logging off: {e}");
            }
        }
        let _ = self.link.post(JobEvent::Finished(result));
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    fn set_progress(&self, f: impl FnOnce(&mut Progress)) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut p);
    }

    fn migrate(&self) -> Result<Summary, MigrateError> {
        let started = Instant::now();
        self.set_progress(|p| p.phase = "connecting".into());
        let to = self.options.to.to_string();
        let conn = Conn::connect(&self.options.to).map_err(|source| MigrateError::Connect {
            to: to.clone(),
            source,
        })?;
        conn.set_timeouts(IO_TIMEOUT, IO_TIMEOUT)?;
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.try_clone()?);
        if self.cancelled() {
            return Err(MigrateError::Cancelled);
        }
        let mut s = PageSender {
            job: self,
            conn,
            batch: PageBatch::default(),
            digest: PageDigest::default(),
            started,
            sent_bytes: 0,
            data_pages: 0,
            zero_pages: 0,
            send_time: Duration::ZERO,
            last_report: started,
            round: 0,
            dirty_bytes: 0,
        };
        let result = s.run(&to);
        if let Err(e) = &result {
            // Best effort: the destination discards its VM.
            let why = e.to_string();
            let _ = protocol::write_frame(&mut s.conn, Kind::Cancel, why.as_bytes());
        }
        result
    }
}

impl PageSender<'_> {
    fn run(&mut self, to: &str) -> Result<Summary, MigrateError> {
        let job = self.job;
        protocol::write_preamble(&mut self.conn)?;
        protocol::write_hello(&mut self.conn, &job.hello)?;
        self.conn.flush()?;
        protocol::expect_frame(&mut self.conn, Kind::Accept).map_err(|e| self.or_cancel(e))?;
        log::info!("migration to {to}: accepted; sending memory");

        memory::set_dirty_logging(&job.vm_fd, &job.mem, true)?;
        memory::reset_device_bitmap(&job.mem);
        job.set_progress(|p| p.phase = "pre-copy".into());
        self.send_pages(None)?;
        self.report(true);
        let target_ms = job.options.downtime_ms as f64;
        let timeout = Duration::from_secs(job.options.timeout_s);
        let mut forced = false;
        let pending = loop {
            if job.cancelled() {
                return Err(MigrateError::Cancelled);
            }
            let dirty = memory::dirty_log(&job.vm_fd, &job.mem)?;
            let dirty_bytes = pages::count(&dirty) * PAGE as u64;
            self.dirty_bytes = dirty_bytes;
            let estimate = self.downtime_ms(dirty_bytes);
            self.report(true);
            if estimate <= target_ms {
                break dirty;
            }
            if self.started.elapsed() >= timeout {
                if job.options.on_timeout == OnTimeout::StopCopy {
                    forced = true;
                    job.set_progress(|p| p.phase = "stop-copy".into());
                    break dirty;
                }
                return Err(MigrateError::Timeout {
                    timeout_s: job.options.timeout_s,
                    dirty_mb: dirty_bytes as f64 / 1e6,
                    rate_mbps: self.rate() / 1e6,
                    downtime_ms: estimate,
                    target_ms: job.options.downtime_ms,
                });
            }
            self.round += 1;
            self.send_pages(Some(&dirty))?;
        };

        // Switch-over: from here the VM is paused until RUNNING or a failure.
        job.set_progress(|p| p.phase = "switching over".into());
        let paused_at = Instant::now();
        job.link.post(JobEvent::Switchover)?;
        let state = match job.link.replies.recv() {
            Ok(Ok(state)) => state,
            Ok(Err(why)) => return Err(MigrateError::Switchover(why)),
            Err(_) => return Err(MigrateError::VmGone),
        };
        let mut last = memory::dirty_log(&job.vm_fd, &job.mem)?;
        for (words, more) in last.iter_mut().zip(&pending) {
            for (w, m) in words.iter_mut().zip(more) {
                *w |= m;
            }
        }
        self.round += 1;
        self.send_pages(Some(&last))?;
        protocol::write_state(&mut self.conn, self.digest.value(), &state)?;
        self.conn.flush()?;
        self.conn.set_timeouts(RUNNING_TIMEOUT, IO_TIMEOUT)?;
        protocol::expect_frame(&mut self.conn, Kind::Running).map_err(|e| match e {
            ProtocolError::Io(e) if e.kind() == io::ErrorKind::WouldBlock => {
                MigrateError::NoConfirmation(RUNNING_TIMEOUT)
            }
            e => self.or_cancel(e),
        })?;
        let downtime = paused_at.elapsed();
        Ok(Summary {
            to: to.to_string(),
            total_s: self.started.elapsed().as_secs_f64(),
            downtime_ms: downtime.as_secs_f64() * 1e3,
            sent_bytes: self.sent_bytes,
            data_pages: self.data_pages,
            zero_pages: self.zero_pages,
            rounds: self.round + 1,
            forced,
        })
    }

    /// A broken connection after a cancel is the cancel.
    fn or_cancel(&self, e: ProtocolError) -> MigrateError {
        if self.job.cancelled() {
            MigrateError::Cancelled
        } else {
            e.into()
        }
    }

    /// Bytes per second sending page data, so far (a guess before any).
    fn rate(&self) -> f64 {
        let secs = self.send_time.as_secs_f64();
        if secs > 0.0 && self.sent_bytes > 0 {
            self.sent_bytes as f64 / secs
        } else {
            100e6
        }
    }

    fn downtime_ms(&self, bytes: u64) -> f64 {
        bytes as f64 / self.rate() * 1e3
    }

    /// Updates the shared progress; tells the VMM thread at most every
    /// [`PROGRESS_EVERY`] unless `now`.
    fn report(&mut self, now: bool) {
        let (round, dirty, sent, zero, rate) = (
            self.round,
            self.dirty_bytes,
            self.sent_bytes,
            self.zero_pages,
            self.rate(),
        );
        let estimate = self.downtime_ms(dirty);
        let elapsed = self.started.elapsed().as_secs_f64();
        self.job.set_progress(|p| {
            p.round = round;
            p.sent_bytes = sent;
            p.dirty_bytes = dirty;
            p.zero_pages = zero;
            p.rate_mbps = rate / 1e6;
            p.estimated_downtime_ms = estimate;
            p.elapsed_s = elapsed;
        });
        if now || self.last_report.elapsed() >= PROGRESS_EVERY {
            self.last_report = Instant::now();
            let _ = self.job.link.post(JobEvent::Progress);
        }
    }

    /// Sends the pages `selected` selects (every non-zero page when None).
    fn send_pages(&mut self, selected: Option<&DirtyBitmap>) -> Result<(), MigrateError> {
        let job = self.job;
        let t0 = Instant::now();
        pages::walk(
            &job.mem,
            selected,
            |run| {
                for page in run.pages() {
                    if page.zero {
                        self.zero_pages += 1;
                        // Round 0: the destination's memory is zero already.
                        if selected.is_none() {
                            continue;
                        }
                    } else {
                        self.data_pages += 1;
                    }
                    if self.batch.push(page.guest_addr, page.data, page.zero) {
                        self.flush_batch()?;
                    }
                }
                Ok(())
            },
            MigrateError::Read,
        )?;
        self.flush_batch()?;
        self.send_time += t0.elapsed();
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<(), MigrateError> {
        let job = self.job;
        if self.batch.is_empty() {
            return Ok(());
        }
        if job.cancelled() {
            return Err(MigrateError::Cancelled);
        }
        let payload = self.batch.take_payload();
        self.digest.update(payload);
        protocol::write_frame(&mut self.conn, Kind::Pages, payload).map_err(|e| {
            if job.cancelled() {
                MigrateError::Cancelled
            } else {
                e.into()
            }
        })?;
        self.sent_bytes += (payload.len() + 8) as u64;
        self.throttle();
        self.report(false);
        Ok(())
    }

    /// Keeps the average below `--bandwidth`.
    fn throttle(&self) {
        let Some(mbps) = self.job.options.bandwidth_mbps.filter(|&m| m > 0) else {
            return;
        };
        let due = Duration::from_secs_f64(self.sent_bytes as f64 / (mbps as f64 * 1e6));
        let elapsed = self.started.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}
