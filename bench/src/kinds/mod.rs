//! The kinds of instance the bench compares, each a way to run the same workload: wisp
//! (cold boot and restore), OCI runtimes (runc, crun), containerd (with runc, and with
//! wisp's shim, which makes the container a microVM), and other VMMs (QEMU's microvm
//! machine, Firecracker). A kind that is not installed, or cannot run here, is skipped
//! with a one-line note.

mod containerd;
mod firecracker;
pub(crate) mod oci;
mod qemu;
mod wisp;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use thiserror::Error;

use crate::instance::Instance;
use crate::netns::{Link, Slot, GUEST_IP, HOST_IP, NETMASK};
use crate::workload::Workload;

/// The kinds, in the order the bench reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KindName {
    /// `wisp run`: a cold boot of the workload guest.
    Wisp,
    /// `wisp restore` of a snapshot taken at the workload's ready point.
    WispRestore,
    /// runc running the workload's OCI bundle.
    Runc,
    /// crun running the same bundle.
    Crun,
    /// containerd (`ctr run`) running the workload's image with runc.
    ContainerdRunc,
    /// containerd (`ctr run --runtime io.containerd.wisp.v2`) running the same image
    /// as a wisp microVM, through wisp's shim.
    ContainerdWisp,
    /// QEMU `-M microvm` booting the same kernel and initramfs.
    QemuMicrovm,
    /// Firecracker booting the same kernel and initramfs.
    Firecracker,
}

impl KindName {
    /// Every kind.
    pub const ALL: [KindName; 8] = [
        KindName::Wisp,
        KindName::WispRestore,
        KindName::Runc,
        KindName::Crun,
        KindName::ContainerdRunc,
        KindName::ContainerdWisp,
        KindName::QemuMicrovm,
        KindName::Firecracker,
    ];

    /// The name on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            KindName::Wisp => "wisp",
            KindName::WispRestore => "wisp-restore",
            KindName::Runc => "runc",
            KindName::Crun => "crun",
            KindName::ContainerdRunc => "containerd-runc",
            KindName::ContainerdWisp => "containerd-wisp",
            KindName::QemuMicrovm => "qemu-microvm",
            KindName::Firecracker => "firecracker",
        }
    }

    /// The kind called `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Whether it is a virtual machine (its figures include a guest kernel).
    pub fn is_vm(self) -> bool {
        !matches!(
            self,
            KindName::Runc | KindName::Crun | KindName::ContainerdRunc
        )
    }
}

/// What every kind needs to run the workload.
#[derive(Clone, Debug)]
pub struct Env {
    /// The wisp binary.
    pub wisp: PathBuf,
    /// The default guest's kernel (wisp boots it).
    pub kernel: PathBuf,
    /// The kernel other VMMs boot: where guest kernel mode is emulated, the variant
    /// without the int3 self-test (they cannot deliver the #BP it needs); `None` when
    /// it is needed and missing.
    pub peer_kernel: Option<PathBuf>,
    /// The workload.
    pub workload: Workload,
    /// The kernel command line wisp would use (its defaults, and where guest kernel mode
    /// is emulated its additions), for the other VMMs.
    pub base_cmdline: String,
    /// Whether guest kernel mode is emulated on this host.
    pub emulated: bool,
    /// vCPUs of every VM.
    pub cpus: u32,
    /// RAM of every VM, MiB.
    pub memory_mib: u64,
    /// Scratch directory of this bench run (sockets, bundles, configs).
    pub scratch: PathBuf,
    /// wisp's test guest, for the VMMs' own start cost; `None` when it is not built.
    pub probe: Option<PathBuf>,
}

impl Env {
    /// The `ip=` word every VM gets: static address, no DHCP.
    pub fn ip_param() -> String {
        format!("ip={GUEST_IP}::{HOST_IP}:{NETMASK}::eth0:off")
    }
}

/// How an instance shows that it is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// The workload printed its marker.
    Marker,
    /// The first HTTP answer (a restored guest was ready before it was saved).
    FirstAnswer,
}

/// A kind could not start an instance.
#[derive(Debug, Error)]
pub enum KindError {
    /// The process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// The program.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A file the instance needs could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Preparing the kind failed (e.g. the snapshot to restore).
    #[error("{0}")]
    Prepare(String),
}

