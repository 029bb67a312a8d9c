//! `wisp doctor`: what this host's KVM offers and how fast guest kernel mode runs.

use std::fmt::Write as _;

use kvm_ioctls::Kvm;

use crate::host::{measure_kernel_mode, missing_caps, KernelModeSpeed, REQUIRED_CAPS, STATE_CAPS};

/// Loop iterations for the doctor's measurement (about 0.8 s where kernel mode is
/// emulated, microseconds on hardware).
pub const DOCTOR_ITERATIONS: u32 = 500_000;

/// A finished report.
pub struct Report {
    /// Human-readable text.
    pub text: String,
    /// True when `wisp run` can work on this host.
    pub ok: bool,
}

fn mips(speed: &KernelModeSpeed) -> String {
    let m = speed.instructions_per_sec / 1e6;
    if m >= 100.0 {
        format!("{m:.0} M instructions/s")
    } else {
        format!("{m:.2} M instructions/s")
    }
}

/// Explains what the measured speed means for the user.
pub fn kernel_mode_verdict(speed: &KernelModeSpeed) -> String {
    if speed.emulated() {
        format!(
            "emulated ({}, measured with a timing guest)\n\
             \x20   guest kernel-mode code is emulated instruction by instruction (nested,\n\
             \x20   software-assisted KVM); guest user mode runs at native speed. Linux guests\n\
             \x20   boot in seconds instead of milliseconds, and wisp adds an emulation-friendly\n\
             \x20   kernel cmdline (noxsave clearcpuid=...) automatically. Timings measured on\n\
             \x20   this host say nothing absolute about real hosts: compare ratios.",
            mips(speed)
        )
    } else {
        format!(
            "hardware-virtualized ({}, measured with a timing guest)",
            mips(speed)
        )
    }
}

/// Runs every check against `kvm`.
pub fn run(kvm: &Kvm, iterations: u32) -> Report {
    let mut text = String::new();
    let mut ok = true;
    let line = |text: &mut String, what: &str, value: &str| {
        let _ = writeln!(text, "{what:<20} {value}");
    };
    line(&mut text, "/dev/kvm", "ok (opened read/write)");
    let api = kvm.get_api_version();
    let api_ok = api == 12;
    ok &= api_ok;
    line(
        &mut text,
        "KVM API version",
        &format!("{api} ({})", if api_ok { "ok" } else { "wisp needs 12" }),
    );
    for (title, caps, required) in [
        ("capabilities", REQUIRED_CAPS, true),
        ("state capabilities", STATE_CAPS, false),
    ] {
        let missing = missing_caps(kvm, caps);
        let names: Vec<&str> = caps.iter().map(|(_, n)| *n).collect();
        let value = if missing.is_empty() {
            format!("ok: {}", names.join(", "))
        } else {
            if required {
                ok = false;
            }
            format!("MISSING: {}", missing.join(", "))
        };
        line(&mut text, title, &value);
    }
    line(
        &mut text,
        "vCPUs",
        &format!(
            "{} recommended, {} max",
            kvm.get_nr_vcpus(),
            kvm.get_max_vcpus()
        ),
    );
    match measure_kernel_mode(kvm, iterations) {
        Ok(speed) => line(&mut text, "guest kernel mode", &kernel_mode_verdict(&speed)),
        Err(e) => {
            ok = false;
            line(&mut text, "guest kernel mode", &format!("UNKNOWN: {e}"));
        }
    }
    Report { text, ok }
}
