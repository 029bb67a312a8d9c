//! `wisp migrate`: move a running VM to another wisp (`wisp receive`).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use clap::Args;
use vmm::api::Request;
use vmm::migration::{OnTimeout, Progress, Summary};

use super::whole_number;

#[derive(Args)]
#[command(after_long_help = "\
The destination runs `wisp receive ADDR` first. The VM keeps running while its memory
moves: round 0 sends all of RAM (zero pages are not sent), later rounds what the guest
wrote meanwhile, until what is left would take less than --downtime-ms at the rate
measured; then the VM pauses, the last pages and its state move, and it continues on
the destination, which answers once its vCPUs run. Then this VM's wisp exits 0.

Disks must be shared storage: the destination opens the same paths (or its --disk
overrides); the source flushes them and releases its image locks at the switch-over.
Network cards attach to the destination's backends (its --net overrides).

If anything fails before the destination answers (connection lost, destination gone,
refused, timeout with --on-timeout abort, --cancel or Ctrl-C here), the VM keeps
running here, with its disks and network.

The stream is neither authenticated nor encrypted (as QEMU's plain TCP migration):
use it only on networks you trust, or over a unix socket. See the README, Live
migration.

EXAMPLES:
  wisp receive tcp:4444                        # on the destination (loopback only)
  wisp migrate vm1 --to tcp:127.0.0.1:4444
  wisp migrate vm1 --to unix:/run/wisp-mig.sock --downtime-ms 50 --json
  wisp migrate vm1 --cancel")]
pub struct MigrateArgs {
    /// The VM's --name, or the path of its control socket.
    name: String,
    /// Where the destination listens: tcp:HOST:PORT, tcp:PORT (127.0.0.1) or unix:PATH.
    #[arg(long, value_name = "ADDR", required_unless_present = "cancel")]
    to: Option<String>,
    /// The pause the VM may see at the switch-over, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 30, value_parser = whole_number)]
    downtime_ms: u64,
    /// How long the copying may take before --on-timeout applies, in seconds.
    #[arg(long, value_name = "S", default_value_t = 300, value_parser = whole_number)]
    timeout_s: u64,
    /// Past --timeout-s: `abort` (the VM keeps running here) or `stop-copy` (pause and
    /// move it anyway; the summary reports the longer downtime).
    #[arg(long, value_name = "abort|stop-copy", default_value = "abort")]
    on_timeout: OnTimeout,
    /// Send at most this many MB/s.
    #[arg(long, value_name = "MBPS", value_parser = whole_number)]
    bandwidth: Option<u64>,
    /// One JSON line per event (progress, then the summary) instead of a progress bar.
    #[arg(long)]
    json: bool,
    /// Stop the VM's running migration (it keeps running here).
    #[arg(long, conflicts_with_all = ["to", "json"])]
    cancel: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Ctrl-C cancels the migration instead of killing the client.
fn catch_sigint() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe; SA_RESTART
    // is not set, so a blocked read returns EINTR and the loop sees the flag.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigint as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// One line of where a migration is.
pub fn bar(p: &Progress) -> String {
    format!(
        "{}: round {}, {:.1} MB sent, {:.1} MB dirty, {:.1} MB/s, est. downtime {:.0} ms",
        p.phase,
        p.round,
        mb(p.sent_bytes),
        mb(p.dirty_bytes),
        p.rate_mbps,
        p.estimated_downtime_ms
    )
}

fn summary_line(name: &str, s: &Summary) -> String {
    format!(
        "{name}: migrated to {} in {:.2} s, downtime {:.1} ms{}, {:.1} MB sent ({} pages, {} zero pages skipped), {} rounds",
        s.to,
        s.total_s,
        s.downtime_ms,
        if s.forced { " (stop-copy past the timeout)" } else { "" },
        mb(s.sent_bytes),
        s.data_pages,
        s.zero_pages,
        s.rounds
    )
}

pub fn migrate(args: MigrateArgs) -> Result<u8> {
    if args.cancel {
        vmm::api::call(&args.name, &Request::MigrateCancel)?;
        println!("{}: cancelling the migration", args.name);
        return Ok(0);
    }
    let Some(to) = args.to else {
        anyhow::bail!("--to ADDR is needed (or --cancel)");
    };
    // The address is checked here too, so a typo is one line before anything starts.
    let parsed: vmm::migration::Address = to
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--to {e}"))?;
    let req = Request::Migrate {
        to: parsed.to_string(),
        downtime_ms: args.downtime_ms,
        timeout_s: args.timeout_s,
        on_timeout: args.on_timeout,
        bandwidth_mbps: args.bandwidth,
    };
    catch_sigint();
    let tty = !args.json && std::io::stderr().is_terminal();
    let name = args.name.clone();
    let mut cancelled = false;
    let result = vmm::api::migrate(&args.name, &req, |p| {
        if INTERRUPTED.load(Ordering::Relaxed) && !cancelled {
            cancelled = true;
            let _ = vmm::api::call(&name, &Request::MigrateCancel);
        }
        if args.json {
            let event = vmm::api::MigrationEvent::Progress {
                progress: p.clone(),
            };
            if let Ok(line) = serde_json::to_string(&event) {
                println!("{line}");
            }
        } else if tty {
            let mut err = std::io::stderr();
            let _ = write!(err, "\r{}\x1b[K", bar(p));
            let _ = err.flush();
        }
    });
    if tty {
        eprintln!();
    }
    let summary = result?;
    if args.json {
        let event = vmm::api::MigrationEvent::Done {
            summary: summary.clone(),
        };
        println!("{}", serde_json::to_string(&event)?);
    } else {
        println!("{}", summary_line(&args.name, &summary));
    }
    Ok(0)
}