/// One way of running the workload.
pub trait Kind: Sync {
    /// Which kind.
    fn name(&self) -> KindName;
    /// How its instances attach to their slot.
    fn link(&self) -> Link {
        Link::Tap
    }
    /// What it runs, for the report (kernel and initramfs, or the host kernel).
    fn runs(&self) -> String;
    /// Done once before the first measurement, in a slot of the kind's (e.g. taking
    /// the snapshot to restore).
    fn prepare(&self, _slot: &Slot) -> Result<(), KindError> {
        Ok(())
    }
    /// Starts instance `id` in `slot`.
    fn start(&self, slot: &Slot, id: &str) -> Result<Instance, KindError>;
    /// How readiness shows.
    fn ready(&self) -> Ready {
        Ready::Marker
    }
    /// For a VMM: the size of its guest RAM mapping and, for a restore, the memory
    /// file mapped in its place, so its own share can be told apart.
    fn guest_ram(&self) -> Option<(u64, Option<PathBuf>)> {
        None
    }
    /// For a VMM that can boot wisp's probe guest: starts it with `probe.cmd=hello`
    /// (instance `id`, no network), to time the VMM's own start to the guest's first
    /// output ([`PROBE_MARKER`]), no kernel boot in it.
    fn start_probe(&self, _probe: &Path, _id: &str) -> Option<Result<Instance, KindError>> {
        None
    }
}

/// The probe guest's first output.
pub const PROBE_MARKER: &str = "probe: start";

/// Whether `program` can be run (found on PATH and answering `arg`).
pub(crate) fn runs_ok(program: &str, arg: &str) -> Result<(), String> {
    match Command::new(program).arg(arg).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "`{program} {arg}` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{program} is not installed"))
        }
        Err(e) => Err(format!("cannot run {program}: {e}")),
    }
}

/// The kernel other VMMs boot, or why there is none.
fn peer_kernel(env: &Env) -> Result<&Path, String> {
    env.peer_kernel.as_deref().ok_or_else(|| {
        "needs the kernel without the int3 self-test where guest kernel mode is emulated: \
         WISP_GUEST_INT3_PATCH=1 scripts/build-guest.sh builds target/guest/vmlinux-int3"
            .to_string()
    })
}

/// The kind `name`, ready to start instances, or why it is skipped.
pub fn detect(name: KindName, env: &Env) -> Result<Box<dyn Kind>, String> {
    Ok(match name {
        KindName::Wisp => Box::new(wisp::Wisp::new(env)),
        KindName::WispRestore => Box::new(wisp::WispRestore::new(env)),
        KindName::Runc => Box::new(oci::Oci::new(env, "runc", KindName::Runc)?),
        KindName::Crun => Box::new(oci::Oci::new(env, "crun", KindName::Crun)?),
        KindName::ContainerdRunc | KindName::ContainerdWisp => {
            Box::new(containerd::CtrRun::new(env, name)?)
        }
        KindName::QemuMicrovm => Box::new(qemu::QemuMicrovm::new(env, peer_kernel(env)?)?),
        KindName::Firecracker => Box::new(firecracker::Firecracker::new(env, peer_kernel(env)?)?),
    })
}

/// Spawns `cmd` for a probe guest `what`, outside any slot.
fn spawn_probe(cmd: Command, what: &str) -> Result<Instance, KindError> {
    Instance::spawn(cmd, PROBE_MARKER).map_err(|source| KindError::Spawn {
        what: what.to_string(),
        source,
    })
}

/// Spawns `cmd` for instance `what`, inside `slot` when `in_slot`.
fn spawn(mut cmd: Command, slot: &Slot, in_slot: bool, what: &str) -> Result<Instance, KindError> {
    if in_slot {
        slot.enter_on_spawn(&mut cmd);
    }
    Instance::spawn(cmd, crate::workload::READY_MARKER).map_err(|source| KindError::Spawn {
        what: what.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in KindName::ALL {
            assert_eq!(KindName::parse(k.as_str()), Some(k));
        }
        assert_eq!(KindName::parse("docker-desktop"), None);
        assert!(KindName::Wisp.is_vm() && !KindName::Runc.is_vm());
        assert!(KindName::ContainerdWisp.is_vm() && !KindName::ContainerdRunc.is_vm());
        assert_eq!(
            KindName::parse("containerd-wisp"),
            Some(KindName::ContainerdWisp)
        );
    }

    #[test]
    fn a_missing_program_is_a_note() {
        let e = runs_ok("wisp-bench-no-such-program", "--version").unwrap_err();
        assert_eq!(e, "wisp-bench-no-such-program is not installed");
    }
}
