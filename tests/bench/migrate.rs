//! Live migration benchmark (not a test: it reports, it never fails on a number).
//!
//! Three probe guests: idle at 256 MiB and at 1 GiB (`counter:1:0:1`: 1 MiB rewritten
//! between progress lines, printed as often as the serial port allows: on hosts where
//! guest kernel mode is emulated a line takes a few milliseconds, which bounds the
//! resolution below), and one dirtying memory (`counter:32:0:20`: 32 MiB rewritten
//! over and over, a line every 20 ms, so its console gap is no finer than that) at
//! 256 MiB. Each is moved, in alternation within one run:
//! - by live migration over loopback TCP (`wisp receive tcp:...` and `wisp migrate`);
//! - by hand, as the seed labs do: `wisp snapshot --stop`, a copy of the snapshot
//!   directory (sparse), `wisp restore` of the copy.
//!
//! Reported per guest and method, min / median / max: the downtime the host sees (the
//! last console output of the old process to the first of the new one), the total
//! (from the command's start to the new process's first output), and for migrations
//! the downtime wisp reports (pause to the destination's confirmation), the bytes sent
//! and the rounds; then the ratio snapshot-copy-restore / migration of the downtime
//! medians.
//!
//! Run: `scripts/bench.sh migrate`. Options: `--runs N` (default 3).

#[path = "../common/mod.rs"]
mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use common::{probe, wisp, TempDir};

const WAIT: Duration = Duration::from_secs(120);

struct Guest {
    label: &'static str,
    memory_mib: u64,
    cmds: &'static str,
}

const GUESTS: [Guest; 3] = [
    Guest {
        label: "idle, 256 MiB",
        memory_mib: 256,
        cmds: "counter:1:0:1",
    },
    Guest {
        label: "idle, 1 GiB",
        memory_mib: 1024,
        cmds: "counter:1:0:1",
    },
    Guest {
        label: "dirtying 32 MiB, 256 MiB",
        memory_mib: 256,
        cmds: "counter:32:0:20",
    },
];

