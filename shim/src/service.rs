//! The shim v2 task service containerd talks to (ttrpc, `containerd.task.v2.Task`),
//! over [`Container`]: one shim process per container, one VM per container. Every
//! state change is published to containerd as its task event.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim::api::{self, Empty};
use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExit, TaskIO, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status as TaskStatus};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, TtrpcContext, TtrpcResult};

use crate::container::{self, Container, ContainerError, Status, Stdio3};

/// How the crate runs the shim: it waits for its own children (wisp, `ip`), since the
/// crate's reaper would take every exit with waitpid(-1) and leave std's waits with
/// ECHILD; orphans (a dead wisp's helpers) go to containerd, the next subreaper up.
pub fn config() -> Config {
    Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    }
}

/// The shim.
#[derive(Clone)]
pub struct Service {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
    bundle: String,
    /// This shim's ttrpc socket (`unix:///run/containerd/s/...`), empty for `start`
    /// and `delete`.
    socket: String,
    /// containerd's address (`-address`).
    address: String,
    containers: Arc<Mutex<HashMap<String, Arc<Container>>>>,
    publisher: Option<Arc<RemotePublisher>>,
}

fn status(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn failed(e: ContainerError) -> ttrpc::Error {
    let code = match e {
        ContainerError::State(_) => Code::FAILED_PRECONDITION,
        ContainerError::Bundle(_) => Code::INVALID_ARGUMENT,
        _ => Code::UNKNOWN,
    };
    status(code, format!("wisp: {e}"))
}

fn unsupported(what: &str) -> ttrpc::Error {
    status(Code::UNIMPLEMENTED, format!("wisp: {what}"))
}

fn timestamp(t: Option<SystemTime>) -> MessageField<Timestamp> {
    let Some(t) = t else {
        return MessageField::none();
    };
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    MessageField::some(Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    })
}

fn no_exec(exec_id: &str) -> TtrpcResult<()> {
    if exec_id.is_empty() {
        Ok(())
    } else {
        Err(unsupported(
            "exec is not supported: the guest's init runs the container's one process",
        ))
    }
}

impl Service {
    fn get(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        let map = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("wisp: no task {id}")))
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Some(p) = &self.publisher {
            if let Err(e) = p.publish(Default::default(), topic, &self.namespace, event) {
                log::warn!("cannot publish {topic}: {e}");
            }
        }
    }
}

