//! wisp itself: a cold boot of the workload guest, and a restore of a snapshot taken at
//! its ready point (the start a serverless platform would use).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::{spawn, spawn_probe, Env, Kind, KindError, KindName, Ready};
use crate::instance::Instance;
use crate::netns::{Link, Slot, TAP};

/// How long a cold boot may take before the bench gives up on it.
pub(crate) const BOOT_LIMIT: Duration = Duration::from_secs(300);

/// `wisp run` of the workload.
pub struct Wisp {
    env: Env,
}

impl Wisp {
    pub(super) fn new(env: &Env) -> Self {
        Self { env: env.clone() }
    }

    fn command(&self, id: &str) -> Command {
        let e = &self.env;
        let mut cmd = Command::new(&e.wisp);
        cmd.arg("run")
            .arg("--kernel")
            .arg(&e.kernel)
            .arg("--initrd")
            .arg(&e.workload.initramfs)
            .args(["--cpus", &e.cpus.to_string()])
            .args(["--memory", &e.memory_mib.to_string()])
            .args(["--net", &format!("tap={TAP}")])
            .args(["--name", &format!("bench-{id}")])
            .arg("--api")
            .arg(e.scratch.join(format!("{id}.sock")))
            .args(["--cmdline", &Env::ip_param()]);
        cmd
    }
}

impl Kind for Wisp {
    fn name(&self) -> KindName {
        KindName::Wisp
    }

    fn runs(&self) -> String {
        format!("{} + workload initramfs", self.env.kernel.display())
    }

    fn start(&self, slot: &Slot, id: &str) -> Result<Instance, KindError> {
        spawn(self.command(id), slot, true, "wisp run")
    }

    fn guest_ram(&self) -> Option<(u64, Option<PathBuf>)> {
        Some((self.env.memory_mib << 20, None))
    }

    fn start_probe(&self, probe: &Path, id: &str) -> Option<Result<Instance, KindError>> {
        let e = &self.env;
        let mut cmd = Command::new(&e.wisp);
        cmd.arg("run")
            .arg("--kernel")
            .arg(probe)
            .args(["--cpus", &e.cpus.to_string()])
            .args(["--memory", &e.memory_mib.to_string()])
            .args(["--name", &format!("bench-{id}")])
            .args(["--cmdline", "probe.cmd=hello"]);
        Some(spawn_probe(cmd, "wisp run"))
    }
}

/// `wisp restore` of the workload guest, snapshotted once per bench right after it
/// printed its ready marker.
pub struct WispRestore {
    boot: Wisp,
    snapshot: OnceLock<PathBuf>,
}

impl WispRestore {
    pub(super) fn new(env: &Env) -> Self {
        Self {
            boot: Wisp::new(env),
            snapshot: OnceLock::new(),
        }
    }

    fn dir(&self) -> Result<&PathBuf, KindError> {
        self.snapshot
            .get()
            .ok_or_else(|| KindError::Prepare("no snapshot was taken".into()))
    }
}

impl Kind for WispRestore {
    fn name(&self) -> KindName {
        KindName::WispRestore
    }

    fn link(&self) -> Link {
        Link::Tap
    }

    fn runs(&self) -> String {
        format!("a snapshot of `{}`", self.boot.runs())
    }

    /// Boots the workload in `slot` and snapshots it at its ready point (`--stop`), once.
    fn prepare(&self, slot: &Slot) -> Result<(), KindError> {
        if self.snapshot.get().is_some() {
            return Ok(());
        }
        let dir = self.boot.env.scratch.join("snapshot");
        let id = "snapshot-source";
        let mut inst = spawn(self.boot.command(id), slot, true, "wisp run")?;
        if let Err(why) = inst.wait_marker(BOOT_LIMIT) {
            inst.stop();
            return Err(KindError::Prepare(format!(
                "booting the guest to snapshot: {why}"
            )));
        }
        let sock = self.boot.env.scratch.join(format!("{id}.sock"));
        let out = Command::new(&self.boot.env.wisp)
            .arg("snapshot")
            .arg(&sock)
            .arg("--to")
            .arg(&dir)
            .arg("--stop")
            .stdin(Stdio::null())
            .output();
        let waited = inst.wait_exit(Duration::from_secs(60));
        inst.stop();
        match out {
            Ok(o) if o.status.success() && waited => {}
            Ok(o) => {
                return Err(KindError::Prepare(format!(
                    "wisp snapshot failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )))
            }
            Err(source) => {
                return Err(KindError::Spawn {
                    what: "wisp snapshot".into(),
                    source,
                })
            }
        }
        let _ = self.snapshot.set(dir);
        Ok(())
    }

    fn start(&self, slot: &Slot, id: &str) -> Result<Instance, KindError> {
        let mut cmd = Command::new(&self.boot.env.wisp);
        cmd.arg("restore")
            .arg(self.dir()?)
            .args(["--net", &format!("tap={TAP}")])
            .args(["--name", &format!("bench-{id}")])
            .arg("--api")
            .arg(self.boot.env.scratch.join(format!("{id}.sock")));
        spawn(cmd, slot, true, "wisp restore")
    }

    fn ready(&self) -> Ready {
        Ready::FirstAnswer
    }

    fn guest_ram(&self) -> Option<(u64, Option<PathBuf>)> {
        let file = self.snapshot.get().map(|d| d.join("memory"));
        Some((self.boot.env.memory_mib << 20, file))
    }
}