/// A wisp whose console output is timestamped as it arrives.
struct Watched {
    child: Child,
    chunks: Receiver<Instant>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Watched {
    fn spawn(args: &[&str]) -> Watched {
        let mut child = Command::new(wisp())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn wisp");
        let mut out = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || tx.send(Instant::now()).is_err() {
                    break;
                }
            }
        });
        Watched {
            child,
            chunks: rx,
            first: None,
            last: None,
        }
    }

    /// Waits for the first output.
    fn first_output(&mut self) -> Instant {
        if self.first.is_none() {
            let at = self.chunks.recv_timeout(WAIT).expect("no console output");
            self.first = Some(at);
            self.last = Some(at);
        }
        self.first.unwrap_or_else(Instant::now)
    }

    /// Waits for the process to end; returns when its last output arrived.
    fn last_output(mut self) -> Instant {
        let deadline = Instant::now() + WAIT;
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            while let Ok(at) = self.chunks.try_recv() {
                self.last = Some(at);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        while let Ok(at) = self.chunks.recv_timeout(Duration::from_millis(200)) {
            self.last = Some(at);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.last.unwrap_or_else(Instant::now)
    }

    fn stop(mut self, api: &Path) {
        let _ = Command::new(wisp())
            .args(["stop", api.to_str().expect("utf-8")])
            .output();
        let deadline = Instant::now() + WAIT;
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn source(dir: &TempDir, g: &Guest, name: &str) -> (Watched, std::path::PathBuf) {
    let api = dir.0.join(format!("{name}.sock"));
    let memory = g.memory_mib.to_string();
    let cmdline = format!("probe.cmd={}", g.cmds);
    let kernel = probe();
    let mut w = Watched::spawn(&[
        "run",
        "--name",
        name,
        "--api",
        api.to_str().expect("utf-8"),
        "--memory",
        &memory,
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "--cmdline",
        &cmdline,
    ]);
    w.first_output();
    // Let the workload settle into its steady state.
    std::thread::sleep(Duration::from_millis(700));
    (w, api)
}

#[derive(Default)]
struct Samples {
    downtime_ms: Vec<f64>,
    reported_ms: Vec<f64>,
    total_s: Vec<f64>,
    mb: Vec<f64>,
    rounds: Vec<f64>,
}

fn migrate_once(dir: &TempDir, g: &Guest, run: usize, port: u16, s: &mut Samples) {
    let name = format!("mig-{}-{run}", g.memory_mib);
    let (src, api) = source(dir, g, &name);
    let addr = format!("tcp:127.0.0.1:{port}");
    let dest_api = dir.0.join(format!("{name}-d.sock"));
    let mut dest = Watched::spawn(&[
        "receive",
        &addr,
        "--name",
        &format!("{name}-d"),
        "--api",
        dest_api.to_str().expect("utf-8"),
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let out = Command::new(wisp())
        .args([
            "migrate",
            api.to_str().expect("utf-8"),
            "--to",
            &addr,
            "--json",
            "--timeout-s",
            "30",
            "--on-timeout",
            "stop-copy",
        ])
        .output()
        .expect("wisp migrate");
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("summary");
    let first = dest.first_output();
    let last = src.last_output();
    s.downtime_ms
        .push(first.saturating_duration_since(last).as_secs_f64() * 1e3);
    s.total_s.push(first.duration_since(t0).as_secs_f64());
    s.reported_ms
        .push(summary["summary"]["downtime_ms"].as_f64().unwrap_or(0.0));
    s.mb.push(summary["summary"]["sent_bytes"].as_f64().unwrap_or(0.0) / 1e6);
    s.rounds
        .push(summary["summary"]["rounds"].as_f64().unwrap_or(0.0));
    dest.stop(&dest_api);
}

fn by_hand_once(dir: &TempDir, g: &Guest, run: usize, s: &mut Samples) {
    let name = format!("hand-{}-{run}", g.memory_mib);
    let (src, api) = source(dir, g, &name);
    let snap = dir.0.join(format!("{name}.snap"));
    let copy = dir.0.join(format!("{name}.copy"));
    let t0 = Instant::now();
    let out = Command::new(wisp())
        .args([
            "snapshot",
            api.to_str().expect("utf-8"),
            "--to",
            snap.to_str().expect("utf-8"),
            "--stop",
        ])
        .output()
        .expect("wisp snapshot");
    assert!(out.status.success(), "snapshot failed");
    let last = src.last_output();
    let cp = Command::new("cp")
        .args(["-r", "--sparse=always"])
        .arg(&snap)
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(cp.success(), "copy failed");
    let restored_api = dir.0.join(format!("{name}-r.sock"));
    let mut restored = Watched::spawn(&[
        "restore",
        copy.to_str().expect("utf-8"),
        "--name",
        &format!("{name}-r"),
        "--api",
        restored_api.to_str().expect("utf-8"),
    ]);
    let first = restored.first_output();
    s.downtime_ms
        .push(first.saturating_duration_since(last).as_secs_f64() * 1e3);
    s.total_s.push(first.duration_since(t0).as_secs_f64());
    restored.stop(&restored_api);
    let _ = std::fs::remove_dir_all(&snap);
    let _ = std::fs::remove_dir_all(&copy);
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn main() {
    let runs = common::option_arg("--runs", 3) as usize;
    let dir = TempDir::new("bench-migrate");
    let mut live: Vec<Samples> = GUESTS.iter().map(|_| Samples::default()).collect();
    let mut hand: Vec<Samples> = GUESTS.iter().map(|_| Samples::default()).collect();
    let mut port = 47_000;
    for run in 0..runs {
        for (i, g) in GUESTS.iter().enumerate() {
            port += 1;
            migrate_once(&dir, g, run, port, &mut live[i]);
            by_hand_once(&dir, g, run, &mut hand[i]);
        }
    }
    println!(
        "migration benchmark: probe guests, {runs} runs per guest and method, alternating; min / median / max"
    );
    println!(
        "{:<26} {:<26} {:>26} {:>22} {:>9} {:>9} {:>7}",
        "guest", "method", "console gap ms", "total s", "paused ms", "MB sent", "rounds"
    );
    for (i, g) in GUESTS.iter().enumerate() {
        for (method, s) in [
            ("live migration (TCP)", &live[i]),
            ("snapshot + copy + restore", &hand[i]),
        ] {
            let (d0, d1, d2) = stats(&s.downtime_ms);
            let (t0, t1, t2) = stats(&s.total_s);
            let (paused, mb, rounds) = if s.mb.is_empty() {
                ("-".to_string(), "-".to_string(), "-".to_string())
            } else {
                (
                    format!("{:.1}", stats(&s.reported_ms).1),
                    format!("{:.1}", stats(&s.mb).1),
                    format!("{:.0}", stats(&s.rounds).1),
                )
            };
            println!(
                "{:<26} {:<26} {:>8.1} {:>8.1} {:>8.1} {:>6.2} {:>6.2} {:>6.2} {:>9} {:>9} {:>7}",
                g.label, method, d0, d1, d2, t0, t1, t2, paused, mb, rounds
            );
        }
        println!(
            "{:<26} ratio of downtime medians, snapshot-copy-restore / live: {:.1}",
            "",
            stats(&hand[i].downtime_ms).1 / stats(&live[i].downtime_ms).1.max(1e-3)
        );
    }
    println!(
        "Where guest kernel mode is emulated (see `wisp doctor`), a console line takes a few ms: downtimes below that are not resolved, and nothing here says anything absolute about real hardware."
    );
}
