//! A container's network namespace (as CNI sets it up for Kubernetes, or as `ctr run
//! --with-ns network:PATH` names it) handed to the VM: the namespace's veth keeps its
//! place, a bridge joins it to the TAP wisp creates there, and the guest takes the
//! veth's IPv4 address and MAC (the veth gets a new MAC, so the peer's ARP entry stays
//! right). [`Plan::restore`] puts the namespace back as it was.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use thiserror::Error;

/// The bridge the shim creates in the namespace.
pub const BRIDGE: &str = "wisp0";

/// Why the namespace cannot be handed to the VM.
#[derive(Debug, Error)]
pub enum NetnsError {
    /// `ip` could not run or failed.
    #[error("network namespace {ns}: `ip {args}` failed: {why}")]
    Ip {
        /// The namespace.
        ns: String,
        /// The arguments.
        args: String,
        /// Its error output.
        why: String,
    },
    /// There is no interface to give the guest.
    #[error(
        "network namespace {0}: no interface with an IPv4 address to give the VM (is CNI set up?)"
    )]
    NoInterface(String),
}

/// What the namespace held, and what the guest gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The namespace file.
    pub ns: PathBuf,
    /// The veth (e.g. eth0).
    pub iface: String,
    /// Its IPv4 address.
    pub addr: String,
    /// Its prefix length.
    pub prefix: u8,
    /// The default gateway, if any.
    pub gateway: Option<String>,
    /// Its MAC, which the guest takes.
    pub mac: String,
    /// The MAC the veth gets meanwhile.
    pub veth_mac: String,
}

