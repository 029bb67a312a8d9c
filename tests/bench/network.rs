//! Network throughput benchmark (not a test: it reports, it never fails on a number).
//!
//! TAP mode: the probe guest sends frames as fast as it can (`net-send:0:LEN`) through
//! virtio-net to a TAP in a private network namespace; the host counts what arrives on
//! the TAP (interface counters) over a fixed window. Reported per frame size: frames/s
//! and Gbit/s of Ethernet frames.
//!
//! Run: `scripts/bench.sh network` (root: it creates a namespace and a TAP).
//! Options: `--seconds N` (window, default 5).

#[path = "../common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::{probe, wisp};

const FRAME_SIZES: [usize; 2] = [64, 1514];

/// RX counters (packets, bytes) of `dev` in `ns`, from `ip -s link`.
fn rx_counters(ns: &NetNs, dev: &str) -> (u64, u64) {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-s", "link", "show", dev])
        .output()
        .expect("ip -s link");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if l.trim_start().starts_with("RX:") {
            let nums: Vec<u64> = lines
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            return (nums[1], nums[0]);
        }
    }
    panic!("no RX counters in:\n{text}");
}

struct Rate {
    frames_per_sec: f64,
    gbit_per_sec: f64,
}

fn tap_tx(ns: &NetNs, len: usize, window: Duration) -> Rate {
    let cmdline = format!("probe.cmd=net-info,net-send:0:{len}");
    let mut child = ns
        .command(wisp().to_str().expect("utf-8"))
        .args([
            "run",
            "--kernel",
            probe().to_str().expect("utf-8"),
            "--net",
            "tap=tp0",
        ])
        .args(["--cmdline", &cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn wisp");
    // Warm up, then count over the window.
    std::thread::sleep(Duration::from_secs(1));
    let (p0, b0) = rx_counters(ns, "tp0");
    let t0 = Instant::now();
    std::thread::sleep(window);
    let (p1, b1) = rx_counters(ns, "tp0");
    let secs = t0.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    // The TAP counts the frame without the 12-byte virtio-net header.
    Rate {
        frames_per_sec: (p1 - p0) as f64 / secs,
        gbit_per_sec: (b1 - b0) as f64 * 8.0 / secs / 1e9,
    }
}

fn main() {
    let mut window = Duration::from_secs(5);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let v = it.next().and_then(|v| v.parse().ok()).expect("--seconds N");
                window = Duration::from_secs(v);
            }
            "--bench" => {}
            other => eprintln!("network bench: ignoring argument {other:?}"),
        }
    }
    let ns = NetNs::new("bench");
    ns.tap("tp0");
    println!(
        "wisp network benchmark ({}-second windows)",
        window.as_secs()
    );
    println!();
    println!("| path | frame bytes | frames/s | Gbit/s |");
    println!("|---|---:|---:|---:|");
    for len in FRAME_SIZES {
        let r = tap_tx(&ns, len, window);
        println!(
            "| guest -> TAP (probe, virtio-net) | {len} | {:.0} | {:.3} |",
            r.frames_per_sec, r.gbit_per_sec
        );
    }
}
