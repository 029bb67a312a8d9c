//! The VMM thread's side of a migration: it starts the sender job (migration/send.rs),
//! keeps serving the VM while the job runs, and acts on what the job reports:
//! progress goes to the clients following the migration; the switch-over request is
//! carried out here (pause, devices hand over their host resources, state captured);
//! the end either exits wisp (the VM runs on the destination) or takes the devices'
//! resources back and resumes the VM.
//!
//! While the job runs, pause, resume and snapshot requests are refused: a resume after
//! the state was captured would let the guest change memory the destination never
//! gets.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{EventLoop, EventLoopError, TOKEN_JOB};
use crate::api::{MigrationEvent, Reply, Response};
use crate::migration::protocol::Hello;
use crate::migration::receive::cpu_features;
use crate::migration::send::{Conn, JobEvent, JobLink, MigrateError, SendJob};
use crate::migration::{MigrateOptions, Progress};
use crate::outcome::Outcome;
use crate::run_control::VcpuThreads;
use crate::state::format::FORMAT_VERSION;
use crate::state::MachineState;

/// A migration in progress.
pub(super) struct Migration {
    options: MigrateOptions,
    cancel: Arc<AtomicBool>,
    pub(super) progress: Arc<Mutex<Progress>>,
    conn: Arc<Mutex<Option<Conn>>>,
    events: Receiver<JobEvent>,
    wake: EventFd,
    replies: Sender<Result<MachineState, String>>,
    /// Gets `()` when the job has ended.
    done: Option<Receiver<()>>,
    /// Clients following it (the one that started it, at least).
    watchers: Vec<Reply>,
    /// The VM was paused (and its devices released) for the switch-over.
    switched: bool,
    /// It was paused before that, so a failed migration leaves it paused.
    was_paused: bool,
}

impl Migration {
    fn stop_job(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            c.shutdown();
        }
    }

    fn tell(&mut self, event: &MigrationEvent) {
        self.watchers.retain_mut(|w| w.line(event));
    }
}

impl Drop for Migration {
    fn drop(&mut self) {
        // The VM ends while the job runs (power-off, stop): the job gives up, also if it
        // waits for the answer to a switch-over that will not come.
        self.stop_job();
        let _ = self.replies.send(Err("the VM is stopping".into()));
        if let Some(done) = self.done.take() {
            let _ = done.recv();
        }
    }
}

impl EventLoop {
    /// Whether a migration runs (control requests that would interfere are refused).
    pub(super) fn migrating(&self) -> Result<(), String> {
        match &self.migration {
            Some(m) => Err(format!(
                "a migration to {} is running; wait for it, or cancel it with `wisp migrate NAME --cancel`",
                m.options.to
            )),
            None => Ok(()),
        }
    }

    /// Starts a migration; `reply` gets the answer, then the migration's events.
    pub(super) fn start_migration(&mut self, options: MigrateOptions, mut reply: Reply) {
        if let Err(e) = self.migrating() {
            reply.send(&Response::refused(e));
            return;
        }
        match self.spawn_job(options) {
            Ok(m) => {
                self.migration = Some(m);
                let response = Response {
                    ok: true,
                    status: Some(self.status()),
                    error: None,
                    snapshot: None,
                };
                if reply.line(&response) {
                    if let Some(m) = self.migration.as_mut() {
                        m.watchers.push(reply);
                    }
                }
            }
            Err(e) => reply.send(&Response::refused(e)),
        }
    }

