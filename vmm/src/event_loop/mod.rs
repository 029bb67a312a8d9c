//! The VMM thread's epoll loop: the exit latch, console input (paced by the UART's
//! "input drained" event), termination signals, the control socket (control.rs), and
//! the virtio devices' queue notifications (ioeventfds) and backends (TAPs, passt;
//! edge-triggered).

mod control;
mod migrate;

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::bus::lock;
use devices::virtio::mmio::MmioTransport;
use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{Connections, MAX_CLIENTS};
use crate::console::{EscapeFilter, Input, InputSource};
use crate::machine::Machine;
use crate::migration::worker::Worker;
use crate::outcome::{ExitLatch, Outcome};
use crate::run_control::VcpuThreads;
use crate::signals::SignalFd;

const TOKEN_LATCH: u64 = 0;
const TOKEN_INPUT: u64 = 1;
const TOKEN_DRAINED: u64 = 2;
const TOKEN_SIGNAL: u64 = 3;
const TOKEN_API: u64 = 4;
/// A migration job's wake-up.
const TOKEN_JOB: u64 = 5;
/// Control-socket clients: `TOKEN_CLIENTS + slot`.
const TOKEN_CLIENTS: u64 = 1 << 32;
const READ_CHUNK: usize = 4096;
/// Device tokens: `TOKEN_DEVICES + device * DEVICE_TOKENS + queue`, and the backend at
/// `... + BACKEND_SUB`.
const TOKEN_DEVICES: u64 = 16;
const DEVICE_TOKENS: u64 = 16;
const BACKEND_SUB: u64 = DEVICE_TOKENS - 1;

/// Errors of the event loop itself (not of the guest).
#[derive(Debug, Error)]
pub enum EventLoopError {
    /// epoll failed.
    #[error("event loop: {0}")]
    Epoll(#[from] io::Error),
}

struct ConsoleIn {
    input: Input,
    escape: Option<EscapeFilter>,
    pending: Vec<u8>,
    pos: usize,
    eof: bool,
    watched: bool,
}

/// Watches a device backend fd, edge-triggered for reads and writes.
fn watch_backend(epoll: &Epoll, fd: RawFd, token: u64) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
            token,
        ),
    )
}

/// The VMM thread's loop.
pub struct EventLoop {
    epoll: Epoll,
    latch: Arc<ExitLatch>,
    drained: EventFd,
    signals: SignalFd,
    console: Option<ConsoleIn>,
    devices: Vec<Arc<Mutex<MmioTransport>>>,
    /// Per device: the backend fd being watched and its generation.
    backends: Vec<Option<(RawFd, u64)>>,
    api: Option<control::Api>,
    /// While paused: device events seen, per device (queue bits, backend epoll mask).
    pending: Option<Vec<(u64, u32)>>,
    /// The VM, its memory, configuration and legacy devices (status, console input,
    /// snapshots).
    machine: Machine,
    /// wisp's start, for the uptime.
    start: Instant,
    /// A migration in progress.
    migration: Option<migrate::Migration>,
    /// The thread that runs migrations.
    worker: Worker,
}

