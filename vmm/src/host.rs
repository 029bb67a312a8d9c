//! The host's KVM: opening it with clear errors, and measuring whether guest kernel mode
//! runs in hardware or is emulated instruction by instruction (nested, software-assisted
//! KVM), with a tiny timing guest.

use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm, VcpuExit};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::KVM_TSS_ADDRESS;
use crate::arch::regs::{boot_regs, setup_sregs, EntryPoint};
use crate::memory;

/// Guest kernel mode slower than this (instructions per second) is software-emulated.
/// Hardware virtualization runs billions; the emulators seen so far run about a million.
pub const EMULATION_THRESHOLD: f64 = 100e6;

const MARKER_PORT: u16 = 0x80;
const CODE_START: u64 = 0x10000;
const PROBE_MEM: u64 = 1 << 20;

/// Errors opening or probing KVM.
#[derive(Debug, Error)]
pub enum HostError {
    /// /dev/kvm is missing.
    #[error("/dev/kvm does not exist: KVM is not available here (enable virtualization in the firmware or load the kvm_intel/kvm_amd module)")]
    NoKvm,
    /// /dev/kvm is not accessible.
    #[error("no permission to open /dev/kvm: add your user to the 'kvm' group (sudo usermod -aG kvm $USER, then log in again) or run as root")]
    KvmPermission,
    /// Other open failures.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(kvm_ioctls::Error),
    /// An ioctl failed while probing.
    #[error("KVM timing probe failed at {0}: {1}")]
    Probe(&'static str, String),
}

/// KVM capabilities `wisp run` cannot work without, with a short description.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::UserMemory, "user memory slots"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::ExtCpuid, "CPUID"),
    (Cap::ImmediateExit, "immediate exit"),
];

/// Capabilities that snapshot and migration rely on.
pub const STATE_CAPS: &[(Cap, &str)] = &[
    (Cap::VcpuEvents, "vCPU events"),
    (Cap::Xsave, "XSAVE state"),
    (Cap::Xcrs, "XCRs"),
    (Cap::Debugregs, "debug registers"),
    (Cap::AdjustClock, "KVM clock"),
    (Cap::MpState, "MP state"),
];

/// The capabilities of `caps` (e.g. [`REQUIRED_CAPS`]) this host lacks.
pub fn missing_caps(kvm: &Kvm, caps: &[(Cap, &'static str)]) -> Vec<&'static str> {
    caps.iter()
        .filter(|(cap, _)| !kvm.check_extension(*cap))
        .map(|(_, name)| *name)
        .collect()
}

/// Opens /dev/kvm.
pub fn open_kvm() -> Result<Kvm, HostError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => HostError::NoKvm,
        libc::EACCES | libc::EPERM => HostError::KvmPermission,
        _ => HostError::KvmOpen(e),
    })
}

/// How fast guest kernel mode runs.
#[derive(Clone, Copy, Debug)]
pub struct KernelModeSpeed {
    /// Measured guest instructions per second in 64-bit CPL0.
    pub instructions_per_sec: f64,
    /// How long the measured loop took.
    pub elapsed: Duration,
}

impl KernelModeSpeed {
    /// True when guest kernel mode is emulated in software.
    pub fn emulated(&self) -> bool {
        self.instructions_per_sec < EMULATION_THRESHOLD
    }
}

/// The timing guest: two port writes around a `dec ecx; jnz` loop of `iterations`.
fn timing_code(iterations: u32) -> Vec<u8> {
    let mut code = vec![0xe6, MARKER_PORT as u8]; // out 0x80, al
    code.push(0xb9); // mov ecx, imm32
    code.extend_from_slice(&iterations.to_le_bytes());
    code.extend_from_slice(&[0xff, 0xc9]); // dec ecx
    code.extend_from_slice(&[0x75, 0xfc]); // jnz -4
    code.extend_from_slice(&[0xe6, MARKER_PORT as u8, 0xf4]); // out 0x80, al; hlt
    code
}

fn probe_err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> HostError {
    move |e| HostError::Probe(what, e.to_string())
}

/// Runs `iterations` loop iterations (2 instructions each) in 64-bit guest kernel mode
/// and times them between two port-I/O exits.
pub fn measure_kernel_mode(kvm: &Kvm, iterations: u32) -> Result<KernelModeSpeed, HostError> {
    // `mem` is declared before `vm` so that it is dropped after it.
    let mem = memory::create(PROBE_MEM).map_err(probe_err("allocating memory"))?;
    let vm = kvm.create_vm().map_err(probe_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(probe_err("KVM_SET_TSS_ADDR"))?;
    memory::register(&vm, &mem).map_err(probe_err("registering memory"))?;
    mem.write_slice(&timing_code(iterations), GuestAddress(CODE_START))
        .map_err(probe_err("writing code"))?;

    let mut vcpu = vm.create_vcpu(0).map_err(probe_err("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(probe_err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(probe_err("KVM_SET_CPUID2"))?;
    let entry = EntryPoint::Linux64(CODE_START);
    let mut sregs = vcpu.get_sregs().map_err(probe_err("KVM_GET_SREGS"))?;
    setup_sregs(&mem, entry, &mut sregs).map_err(probe_err("long mode set-up"))?;
    vcpu.set_sregs(&sregs).map_err(probe_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(probe_err("KVM_SET_REGS"))?;

    let mut start = None;
    loop {
        match vcpu.run().map_err(probe_err("KVM_RUN"))? {
            VcpuExit::IoOut(MARKER_PORT, _) => match start {
                None => start = Some(Instant::now()),
                Some(t0) => {
                    let elapsed: Duration = t0.elapsed();
                    let secs = elapsed.as_secs_f64().max(1e-9);
                    return Ok(KernelModeSpeed {
                        instructions_per_sec: 2.0 * f64::from(iterations) / secs,
                        elapsed,
                    });
                }
            },
            other => {
                return Err(HostError::Probe(
                    "running the timing guest",
                    format!("{other:?}"),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_code_shape() {
        let c = timing_code(0x1234);
        assert_eq!(&c[..2], &[0xe6, 0x80]);
        assert_eq!(&c[3..7], &0x1234u32.to_le_bytes());
        // The jnz jumps back exactly onto the dec.
        assert_eq!(&c[7..11], &[0xff, 0xc9, 0x75, 0xfc]);
        assert_eq!(c.last(), Some(&0xf4));
    }

    #[test]
    fn threshold_classifies() {
        let emu = KernelModeSpeed {
            instructions_per_sec: 1.3e6,
            elapsed: Duration::ZERO,
        };
        let hw = KernelModeSpeed {
            instructions_per_sec: 3e9,
            elapsed: Duration::ZERO,
        };
        assert!(emu.emulated());
        assert!(!hw.emulated());
    }
}
