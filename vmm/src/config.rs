//! The machine configuration: what `wisp run` was asked to build. Plain serde data, so a
//! snapshot can carry it and a restore needs no repeat of the options.

use std::path::PathBuf;

use devices::virtio::block::BlockConfig;
use devices::virtio::net::MacAddr;

use crate::usernet::{self, UserNetConfig};
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
    /// virtio-blk disks, in order (the first is /dev/vda).
    pub disks: Vec<BlockConfig>,
    /// virtio-net cards, in order.
    pub nets: Vec<NetConfig>,
}

/// Where a network card's frames go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetBackend {
    /// An existing host TAP.
    Tap(String),
    /// A TAP wisp creates and attaches to this host bridge.
    Bridge(String),
    /// User-mode NAT through passt.
    User(UserNetConfig),
}

/// One virtio-net card.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The host side.
    pub backend: NetBackend,
    /// The guest's MAC; default: derived from the VM name and the card's index.
    pub mac: Option<MacAddr>,
}

/// Most virtio devices (disks + network cards) one VM can have.
pub const MAX_VIRTIO_DEVICES: usize = 16;

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
    /// A malformed --disk value.
    #[error("--disk {spec:?}: {why}; expected PATH[,ro][,id=NAME]")]
    BadDisk {
        /// The value given.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// A malformed --net value.
    #[error("--net {spec:?}: {why}; expected user[,hostfwd=...], tap=NAME or bridge=BR (each with [,mac=MAC])")]
    BadNet {
        /// The value given.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// Too many devices.
    #[error(
        "{0} disks and network cards are too many; wisp supports at most {MAX_VIRTIO_DEVICES}"
    )]
    TooManyDevices(usize),
    /// Restore overrides that do not fit the snapshot.
    #[error("{0}")]
    BadOverride(String),
    /// A saved configuration (snapshot, migration) whose VM name is not a valid name.
    #[error("the saved VM name {0:?} is not a valid name; restore it with --name NAME")]
    BadSavedName(String),
    /// One image behind two disks.
    #[error("--disk {} is given twice (disks {first} and {second} are the same file); each image backs one disk", path.display())]
    DiskTwice {
        /// The image.
        path: PathBuf,
        /// Index of the first disk using it.
        first: usize,
        /// Index of the second.
        second: usize,
    },
}

impl VmConfig {
    /// Checks everything wisp requires of a machine configuration, wherever it comes
    /// from: `wisp run`'s options, a snapshot's state or a migration stream (both
    /// untrusted). Nothing may start before this passes.
    pub fn validate(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        check_name(&self.name)?;
        check_cpus(u64::from(self.cpus), limits)?;
        check_memory(self.memory_mib, limits)?;
        check_devices(self.disks.len(), self.nets.len())?;
        for disk in &self.disks {
            check_disk(disk)?;
        }
        check_disks_distinct(&self.disks)?;
        for net in &self.nets {
            let bad = |why: &str| ConfigError::BadNet {
                spec: format!("{:?}", net.backend),
                why: why.to_string(),
            };
            match &net.backend {
                NetBackend::Tap(n) | NetBackend::Bridge(n) if !valid_ifname(n) => {
                    return Err(bad(
                        "interface names are 1 to 15 characters without '/', ' ' or ':'",
                    ))
                }
                _ => {}
            }
            if net.mac.is_some_and(|m| m.is_multicast()) {
                return Err(bad("mac must be a unicast address (first byte even)"));
            }
        }
        Ok(())
    }

    /// Gives every network card without `mac=` its derived MAC, so the configuration
    /// says what the guest sees (a snapshot restored under another name keeps it).
    pub fn resolve_macs(&mut self) {
        for (i, net) in self.nets.iter_mut().enumerate() {
            net.mac
                .get_or_insert_with(|| MacAddr::derived(&format!("{}/{i}", self.name)));
        }
    }

    /// Applies what `wisp restore` (or `wisp receive`) was given to a saved
    /// configuration: a new `name` (else the saved one must be valid), then the device
    /// overrides of [`VmConfig::override_devices`]. The caller then validates the
    /// result.
    pub fn apply_restore_options(
        &mut self,
        name: Option<&str>,
        disks: &[String],
        nets: &[String],
    ) -> Result<(), ConfigError> {
        match name {
            Some(name) => {
                check_name(name)?;
                self.name = name.to_string();
            }
            None if check_name(&self.name).is_err() => {
                return Err(ConfigError::BadSavedName(self.name.clone()))
            }
            None => {}
        }
        self.override_devices(disks, nets)
    }

