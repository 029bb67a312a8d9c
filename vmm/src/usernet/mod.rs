//! User-mode NAT networking (`--net user[,hostfwd=...]`), backed by passt.
//!
//! wisp starts passt as a child process connected over a socketpair (`--fd`), in
//! passt's stream framing (4-byte big-endian length + Ethernet frame), with a
//! slirp-like address plan: the guest gets 10.0.2.15/24 by DHCP, 10.0.2.2 is the
//! gateway (and reaches the host), 10.0.2.3 answers DNS by forwarding to the host's
//! resolver. Port forwards map to passt's `-t`/`-u`. passt sandboxes itself, runs as
//! the invoking user (as `nobody` when that is root), exits when wisp's end of the
//! socket closes, and is killed and reaped when wisp drops it.

mod passt;
pub mod supervisor;

use std::io;
use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use self::supervisor::Supervisor;

/// The program wisp runs.
pub const PASST: &str = "passt";
/// MTU given to the guest: wisp offers no mergeable RX buffers, so frames must fit
/// one 1526-byte buffer... or a Linux guest's big buffers; 1500 keeps both safe.
pub const MTU: u32 = 1500;

/// Errors of user-mode networking.
#[derive(Debug, Error)]
pub enum UserNetError {
    /// A malformed `hostfwd=` or option.
    #[error("--net user: {0}")]
    Syntax(String),
    /// passt is not on PATH.
    #[error(
        "--net user needs passt, which is not installed (or not on PATH): apt-get install passt"
    )]
    NotInstalled,
    /// A forward's host port cannot be bound.
    #[error("hostfwd={spec}: cannot listen on {addr}:{port}: {why}; choose another host port")]
    PortUnavailable {
        /// The forward as written.
        spec: String,
        /// Host address.
        addr: IpAddr,
        /// Host port.
        port: u16,
        /// Cause.
        why: String,
    },
    /// Starting passt failed.
    #[error("cannot start passt: {0}")]
    Spawn(io::Error),
    /// passt exited during start-up.
    #[error("passt exited at start-up: {0}")]
    Died(String),
}

/// TCP or UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// One `hostfwd=PROTO:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFwd {
    /// Protocol.
    pub proto: Proto,
    /// Host address to listen on (default 127.0.0.1).
    pub host_addr: IpAddr,
    /// Host port.
    pub host_port: u16,
    /// Guest port.
    pub guest_port: u16,
}

impl HostFwd {
    /// As written by the user, normalised.
    pub fn spec(&self) -> String {
        let p = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        format!(
            "{p}:{}:{}-:{}",
            self.host_addr, self.host_port, self.guest_port
        )
    }
}

/// The address plan and forwards of one user-mode network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNetConfig {
    /// The guest's address (DHCP hands it out).
    pub guest: Ipv4Addr,
    /// Prefix length of the guest network.
    pub prefix: u8,
    /// Gateway; traffic to it reaches the host.
    pub gateway: Ipv4Addr,
    /// DNS address the guest is told about; passt forwards it to the host's resolver.
    pub dns: Ipv4Addr,
    /// Port forwards, host to guest.
    pub forwards: Vec<HostFwd>,
}

impl Default for UserNetConfig {
    fn default() -> Self {
        Self {
            guest: Ipv4Addr::new(10, 0, 2, 15),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            dns: Ipv4Addr::new(10, 0, 2, 3),
            forwards: Vec::new(),
        }
    }
}

fn syntax(msg: String) -> UserNetError {
    UserNetError::Syntax(msg)
}

fn parse_port(s: &str, what: &str, spec: &str) -> Result<u16, UserNetError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(syntax(format!(
            "hostfwd={spec}: {what} {s:?} is not a port number 1-65535"
        ))),
    }
}

/// Parses `PROTO:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT` (QEMU's syntax).
/// GUESTADDR, if given, must be the guest's address: passt forwards to it.
pub fn parse_hostfwd(spec: &str, guest: Ipv4Addr) -> Result<HostFwd, UserNetError> {
    let bad = |why: &str| {
        syntax(format!(
            "hostfwd={spec}: {why}; expected PROTO:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT, e.g. hostfwd=tcp::2222-:22"
        ))
    };
    let (host, guest_part) = spec.split_once('-').ok_or_else(|| bad("no '-'"))?;
    let mut h = host.splitn(3, ':');
    let proto = match h.next() {
        Some("tcp") | Some("") => Proto::Tcp,
        Some("udp") => Proto::Udp,
        _ => return Err(bad("PROTO must be tcp or udp")),
    };
    let (Some(haddr), Some(hport)) = (h.next(), h.next()) else {
        return Err(bad("missing HOSTADDR:HOSTPORT"));
    };
    let host_addr = if haddr.is_empty() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        haddr
            .parse()
            .map_err(|_| bad(&format!("HOSTADDR {haddr:?} is not an IP address")))?
    };
    let host_port = parse_port(hport, "HOSTPORT", spec)?;
    let (gaddr, gport) = guest_part
        .rsplit_once(':')
        .ok_or_else(|| bad("missing GUESTADDR:GUESTPORT"))?;
    if !gaddr.is_empty() {
        let a: Ipv4Addr = gaddr
            .parse()
            .map_err(|_| bad(&format!("GUESTADDR {gaddr:?} is not an IPv4 address")))?;
        if a != guest {
            return Err(bad(&format!(
                "GUESTADDR must be the guest's address {guest} (or empty)"
            )));
        }
    }
    let guest_port = parse_port(gport, "GUESTPORT", spec)?;
    Ok(HostFwd {
        proto,
        host_addr,
        host_port,
        guest_port,
    })
}

