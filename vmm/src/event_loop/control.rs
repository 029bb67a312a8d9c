//! Control-socket requests, handled on the VMM thread: status, pause, resume, stop.
//!
//! Pause stops every vCPU at a consistent point (run_control.rs) and stops device
//! processing: the event loop then only records which queues were notified and which
//! backend events arrived, and stops reading console input; resume lets the vCPUs go and
//! replays the recorded events.

use std::time::Instant;

use devices::bus::lock;

use super::{EventLoop, EventLoopError};
use crate::api::{self, ApiServer, Request, Response, Status};
use crate::outcome::Outcome;
use crate::run_control::{VcpuThreads, PAUSE_TIMEOUT};

/// What `status` reports that the loop does not otherwise know.
pub struct VmInfo {
    /// VM name.
    pub name: String,
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// wisp's start.
    pub start: Instant,
}

/// The control socket and the facts it reports.
pub(super) struct Api {
    pub(super) server: ApiServer,
    pub(super) info: VmInfo,
}

impl EventLoop {
    fn status(&self) -> Option<Status> {
        let api = self.api.as_ref()?;
        Some(Status {
            name: api.info.name.clone(),
            state: if self.pending.is_some() {
                "paused".into()
            } else {
                "running".into()
            },
            cpus: api.info.cpus,
            memory_mib: api.info.memory_mib,
            uptime_s: api.info.start.elapsed().as_secs_f64(),
            pid: std::process::id(),
        })
    }

    /// Answers every waiting client.
    pub(super) fn control_requests(&mut self, vcpus: &VcpuThreads) -> Result<(), EventLoopError> {
        loop {
            let Some((stream, req)) = self.api.as_ref().and_then(|a| a.server.next_request())
            else {
                return Ok(());
            };
            let result = match req {
                Request::Status => Ok(()),
                Request::Pause => self.pause(vcpus),
                Request::Resume => self.resume(vcpus),
                Request::Stop => {
                    self.latch.set(Outcome::Stopped);
                    Ok(())
                }
            };
            let response = match result {
                Ok(()) => Response {
                    ok: true,
                    status: self.status(),
                    error: None,
                },
                Err(e) => Response {
                    ok: false,
                    status: None,
                    error: Some(e),
                },
            };
            api::answer(stream, &response);
        }
    }

    fn pause(&mut self, vcpus: &VcpuThreads) -> Result<(), String> {
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

    fn resume(&mut self, vcpus: &VcpuThreads) -> Result<(), String> {
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