    /// Applies `wisp restore` overrides: new disk image paths (`disks`, one per disk,
    /// in order, paths only: the guest already knows the disks' options) and new
    /// network backends (`nets`, one per card, in order; the MAC stays the one the
    /// guest knows). Empty lists keep the snapshot's.
    pub fn override_devices(
        &mut self,
        disks: &[String],
        nets: &[String],
    ) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::BadOverride(m));
        if !disks.is_empty() {
            if disks.len() != self.disks.len() {
                return bad(format!(
                    "the saved VM has {} disk(s); give --disk once per disk, in order, or not at all",
                    self.disks.len()
                ));
            }
            for (disk, path) in self.disks.iter_mut().zip(disks) {
                if path.is_empty() || path.contains(',') {
                    return bad(format!(
                        "--disk {path:?}: on restore only the image path can change (the guest already knows ro and id)"
                    ));
                }
                disk.path = PathBuf::from(path);
            }
        }
        if !nets.is_empty() {
            if nets.len() != self.nets.len() {
                return bad(format!(
                    "the saved VM has {} network card(s); give --net once per card, in order, or not at all",
                    self.nets.len()
                ));
            }
            for (card, spec) in self.nets.iter_mut().zip(nets) {
                let new = parse_net(spec)?;
                let was_tap = matches!(card.backend, NetBackend::Tap(_) | NetBackend::Bridge(_));
                if was_tap && matches!(new.backend, NetBackend::User(_)) {
                    return bad(format!(
                        "--net {spec:?}: this card was snapshotted on a TAP, whose offloads the guest may use; user-mode networking cannot take them over: use tap= or bridge="
                    ));
                }
                if new.mac.is_some() && new.mac != card.mac {
                    return bad(format!(
                        "--net {spec:?}: the guest knows this card as {}; a restore cannot change its MAC",
                        card.mac.map(|m| m.to_string()).unwrap_or_default()
                    ));
                }
                card.backend = new.backend;
            }
        }
        Ok(())
    }
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

/// Checks one disk's options (what [`parse_disk`] would accept).
fn check_disk(disk: &BlockConfig) -> Result<(), ConfigError> {
    let bad = |why: &str| ConfigError::BadDisk {
        spec: disk.path.display().to_string(),
        why: why.to_string(),
    };
    if disk.path.as_os_str().is_empty() {
        return Err(bad("no image path"));
    }
    if disk.id.len() > 20 || !disk.id.is_ascii() {
        return Err(bad("id must be 1 to 20 ASCII characters"));
    }
    Ok(())
}

/// Refuses one image behind two disks (the second open would fail on the first's
/// lock, with a message about another process). Paths that do not resolve are
/// compared as written; opening them fails later with its own message.
fn check_disks_distinct(disks: &[BlockConfig]) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let ids: Vec<Result<(u64, u64), &PathBuf>> = disks
        .iter()
        .map(|d| {
            std::fs::metadata(&d.path)
                .map(|m| (m.dev(), m.ino()))
                .map_err(|_| &d.path)
        })
        .collect();
    for (second, id) in ids.iter().enumerate() {
        if let Some(first) = ids[..second].iter().position(|earlier| earlier == id) {
            return Err(ConfigError::DiskTwice {
                path: disks[second].path.clone(),
                first,
                second,
            });
        }
    }
    Ok(())
}

/// Parses `--disk PATH[,ro][,id=NAME]`.
pub fn parse_disk(spec: &str) -> Result<BlockConfig, ConfigError> {
    let bad = |why: &str| ConfigError::BadDisk {
        spec: spec.to_string(),
        why: why.to_string(),
    };
    let mut parts = spec.split(',');
    let path = PathBuf::from(parts.next().unwrap_or_default());
    if path.as_os_str().is_empty() {
        return Err(bad("no image path"));
    }
    let mut read_only = false;
    let mut id = None;
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => read_only = true,
            Some(("id", v)) if !v.is_empty() && v.len() <= 20 && v.is_ascii() => {
                id = Some(v.to_string())
            }
            Some(("id", _)) => return Err(bad("id must be 1 to 20 ASCII characters")),
            _ => return Err(bad(&format!("unknown option {opt:?}"))),
        }
    }
    let id = id.unwrap_or_else(|| {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name.chars().filter(char::is_ascii).take(20).collect()
    });
    Ok(BlockConfig {
        path,
        read_only,
        id,
    })
}

