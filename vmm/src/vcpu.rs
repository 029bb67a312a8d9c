//! One vCPU: its KVM set-up and the thread that runs it.
//!
//! Exits are served on the vCPU thread: port I/O and MMIO go to the buses, guest stop
//! requests and crashes go to the [`ExitLatch`]. The VMM thread stops a vCPU by setting
//! the shared stop flag and sending it [`kick_signal`]; the signal handler sets
//! `immediate_exit` in the vCPU's `kvm_run`, so a kick can never be lost between the flag
//! check and KVM_RUN.

use std::cell::Cell;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::{Bus, StopReason};
use kvm_bindings::{
    kvm_run, CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::cpuid::{normalize, VcpuTopology};
use crate::arch::regs::{self, EntryPoint};
use crate::arch::vcpu_state::{self, StateCaps, VcpuState};
use crate::memory::GuestMemory;
use crate::outcome::{ExitLatch, Outcome};
use crate::run_control::RunControl;

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const INT3_OPCODE: u8 = 0xcc;
const BP_VECTOR: u8 = 3;
const MAX_INSN_LEN: usize = 15;

/// Errors creating or configuring a vCPU.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: {what} failed: {source}")]
    Kvm {
        /// vCPU index.
        index: u8,
        /// The operation.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// Boot register set-up failed.
    #[error("vCPU {0}: {1}")]
    Regs(u8, regs::RegsError),
    /// The vCPU thread could not be started.
    #[error("cannot start the thread for vCPU {0}: {1}")]
    Spawn(u8, std::io::Error),
    /// Saving or restoring the vCPU's state failed.
    #[error("vCPU {0} state: {1}")]
    State(u8, crate::arch::vcpu_state::VcpuStateError),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is set by this thread to its own vCPU's kvm_run mapping,
            // which stays mapped until the thread clears the pointer before dropping the
            // vCPU. Writing one byte is async-signal-safe.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
    fence(Ordering::SeqCst);
}

/// Installs the kick handler (once per process; later calls are harmless).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal)
}

/// Bytes as space-separated hex pairs, for messages about guest code.
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    mem: GuestMemory,
    caps: Arc<StateCaps>,
}

/// What the run loop does after an exit.
enum Next {
    Continue,
    Stop(Outcome),
    EmulationFailure,
}

