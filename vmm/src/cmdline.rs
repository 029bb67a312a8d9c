//! The kernel command line: wisp's microVM defaults, the emulation-friendly additions
//! when the host emulates guest kernel mode, then the user's `--cmdline`.

use linux_loader::cmdline::Cmdline;
use thiserror::Error;

use crate::arch::layout::CMDLINE_MAX_SIZE;

/// Always present: serial console, reboot through the i8042 (no triple fault), and
/// reboot (which ends the VM) instead of hanging on panic.
pub const BASE: &str = "console=ttyS0 reboot=k panic=-1";

/// Added only when guest kernel mode is software-emulated (see `wisp doctor`):
/// - hide CPU features the host's instruction emulator cannot run (xsave, popcnt, SMAP's
///   clac/stac, cmpxchg16b) or runs slowly (rep movsb/stosb);
/// - no FSGSBASE: with it, the NMI entry path reads the per-CPU base with `lsl`, which
///   the emulator cannot run either (an NMI, e.g. an RCU stall backtrace, then crashes
///   the guest);
/// - no RCU stall reports: a vCPU thread starved by a busy host looks like a stall to a
///   guest this slow;
/// - trust the TSC, and skip work that costs seconds when every kernel instruction is
///   emulated (read-only remapping, rewriting SMP lock prefixes on one vCPU, the boot log).
pub const EMULATED_KERNEL_MODE: &str =
    "noxsave clearcpuid=popcnt,smap,erms,fsrm,cx16 nofsgsbase rcupdate.rcu_cpu_stall_suppress=1 tsc=reliable no_timer_check rodata=off noreplace-smp quiet";

/// Errors building the command line.
#[derive(Debug, Error)]
pub enum CmdlineError {
    /// Too long or containing characters the kernel cannot take.
    #[error("the kernel command line is invalid or longer than {max} bytes: {0}", max = CMDLINE_MAX_SIZE - 1)]
    Invalid(linux_loader::cmdline::Error),
}

/// True if the user's command line turns ACPI off (the kernel then reads the MP table
/// and needs its virtio devices on the command line).
pub fn acpi_off(user: &str) -> bool {
    user.split_whitespace().rfind(|w| w.starts_with("acpi=")) == Some("acpi=off")
}

/// Builds the full command line: wisp's part, `devices` (device announcements), then
/// the user's part, so the user's words win.
pub fn compose(
    user: &str,
    emulated_kernel_mode: bool,
    devices: &str,
) -> Result<Cmdline, CmdlineError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(CmdlineError::Invalid)?;
    c.insert_str(BASE).map_err(CmdlineError::Invalid)?;
    if emulated_kernel_mode {
        c.insert_str(EMULATED_KERNEL_MODE)
            .map_err(CmdlineError::Invalid)?;
    }
    if !devices.is_empty() {
        c.insert_str(devices).map_err(CmdlineError::Invalid)?;
    }
    let user = user.trim();
    if !user.is_empty() {
        c.insert_str(user).map_err(CmdlineError::Invalid)?;
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(c: &Cmdline) -> String {
        c.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn user_part_comes_last_and_adaptation_is_conditional() {
        let hw = compose(" probe.cmd=hello ", false, "").unwrap();
        assert_eq!(s(&hw), format!("{BASE} probe.cmd=hello"));
        let emu = compose("loglevel=7", true, "dev=1").unwrap();
        assert_eq!(
            s(&emu),
            format!("{BASE} {EMULATED_KERNEL_MODE} dev=1 loglevel=7")
        );
    }

    #[test]
    fn acpi_off_is_the_last_acpi_word() {
        assert!(acpi_off("root=/dev/vda acpi=off"));
        assert!(!acpi_off("acpi=off acpi=force"));
        assert!(!acpi_off("noacpi"));
    }

    #[test]
    fn too_long_is_an_error() {
        assert!(compose(&"a".repeat(CMDLINE_MAX_SIZE), false, "").is_err());
        assert!(compose("bad\u{1}char", false, "").is_err());
    }
}