impl EventLoop {
    /// A loop over `latch`, the UART's drained event, `signals`, console `input`, the
    /// virtio `devices` and the control socket `api`, for the VM of `machine`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        latch: Arc<ExitLatch>,
        drained: EventFd,
        signals: SignalFd,
        input: Option<Input>,
        devices: Vec<Arc<Mutex<MmioTransport>>>,
        api: Option<crate::api::ApiServer>,
        machine: Machine,
        start: Instant,
    ) -> Result<Self, EventLoopError> {
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(latch.eventfd().as_raw_fd(), TOKEN_LATCH)?;
        add(drained.as_raw_fd(), TOKEN_DRAINED)?;
        add(signals.as_raw_fd(), TOKEN_SIGNAL)?;
        if let Some(server) = &api {
            add(server.listener().as_raw_fd(), TOKEN_API)?;
        }
        let mut backends = Vec::with_capacity(devices.len());
        for (d, dev) in devices.iter().enumerate() {
            let base = TOKEN_DEVICES + d as u64 * DEVICE_TOKENS;
            let dev = lock(dev);
            for (q, evt) in dev.queue_evts().iter().enumerate() {
                add(evt.as_raw_fd(), base + q as u64)?;
            }
            let backend = dev.backend_fd().map(|fd| (fd, dev.backend_generation()));
            if let Some((fd, _)) = backend {
                watch_backend(&epoll, fd, base + BACKEND_SUB)?;
            }
            backends.push(backend);
        }
        let console = input.map(|input| ConsoleIn {
            escape: input.escape.then(EscapeFilter::default),
            input,
            pending: Vec::new(),
            pos: 0,
            eof: false,
            watched: false,
        });
        Ok(Self {
            epoll,
            latch,
            drained,
            signals,
            console,
            devices,
            backends,
            api: api.map(|server| control::Api {
                server,
                clients: Connections::default(),
            }),
            pending: None,
            machine,
            start,
            migration: None,
            worker: Worker::spawn()?,
        })
    }

    /// Runs until something reports an outcome.
    pub fn run(&mut self, vcpus: &VcpuThreads) -> Result<Outcome, EventLoopError> {
        self.feed()?;
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            if let Some(outcome) = self.latch.get() {
                return Ok(outcome);
            }
            let timeout = self.wait_timeout();
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_INPUT => self.read_input()?,
                    TOKEN_DRAINED => {
                        // The counter only wakes us; its value does not matter.
                        let _ = self.drained.read();
                        if self.pending.is_none() {
                            self.feed()?;
                        }
                    }
                    TOKEN_API => self.accept_clients()?,
                    TOKEN_JOB => self.job_events(vcpus)?,
                    t if (TOKEN_CLIENTS..TOKEN_CLIENTS + MAX_CLIENTS as u64).contains(&t) => {
                        self.client_request((t - TOKEN_CLIENTS) as usize, vcpus)
                    }
                    TOKEN_SIGNAL => {
                        if let Some(signo) = self.signals.read() {
                            self.latch.set(Outcome::Signal(signo));
                        }
                    }
                    t if t >= TOKEN_DEVICES => self.device_event(t - TOKEN_DEVICES, ev.events())?,
                    _ => {}
                }
            }
        }
    }

    /// How long epoll may wait: until the next control client runs out of time (those
    /// that have are dropped here), else forever.
    fn wait_timeout(&mut self) -> i32 {
        let Some(clients) = self.api.as_mut().map(|a| &mut a.clients) else {
            return -1;
        };
        let now = Instant::now();
        clients.expire(now);
        clients.next_deadline().map_or(-1, |d| {
            // Rounded up, so the deadline has passed when epoll returns.
            let ms = d.saturating_duration_since(now).as_micros().div_ceil(1000);
            i32::try_from(ms).unwrap_or(i32::MAX)
        })
    }

    fn device_event(&mut self, token: u64, events: u32) -> Result<(), EventLoopError> {
        let index = (token / DEVICE_TOKENS) as usize;
        let sub = token % DEVICE_TOKENS;
        let Some(dev) = self.devices.get(index) else {
            return Ok(());
        };
        let mut dev = lock(dev);
        if let Some(pending) = self.pending.as_mut().and_then(|p| p.get_mut(index)) {
            // Paused: remember the event, process it on resume.
            if sub == BACKEND_SUB {
                pending.1 |= events;
            } else if let Some(evt) = dev.queue_evts().get(sub as usize) {
                let _ = evt.read();
                pending.0 |= 1 << sub;
            }
            return Ok(());
        }
        if sub == BACKEND_SUB {
            dev.backend_event(events);
        } else {
            dev.queue_event(sub as usize);
        }
        // A reconnected backend has a new fd: watch it instead of the old one.
        let now = dev.backend_fd().map(|fd| (fd, dev.backend_generation()));
        drop(dev);
        if let Some(slot) = self.backends.get_mut(index) {
            if *slot != now {
                if let Some((old, _)) = *slot {
                    // The old fd is usually closed already, which removed it.
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, old, EpollEvent::default());
                }
                if let Some((fd, _)) = now {
                    let token = TOKEN_DEVICES + index as u64 * DEVICE_TOKENS + BACKEND_SUB;
                    watch_backend(&self.epoll, fd, token)?;
                }
                *slot = now;
            }
        }
        Ok(())
    }

    fn watch_input(&mut self, on: bool) -> io::Result<()> {
        let Some(c) = self.console.as_mut() else {
            return Ok(());
        };
        let InputSource::Stream(fd) = c.input.source else {
            return Ok(());
        };
        if c.watched == on {
            return Ok(());
        }
        let op = if on {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        self.epoll
            .ctl(op, fd, EpollEvent::new(EventSet::IN, TOKEN_INPUT))?;
        c.watched = on;
        Ok(())
    }

    /// Reads one chunk of input into `pending`; returns false at end of input.
    fn read_chunk(&mut self) -> io::Result<bool> {
        let Some(c) = self.console.as_mut() else {
            return Ok(false);
        };
        let mut buf = [0u8; READ_CHUNK];
        let n = match &mut c.input.source {
            InputSource::Stream(fd) => {
                // SAFETY: reading into a local buffer of READ_CHUNK bytes from a
                // descriptor that stays open for the life of the process (stdin).
                let r = unsafe { libc::read(*fd, buf.as_mut_ptr().cast(), buf.len()) };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) {
                        return Ok(true);
                    }
                    return Err(e);
                }
                r as usize
            }
            InputSource::File(f) => f.read(&mut buf)?,
        };
        if n == 0 {
            c.eof = true;
            return Ok(false);
        }
        c.pending.drain(..c.pos);
        c.pos = 0;
        let quit = match c.escape.as_mut() {
            Some(filter) => filter.filter(&buf[..n], &mut c.pending),
            None => {
                c.pending.extend_from_slice(&buf[..n]);
                false
            }
        };
        if quit {
            self.latch.set(Outcome::Quit);
        }
        Ok(true)
    }

    fn read_input(&mut self) -> Result<(), EventLoopError> {
        if !self.read_chunk()? {
            log::debug!("console input closed");
            self.watch_input(false)?;
            return Ok(());
        }
        self.feed()
    }

    /// Moves pending input into the UART FIFO as far as it has room, and decides whether
    /// to read more now (room left) or wait for the guest to drain the FIFO.
    fn feed(&mut self) -> Result<(), EventLoopError> {
        loop {
            let Some(c) = self.console.as_mut() else {
                return Ok(());
            };
            if c.pos < c.pending.len() {
                let n = lock(&self.machine.serial).enqueue_input(&c.pending[c.pos..]);
                c.pos += n;
            }
            let backlog = c.pos < c.pending.len();
            let eof = c.eof;
            let is_file = matches!(c.input.source, InputSource::File(_));
            if backlog || eof {
                // Wait for the drained event before reading more.
                self.watch_input(false)?;
                return Ok(());
            }
            if is_file {
                let room = lock(&self.machine.serial).fifo_capacity() > 0;
                if !room || !self.read_chunk()? {
                    return Ok(());
                }
            } else {
                self.watch_input(true)?;
                return Ok(());
            }
        }
    }
}