impl containerd_shim::Shim for Service {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            socket: args.socket.clone(),
            address: args.address.clone(),
            containers: Arc::new(Mutex::new(HashMap::new())),
            publisher: None,
        }
    }

    fn start_shim(&mut self, opts: containerd_shim::StartOpts) -> containerd_shim::Result<String> {
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            self.bundle.clone().into()
        };
        let pid = container::cleanup_after_crash(&self.namespace, &self.id, Path::new(&bundle));
        // The dead shim's socket, where containerd 1.6 names it: /run/containerd/s/ and
        // the SHA-256 of ADDRESS/NAMESPACE/ID.
        let key = format!("{}/{}/{}", self.address, self.namespace, self.id);
        let socket = format!(
            "/run/containerd/s/{}",
            wisp_image::digest::sha256_of(key.as_bytes())
        );
        container::remove_socket(&socket, false);
        Ok(DeleteResponse {
            pid,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: timestamp(Some(SystemTime::now())),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
        // The crate removes the socket named in the bundle's `address` file, which
        // containerd has deleted with the bundle by now: the socket would stay behind.
        container::remove_socket(&self.socket, true);
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        Service {
            publisher: Some(Arc::new(publisher)),
            ..self.clone()
        }
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(unsupported("restoring a checkpoint is not supported"));
        }
        let stdio = Stdio3 {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let c = Container::create(
            &self.namespace,
            &req.id,
            Path::new(&req.bundle),
            &req.rootfs,
            stdio,
        )
        .map_err(failed)?;
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.id.clone(), Arc::new(c));
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin,
                    stdout: req.stdout,
                    stderr: req.stderr,
                    terminal: req.terminal,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse::default())
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        no_exec(&req.exec_id)?;
        let c = self.get(&req.id)?;
        let started = c.start();
        // Whether it started or died at once, its exit becomes a TaskExit.
        let me = self.clone();
        let waited = Arc::clone(&c);
        std::thread::spawn(move || {
            let (code, at) = waited.wait();
            let (_, pid, _, _) = waited.state();
            me.publish(
                topics::TASK_EXIT_EVENT_TOPIC,
                Box::new(TaskExit {
                    container_id: waited.id.clone(),
                    id: waited.id.clone(),
                    pid,
                    exit_status: code,
                    exited_at: timestamp(at),
                    ..Default::default()
                }),
            );
        });
        let pid = started.map_err(failed)?;
        self.publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: req.id,
                pid,
                ..Default::default()
            }),
        );
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        no_exec(&req.exec_id)?;
        let c = self.get(&req.id)?;
        let (st, pid, exit_status, exited_at) = c.state();
        let status = match st {
            Status::Created => TaskStatus::CREATED,
            Status::Running => TaskStatus::RUNNING,
            Status::Paused => TaskStatus::PAUSED,
            Status::Stopped => TaskStatus::STOPPED,
        };
        Ok(api::StateResponse {
            id: c.id.clone(),
            bundle: c.bundle.display().to_string(),
            pid,
            status: status.into(),
            stdin: c.stdio.stdin.clone(),
            stdout: c.stdio.stdout.clone(),
            stderr: c.stdio.stderr.clone(),
            terminal: c.stdio.terminal,
            exit_status,
            exited_at: timestamp(exited_at),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        no_exec(&req.exec_id)?;
        let c = self.get(&req.id)?;
        let (exit_status, at) = c.wait();
        Ok(api::WaitResponse {
            exit_status,
            exited_at: timestamp(at),
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        no_exec(&req.exec_id)?;
        self.get(&req.id)?.kill(req.signal).map_err(failed)?;
        Ok(Empty::default())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        no_exec(&req.exec_id)?;
        let c = self.get(&req.id)?;
        c.cleanup().map_err(failed)?;
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.id);
        let (_, pid, exit_status, at) = c.state();
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: c.id.clone(),
                id: c.id.clone(),
                pid,
                exit_status,
                exited_at: timestamp(at),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid,
            exit_status,
            exited_at: timestamp(at),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let (_, pid, _, _) = self.get(&req.id)?.state();
        let processes = (pid != 0)
            .then(|| ProcessInfo {
                pid,
                ..Default::default()
            })
            .into_iter()
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        self.get(&req.id)?.pause(true).map_err(failed)?;
        self.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id: req.id,
                ..Default::default()
            }),
        );
        Ok(Empty::default())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        self.get(&req.id)?.pause(false).map_err(failed)?;
        self.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id: req.id,
                ..Default::default()
            }),
        );
        Ok(Empty::default())
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let (total, user, kernel, rss, limit) = self.get(&req.id)?.usage().map_err(failed)?;
        let metrics = Metrics {
            cpu: MessageField::some(CPUStat {
                usage: MessageField::some(CPUUsage {
                    total,
                    user,
                    kernel,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                rss,
                usage: MessageField::some(MemoryEntry {
                    usage: rss,
                    limit,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| status(Code::INTERNAL, e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.get(&req.id).map(|c| c.state().1).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        let empty = self
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if empty {
            self.exit.signal();
        }
        Ok(Empty::default())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        // The guest's serial console has no end of file: the process keeps its input
        // open (README). Nothing else to close.
        self.get(&req.id)?;
        log::info!(
            "{}: stdin closed by containerd (the guest sees no end of file)",
            req.id
        );
        Ok(Empty::default())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, _req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        Err(unsupported(
            "resizing the terminal is not supported: the guest's serial console has no window size",
        ))
    }

    fn exec(&self, _ctx: &TtrpcContext, _req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        Err(unsupported(
            "exec is not supported: the guest's init runs the container's one process",
        ))
    }

    fn update(&self, _ctx: &TtrpcContext, _req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        Err(unsupported(
            "updating resources is not supported: vCPUs and memory are fixed when the VM starts",
        ))
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(unsupported(
            "checkpoints are not supported through containerd yet",
        ))
    }
}