fn parse_ipv4(key: &str, v: &str) -> Result<Ipv4Addr, UserNetError> {
    v.parse()
        .map_err(|_| syntax(format!("{key}={v:?} is not an IPv4 address")))
}

/// Parses the options after `user` in `--net user,...`: `hostfwd=...` (repeatable),
/// `net=ADDR/PREFIX`, `host=ADDR` (gateway), `dns=ADDR`, `guest=ADDR`.
pub fn parse_options<'a>(
    opts: impl Iterator<Item = &'a str>,
) -> Result<UserNetConfig, UserNetError> {
    let mut cfg = UserNetConfig::default();
    let mut fwds = Vec::new();
    let mut net: Option<(Ipv4Addr, u8)> = None;
    for opt in opts {
        let (k, v) = opt
            .split_once('=')
            .ok_or_else(|| syntax(format!("unknown option {opt:?}")))?;
        match k {
            "hostfwd" => fwds.push(v.to_string()),
            "net" => {
                let (a, p) = v.split_once('/').unwrap_or((v, "24"));
                let prefix: u8 = p
                    .parse()
                    .ok()
                    .filter(|p| (8..=30).contains(p))
                    .ok_or_else(|| syntax(format!("net={v:?}: prefix must be 8..30")))?;
                net = Some((parse_ipv4("net", a)?, prefix));
            }
            "host" => cfg.gateway = parse_ipv4(k, v)?,
            "dns" => cfg.dns = parse_ipv4(k, v)?,
            "guest" | "dhcpstart" => cfg.guest = parse_ipv4(k, v)?,
            _ => return Err(syntax(format!("unknown option {opt:?}"))),
        }
    }
    if let Some((addr, prefix)) = net {
        // Re-base the default host parts (.2, .3, .15) on the given network unless set.
        let base = u32::from(addr) & (u32::MAX << (32 - prefix));
        let d = UserNetConfig::default();
        let rebase = |a: Ipv4Addr, default: Ipv4Addr| {
            if a == default {
                Ipv4Addr::from(base | (u32::from(default) & 0xff))
            } else {
                a
            }
        };
        cfg.prefix = prefix;
        cfg.gateway = rebase(cfg.gateway, d.gateway);
        cfg.dns = rebase(cfg.dns, d.dns);
        cfg.guest = rebase(cfg.guest, d.guest);
    }
    let mask = u32::MAX << (32 - cfg.prefix);
    for (name, a) in [("host", cfg.gateway), ("dns", cfg.dns)] {
        if u32::from(a) & mask != u32::from(cfg.guest) & mask || a == cfg.guest {
            return Err(syntax(format!(
                "{name}={a} must be another address in the guest's network {}/{}",
                Ipv4Addr::from(u32::from(cfg.guest) & mask),
                cfg.prefix
            )));
        }
    }
    for f in fwds {
        cfg.forwards.push(parse_hostfwd(&f, cfg.guest)?);
    }
    Ok(cfg)
}

