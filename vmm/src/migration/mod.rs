//! Live migration: a running VM moves to another wisp over TCP or a unix socket.
//!
//! The source (`send.rs`) runs as a job beside the event loop: a thread that sends
//! guest memory in pre-copy rounds (all of it, then what was dirtied meanwhile, as
//! [`crate::memory::dirty_log`] reports) while the VM keeps running, and asks the VMM
//! thread to pause and capture the [`crate::state::MachineState`] once what is left
//! fits the downtime target. The destination (`receive.rs`) checks the offer, builds
//! the machine while memory arrives, loads the state and runs. The wire format is in
//! `protocol.rs`.

pub mod protocol;
pub mod receive;
pub mod send;
pub mod worker;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a migration goes, or where `wisp receive` listens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Address {
    /// `tcp:HOST:PORT`: host and port, as `ToSocketAddrs` takes them.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("expected tcp:HOST:PORT, tcp:PORT or unix:PATH, not {s:?}");
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let rest = s.strip_prefix("tcp:").ok_or_else(bad)?;
        // tcp:PORT and tcp::PORT mean loopback.
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => ("", rest),
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = match host {
            "" => "127.0.0.1",
            h => h,
        };
        Ok(Address::Tcp(format!("{host}:{port}")))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(hp) => write!(f, "tcp:{hp}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What to do when pre-copy does not converge in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnTimeout {
    /// Give up; the VM keeps running on the source.
    #[default]
    Abort,
    /// Pause and send what is left, whatever the downtime.
    StopCopy,
}

impl FromStr for OnTimeout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "abort" => Ok(Self::Abort),
            "stop-copy" => Ok(Self::StopCopy),
            _ => Err(format!("expected abort or stop-copy, not {s:?}")),
        }
    }
}

/// How to migrate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// The destination.
    pub to: Address,
    /// The pause the VM may see, in milliseconds.
    pub downtime_ms: u64,
    /// How long pre-copy may take, in seconds.
    pub timeout_s: u64,
    /// What happens then.
    #[serde(default)]
    pub on_timeout: OnTimeout,
    /// At most this many MB/s, if set.
    #[serde(default)]
    pub bandwidth_mbps: Option<u64>,
}

/// Where a migration is, as `wisp status` and the migrate client show it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// `connecting`, `pre-copy`, `stop-copy` or `switching over`.
    pub phase: String,
    /// Pre-copy rounds so far (round 0 sends all memory).
    pub round: u32,
    /// Bytes sent so far (all frames).
    pub sent_bytes: u64,
    /// Bytes dirty and not yet sent, when last counted.
    pub dirty_bytes: u64,
    /// Zero pages skipped or sent as markers.
    pub zero_pages: u64,
    /// The rate measured so far, MB/s.
    pub rate_mbps: f64,
    /// The downtime the bytes left would cost at that rate, in ms.
    pub estimated_downtime_ms: f64,
    /// Seconds since the migration started.
    pub elapsed_s: f64,
}

/// What a finished migration reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The destination.
    pub to: String,
    /// From the start to the destination's RUNNING.
    pub total_s: f64,
    /// From the pause to the destination's RUNNING, in ms.
    pub downtime_ms: f64,
    /// Bytes sent (all frames).
    pub sent_bytes: u64,
    /// Pages sent with their data.
    pub data_pages: u64,
    /// Zero pages skipped or sent as markers.
    pub zero_pages: u64,
    /// Pre-copy rounds, the final one under pause included.
    pub rounds: u32,
    /// Whether it finished past the timeout by stop-copy.
    pub forced: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            "tcp:4444".parse(),
            Ok(Address::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!(
            "tcp::4444".parse(),
            Ok(Address::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!(
            "tcp:0.0.0.0:4444".parse(),
            Ok(Address::Tcp("0.0.0.0:4444".into()))
        );
        assert_eq!(
            "tcp:[::1]:4444".parse(),
            Ok(Address::Tcp("[::1]:4444".into()))
        );
        assert_eq!(
            "unix:/run/m.sock".parse(),
            Ok(Address::Unix("/run/m.sock".into()))
        );
        for bad in ["", "tcp:", "tcp:x", "tcp:1.2.3.4:99999", "unix:", "udp:1"] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
        assert_eq!(
            Address::Tcp("127.0.0.1:1".into()).to_string(),
            "tcp:127.0.0.1:1"
        );
    }
}
