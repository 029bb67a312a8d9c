//! Firecracker (when `firecracker` is on PATH) booting the same kernel, initramfs and
//! command line as wisp, configured from a file (no API socket), with a network card on
//! the slot's TAP. Its seccomp filters are off (`--no-seccomp`), as wisp has none yet:
//! like for like, and a build for the gnu target cannot use them anyway.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use super::{runs_ok, spawn, spawn_probe, Env, Kind, KindError, KindName};
use crate::instance::Instance;
use crate::netns::{Slot, TAP};

/// `firecracker --no-api --config-file`.
pub struct Firecracker {
    env: Env,
    kernel: PathBuf,
}

impl Firecracker {
    pub(super) fn new(env: &Env, kernel: &Path) -> Result<Self, String> {
        runs_ok("firecracker", "--version")?;
        Ok(Self {
            env: env.clone(),
            kernel: kernel.to_path_buf(),
        })
    }
}

impl Kind for Firecracker {
    fn name(&self) -> KindName {
        KindName::Firecracker
    }

    fn runs(&self) -> String {
        format!(
            "{} + workload initramfs (seccomp off)",
            self.kernel.display()
        )
    }

    fn start(&self, slot: &Slot, id: &str) -> Result<Instance, KindError> {
        let e = &self.env;
        let config = json!({
            "boot-source": {
                "kernel_image_path": self.kernel,
                "initrd_path": e.workload.initramfs,
                "boot_args": format!("{} {}", e.base_cmdline, Env::ip_param()),
            },
            "drives": [],
            "machine-config": { "vcpu_count": e.cpus, "mem_size_mib": e.memory_mib },
            "network-interfaces": [{ "iface_id": "eth0", "host_dev_name": TAP }]
        });
        spawn(self.command(id, &config)?, slot, true, "firecracker")
    }

    fn start_probe(&self, probe: &Path, id: &str) -> Option<Result<Instance, KindError>> {
        let e = &self.env;
        let config = json!({
            "boot-source": { "kernel_image_path": probe, "boot_args": "probe.cmd=hello" },
            "drives": [],
            "machine-config": { "vcpu_count": e.cpus, "mem_size_mib": e.memory_mib }
        });
        Some(
            self.command(id, &config)
                .and_then(|cmd| spawn_probe(cmd, "firecracker")),
        )
    }
}

impl Firecracker {
    /// `firecracker` configured by `config`, written to a file for instance `id`.
    fn command(&self, id: &str, config: &serde_json::Value) -> Result<Command, KindError> {
        let path = self.env.scratch.join(format!("firecracker-{id}.json"));
        std::fs::write(&path, config.to_string()).map_err(|source| KindError::Write {
            path: path.clone(),
            source,
        })?;
        let mut cmd = Command::new("firecracker");
        cmd.args([
            "--no-api",
            "--no-seccomp",
            "--level",
            "Error",
            "--config-file",
        ])
        .arg(&path);
        Ok(cmd)
    }
}
