//! Control-socket requests, handled on the VMM thread: status, pause, resume, snapshot,
//! stop.
//!
//! Pause stops every vCPU at a consistent point (run_control.rs) and stops device
//! processing: the event loop then only records which queues were notified and which
//! backend events arrived, and stops reading console input; resume lets the vCPUs go and
//! replays the recorded events.
//!
//! Snapshot pauses (unless paused already), writes the snapshot (snapshot/mod.rs), and
//! then resumes, stops, or stays paused if the VM was paused before. A failed snapshot
//! leaves the VM as it was.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use devices::bus::lock;

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::{EventLoop, EventLoopError, TOKEN_CLIENTS};
use crate::api::{ApiServer, Connections, Request, Response, Status};
use crate::migration::{Address, MigrateOptions};
use crate::outcome::Outcome;
use crate::run_control::{VcpuThreads, PAUSE_TIMEOUT};
use crate::snapshot::{self, check_target, SnapshotSummary};

/// The control socket and its connected clients.
pub(super) struct Api {
    pub(super) server: ApiServer,
    pub(super) clients: Connections,
}

impl EventLoop {
    pub(super) fn status(&self) -> Status {
        let config = &self.machine.config;
        let state = if self.latch.get().is_some() {
            "stopping"
        } else if self.migration.is_some() {
            "migrating"
        } else if self.pending.is_some() {
            "paused"
        } else {
            "running"
        };
        Status {
            name: config.name.clone(),
            state: state.into(),
            cpus: config.cpus,
            memory_mib: config.memory_mib,
            uptime_s: self.start.elapsed().as_secs_f64(),
            pid: std::process::id(),
            migration: self
                .migration
                .as_ref()
                .and_then(|m| m.progress.lock().ok().map(|p| p.clone())),
        }
    }

    /// Accepts the clients waiting on the control socket and watches each.
    pub(super) fn accept_clients(&mut self) -> Result<(), EventLoopError> {
        let Some(api) = self.api.as_mut() else {
            return Ok(());
        };
        let epoll = &self.epoll;
        api.clients.accept(&api.server, |fd, slot| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TOKEN_CLIENTS + slot as u64),
            )
        })?;
        Ok(())
    }

    /// Reads from the client in `slot` and, once its request line is complete,
    /// carries it out and answers.
    pub(super) fn client_request(&mut self, slot: usize, vcpus: &VcpuThreads) {
        let Some((reply, req)) = self.api.as_mut().and_then(|a| a.clients.read(slot)) else {
            return;
        };
        // The connection now only carries answers (a migration's events, for a while):
        // it is no longer watched, or a client that hangs up would wake the loop for
        // good.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            reply.as_raw_fd(),
            EpollEvent::default(),
        );
        let mut snapshot = None;
        let result = match req {
            Request::Status => Ok(()),
            Request::Pause => self.migrating().and_then(|()| self.pause(vcpus)),
            Request::Resume => self.migrating().and_then(|()| self.resume(vcpus)),
            Request::Stop => {
                self.latch.set(Outcome::Stopped);
                Ok(())
            }
            Request::Snapshot { to, force, stop } => self.migrating().and_then(|()| {
                self.snapshot(vcpus, &to, force, stop)
                    .map(|s| snapshot = Some(s))
            }),
            Request::Migrate {
                to,
                downtime_ms,
                timeout_s,
                on_timeout,
                bandwidth_mbps,
            } => {
                match to.parse::<Address>() {
                    Ok(to) => self.start_migration(
                        MigrateOptions {
                            to,
                            downtime_ms,
                            timeout_s,
                            on_timeout,
                            bandwidth_mbps,
                        },
                        reply,
                    ),
                    Err(e) => reply.send(&Response::refused(format!("--to {e}"))),
                }
                return;
            }
            Request::MigrateCancel => self.cancel_migration(),
        };
        let response = match result {
            Ok(()) => Response {
                ok: true,
                status: Some(self.status()),
                error: None,
                snapshot,
            },
            Err(e) => Response::refused(e),
        };
        reply.send(&response);
    }

    pub(super) fn pause(&mut self, vcpus: &VcpuThreads) -> Result<(), String> {
        if self.pending.is_some() {
            return Ok(());
        }
        if !vcpus.pause() {
            return Err(format!(
                "the vCPUs did not stop within {PAUSE_TIMEOUT:?}; the VM keeps running"
            ));
        }
        self.pending = Some(vec![(0, 0); self.devices.len()]);
        self.watch_input(false).map_err(|e| e.to_string())?;
        log::info!("paused");
        Ok(())
    }

    fn snapshot(
        &mut self,
        vcpus: &VcpuThreads,
        to: &Path,
        force: bool,
        stop: bool,
    ) -> Result<SnapshotSummary, String> {
        if !to.is_absolute() {
            return Err(format!("snapshot path {} is not absolute", to.display()));
        }
        check_target(to, force).map_err(|e| e.to_string())?;
        let was_paused = self.pending.is_some();
        let started = Instant::now();
        let result = self.pause(vcpus).and_then(|()| {
            let state = self
                .machine
                .save_state(vcpus, &self.devices)
                .map_err(|e| e.to_string())?;
            snapshot::write(to, state, &self.machine.mem, force, started).map_err(|e| e.to_string())
        });
        let stopping = stop && result.is_ok();
        let resume = !was_paused && !stopping;
        match &result {
            Ok(s) => log::info!(
                "snapshot written to {} ({} MiB on disk, {:.0} ms)",
                s.path.display(),
                s.disk_bytes >> 20,
                s.took_s * 1e3
            ),
            Err(e) => log::error!("snapshot failed: {e}"),
        }
        if stopping {
            self.latch.set(Outcome::Stopped);
        }
        if resume {
            self.resume(vcpus)?;
        }
        result
    }

    pub(super) fn resume(&mut self, vcpus: &VcpuThreads) -> Result<(), String> {
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        vcpus.resume();
        for (dev, (queues, backend)) in self.devices.iter().zip(pending) {
            let mut dev = lock(dev);
            for q in 0..64 {
                if queues & (1 << q) != 0 {
                    dev.queue_event(q);
                }
            }
            if backend != 0 {
                dev.backend_event(backend);
            }
        }
        self.feed().map_err(|e| e.to_string())?;
        log::info!("resumed");
        Ok(())
    }
}