impl Vcpu {
    /// Creates vCPU `index` on `vm`.
    pub fn new(
        vm: &VmFd,
        index: u8,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        mem: GuestMemory,
        caps: Arc<StateCaps>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Kvm {
                index,
                what: "KVM_CREATE_VCPU",
                source,
            })?;
        Ok(Self {
            index,
            fd,
            io_bus,
            mmio_bus,
            mem,
            caps,
        })
    }

    /// Loads a saved state (instead of [`Vcpu::configure`]).
    pub fn restore(&self, state: &VcpuState) -> Result<(), VcpuError> {
        vcpu_state::restore(&self.fd, state, &self.caps)
            .map_err(|e| VcpuError::State(self.index, e))
    }

    /// Reads the vCPU's state; only while its thread is outside KVM_RUN.
    fn save(&self) -> Result<VcpuState, VcpuError> {
        vcpu_state::save(&self.fd, self.index, &self.caps)
            .map_err(|e| VcpuError::State(self.index, e))
    }

    fn kvm_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Kvm {
            index,
            what,
            source,
        }
    }

    /// Sets CPUID, MSRs, registers, FPU and LAPIC for booting at `entry`; returns the
    /// CPUID it set.
    /// `no_hypercalls` hides the KVM PV features that need hypercalls (see
    /// [`VcpuTopology::no_hypercalls`]).
    pub fn configure(
        &self,
        kvm: &Kvm,
        supported_cpuid: &CpuId,
        count: u8,
        entry: EntryPoint,
        no_hypercalls: bool,
    ) -> Result<CpuId, VcpuError> {
        let mut cpuid = supported_cpuid.clone();
        normalize(
            cpuid.as_mut_slice(),
            VcpuTopology {
                index: self.index,
                count,
                tsc_deadline: kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
                no_hypercalls,
            },
        );
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.kvm_err("KVM_SET_CPUID2"))?;
        let msrs = regs::boot_msrs().map_err(|e| VcpuError::Regs(self.index, e))?;
        self.fd
            .set_msrs(&msrs)
            .map_err(self.kvm_err("KVM_SET_MSRS"))?;
        let mut sregs = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
        regs::setup_sregs(&self.mem, entry, &mut sregs)
            .map_err(|e| VcpuError::Regs(self.index, e))?;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.kvm_err("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&regs::boot_regs(entry))
            .map_err(self.kvm_err("KVM_SET_REGS"))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.kvm_err("KVM_SET_FPU"))?;
        let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?;
        regs::setup_lint(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.kvm_err("KVM_SET_LAPIC"))?;
        Ok(cpuid)
    }

    /// Starts the vCPU thread. It runs until `control` says stop (and the thread is
    /// kicked) or the guest stops or crashes, which it reports to `latch`; it parks while
    /// `control` asks for a pause.
    pub fn spawn(
        self,
        control: Arc<RunControl>,
        latch: Arc<ExitLatch>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                self.run(&control, &latch);
                control.exited();
            })
            .map_err(|e| VcpuError::Spawn(index, e))
    }

    fn run(mut self, control: &RunControl, latch: &ExitLatch) {
        if let Err(e) = crate::seccomp::enter(crate::seccomp::Thread::Vcpu) {
            latch.set(Outcome::Crash(e.to_string()));
            return;
        }
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|p| p.set(run_ptr));
        let index = usize::from(self.index);
        while control.checkpoint(index, &mut || self.save()) {
            let next = self.run_once();
            let next = match next {
                Next::EmulationFailure => self.handle_emulation_failure(),
                other => other,
            };
            if let Next::Stop(outcome) = next {
                latch.set(outcome);
                break;
            }
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        if log::log_enabled!(log::Level::Debug) {
            self.log_position();
        }
    }

    /// Logs where the vCPU stopped (helps to tell a hung guest from a slow one).
    fn log_position(&self) {
        let index = self.index;
        match (self.fd.get_regs(), self.fd.get_mp_state()) {
            (Ok(r), Ok(mp)) => log::debug!(
                "vcpu{index} stopped at RIP {:#x} RSP {:#x} RFLAGS {:#x} (mp_state {}), code [{}]",
                r.rip,
                r.rsp,
                r.rflags,
                mp.mp_state,
                hex(&self.instruction_bytes(r.rip))
            ),
            (Err(e), _) | (_, Err(e)) => log::debug!("vcpu{index}: state unreadable: {e}"),
        }
    }

    fn run_once(&mut self) -> Next {
        let index = self.index;
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    if !self.io_bus.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    Next::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    if !self.io_bus.write(u64::from(port), data) {
                        log::trace!("vcpu{index}: unhandled out {port:#x} {data:x?}");
                    }
                    Next::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !self.mmio_bus.read(addr, data) {
                        log::debug!("vcpu{index}: unhandled MMIO read at {addr:#x}");
                        data.fill(0xff);
                    }
                    Next::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !self.mmio_bus.write(addr, data) {
                        log::debug!("vcpu{index}: unhandled MMIO write at {addr:#x}");
                    }
                    Next::Continue
                }
                VcpuExit::Intr => Next::Continue,
                VcpuExit::Shutdown => Next::Stop(Outcome::Crash(format!(
                    "triple fault (KVM_EXIT_SHUTDOWN) on vCPU {index}"
                ))),
                VcpuExit::Hlt => Next::Stop(Outcome::Crash(format!(
                    "vCPU {index} halted outside the in-kernel LAPIC"
                ))),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(Outcome::Guest(StopReason::PowerOff)),
                    KVM_SYSTEM_EVENT_RESET => Next::Stop(Outcome::Guest(StopReason::Reset)),
                    KVM_SYSTEM_EVENT_CRASH => Next::Stop(Outcome::Crash(format!(
                        "guest reported a crash on vCPU {index}"
                    ))),
                    other => {
                        log::warn!("vcpu{index}: ignoring system event {other}");
                        Next::Continue
                    }
                },
                VcpuExit::InternalError => Next::EmulationFailure,
                VcpuExit::FailEntry(reason, cpu) => Next::Stop(Outcome::Crash(format!(
                    "VM entry failed on vCPU {index} (hardware reason {reason:#x}, host CPU {cpu})"
                ))),
                other => Next::Stop(Outcome::Crash(format!(
                    "unexpected KVM exit on vCPU {index}: {other:?}"
                ))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Stop(Outcome::Crash(format!(
                "KVM_RUN failed on vCPU {index}: {e}"
            ))),
        }
    }

    /// Reads up to 15 instruction bytes at the guest's current RIP.
    fn instruction_bytes(&self, rip: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_INSN_LEN);
        let mut linear = rip;
        while out.len() < MAX_INSN_LEN {
            let Ok(t) = self.fd.translate_gva(linear) else {
                break;
            };
            if t.valid == 0 {
                break;
            }
            let page_left = 0x1000 - (t.physical_address & 0xfff) as usize;
            let n = page_left.min(MAX_INSN_LEN - out.len());
            let mut buf = vec![0u8; n];
            if self
                .mem
                .read_slice(&mut buf, GuestAddress(t.physical_address))
                .is_err()
            {
                break;
            }
            out.extend_from_slice(&buf);
            linear = linear.wrapping_add(n as u64);
        }
        out
    }

    /// KVM's instruction emulator gave up. An `int3` is delivered to the guest as #BP
    /// (some hosts' emulators cannot run it); anything else ends the VM with RIP and the
    /// instruction bytes.
    fn handle_emulation_failure(&mut self) -> Next {
        let index = self.index;
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
        // member KVM filled in.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let regs = match self.fd.get_regs() {
            Ok(r) => r,
            Err(e) => {
                return Next::Stop(Outcome::Crash(format!(
                    "KVM internal error on vCPU {index} (suberror {}), registers unreadable: {e}",
                    internal.suberror
                )))
            }
        };
        let bytes = self.instruction_bytes(regs.rip);
        if internal.suberror == KVM_INTERNAL_ERROR_EMULATION && bytes.first() == Some(&INT3_OPCODE)
        {
            match self.inject_breakpoint(regs) {
                Ok(()) => return Next::Continue,
                Err(e) => log::warn!("vcpu{index}: cannot deliver #BP: {e}"),
            }
        }
        let what = if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
            "KVM emulation failure".to_string()
        } else {
            format!("KVM internal error (suberror {})", internal.suberror)
        };
        Next::Stop(Outcome::Crash(format!(
            "{what} on vCPU {index} at RIP {:#x}, instruction bytes [{}]",
            regs.rip,
            hex(&bytes)
        )))
    }

    /// Delivers the #BP that the `int3` at RIP would have raised: RIP moves past the
    /// one-byte instruction (#BP is a trap) and vector 3 is injected.
    fn inject_breakpoint(
        &mut self,
        mut regs: kvm_bindings::kvm_regs,
    ) -> Result<(), kvm_ioctls::Error> {
        let mut events = self.fd.get_vcpu_events()?;
        regs.rip += 1;
        self.fd.set_regs(&regs)?;
        events.exception.injected = 1;
        events.exception.nr = BP_VECTOR;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        self.fd.set_vcpu_events(&events)?;
        log::debug!(
            "vcpu{}: delivered #BP for int3 at {:#x}",
            self.index,
            regs.rip - 1
        );
        Ok(())
    }
}
