//! QEMU's microvm machine booting the same kernel, initramfs and command line as wisp,
//! with a virtio-mmio network card on the slot's TAP.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{runs_ok, spawn, Env, Kind, KindError, KindName};
use crate::instance::Instance;
use crate::netns::{Slot, TAP};

const QEMU: &str = "qemu-system-x86_64";

/// `qemu-system-x86_64 -M microvm`.
pub struct QemuMicrovm {
    env: Env,
    kernel: PathBuf,
}

impl QemuMicrovm {
    pub(super) fn new(env: &Env, kernel: &Path) -> Result<Self, String> {
        runs_ok(QEMU, "--version")?;
        Ok(Self {
            env: env.clone(),
            kernel: kernel.to_path_buf(),
        })
    }
}

impl Kind for QemuMicrovm {
    fn name(&self) -> KindName {
        KindName::QemuMicrovm
    }

    fn runs(&self) -> String {
        format!("{} + workload initramfs", self.kernel.display())
    }

    fn start(&self, slot: &Slot, _id: &str) -> Result<Instance, KindError> {
        let e = &self.env;
        // Where kernel mode is emulated, the guest must not send IPIs or yield by
        // hypercall (the emulator cannot complete a VMCALL); wisp hides the same bits.
        let cpu = if e.emulated {
            "host,kvm-pv-ipi=off,kvm-pv-sched-yield=off,kvm-pv-unhalt=off"
        } else {
            "host"
        };
        let mut cmd = Command::new(QEMU);
        cmd.args(["-M", "microvm", "-enable-kvm", "-cpu", cpu])
            .args(["-m", &e.memory_mib.to_string()])
            .args(["-smp", &e.cpus.to_string()])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&e.workload.initramfs)
            .args([
                "-append",
                &format!("{} {}", e.base_cmdline, Env::ip_param()),
            ])
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={TAP},script=no,downscript=no"),
                "-device",
                "virtio-net-device,netdev=n0",
            ]);
        spawn(cmd, slot, true, QEMU)
    }
}
