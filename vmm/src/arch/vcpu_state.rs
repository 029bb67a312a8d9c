//! A vCPU's complete KVM state as plain serde data, for snapshots and migration.
//!
//! Saving and restoring follow the orders KVM needs (the same as Firecracker's and
//! QEMU's):
//! - save: MP state first (KVM_GET_MP_STATE accepts pending APIC events, which changes
//!   other state), then registers, FPU/XSAVE, XCRs, debug registers, LAPIC, MSRs (after
//!   the LAPIC: the TSC deadline depends on it), and vCPU events last;
//! - restore: CPUID first (it decides which MSRs and XSAVE features exist), then MP
//!   state, registers, special registers, FPU/XSAVE, XCRs, debug registers, LAPIC, MSRs
//!   (TSC before the TSC deadline), vCPU events.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;

const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSRs read or written per KVM_GET_MSRS / KVM_SET_MSRS call.
const MSR_CHUNK: usize = 64;

/// Errors saving or restoring a vCPU's state.
#[derive(Debug, Error)]
pub enum VcpuStateError {
    /// A KVM vCPU ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// A list too long for KVM's fixed-size arrays (a corrupt state).
    #[error("{what}: {len} entries is more than KVM accepts")]
    TooLong {
        /// Which list.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// The state lacks XSAVE but this host needs it, or the other way round.
    #[error("the snapshot has no XSAVE area but this host's KVM uses one")]
    NoXsave,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { what, source }
}

/// The legacy FPU/SSE state (KVM_GET_FPU), kept next to XSAVE for hosts without it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers.
    pub fpr: [[u8; 16]; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM registers.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// One MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    /// MSR index.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// Everything KVM holds about one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index (its APIC ID).
    pub index: u8,
    /// The CPUID the guest sees.
    #[serde(with = "super::kvm_serde::exact_vec")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Running, halted, waiting for INIT/SIPI...
    #[serde(with = "super::kvm_serde::exact")]
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    #[serde(with = "super::kvm_serde::exact")]
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    #[serde(with = "super::kvm_serde::exact")]
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state.
    pub fpu: FpuState,
    /// The XSAVE area, where KVM supports it (it supersedes `fpu`).
    #[serde(with = "super::kvm_serde::exact_opt")]
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers (XCR0), where supported.
    #[serde(with = "super::kvm_serde::exact_opt")]
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    #[serde(with = "super::kvm_serde::exact")]
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    #[serde(with = "super::kvm_serde::exact")]
    pub lapic: kvm_lapic_state,
    /// Every MSR of KVM's list that this vCPU could read.
    pub msrs: Vec<Msr>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    #[serde(with = "super::kvm_serde::exact")]
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency in kHz, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// What the host's KVM offers, which decides what a vCPU state contains.
#[derive(Clone, Debug, Default)]
pub struct StateCaps {
    /// KVM_CAP_XSAVE.
    pub xsave: bool,
    /// KVM_CAP_XCRS.
    pub xcrs: bool,
    /// The MSRs KVM can save and restore (KVM_GET_MSR_INDEX_LIST).
    pub msr_list: Vec<u32>,
}

impl StateCaps {
    /// Queries `kvm`.
    pub fn query(kvm: &kvm_ioctls::Kvm) -> Result<Self, VcpuStateError> {
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        Ok(Self {
            xsave: kvm.check_extension(kvm_ioctls::Cap::Xsave),
            xcrs: kvm.check_extension(kvm_ioctls::Cap::Xcrs),
            msr_list,
        })
    }
}

fn msrs_of(entries: &[kvm_msr_entry]) -> Result<Msrs, VcpuStateError> {
    Msrs::from_entries(entries).map_err(|_| VcpuStateError::TooLong {
        what: "MSRs",
        len: entries.len(),
    })
}

/// Runs `op` (KVM_GET_MSRS or KVM_SET_MSRS) over `entries` in chunks. Both stop at the
/// first MSR KVM refuses and return how many they did: that one is skipped (its index
/// is returned) and the rest go on. `done` receives the entries KVM handled, as `op`
/// left them (read values for KVM_GET_MSRS).
fn msrs_in_chunks(
    entries: &[kvm_msr_entry],
    mut op: impl FnMut(&mut Msrs) -> Result<usize, VcpuStateError>,
    done: &mut Vec<Msr>,
) -> Result<Vec<u32>, VcpuStateError> {
    let mut refused = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let mut msrs = msrs_of(chunk)?;
        let n = op(&mut msrs)?.min(chunk.len());
        done.extend(msrs.as_slice()[..n].iter().map(|e| Msr {
            index: e.index,
            data: e.data,
        }));
        match chunk.get(n) {
            Some(bad) => {
                refused.push(bad.index);
                rest = &rest[n + 1..];
            }
            None => rest = &rest[chunk.len()..],
        }
    }
    Ok(refused)
}

/// Reads every MSR of `list` that KVM lets this vCPU read (one it cannot read is
/// skipped).
fn save_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<Msr>, VcpuStateError> {
    let entries: Vec<kvm_msr_entry> = list
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut out = Vec::with_capacity(list.len());
    let unreadable = msrs_in_chunks(
        &entries,
        |m| fd.get_msrs(m).map_err(kvm_err("KVM_GET_MSRS")),
        &mut out,
    )?;
    for index in unreadable {
        log::debug!("MSR {index:#x} is not readable; not saved");
    }
    Ok(out)
}

/// Writes `msrs`, the TSC deadline after the TSC (the deadline is relative to it). An
/// MSR KVM refuses is logged and skipped: restoring on a host whose KVM lacks one is
/// better than not restoring at all.
fn restore_msrs(fd: &VcpuFd, index: u8, msrs: &[Msr]) -> Result<(), VcpuStateError> {
    let ordered: Vec<kvm_msr_entry> = msrs
        .iter()
        .filter(|m| m.index != MSR_IA32_TSC_DEADLINE)
        .chain(msrs.iter().filter(|m| m.index == MSR_IA32_TSC_DEADLINE))
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: m.data,
            ..Default::default()
        })
        .collect();
    let refused = msrs_in_chunks(
        &ordered,
        |m| fd.set_msrs(m).map_err(kvm_err("KVM_SET_MSRS")),
        &mut Vec::new(),
    )?;
    if !refused.is_empty() {
        log::warn!(
            "vcpu{index}: KVM refused MSRs {}; they keep their reset values",
            refused
                .iter()
                .map(|i| format!("{i:#x}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Reads the state of vCPU `index` (its thread must be outside KVM_RUN).
pub fn save(fd: &VcpuFd, index: u8, caps: &StateCaps) -> Result<VcpuState, VcpuStateError> {
    let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let fpu = FpuState::from(&fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?);
    let xsave = if caps.xsave {
        Some(fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?)
    } else {
        None
    };
    let xcrs = if caps.xcrs {
        Some(fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?)
    } else {
        None
    };
    let debug_regs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let msrs = save_msrs(fd, &caps.msr_list)?;
    let events = fd
        .get_vcpu_events()
        .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let tsc_khz = fd.get_tsc_khz().ok();
    Ok(VcpuState {
        index,
        cpuid,
        mp_state,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
        tsc_khz,
    })
}

/// Loads `state` into a freshly created vCPU.
pub fn restore(fd: &VcpuFd, state: &VcpuState, caps: &StateCaps) -> Result<(), VcpuStateError> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuStateError::TooLong {
        what: "CPUID entries",
        len: state.cpuid.len(),
    })?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    if let Some(khz) = state.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                log::warn!(
                    "vcpu{}: cannot set the guest TSC to {khz} kHz ({e}); guest time may drift",
                    state.index
                );
            }
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(kvm_err("KVM_SET_SREGS"))?;
    fd.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(kvm_err("KVM_SET_FPU"))?;
    match (&state.xsave, caps.xsave) {
        (Some(xsave), true) => {
            // SAFETY: `xsave` is a whole `kvm_xsave` (4 KiB, the legacy layout): KVM
            // copies exactly that many bytes, so nothing past it is read.
            unsafe { fd.set_xsave(xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        }
        (None, true) => return Err(VcpuStateError::NoXsave),
        // A host without XSAVE takes the FPU state set above.
        (_, false) => {}
    }
    if let (Some(xcrs), true) = (&state.xcrs, caps.xcrs) {
        fd.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&state.debug_regs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic)
        .map_err(kvm_err("KVM_SET_LAPIC"))?;
    restore_msrs(fd, state.index, &state.msrs)?;
    fd.set_vcpu_events(&state.events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSR_IA32_TSC: u32 = 0x10;

    #[test]
    fn msr_chunks_skip_what_kvm_refuses_and_go_on() {
        let entries: Vec<kvm_msr_entry> = (0..150u32)
            .map(|index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let refuse = [3u32, 64, 149];
        let mut calls = 0;
        let mut done = Vec::new();
        let refused = msrs_in_chunks(
            &entries,
            |m| {
                calls += 1;
                let slice = m.as_mut_slice();
                let n = slice
                    .iter()
                    .position(|e| refuse.contains(&e.index))
                    .unwrap_or(slice.len());
                for e in &mut slice[..n] {
                    e.data = u64::from(e.index) * 2;
                }
                Ok(n)
            },
            &mut done,
        )
        .unwrap();
        assert_eq!(refused, refuse);
        assert_eq!(done.len(), 147);
        assert!(done.iter().all(|m| !refuse.contains(&m.index)));
        assert!(done.iter().all(|m| m.data == u64::from(m.index) * 2));
        assert!(calls >= 3);
    }

    #[test]
    fn fpu_round_trips_through_the_plain_struct() {
        let mut f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 0x1234,
            ..Default::default()
        };
        f.xmm[3][7] = 0xab;
        f.fpr[1][0] = 9;
        let back = kvm_fpu::from(&FpuState::from(&f));
        assert_eq!(back.fcw, 0x37f);
        assert_eq!(back.mxcsr, 0x1f80);
        assert_eq!(back.last_ip, 0x1234);
        assert_eq!(back.xmm[3][7], 0xab);
        assert_eq!(back.fpr[1][0], 9);
    }

    #[test]
    fn state_survives_json_with_kvm_structs_as_bytes() {
        let mut regs = kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            ..Default::default()
        };
        regs.rax = 42;
        let s = VcpuState {
            index: 1,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 0xd,
                eax: 7,
                ..Default::default()
            }],
            mp_state: kvm_mp_state { mp_state: 3 },
            regs,
            sregs: kvm_sregs::default(),
            fpu: FpuState::default(),
            xsave: Some(kvm_xsave::default()),
            xcrs: None,
            debug_regs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            msrs: vec![Msr {
                index: MSR_IA32_TSC,
                data: 99,
            }],
            events: kvm_vcpu_events::default(),
            tsc_khz: Some(2_000_000),
        };
        let json = serde_json::to_string(&s).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.regs.rip, s.regs.rip);
        assert_eq!(back.regs.rax, 42);
        assert_eq!(back.cpuid[0].function, 0xd);
        assert_eq!(back.mp_state.mp_state, 3);
        assert_eq!(back.msrs, s.msrs);
        assert_eq!(back.tsc_khz, Some(2_000_000));
    }
}
