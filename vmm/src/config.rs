//! The machine configuration: what `wisp run` was asked to build. Plain serde data, so a
//! snapshot can carry it and a restore needs no repeat of the options.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::arch::mptable::MAX_CPUS;

/// Smallest guest wisp builds: room for the boot structures and a small kernel.
pub const MIN_MEMORY_MIB: u64 = 16;

/// A VM's machine configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Name, used in logs and (later) for the control socket.
    pub name: String,
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Optional initrd / initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to wisp's defaults.
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
}

/// A configuration that cannot be built, with the fix in the message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Zero vCPUs.
    #[error("--cpus must be at least 1")]
    NoCpus,
    /// More vCPUs than KVM or the MP table allow.
    #[error(
        "--cpus {asked} is more than wisp supports on this host ({max}); use --cpus {max} or fewer"
    )]
    TooManyCpus {
        /// Requested.
        asked: u64,
        /// Limit.
        max: u64,
    },
    /// Too little memory.
    #[error("--memory {0} MiB is too little; wisp needs at least {MIN_MEMORY_MIB} MiB")]
    TooLittleMemory(u64),
    /// More memory than the host has.
    #[error(
        "--memory {asked} MiB is more than this host's RAM ({host} MiB); use a smaller --memory"
    )]
    TooMuchMemory {
        /// Requested.
        asked: u64,
        /// Host RAM.
        host: u64,
    },
    /// An empty or oversized name.
    #[error("--name must be 1 to 64 characters of letters, digits, '-', '_' or '.', not {0:?}")]
    BadName(String),
}

/// Limits that come from the host.
#[derive(Clone, Copy, Debug)]
pub struct HostLimits {
    /// KVM_CAP_MAX_VCPUS.
    pub max_vcpus: u64,
    /// Host RAM in MiB.
    pub ram_mib: u64,
}

/// Checks a requested vCPU count; returns it as the u8 the machine uses.
pub fn check_cpus(asked: u64, limits: &HostLimits) -> Result<u8, ConfigError> {
    let max = limits.max_vcpus.min(u64::from(MAX_CPUS));
    match asked {
        0 => Err(ConfigError::NoCpus),
        n if n > max => Err(ConfigError::TooManyCpus { asked: n, max }),
        n => Ok(n as u8),
    }
}

/// Checks a requested memory size.
pub fn check_memory(mib: u64, limits: &HostLimits) -> Result<u64, ConfigError> {
    if mib < MIN_MEMORY_MIB {
        return Err(ConfigError::TooLittleMemory(mib));
    }
    if mib > limits.ram_mib {
        return Err(ConfigError::TooMuchMemory {
            asked: mib,
            host: limits.ram_mib,
        });
    }
    Ok(mib)
}

/// Checks a VM name: it becomes part of file names later.
pub fn check_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadName(name.to_string()))
    }
}

/// Host RAM in MiB, from /proc/meminfo.
pub fn host_ram_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total(&text)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HostLimits = HostLimits {
        max_vcpus: 1024,
        ram_mib: 8192,
    };

    #[test]
    fn cpu_limits() {
        assert_eq!(check_cpus(0, &LIMITS), Err(ConfigError::NoCpus));
        assert_eq!(check_cpus(1, &LIMITS), Ok(1));
        assert_eq!(check_cpus(254, &LIMITS), Ok(254));
        assert!(matches!(
            check_cpus(255, &LIMITS),
            Err(ConfigError::TooManyCpus { max: 254, .. })
        ));
        let small = HostLimits {
            max_vcpus: 8,
            ..LIMITS
        };
        assert!(matches!(
            check_cpus(9, &small),
            Err(ConfigError::TooManyCpus { max: 8, .. })
        ));
    }

    #[test]
    fn memory_limits() {
        assert_eq!(
            check_memory(15, &LIMITS),
            Err(ConfigError::TooLittleMemory(15))
        );
        assert_eq!(check_memory(16, &LIMITS), Ok(16));
        assert_eq!(check_memory(8192, &LIMITS), Ok(8192));
        let e = check_memory(8193, &LIMITS).unwrap_err();
        assert!(e
            .to_string()
            .contains("more than this host's RAM (8192 MiB)"));
    }

    #[test]
    fn names() {
        assert!(check_name("wisp-1.test_a").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn meminfo_parsing() {
        assert_eq!(
            parse_mem_total("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24000)
        );
        assert_eq!(parse_mem_total("nothing"), None);
    }
}
