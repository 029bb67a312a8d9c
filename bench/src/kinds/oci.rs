//! OCI runtimes (runc, crun) running the workload's bundle: the workload's root file
//! system read-only, a network namespace of the slot's, the usual container
//! capabilities. Started detached (`run -d`), as container managers do, so the
//! instance is the container's processes; the runtime's own CPU time counts towards
//! its start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use wisp_image::process::Process;

use super::{runs_ok, spawn, Env, Kind, KindError, KindName};
use crate::instance::Instance;
use crate::netns::{Link, Slot};

/// Docker's default capability set.
const CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A runtime with runc's command line.
pub struct Oci {
    env: Env,
    program: &'static str,
    name: KindName,
    version: String,
    /// Run the runtime in a mount namespace of its own that shows the host's cgroup v2
    /// hierarchy at /sys/fs/cgroup: crun refuses hybrid hosts (cgroup v1 controllers
    /// next to a v2 hierarchy) but runs on the v2 part of them as on a v2 host.
    unified_view: bool,
}

/// A command running `program`: directly, or with `unified_view` in a mount namespace
/// that shows only the cgroup v2 hierarchy (see [`Oci`]).
fn wrapped(program: &'static str, unified_view: bool) -> Command {
    if !unified_view {
        return Command::new(program);
    }
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind /sys/fs/cgroup/unified /sys/fs/cgroup && exec \"$0\" \"$@\"",
        program,
    ]);
    cmd
}

/// A command running the OCI runtime `program` as the bench's container kinds do
/// (crun on a hybrid-cgroup host sees only the cgroup v2 hierarchy).
pub(crate) fn runtime_command(program: &'static str) -> Command {
    wrapped(program, program == "crun" && hybrid_cgroups())
}

/// Whether the host mounts cgroup v1 next to a cgroup v2 hierarchy with controllers
/// in it ("hybrid"), which crun refuses to manage.
fn hybrid_cgroups() -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .is_ok_and(|c| !c.trim().is_empty())
}

impl Oci {
    pub(super) fn new(env: &Env, program: &'static str, name: KindName) -> Result<Self, String> {
        runs_ok(program, "--version")?;
        let version = Command::new(program)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|t| t.lines().next().map(str::to_string))
            .unwrap_or_default();
        let unified_view = program == "crun" && hybrid_cgroups();
        Ok(Self {
            env: env.clone(),
            program,
            name,
            version,
            unified_view,
        })
    }

    /// A command running the runtime (see `unified_view`).
    fn command(&self) -> Command {
        wrapped(self.program, self.unified_view)
    }

    fn container_id(id: &str) -> String {
        format!("wisp-bench-{}-{id}", std::process::id())
    }

    /// The bundle's config.json: the workload's /init on its read-only root, with a
    /// tmpfs /tmp, a file-descriptor limit and Docker's masked and read-only /proc paths.
    fn config(&self, slot: &Slot) -> serde_json::Value {
        let netns = slot
            .container_ns_path()
            .map(|p| p.to_string_lossy().into_owned());
        let init = Process {
            args: vec!["/bin/sh".into(), "/init".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            terminal: false,
        };
        let mut config = bundle_config(&init, &self.env.workload.rootfs, true, netns);
        config["process"]["rlimits"] =
            json!([{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }]);
        if let Some(mounts) = config["mounts"].as_array_mut() {
            mounts.push(
                json!({ "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                                "options": ["nosuid", "nodev", "mode=1777"] }),
            );
        }
        config["linux"]["maskedPaths"] = json!([
            "/proc/kcore",
            "/proc/keys",
            "/proc/timer_list",
            "/sys/firmware"
        ]);
        config["linux"]["readonlyPaths"] = json!([
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger"
        ]);
        config
    }
}

/// What every bench container's config.json has: process `p` with Docker's default
/// capabilities and no new privileges, root `root`, /proc, /dev and /sys, and pid, ipc,
/// uts, mount and network namespaces (the one at `netns`, or a new one).
pub(crate) fn bundle_config(
    p: &Process,
    root: &Path,
    readonly: bool,
    netns: Option<String>,
) -> serde_json::Value {
    let network = match netns {
        Some(path) => json!({ "type": "network", "path": path }),
        None => json!({ "type": "network" }),
    };
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": p.uid, "gid": p.gid },
            "args": p.args,
            "env": p.env,
            "cwd": p.cwd,
            "capabilities": { "bounding": CAPS, "effective": CAPS, "permitted": CAPS },
            "noNewPrivileges": true
        },
        "root": { "path": root, "readonly": readonly },
        "hostname": "wisp-bench",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] }
        ],
        "linux": {
            "namespaces": [
                { "type": "pid" }, network, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }
            ]
        }
    })
}

impl Kind for Oci {
    fn name(&self) -> KindName {
        self.name
    }

    fn link(&self) -> Link {
        Link::Veth
    }

    fn runs(&self) -> String {
        let note = if self.unified_view {
            " (its cgroup in the v2 hierarchy of this hybrid-cgroup host)"
        } else {
            ""
        };
        format!("the host kernel; {}{note}", self.version)
    }

    fn start(&self, slot: &Slot, id: &str) -> Result<Instance, KindError> {
        let bundle = self.env.scratch.join(format!("bundle-{id}"));
        let write = |path: PathBuf| move |source| KindError::Write { path, source };
        std::fs::create_dir_all(&bundle).map_err(write(bundle.clone()))?;
        let config = bundle.join("config.json");
        std::fs::write(&config, self.config(slot).to_string()).map_err(write(config.clone()))?;
        let cid = Self::container_id(id);
        let pid_file = bundle.join("pid");
        let _ = std::fs::remove_file(&pid_file);
        // A container of an earlier, interrupted run with this id would be in the way.
        let _ = self.command().args(["delete", "--force", &cid]).output();
        let mut cmd = self.command();
        cmd.args(["run", "-d", "--bundle"])
            .arg(&bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(&cid);
        let mut inst = spawn(cmd, slot, false, self.program)?;
        let mut delete = self.command();
        delete.args(["delete", "--force", &cid]);
        inst.on_stop(delete);
        if let Err(why) = inst.detach(&pid_file, Duration::from_secs(60)) {
            inst.stop();
            return Err(KindError::Prepare(format!("{} run: {why}", self.program)));
        }
        Ok(inst)
    }
}
