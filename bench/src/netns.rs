//! Network namespaces the bench creates, one slot per instance, so that every instance
//! has the same addresses (a restored VM keeps the address it was snapshotted with) and
//! none of them touches the host's network.
//!
//! A slot is a namespace `wb<pid>-<n>` holding the client's end: a TAP for a VM (the
//! VMM runs in the namespace and opens it), or a veth whose peer is the only interface
//! of a second namespace `wb<pid>-<n>c`, the container's. The client side is
//! [`HOST_IP`], the instance [`GUEST_IP`].

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use thiserror::Error;

/// The client's address in every slot.
pub const HOST_IP: &str = "10.77.0.1";
/// The instance's address in every slot.
pub const GUEST_IP: &str = "10.77.0.2";
/// The netmask of the slot's /24.
pub const NETMASK: &str = "255.255.255.0";
/// The TAP a VM's card uses.
pub const TAP: &str = "wbtap0";

/// How the instance connects to the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// A TAP named [`TAP`], for a VMM running in the slot.
    Tap,
    /// A veth into a namespace of the instance's own (a container's).
    Veth,
}

/// Setting up a namespace failed.
#[derive(Debug, Error)]
pub enum NetError {
    /// An `ip` command failed.
    #[error("`{cmd}` failed: {why}")]
    Ip {
        /// The command line.
        cmd: String,
        /// Its error output, or why it could not run.
        why: String,
    },
    /// The namespace file could not be opened or entered.
    #[error("network namespace {name}: {source}")]
    Enter {
        /// The namespace.
        name: String,
        /// Cause.
        source: io::Error,
    },
}

fn ip(args: &[&str]) -> Result<(), NetError> {
    let cmd = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetError::Ip {
            cmd: cmd.clone(),
            why: format!("{e} (install iproute2)"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Ip {
            cmd,
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// One instance's network.
pub struct Slot {
    name: String,
    ns: File,
    container_ns: Option<String>,
}

impl Slot {
    /// Creates slot `index` of this bench process, linked as `link`.
    pub fn create(index: usize, link: Link) -> Result<Self, NetError> {
        let name = format!("wb{}-{index}", std::process::id());
        ip(&["netns", "add", &name])?;
        // From here on, Drop removes what exists.
        let ns = File::open(format!("/run/netns/{name}")).map_err(|source| NetError::Enter {
            name: name.clone(),
            source,
        });
        let mut slot = match ns {
            Ok(ns) => Slot {
                name: name.clone(),
                ns,
                container_ns: None,
            },
            Err(e) => {
                let _ = ip(&["netns", "del", &name]);
                return Err(e);
            }
        };
        let host = format!("{HOST_IP}/24");
        let n = name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        match link {
            Link::Tap => {
                ip(&["-n", n, "tuntap", "add", "dev", TAP, "mode", "tap"])?;
                ip(&["-n", n, "addr", "add", &host, "dev", TAP])?;
                ip(&["-n", n, "link", "set", TAP, "up"])?;
            }
            Link::Veth => {
                let c = format!("{name}c");
                ip(&["netns", "add", &c])?;
                slot.container_ns = Some(c.clone());
                ip(&[
                    "-n", n, "link", "add", "wbveth0", "type", "veth", "peer", "name", "eth0",
                    "netns", &c,
                ])?;
                ip(&["-n", n, "addr", "add", &host, "dev", "wbveth0"])?;
                ip(&["-n", n, "link", "set", "wbveth0", "up"])?;
                let guest = format!("{GUEST_IP}/24");
                ip(&["-n", &c, "addr", "add", &guest, "dev", "eth0"])?;
                ip(&["-n", &c, "link", "set", "eth0", "up"])?;
                ip(&["-n", &c, "link", "set", "lo", "up"])?;
            }
        }
        Ok(slot)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Forgets the previous instance's MAC address, so the next one is found at once.
    pub fn forget_neighbours(&self) {
        let _ = ip(&["-n", &self.name, "neigh", "flush", "all"]);
    }

    /// The container's namespace (for [`Link::Veth`] slots), as a path for an OCI
    /// config.
    pub fn container_ns_path(&self) -> Option<PathBuf> {
        self.container_ns
            .as_ref()
            .map(|c| PathBuf::from(format!("/run/netns/{c}")))
    }

    /// Makes `cmd` start inside the slot's namespace.
    pub fn enter_on_spawn(&self, cmd: &mut Command) {
        let fd = self.ns.as_raw_fd();
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: setns is a plain system call, and the
        // closure allocates nothing. `fd` stays open in the parent (self.ns) while the
        // command is spawned, so the child's copy is valid.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
    }

    /// Runs `f` on a thread inside the slot's namespace (the caller's thread stays where
    /// it is).
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
        let fd = self.ns.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread only, with a namespace fd that self keeps
                // open for the scope's duration.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(NetError::Enter {
                        name: self.name.clone(),
                        source: io::Error::last_os_error(),
                    });
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetError::Enter {
                    name: self.name.clone(),
                    source: io::Error::other("the client thread panicked"),
                })
            })
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        for ns in self.container_ns.iter().chain(std::iter::once(&self.name)) {
            if let Err(e) = ip(&["netns", "del", ns]) {
                log::warn!("bench: cannot remove namespace: {e}");
            }
        }
    }
}

/// Removes namespaces left by bench processes that no longer exist (killed before they
/// could clean up).
pub fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix("wb").and_then(|r| r.split('-').next());
        if pid.is_some_and(crate::procfs::gone) {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}