/// Finds `prog` on PATH.
pub(crate) fn find_on_path(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Checks that every forward's host port can be bound now (passt would otherwise
/// exit at start-up with a less specific message).
pub fn check_ports(cfg: &UserNetConfig) -> Result<(), UserNetError> {
    for f in &cfg.forwards {
        let r = match f.proto {
            Proto::Tcp => TcpListener::bind((f.host_addr, f.host_port)).map(drop),
            Proto::Udp => UdpSocket::bind((f.host_addr, f.host_port)).map(drop),
        };
        if let Err(e) = r {
            let why = match e.kind() {
                io::ErrorKind::AddrInUse => "already in use".to_string(),
                io::ErrorKind::PermissionDenied => {
                    "permission denied (ports below 1024 need root)".to_string()
                }
                _ => e.to_string(),
            };
            return Err(UserNetError::PortUnavailable {
                spec: f.spec(),
                addr: f.host_addr,
                port: f.host_port,
                why,
            });
        }
    }
    Ok(())
}

/// passt's command line for `cfg`, talking over descriptor `fd`.
pub fn passt_args(cfg: &UserNetConfig, fd: i32) -> Vec<String> {
    let mut a: Vec<String> = [
        "--foreground",
        "--quiet",
        "--stderr",
        "--one-off",
        "--ipv4-only",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let kv = [
        ("--fd", fd.to_string()),
        ("--address", cfg.guest.to_string()),
        ("--netmask", cfg.prefix.to_string()),
        ("--gateway", cfg.gateway.to_string()),
        ("--mtu", MTU.to_string()),
        ("--dns-forward", cfg.dns.to_string()),
        ("--dns", cfg.dns.to_string()),
    ];
    for (k, v) in kv {
        a.push(k.to_string());
        a.push(v);
    }
    for f in &cfg.forwards {
        a.push(match f.proto {
            Proto::Tcp => "-t".into(),
            Proto::Udp => "-u".into(),
        });
        a.push(format!("{}/{}:{}", f.host_addr, f.host_port, f.guest_port));
    }
    a
}

/// What can be checked before passt starts: it is installed, and every forward's host
/// port is free.
pub fn check(cfg: &UserNetConfig) -> Result<(), UserNetError> {
    find_on_path(PASST).ok_or(UserNetError::NotInstalled)?;
    check_ports(cfg)
}

/// Starts user-mode networking for `cfg`: checks it ([`check`]), starts the
/// supervisor process and through it passt, and returns wisp's end of the connection
/// plus the handle that asks the supervisor for a new passt when this one dies.
pub fn start(
    cfg: &UserNetConfig,
) -> Result<(UnixStream, Box<dyn devices::virtio::net::stream::Reconnect>), UserNetError> {
    check(cfg)?;
    let (supervisor, stream) = Supervisor::start(cfg)?;
    Ok((stream, Box::new(supervisor)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

    #[test]
    fn hostfwd_syntax_matches_qemu() {
        let f = parse_hostfwd("tcp::2222-:22", GUEST).unwrap();
        assert_eq!(f.proto, Proto::Tcp);
        assert_eq!(
            f.host_addr,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "never 0.0.0.0 by default"
        );
        assert_eq!((f.host_port, f.guest_port), (2222, 22));
        let f = parse_hostfwd("udp:0.0.0.0:5353-10.0.2.15:53", GUEST).unwrap();
        assert_eq!(f.proto, Proto::Udp);
        assert_eq!(f.host_addr, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(f.spec(), "udp:0.0.0.0:5353-:53");
        for bad in [
            "tcp:2222-:22",
            "sctp::1-:2",
            "tcp::0-:22",
            "tcp::70000-:22",
            "tcp::2222:22",
            "tcp:localhost:2222-:22",
            "tcp::2222-10.0.2.16:22",
            "tcp::2222-:",
        ] {
            let e = parse_hostfwd(bad, GUEST).unwrap_err();
            assert!(e.to_string().contains("hostfwd="), "{bad}: {e}");
        }
    }

    #[test]
    fn address_plan_defaults_and_overrides() {
        let c = parse_options(std::iter::empty()).unwrap();
        assert_eq!(c, UserNetConfig::default());
        let c =
            parse_options(["net=192.168.76.0/24", "hostfwd=tcp::2222-:22"].into_iter()).unwrap();
        assert_eq!(c.guest, Ipv4Addr::new(192, 168, 76, 15));
        assert_eq!(c.gateway, Ipv4Addr::new(192, 168, 76, 2));
        assert_eq!(c.dns, Ipv4Addr::new(192, 168, 76, 3));
        assert_eq!(c.forwards.len(), 1);
        assert!(parse_options(["host=10.0.3.2"].into_iter()).is_err());
        assert!(parse_options(["bogus=1"].into_iter()).is_err());
        assert!(parse_options(["net=10.0.0.0/31"].into_iter()).is_err());
    }

    #[test]
    fn passt_gets_the_plan_and_forwards() {
        let c = parse_options(["hostfwd=tcp::2222-:22", "hostfwd=udp:0.0.0.0:53-:53"].into_iter())
            .unwrap();
        let a = passt_args(&c, 7).join(" ");
        for want in [
            "--fd 7",
            "--address 10.0.2.15",
            "--netmask 24",
            "--gateway 10.0.2.2",
            "--mtu 1500",
            "--dns-forward 10.0.2.3",
            "-t 127.0.0.1/2222:22",
            "-u 0.0.0.0/53:53",
            "--one-off",
        ] {
            assert!(a.contains(want), "{want} missing in {a}");
        }
    }

    #[test]
    fn a_busy_port_names_the_forward() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let c = parse_options([format!("hostfwd=tcp::{port}-:22").as_str()].into_iter()).unwrap();
        let e = check_ports(&c).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("already in use"),
            "{msg}"
        );
    }
}