/// Parses `--net user[,OPTIONS]`, `--net tap=NAME` or `--net bridge=BR`, each with an
/// optional `mac=MAC`.
pub fn parse_net(spec: &str) -> Result<NetConfig, ConfigError> {
    let bad = |why: &str| ConfigError::BadNet {
        spec: spec.to_string(),
        why: why.to_string(),
    };
    let mut parts = spec.split(',');
    let first = parts.next().unwrap_or_default();
    let mut mac = None;
    let mut rest = Vec::new();
    for opt in parts {
        match opt.split_once('=') {
            Some(("mac", v)) => match MacAddr::parse(v) {
                Some(m) if !m.is_multicast() => mac = Some(m),
                Some(_) => return Err(bad("mac must be a unicast address (first byte even)")),
                None => return Err(bad("mac must look like 52:54:00:12:34:56")),
            },
            _ => rest.push(opt),
        }
    }
    let backend = match first.split_once('=') {
        None if first == "user" => NetBackend::User(
            usernet::parse_options(rest.drain(..)).map_err(|e| bad(&e.to_string()))?,
        ),
        Some(("tap", n)) if valid_ifname(n) => NetBackend::Tap(n.to_string()),
        Some(("bridge", n)) if valid_ifname(n) => NetBackend::Bridge(n.to_string()),
        Some(("tap" | "bridge", _)) => {
            return Err(bad(
                "interface names are 1 to 15 characters without '/', ' ' or ':'",
            ))
        }
        _ => return Err(bad("it must start with user, tap=NAME or bridge=BR")),
    };
    if let Some(opt) = rest.first() {
        return Err(bad(&format!("unknown option {opt:?}")));
    }
    Ok(NetConfig { backend, mac })
}

fn valid_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() < 16
        && n.chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '/' | ':' | ','))
}

/// Checks the device count.
pub fn check_devices(disks: usize, nets: usize) -> Result<(), ConfigError> {
    let n = disks + nets;
    if n > MAX_VIRTIO_DEVICES {
        return Err(ConfigError::TooManyDevices(n));
    }
    Ok(())
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
    fn disk_specs() {
        let d = parse_disk("/tmp/a.img").unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert!(!d.read_only);
        assert_eq!(d.id, "a.img");
        let d = parse_disk("x.img,ro,id=root").unwrap();
        assert!(d.read_only);
        assert_eq!(d.id, "root");
        for bad in [
            "",
            ",ro",
            "x,rw",
            "x,id=",
            &format!("x,id={}", "a".repeat(21)),
        ] {
            let e = parse_disk(bad).unwrap_err();
            assert!(e.to_string().contains("PATH[,ro][,id=NAME]"), "{bad}: {e}");
        }
    }

    #[test]
    fn net_specs() {
        let n = parse_net("tap=tap0").unwrap();
        assert_eq!(n.backend, NetBackend::Tap("tap0".into()));
        assert_eq!(n.mac, None);
        let n = parse_net("bridge=br0,mac=52:54:00:00:00:01").unwrap();
        assert_eq!(n.backend, NetBackend::Bridge("br0".into()));
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:00:00:01");
        for bad in [
            "",
            "tap",
            "tap=",
            "tap=0123456789abcdef",
            "vde=x",
            "user,hostfwd=tcp::2222",
            "user,foo=1",
            "tap=t0,mac=01:00:00:00:00:01",
            "tap=t0,mac=zz",
            "tap=t0,foo=1",
        ] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
        let n = parse_net("user,hostfwd=tcp::2222-:22,mac=52:54:00:00:00:02").unwrap();
        let NetBackend::User(u) = n.backend else {
            panic!("not user")
        };
        assert_eq!(u.forwards[0].host_port, 2222);
        assert!(n.mac.is_some());
        let e = parse_net("user,hostfwd=tcp::2222").unwrap_err().to_string();
        assert!(e.contains("hostfwd=tcp::2222"), "{e}");
        assert!(check_devices(8, 8).is_ok());
        assert!(check_devices(9, 8).is_err());
    }

    #[test]
    fn restore_overrides() {
        let mut c = VmConfig {
            name: "a".into(),
            kernel: "k".into(),
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory_mib: 64,
            disks: vec![parse_disk("one.img,ro,id=x").unwrap()],
            nets: vec![parse_net("tap=t0").unwrap()],
        };
        c.resolve_macs();
        let mac = c.nets[0].mac;
        assert!(mac.is_some());
        c.name = "b".into();
        c.resolve_macs();
        assert_eq!(c.nets[0].mac, mac, "a resolved MAC survives a rename");
        c.override_devices(&["two.img".into()], &["bridge=br0".into()])
            .unwrap();
        assert_eq!(c.disks[0].path, PathBuf::from("two.img"));
        assert!(c.disks[0].read_only);
        assert_eq!(c.nets[0].backend, NetBackend::Bridge("br0".into()));
        assert_eq!(c.nets[0].mac, mac);
        c.override_devices(&[], &[]).unwrap();
        for (disks, nets) in [
            (vec!["a".to_string(), "b".to_string()], vec![]),
            (vec!["a,ro".to_string()], vec![]),
            (vec![], vec!["tap=t1".to_string(), "tap=t2".to_string()]),
            (vec![], vec!["tap=t1,mac=52:54:00:00:00:09".to_string()]),
            (vec![], vec!["nonsense".to_string()]),
            (vec![], vec!["user".to_string()]),
        ] {
            assert!(
                c.override_devices(&disks, &nets).is_err(),
                "{disks:?} {nets:?}"
            );
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