    fn spawn_job(&mut self, options: MigrateOptions) -> Result<Migration, String> {
        let machine = &self.machine;
        let layout = machine.mem_layout();
        let hello = Hello {
            wisp_version: env!("CARGO_PKG_VERSION").to_string(),
            format_version: FORMAT_VERSION,
            config: machine.config.clone(),
            memory: layout,
            cpu: cpu_features(&machine.guest_cpuid),
        };
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
        self.epoll
            .ctl(
                ControlOperation::Add,
                wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_JOB),
            )
            .map_err(|e| e.to_string())?;
        let (events_tx, events) = channel();
        let (replies, replies_rx) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Mutex::new(Progress {
            phase: "connecting".into(),
            ..Default::default()
        }));
        let conn = Arc::new(Mutex::new(None));
        let job = SendJob {
            options: options.clone(),
            hello,
            vm_fd: machine.vm_fd.clone(),
            mem: machine.mem.clone(),
            cancel: cancel.clone(),
            progress: progress.clone(),
            conn: conn.clone(),
            link: JobLink {
                events: events_tx,
                wake: wake.try_clone().map_err(|e| e.to_string())?,
                replies: replies_rx,
            },
        };
        let done = self.worker.submit(job)?;
        log::info!("migrating to {}", options.to);
        Ok(Migration {
            options,
            cancel,
            progress,
            conn,
            events,
            wake,
            replies,
            done: Some(done),
            watchers: Vec::new(),
            switched: false,
            was_paused: false,
        })
    }

    /// Cancels the running migration (its end is reported as usual).
    pub(super) fn cancel_migration(&mut self) -> Result<(), String> {
        match self.migration.as_mut() {
            Some(m) => {
                m.stop_job();
                Ok(())
            }
            None => Err("no migration is running".into()),
        }
    }

    /// What the job reported.
    pub(super) fn job_events(&mut self, vcpus: &VcpuThreads) -> Result<(), EventLoopError> {
        loop {
            let Some(m) = self.migration.as_mut() else {
                return Ok(());
            };
            let _ = m.wake.read();
            let Ok(event) = m.events.try_recv() else {
                return Ok(());
            };
            match event {
                JobEvent::Progress => {
                    let progress = m.progress.lock().map(|p| p.clone()).unwrap_or_default();
                    m.tell(&MigrationEvent::Progress { progress });
                }
                JobEvent::Switchover => {
                    let answer = self.switch_over(vcpus);
                    if let Some(m) = self.migration.as_mut() {
                        let _ = m.replies.send(answer);
                    }
                }
                JobEvent::Finished(result) => {
                    self.migration_finished(vcpus, result)?;
                    return Ok(());
                }
            }
        }
    }

    /// Pauses the VM, has every device hand over its host resources, and captures the
    /// state. On failure the VM is as it was.
    fn switch_over(&mut self, vcpus: &VcpuThreads) -> Result<MachineState, String> {
        let was_paused = self.pending.is_some();
        self.pause(vcpus)?;
        let undo = |this: &mut Self, released: usize| {
            for t in &this.devices[..released] {
                if let Err(e) = lock(t).claim_host() {
                    log::error!(
                        "{}: cannot take its host resources back: {e}",
                        lock(t).name()
                    );
                }
            }
            if !was_paused {
                let _ = this.resume(vcpus);
            }
        };
        for (i, t) in self.devices.iter().enumerate() {
            let mut t = lock(t);
            if let Err(e) = t.release_host() {
                let why = format!("{}: cannot hand over: {e}", t.name());
                drop(t);
                undo(self, i);
                return Err(why);
            }
        }
        match self.machine.save_state(vcpus, &self.devices) {
            Ok(state) => {
                if let Some(m) = self.migration.as_mut() {
                    m.switched = true;
                    m.was_paused = was_paused;
                }
                Ok(state)
            }
            Err(e) => {
                undo(self, self.devices.len());
                Err(e.to_string())
            }
        }
    }

    fn migration_finished(
        &mut self,
        vcpus: &VcpuThreads,
        result: Result<crate::migration::Summary, MigrateError>,
    ) -> Result<(), EventLoopError> {
        let Some(mut m) = self.migration.take() else {
            return Ok(());
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            m.wake.as_raw_fd(),
            EpollEvent::default(),
        );
        match result {
            Ok(summary) => {
                log::info!(
                    "migrated to {}: {:.0} ms of downtime, {:.1} MB in {} rounds over {:.2} s",
                    summary.to,
                    summary.downtime_ms,
                    summary.sent_bytes as f64 / 1e6,
                    summary.rounds,
                    summary.total_s
                );
                let to = summary.to.clone();
                m.tell(&MigrationEvent::Done { summary });
                self.latch.set(Outcome::Migrated(to));
            }
            Err(e) => {
                log::error!(
                    "migration to {} failed: {e}; the VM keeps running here",
                    m.options.to
                );
                if m.switched {
                    // Take the devices back; if the destination holds a disk, it may run
                    // the VM already: then this side must not.
                    for t in &self.devices {
                        let mut t = lock(t);
                        if let Err(err) = t.claim_host() {
                            let why = format!(
                                "{} is held by another process after the failed migration ({err}), maybe the destination running the VM",
                                t.name()
                            );
                            drop(t);
                            m.tell(&MigrationEvent::Failed { error: why.clone() });
                            self.latch.set(Outcome::Crash(why));
                            return Ok(());
                        }
                    }
                    if !m.was_paused {
                        if let Err(e) = self.resume(vcpus) {
                            log::error!("cannot resume after the failed migration: {e}");
                        }
                    }
                }
                m.tell(&MigrationEvent::Failed {
                    error: format!("{e}; the VM keeps running here"),
                });
            }
        }
        Ok(())
    }
}
