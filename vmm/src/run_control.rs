//! Pausing and stopping the vCPU threads at a consistent point.
//!
//! Each vCPU thread calls [`RunControl::checkpoint`] between two KVM_RUNs. To pause,
//! the VMM thread raises the request, kicks every vCPU out of KVM_RUN (SIGRTMIN plus
//! `immediate_exit`, see vcpu.rs) and waits until each one has parked in its checkpoint
//! (or exited). Parked vCPUs are outside KVM_RUN with their exits fully handled, so the
//! vCPU state is consistent for reading.
//!
//! A parked vCPU also serves save requests: KVM wants vCPU ioctls issued by the vCPU's
//! own thread, so [`VcpuThreads::save_states`] asks every parked thread to read its
//! state and waits for the answers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::arch::vcpu_state::VcpuState;
use crate::vcpu::VcpuError;

/// Why the vCPUs' states could not be collected.
#[derive(Debug, Error)]
pub enum SaveStatesError {
    /// Saving needs parked vCPUs.
    #[error("the vCPUs are not paused")]
    NotPaused,
    /// A vCPU thread has ended.
    #[error("a vCPU has stopped (the guest is shutting down)")]
    Exiting,
    /// Not every vCPU answered in time.
    #[error("the vCPUs did not report their state within {0:?}")]
    Timeout(Duration),
    /// A vCPU could not read its state.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

/// What a parked vCPU answered to a save request.
type Saved = Result<VcpuState, VcpuError>;

#[derive(Default)]
struct State {
    stop: bool,
    pause: bool,
    parked: usize,
    exited: usize,
    /// Bumped for every save request; parked vCPUs answer each one once.
    save_seq: u64,
    /// Answers to the current save request, by vCPU index.
    saved: Vec<Option<Saved>>,
}

/// Shared between the VMM thread and the vCPU threads.
#[derive(Default)]
pub struct RunControl {
    /// Fast path for vCPUs: set whenever `stop` or `pause` is.
    attention: AtomicBool,
    state: Mutex<State>,
    cond: Condvar,
}

impl RunControl {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// vCPU side, between two KVM_RUNs: parks while a pause is requested, answering
    /// save requests for vCPU `index` with `save`. Returns false when the thread must
    /// stop.
    pub fn checkpoint(&self, index: usize, save: &mut dyn FnMut() -> Saved) -> bool {
        if !self.attention.load(Ordering::Acquire) {
            return true;
        }
        let mut s = self.lock();
        if s.pause && !s.stop {
            s.parked += 1;
            let mut answered = s.save_seq;
            self.cond.notify_all();
            while s.pause && !s.stop {
                if s.save_seq != answered {
                    answered = s.save_seq;
                    drop(s);
                    let state = save();
                    s = self.lock();
                    if s.save_seq == answered {
                        if let Some(slot) = s.saved.get_mut(index) {
                            *slot = Some(state);
                        }
                        self.cond.notify_all();
                    }
                    continue;
                }
                s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.parked -= 1;
        }
        !s.stop
    }

    /// VMM side, while paused: asks every parked vCPU for its state and waits for all
    /// `count` answers. A vCPU that has exited (the guest powered off meanwhile) never
    /// answers, which ends in a timeout error.
    pub fn save_states(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, SaveStatesError> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        if !s.pause || s.stop {
            return Err(SaveStatesError::NotPaused);
        }
        if s.exited > 0 {
            return Err(SaveStatesError::Exiting);
        }
        s.save_seq += 1;
        s.saved = (0..count).map(|_| None).collect();
        self.cond.notify_all();
        while s.saved.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || s.exited > 0 {
                return Err(SaveStatesError::Timeout(timeout));
            }
            s = self
                .cond
                .wait_timeout(s, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let saved = std::mem::take(&mut s.saved);
        saved
            .into_iter()
            .flatten()
            .map(|r| r.map_err(SaveStatesError::from))
            .collect()
    }

    /// vCPU side: the thread is leaving (stop, guest exit or crash).
    pub fn exited(&self) {
        let mut s = self.lock();
        s.exited += 1;
        self.cond.notify_all();
    }

    /// Asks every vCPU to park at its next checkpoint (the caller then kicks them).
    pub fn request_pause(&self) {
        self.lock().pause = true;
        self.attention.store(true, Ordering::Release);
    }

    /// Waits until all `count` vCPUs are parked or gone; false on timeout.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while s.parked + s.exited < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .cond
                .wait_timeout(s, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        true
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let mut s = self.lock();
        s.pause = false;
        if !s.stop {
            self.attention.store(false, Ordering::Release);
        }
        self.cond.notify_all();
    }

    /// Asks every vCPU to stop (the caller then kicks them).
    pub fn stop(&self) {
        self.lock().stop = true;
        self.attention.store(true, Ordering::Release);
        self.cond.notify_all();
    }
}

/// The running vCPU threads and their control.
pub struct VcpuThreads {
    control: std::sync::Arc<RunControl>,
    threads: Vec<std::thread::JoinHandle<()>>,
    count: usize,
}

/// How long a pause may take before it is reported as failed.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

impl VcpuThreads {
    /// Threads that `control` governs; `count` is how many vCPUs the VM has.
    pub fn new(control: std::sync::Arc<RunControl>, count: usize) -> Self {
        Self {
            control,
            threads: Vec::with_capacity(count),
            count,
        }
    }

    /// Adds a spawned thread.
    pub fn push(&mut self, t: std::thread::JoinHandle<()>) {
        self.threads.push(t);
    }

    fn kick(&self) {
        use vmm_sys_util::signal::Killable;
        for t in &self.threads {
            // A thread that already exited cannot be signalled; nothing to do then.
            let _ = t.kill(crate::vcpu::kick_signal());
        }
    }

    /// Stops every vCPU at a consistent point and waits until all have parked.
    pub fn pause(&self) -> bool {
        self.control.request_pause();
        self.kick();
        let ok = self.control.wait_parked(self.count, PAUSE_TIMEOUT);
        if !ok {
            self.control.resume();
        }
        ok
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.control.resume();
    }

    /// Every vCPU's state (the vCPUs must be paused).
    pub fn save_states(&self) -> Result<Vec<VcpuState>, SaveStatesError> {
        self.control.save_states(self.count, PAUSE_TIMEOUT)
    }

    /// Stops every vCPU thread and joins it.
    pub fn stop(self) {
        self.control.stop();
        self.kick();
        for t in self.threads {
            if t.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    fn no_save() -> Saved {
        Err(VcpuError::Spawn(0, std::io::ErrorKind::Unsupported.into()))
    }

    #[test]
    fn pause_parks_every_thread_and_resume_releases_them() {
        let c = Arc::new(RunControl::default());
        let work = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (c, work) = (c.clone(), work.clone());
                std::thread::spawn(move || {
                    while c.checkpoint(0, &mut no_save) {
                        work.fetch_add(1, Ordering::Relaxed);
                        std::thread::yield_now();
                    }
                    c.exited();
                })
            })
            .collect();
        c.request_pause();
        assert!(c.wait_parked(3, Duration::from_secs(10)));
        let frozen = work.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            work.load(Ordering::Relaxed),
            frozen,
            "no progress while paused"
        );
        c.resume();
        let t0 = Instant::now();
        while work.load(Ordering::Relaxed) == frozen {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no progress after resume"
            );
            std::thread::yield_now();
        }
        c.stop();
        for t in threads {
            t.join().unwrap();
        }
        // Gone threads count as parked: a later pause does not wait for them.
        c.request_pause();
        assert!(c.wait_parked(3, Duration::from_millis(10)));
    }

    #[test]
    fn stop_releases_parked_threads() {
        let c = Arc::new(RunControl::default());
        let c2 = c.clone();
        c.request_pause();
        let t = std::thread::spawn(move || c2.checkpoint(0, &mut no_save));
        assert!(c.wait_parked(1, Duration::from_secs(10)));
        c.stop();
        assert!(!t.join().unwrap());
    }
}
