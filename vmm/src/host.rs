//! The host's KVM: opening it with clear errors, and measuring whether guest kernel mode
//! runs in hardware or is emulated instruction by instruction (nested, software-assisted
//! KVM), with a tiny timing guest.

use std::path::Path;
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

/// The file in wisp's runtime directory that keeps the measured speed for one host boot.
const SPEED_CACHE: &str = "kernel-mode-speed";
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// The speed of guest kernel mode for `wisp run`: measured once per host boot and kept
/// in `cache_dir` (wisp's runtime directory) under the boot's id, so later runs start
/// without the timing guest; measured afresh when the cache is missing, from another
/// boot or unreadable (`wisp doctor` always measures). The flag says whether the
/// figure came from the cache.
pub fn kernel_mode_speed(
    kvm: &Kvm,
    iterations: u32,
    cache_dir: Option<&Path>,
) -> Result<(KernelModeSpeed, bool), HostError> {
    let boot_id = std::fs::read_to_string(BOOT_ID)
        .ok()
        .map(|s| s.trim().to_string());
    let cache = cache_dir.map(|d| d.join(SPEED_CACHE));
    if let (Some(path), Some(id)) = (&cache, &boot_id) {
        if let Some(speed) = read_cached_speed(path, id) {
            return Ok((speed, true));
        }
    }
    let speed = measure_kernel_mode(kvm, iterations)?;
    if let (Some(path), Some(id)) = (&cache, &boot_id) {
        if let Err(e) = write_cached_speed(path, id, &speed) {
            log::debug!(
                "cannot keep the kernel-mode speed in {}: {e}",
                path.display()
            );
        }
    }
    Ok((speed, false))
}

/// The speed cached for boot `id`, if the file holds one.
fn read_cached_speed(path: &Path, id: &str) -> Option<KernelModeSpeed> {
    let file = devices::host_file::open_regular(path).ok()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, 256), &mut text).ok()?;
    let (cached_id, ips) = text.trim().split_once(' ')?;
    let ips: f64 = ips.parse().ok()?;
    (cached_id == id && ips.is_finite() && ips > 0.0).then_some(KernelModeSpeed {
        instructions_per_sec: ips,
        elapsed: Duration::ZERO,
    })
}

/// Writes the cache whole (a new file renamed into place, mode 0600).
fn write_cached_speed(path: &Path, id: &str, speed: &KernelModeSpeed) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{id} {}", speed.instructions_per_sec)?;
    drop(f);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
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
    fn the_speed_is_cached_per_boot_and_only_read_back_for_that_boot() {
        let dir = std::env::temp_dir().join(format!("wisp-speed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(SPEED_CACHE);
        let speed = KernelModeSpeed {
            instructions_per_sec: 1.25e6,
            elapsed: Duration::from_millis(30),
        };
        write_cached_speed(&path, "boot-a", &speed).unwrap();
        let back = read_cached_speed(&path, "boot-a").unwrap();
        assert_eq!(back.instructions_per_sec, 1.25e6);
        assert!(back.emulated());
        assert!(read_cached_speed(&path, "boot-b").is_none(), "another boot");
        // Rewritten whole for a new boot; garbage is ignored.
        write_cached_speed(&path, "boot-b", &speed).unwrap();
        assert!(read_cached_speed(&path, "boot-a").is_none());
        for bad in ["", "boot-b", "boot-b x", "boot-b -1", "boot-b NaN"] {
            std::fs::write(&path, bad).unwrap();
            assert!(read_cached_speed(&path, "boot-b").is_none(), "{bad:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