fn ip(ns: &Path, args: &[&str]) -> Result<String, NetnsError> {
    let fail = |why: String| NetnsError::Ip {
        ns: ns.display().to_string(),
        args: args.join(" "),
        why,
    };
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .arg("ip")
        .args(args)
        .output()
        .map_err(|e| fail(format!("cannot run nsenter: {e}")))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json(ns: &Path, args: &[&str]) -> Result<Value, NetnsError> {
    let text = ip(ns, args)?;
    serde_json::from_str(&text).map_err(|e| NetnsError::Ip {
        ns: ns.display().to_string(),
        args: args.join(" "),
        why: format!("unexpected output: {e}"),
    })
}

/// The netmask of a prefix length, dotted.
pub fn netmask(prefix: u8) -> String {
    let m: u32 = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    std::net::Ipv4Addr::from(m).to_string()
}

impl Plan {
    /// Looks at namespace `ns`: its first non-loopback interface with an IPv4 address.
    /// `salt` makes the veth's new MAC (locally administered) unique.
    pub fn read(ns: &Path, salt: &[u8]) -> Result<Plan, NetnsError> {
        let addrs = json(ns, &["-j", "addr", "show"])?;
        let none = || NetnsError::NoInterface(ns.display().to_string());
        let inet = |l: &Value| {
            l["addr_info"]
                .as_array()
                .and_then(|a| a.iter().find(|i| i["family"] == "inet"))
                .cloned()
        };
        let (link, info) = addrs
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["link_type"] == "ether")
            .find_map(|l| Some((l, inet(l)?)))
            .ok_or_else(none)?;
        let iface = link["ifname"].as_str().ok_or_else(none)?.to_string();
        let addr = info["local"].as_str().ok_or_else(none)?.to_string();
        let prefix = info["prefixlen"]
            .as_u64()
            .and_then(|p| u8::try_from(p).ok())
            .ok_or_else(none)?;
        let mac = link["address"].as_str().ok_or_else(none)?.to_string();
        let routes = json(ns, &["-j", "-4", "route", "show", "default"])?;
        let gateway = routes
            .as_array()
            .and_then(|r| r.first())
            .and_then(|r| r["gateway"].as_str())
            .map(str::to_string);
        let h = wisp_image::digest::sha256_of(salt);
        let veth_mac = format!(
            "02:{}:{}:{}:{}:{}",
            &h[0..2],
            &h[2..4],
            &h[4..6],
            &h[6..8],
            &h[8..10]
        );
        Ok(Plan {
            ns: ns.to_path_buf(),
            iface,
            addr,
            prefix,
            gateway,
            mac,
            veth_mac,
        })
    }

    /// Bridges the veth to [`BRIDGE`] and takes its address off, for wisp's TAP.
    pub fn apply(&self) -> Result<(), NetnsError> {
        let ns = &self.ns;
        let i = self.iface.as_str();
        ip(ns, &["link", "add", BRIDGE, "type", "bridge"])?;
        ip(ns, &["link", "set", i, "down"])?;
        ip(ns, &["link", "set", i, "address", &self.veth_mac])?;
        ip(ns, &["addr", "flush", "dev", i])?;
        ip(ns, &["link", "set", i, "master", BRIDGE])?;
        ip(ns, &["link", "set", i, "up"])?;
        ip(ns, &["link", "set", BRIDGE, "up"])?;
        Ok(())
    }

    /// The guest's kernel `ip=` word: the veth's address, gateway and netmask.
    pub fn cmdline(&self) -> String {
        format!(
            "ip={}::{}:{}::eth0:off",
            self.addr,
            self.gateway.as_deref().unwrap_or(""),
            netmask(self.prefix)
        )
    }

    /// Undoes [`Plan::apply`]: the bridge goes, the veth gets its MAC, address and
    /// default route back. Errors are logged: the namespace may be gone already.
    pub fn restore(&self) {
        let ns = &self.ns;
        let i = self.iface.as_str();
        let addr = format!("{}/{}", self.addr, self.prefix);
        // A TAP wisp could not remove (it was killed) is still on the bridge.
        let taps: Vec<String> = json(ns, &["-j", "link", "show", "master", BRIDGE])
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .filter(|n| *n != self.iface)
            .collect();
        let mut steps: Vec<Vec<&str>> = taps
            .iter()
            .map(|t| vec!["link", "del", t.as_str()])
            .collect();
        steps.extend([
            vec!["link", "del", BRIDGE],
            vec!["link", "set", i, "down"],
            vec!["link", "set", i, "address", &self.mac],
            vec!["link", "set", i, "up"],
            vec!["addr", "add", &addr, "dev", i],
        ]);
        if let Some(gw) = &self.gateway {
            steps.push(vec!["route", "add", "default", "via", gw, "dev", i]);
        }
        for s in steps {
            if let Err(e) = ip(ns, &s) {
                log::warn!("{e}");
            }
        }
    }

    /// The plan as JSON, kept in the work directory for `delete` after a crash.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "ns": self.ns, "iface": self.iface, "addr": self.addr, "prefix": self.prefix,
            "gateway": self.gateway, "mac": self.mac, "veth_mac": self.veth_mac,
        })
        .to_string()
    }

    /// Reads [`Plan::to_json`]'s text.
    pub fn from_json(text: &str) -> Option<Plan> {
        let v: Value = serde_json::from_str(text).ok()?;
        let s = |k: &str| v[k].as_str().map(str::to_string);
        Some(Plan {
            ns: PathBuf::from(s("ns")?),
            iface: s("iface")?,
            addr: s("addr")?,
            prefix: u8::try_from(v["prefix"].as_u64()?).ok()?,
            gateway: s("gateway"),
            mac: s("mac")?,
            veth_mac: s("veth_mac")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks_and_the_guest_ip_word() {
        assert_eq!(netmask(24), "255.255.255.0");
        assert_eq!(netmask(0), "0.0.0.0");
        assert_eq!(netmask(32), "255.255.255.255");
        let p = Plan {
            ns: "/var/run/netns/x".into(),
            iface: "eth0".into(),
            addr: "10.88.0.5".into(),
            prefix: 16,
            gateway: Some("10.88.0.1".into()),
            mac: "aa:bb:cc:dd:ee:ff".into(),
            veth_mac: "02:00:00:00:00:01".into(),
        };
        assert_eq!(p.cmdline(), "ip=10.88.0.5::10.88.0.1:255.255.0.0::eth0:off");
        assert_eq!(Plan::from_json(&p.to_json()), Some(p));
    }
}
