//! The migration thread: started with the VM, before the VMM thread installs its
//! seccomp filter (a thread inherits its creator's filter, and the VMM thread's allows
//! neither thread creation nor connecting out), it waits for send jobs and runs them
//! one at a time under the "migrate" filter.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use super::send::SendJob;
use crate::seccomp::{self, Thread};

type Job = (SendJob, Sender<()>);

/// The migration thread's handle.
pub struct Worker {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread; it installs its filter before it waits for work.
    pub fn spawn() -> std::io::Result<Worker> {
        let (jobs, queue) = channel::<Job>();
        let (ready_tx, ready) = channel();
        let thread = std::thread::Builder::new()
            .name("migrate".into())
            .spawn(move || {
                let installed = seccomp::enter(Thread::Migrate).map_err(|e| e.to_string());
                let ok = installed.is_ok();
                let _ = ready_tx.send(installed);
                if ok {
                    serve(&queue);
                }
            })?;
        match ready.recv() {
            Ok(Ok(())) => Ok(Worker {
                jobs: Some(jobs),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(std::io::Error::other(e)),
            Err(_) => Err(std::io::Error::other("the migration thread ended at start")),
        }
    }

    /// Hands `job` to the thread; the receiver gets `()` when the job has ended.
    pub fn submit(&self, job: SendJob) -> Result<Receiver<()>, String> {
        let (done_tx, done) = channel();
        self.jobs
            .as_ref()
            .and_then(|j| j.send((job, done_tx)).ok())
            .ok_or("the migration thread is gone")?;
        Ok(done)
    }
}

fn serve(queue: &Receiver<Job>) {
    while let Ok((job, done)) = queue.recv() {
        job.run();
        let _ = done.send(());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
