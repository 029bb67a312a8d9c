//! Time from the TSC (`rdtsc` runs in CPL3: entry.rs keeps CR4.TSD clear)
//! and its frequency from CPUID, for pacing output.

use core::arch::x86_64::{__cpuid, __cpuid_count, _rdtsc};

/// Frequency assumed when CPUID does not tell (Hz).
pub const DEFAULT_HZ: u64 = 2_000_000_000;
/// Plausible TSC frequencies (Hz); CPUID values outside are ignored.
const MIN_HZ: u64 = 100_000_000;
const MAX_HZ: u64 = 20_000_000_000;

/// KVM's (and VMware's) "timing information" leaf: eax = TSC kHz.
const LEAF_HV_TIMING: u32 = 0x4000_0010;

/// Where the TSC frequency came from.
#[derive(Clone, Copy)]
pub enum Source {
    /// CPUID 0x15: crystal Hz (ecx) * ebx / eax.
    Crystal,
    /// CPUID 0x4000_0010 (hypervisor timing leaf): eax = kHz.
    Hypervisor,
    /// CPUID 0x16: eax = processor base MHz.
    BaseFreq,
    /// None of them: [`DEFAULT_HZ`].
    Default,
}

impl Source {
    /// Short name, as printed by the `tsc` command.
    pub fn name(self) -> &'static str {
        match self {
            Source::Crystal => "cpuid15",
            Source::Hypervisor => "cpuid40000010",
            Source::BaseFreq => "cpuid16",
            Source::Default => "default",
        }
    }
}

/// Reads the time-stamp counter.
#[inline]
pub fn now() -> u64 {
    // SAFETY: rdtsc only reads the TSC; CR4.TSD is clear, so it is
    // allowed in CPL3.
    unsafe { _rdtsc() }
}

/// The TSC frequency in Hz and where it came from: CPUID 0x15, then
/// the hypervisor leaf 0x4000_0010, then 0x16, else [`DEFAULT_HZ`].
pub fn frequency() -> (u64, Source) {
    let plausible = |hz: u64| (MIN_HZ..=MAX_HZ).contains(&hz).then_some(hz);
    let max_leaf = __cpuid(0).eax;
    if max_leaf >= 0x15 {
        let l = __cpuid_count(0x15, 0);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            let hz = u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax);
            if let Some(hz) = plausible(hz) {
                return (hz, Source::Crystal);
            }
        }
    }
    // CPUID.1:ECX bit 31: running under a hypervisor, leaves 0x4000_00xx.
    if __cpuid(1).ecx & (1 << 31) != 0 && __cpuid(0x4000_0000).eax >= LEAF_HV_TIMING {
        if let Some(hz) = plausible(u64::from(__cpuid(LEAF_HV_TIMING).eax) * 1000) {
            return (hz, Source::Hypervisor);
        }
    }
    if max_leaf >= 0x16 {
        if let Some(hz) = plausible(u64::from(__cpuid(0x16).eax & 0xffff) * 1_000_000) {
            return (hz, Source::BaseFreq);
        }
    }
    (DEFAULT_HZ, Source::Default)
}

/// TSC ticks in `us` microseconds at `hz` Hz.
pub fn ticks_us(hz: u64, us: u64) -> u64 {
    hz.saturating_mul(us) / 1_000_000
}

/// TSC ticks in `ms` milliseconds at `hz` Hz.
pub fn ticks_ms(hz: u64, ms: u64) -> u64 {
    ticks_us(hz, ms.saturating_mul(1000))
}

/// Output pacing: the TSC when the last paced event happened.
pub struct Pace {
    last: u64,
}

impl Pace {
    /// Starts the first interval now.
    pub fn start() -> Pace {
        Pace { last: now() }
    }

    /// True, and starts a new interval, if at least `gap` ticks passed
    /// since the interval started. A TSC that went backwards (e.g. after a
    /// restore) counts as a long gap.
    pub fn due(&mut self, gap: u64) -> bool {
        let t = now();
        if t.wrapping_sub(self.last) >= gap {
            self.last = t;
            true
        } else {
            false
        }
    }
}
