//! Network throughput benchmark (not a test: it reports, it never fails on a number).
//!
//! 1. Frames, TAP mode: the probe guest sends frames as fast as it can
//!    (`net-send:0:LEN`) through virtio-net to a TAP in a private network namespace; the
//!    host counts what arrives on the TAP (interface counters) over a fixed window.
//!    Reported per frame size: frames/s and Gbit/s of Ethernet frames.
//! 2. TCP, host to guest: one default Linux guest with two cards, one on a TAP and one
//!    on user-mode networking (passt) with `hostfwd=tcp::PORT-:5001`. The host sends
//!    the same amount of data to `nc` in the guest through each, alternating, and
//!    reports MB/s and the user/TAP ratio measured side by side.
//!
//! Run: `scripts/bench.sh network` (root: it creates a namespace, a TAP and a veth).
//! Options: `--seconds N` (frame window, default 5), `--tcp-mib N` (data per TCP run,
//! default 8), `--no-tcp` (skip the Linux part).

#[path = "../common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::{probe, wisp, Session};

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

/// Sends `bytes` to `addr` and waits for the receiver to close: MB/s (10^6 bytes).
fn tcp_send(addr: SocketAddr, bytes: usize) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conn = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("connect {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    };
    let chunk = vec![0u8; 64 << 10];
    let t0 = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        conn.write_all(&chunk[..n]).expect("send");
        left -= n;
    }
    conn.shutdown(Shutdown::Write).expect("shutdown");
    let mut sink = [0u8; 64];
    while conn.read(&mut sink).map(|n| n > 0).unwrap_or(false) {}
    bytes as f64 / t0.elapsed().as_secs_f64() / 1e6
}

/// Host-to-guest TCP through a TAP and through passt, in one guest: (TAP, user) MB/s.
fn tcp_host_to_guest(ns: &NetNs, mib: usize, rounds: usize) -> Vec<(f64, f64)> {
    ns.ip(&["addr", "add", "10.0.9.1/24", "dev", "tp0"]);
    ns.uplink();
    ns.enter();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let user = format!("user,hostfwd=tcp::{port}-:5001");
    let mut s = Session::start(&[
        "run",
        "--name",
        "bench",
        "--memory",
        "256",
        "--net",
        "tap=tp0",
        "--net",
        &user,
        "--cmdline",
        "ip=10.0.9.2::10.0.9.1:255.255.255.0::eth0:off",
    ]);
    s.expect_from(0, "WISP-READY", Duration::from_secs(300));
    s.send_line(
        "ip link set eth1 up; ip addr add 10.0.2.15/24 dev eth1; \
         (while true; do nc -l -p 5001; done) </dev/null >/dev/null 2>&1 &",
    );
    let ok = s.query("NC", "echo up", Duration::from_secs(120));
    assert_eq!(ok, "up", "guest:\n{}", s.seen);
    let tap: SocketAddr = "10.0.9.2:5001".parse().expect("addr");
    let passt: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    // Warm-up (ARP, the listener loop), then alternate the two paths.
    tcp_send(tap, 1 << 20);
    tcp_send(passt, 1 << 20);
    (0..rounds)
        .map(|_| (tcp_send(tap, mib << 20), tcp_send(passt, mib << 20)))
        .collect()
}

fn main() {
    let mut window = Duration::from_secs(5);
    let mut tcp_mib = 8usize;
    let mut tcp = true;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let v = it.next().and_then(|v| v.parse().ok()).expect("--seconds N");
                window = Duration::from_secs(v);
            }
            "--tcp-mib" => {
                tcp_mib = it.next().and_then(|v| v.parse().ok()).expect("--tcp-mib N");
            }
            "--no-tcp" => tcp = false,
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
    if !tcp {
        return;
    }
    println!();
    println!("TCP host -> guest (default Linux guest, busybox nc, {tcp_mib} MiB per run)");
    println!();
    println!("| round | TAP MB/s | user (passt) MB/s | user / TAP |");
    println!("|---:|---:|---:|---:|");
    let runs = tcp_host_to_guest(&ns, tcp_mib, 3);
    for (i, (tap, user)) in runs.iter().enumerate() {
        println!("| {} | {tap:.2} | {user:.2} | {:.2} |", i + 1, user / tap);
    }
    let (t, u): (f64, f64) = runs.iter().fold((0.0, 0.0), |a, r| (a.0 + r.0, a.1 + r.1));
    println!("| mean | {:.2} | {:.2} | {:.2} |", t / 3.0, u / 3.0, u / t);
}
