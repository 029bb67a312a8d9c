//! Snapshot and restore benchmark (not a test: it reports, it never fails on a number).
//!
//! Two probe guests that differ only in RAM size (128 MiB and 1 GiB) run the same
//! memory workload: `counter:16:1` fills 16 MiB, then `counter:1:0:1` rewrites 1 MiB
//! of it forever with a progress line every few milliseconds (serial output is slow
//! here), so output resumes right after a restore. For each size, in alternation
//! within one run:
//! - snapshot-create time: `wisp snapshot NAME --to DIR`, from the command's start to
//!   its exit (pause, save, write both files, resume);
//! - on-disk size of the snapshot (allocated blocks: the memory file is sparse);
//! - restore-to-running: from spawning `wisp restore DIR` to the first byte of guest
//!   console output after the restore;
//! - for scale, cold boot to the first progress line of the same guest.
//!
//! Reported: medians, and the 1 GiB / 128 MiB ratio of each, measured side by side.
//! Restore maps the memory file copy-on-write and only checks the file's data pages,
//! so its time should not grow with the guest's RAM.
//!
//! Run: `scripts/bench.sh snapshot`. Options: `--runs N` (default 5).

#[path = "../common/mod.rs"]
mod common;

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use common::{probe, wisp, TempDir};

const SIZES_MIB: [u64; 2] = [128, 1024];
const WORKLOAD: &str = "probe.cmd=counter:16:1,counter:1:0:1";
const WAIT: Duration = Duration::from_secs(60);

/// Spawns wisp with `args`, console on stdout; returns it once the first byte of guest
/// output arrived, with the time that took.
fn until_first_output(args: &[&str], want: &str) -> (Child, Duration) {
    let t0 = Instant::now();
    let mut child = Command::new(wisp())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn wisp");
    let mut out = child.stdout.take().expect("stdout");
    let (tx, rx) = channel();
    let pattern = want.to_string();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut sent = false;
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if !sent && String::from_utf8_lossy(&seen).contains(pattern.as_str()) {
                let _ = tx.send(Instant::now());
                sent = true;
            }
        }
    });
    let at = rx
        .recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("no {want:?} from wisp {args:?}"));
    (child, at - t0)
}

fn stop(mut child: Child, api: &Path) {
    let _ = Command::new(wisp())
        .args(["stop", api.to_str().expect("utf-8")])
        .output();
    let deadline = Instant::now() + WAIT;
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn disk_bytes(dir: &Path) -> u64 {
    ["state", "memory"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

#[derive(Default)]
struct Samples {
    boot: Vec<f64>,
    snapshot: Vec<f64>,
    disk_mib: Vec<f64>,
    restore: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One round for `mib`: boot, snapshot, restore.
fn round(dir: &TempDir, mib: u64, run: usize, s: &mut Samples) {
    let name = format!("bench-{mib}-{run}");
    let api = dir.0.join(format!("{name}.sock"));
    let api_s = api.to_str().expect("utf-8").to_string();
    let memory = mib.to_string();
    let probe = probe();
    let (child, boot) = until_first_output(
        &[
            "run",
            "--name",
            &name,
            "--api",
            &api_s,
            "--memory",
            &memory,
            "--kernel",
            probe.to_str().expect("utf-8"),
            "--cmdline",
            WORKLOAD,
        ],
        "count=",
    );
    s.boot.push(boot.as_secs_f64());
    // Let the first counter fill its 16 MiB.
    std::thread::sleep(Duration::from_millis(500));
    let snap: PathBuf = dir.0.join(format!("{name}.snap"));
    let t0 = Instant::now();
    let out = Command::new(wisp())
        .args(["snapshot", &api_s, "--to", snap.to_str().expect("utf-8")])
        .output()
        .expect("wisp snapshot");
    let took = t0.elapsed();
    assert!(
        out.status.success(),
        "snapshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.snapshot.push(took.as_secs_f64());
    s.disk_mib
        .push(disk_bytes(&snap) as f64 / f64::from(1 << 20));
    stop(child, &api);

    let api2 = dir.0.join(format!("{name}-r.sock"));
    let api2_s = api2.to_str().expect("utf-8").to_string();
    let (child, restore) = until_first_output(
        &[
            "restore",
            snap.to_str().expect("utf-8"),
            "--name",
            &format!("{name}-r"),
            "--api",
            &api2_s,
        ],
        "",
    );
    s.restore.push(restore.as_secs_f64());
    stop(child, &api2);
    let _ = std::fs::remove_dir_all(&snap);
}

fn main() {
    let runs = common::option_arg("--runs", 5) as usize;
    let dir = TempDir::new("bench-snapshot");
    let mut samples: Vec<Samples> = SIZES_MIB.iter().map(|_| Samples::default()).collect();
    for run in 0..runs {
        for (i, &mib) in SIZES_MIB.iter().enumerate() {
            round(&dir, mib, run, &mut samples[i]);
        }
    }
    println!(
        "snapshot benchmark: probe guest, {WORKLOAD}, medians of {runs} runs (sizes alternating)"
    );
    println!(
        "{:>10} {:>12} {:>14} {:>14} {:>16}",
        "RAM", "cold boot", "snapshot", "on disk", "restore->output"
    );
    for (mib, s) in SIZES_MIB.iter().zip(&samples) {
        println!(
            "{:>6} MiB {:>9.1} ms {:>11.1} ms {:>10.1} MiB {:>13.1} ms",
            mib,
            median(&s.boot) * 1e3,
            median(&s.snapshot) * 1e3,
            median(&s.disk_mib),
            median(&s.restore) * 1e3
        );
    }
    let (a, b) = (&samples[0], &samples[1]);
    println!(
        "ratio 1 GiB / 128 MiB: snapshot {:.2}, on disk {:.2}, restore {:.2}",
        median(&b.snapshot) / median(&a.snapshot),
        median(&b.disk_mib) / median(&a.disk_mib),
        median(&b.restore) / median(&a.restore)
    );
}
