//! Live migration of the default Linux guest (restored from the boot snapshot) between
//! two network namespaces acting as two hosts, each with a bridge, joined by a veth,
//! with a third namespace as a client on the same segment:
//!
//! ```text
//!   client [cx 10.0.2.100] ── brA (host A: source wisp's TAP) ── veth ── brB (host B)
//! ```
//!
//! A TCP connection from the client to an echo service in the guest stays open across
//! the migration and keeps exchanging data; a shell loop's counter continues on the
//! destination's console; and the guest's gratuitous ARP (VIRTIO_NET_F_GUEST_ANNOUNCE)
//! is the first frame from it seen on the destination's bridge, within a second of the
//! switch.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use common::linux_snapshot::{linux_snapshot, GUEST_IP};
use common::netns::{self, parse_mac, NetNs, PacketSocket};
use common::{arg, wisp_cmd, Session, TempDir};

const CMD: Duration = Duration::from_secs(60);
const ECHO_PORT: u16 = 8000;
const CLIENT_IP: &str = "10.0.2.100";

/// The TICK counter values in `text`.
fn ticks(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("TICK "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Runs `f` on a new thread inside `ns` (a thread enters a namespace once).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let name = ns.to_string();
    std::thread::spawn(move || {
        netns::enter(&name);
        f()
    })
    .join()
    .expect("namespace thread")
}

/// Whether `f` is a gratuitous ARP for `ip` from `mac`: sender and target address
/// both `ip`.
fn is_garp(f: &[u8], mac: [u8; 6], ip: [u8; 4]) -> bool {
    f.len() >= 42
        && f[6..12] == mac
        && f[12..14] == [0x08, 0x06]
        && f[28..32] == ip
        && f[38..42] == ip
}

#[test]
fn a_tcp_connection_and_a_shell_loop_survive_a_move_to_another_host() {
    let snap = linux_snapshot();
    let dir = TempDir::new("linux-migrate");
    let a = NetNs::new("lmigA");
    let b = NetNs::new("lmigB");
    let c = NetNs::new("lmigC");
    for (ns, br) in [(&a, "brA"), (&b, "brB")] {
        ns.ip(&["link", "add", br, "type", "bridge"]);
        ns.ip(&["link", "set", br, "up"]);
    }
    // Host A to host B.
    a.ip(&[
        "link", "add", "vA", "type", "veth", "peer", "name", "vB", "netns", &b.name,
    ]);
    a.ip(&["link", "set", "vA", "master", "brA", "up"]);
    b.ip(&["link", "set", "vB", "master", "brB", "up"]);
    // The client on host A's segment.
    c.ip(&[
        "link", "add", "cx", "type", "veth", "peer", "name", "cA", "netns", &a.name,
    ]);
    a.ip(&["link", "set", "cA", "master", "brA", "up"]);
    c.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "cx"]);
    c.ip(&["link", "set", "cx", "up"]);

    let a_api = dir.0.join("a.sock");
    let b_api = dir.0.join("b.sock");
    let mig = dir.0.join("m.sock");
    let (snap_s, a_api_s) = (arg(&snap).to_string(), arg(&a_api).to_string());
    let mut source = in_ns(&a.name, move || {
        Session::start(&[
            "restore",
            &snap_s,
            "--name",
            "lmig",
            "--api",
            &a_api_s,
            "--net",
            "bridge=brA",
        ])
    });
    // In the guest: an echo service, a counter on the console.
    source.send_line(&format!(
        "printf '#!/bin/sh\\nexec cat\\n' >/tmp/echo; chmod +x /tmp/echo; \
         nc -ll -p {ECHO_PORT} -e /tmp/echo </dev/null >/dev/null 2>&1 &"
    ));
    source.send_line("(i=0; while :; do i=$((i+1)); echo \"TICK $i\"; sleep 1; done) &");
    let mac = parse_mac(&source.query("MAC", "cat /sys/class/net/eth0/address", CMD));
    let deadline = Instant::now() + CMD;
    while ticks(&source.seen).len() < 2 {
        assert!(Instant::now() < deadline, "no ticks:\n{}", source.seen);
        source.poll(Duration::from_millis(200));
    }

    // The client talks to the guest all along: a line every 200 ms, echoed back.
    let (started_tx, started_rx) = channel();
    let (stop_tx, stop_rx) = channel::<()>();
    let client = std::thread::spawn({
        let name = c.name.clone();
        move || {
            netns::enter(&name);
            let addr = format!("{GUEST_IP}:{ECHO_PORT}").parse().expect("address");
            let deadline = Instant::now() + CMD;
            let mut s = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => panic!("connect: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(300)),
                }
            };
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let mut lines = BufReader::new(s.try_clone().expect("clone"));
            let mut n = 0u32;
            loop {
                let msg = format!("message {n}\n");
                s.write_all(msg.as_bytes())
                    .expect("send: the connection broke");
                let mut back = String::new();
                lines
                    .read_line(&mut back)
                    .expect("echo: the connection broke");
                assert_eq!(back, msg, "echo {n}");
                if n == 3 {
                    let _ = started_tx.send(());
                }
                n += 1;
                if stop_rx.try_recv().is_ok() {
                    return n;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    });
    started_rx
        .recv_timeout(CMD)
        .expect("the client never got going");

    // Host B: a wisp waiting for the VM, and a capture on its bridge.
    let (b_api_s, mig_s) = (arg(&b_api).to_string(), format!("unix:{}", arg(&mig)));
    let mut dest = in_ns(&b.name, move || {
        Session::start(&["receive", &mig_s, "--api", &b_api_s, "--net", "bridge=brB"])
    });
    let deadline = Instant::now() + CMD;
    while !mig.exists() {
        assert!(Instant::now() < deadline, "receive does not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (frames_tx, frames_rx) = channel();
    let capture_until = Instant::now() + Duration::from_secs(30);
    let capture = std::thread::spawn({
        let name = b.name.clone();
        move || {
            netns::enter(&name);
            let sock = PacketSocket::open("brB");
            while Instant::now() < capture_until {
                if let Some(f) = sock.recv_frame(Duration::from_millis(200), |f| f[6..12] == mac) {
                    if frames_tx.send((Instant::now(), f)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    let ticks_before = ticks(&source.seen).last().copied().expect("ticks");
    let (code, out, err) = wisp_cmd(&[
        "migrate",
        arg(&a_api),
        "--to",
        &format!("unix:{}", arg(&mig)),
    ]);
    let switched = Instant::now();
    assert_eq!(code, 0, "migrate: {err}");
    assert!(out.contains("migrated to"), "{out}");
    let (status, stderr) = source.wait(CMD);
    assert_eq!(status, Some(0), "source:\n{stderr}");

    // The first frame from the guest on the destination's bridge: its announcement.
    let (at, first) = frames_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("no frame from the guest on the destination's bridge");
    let ip: Vec<u8> = GUEST_IP
        .split('.')
        .map(|p| p.parse().expect("ip"))
        .collect();
    let ip: [u8; 4] = ip.try_into().expect("ipv4");
    assert!(
        is_garp(&first, mac, ip),
        "the guest's first frame on the new bridge is not a gratuitous ARP: {:02x?}",
        &first[..first.len().min(42)]
    );
    let lag = at
        .saturating_duration_since(switched)
        .max(switched.saturating_duration_since(at));
    assert!(
        lag < Duration::from_secs(1),
        "announced {lag:?} from the switch"
    );

    // The shell loop goes on where it was; the connection keeps exchanging data.
    let deadline = Instant::now() + CMD;
    loop {
        let after = ticks(&dest.seen);
        if after.len() >= 3 {
            assert!(
                after[0] > ticks_before,
                "TICK restarted: {after:?} after {ticks_before}"
            );
            assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "{after:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no ticks on the destination:\n{}",
            dest.seen
        );
        dest.poll(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    stop_tx.send(()).expect("client");
    let exchanged = client.join().expect("the TCP connection broke");
    assert!(exchanged > 10, "{exchanged} messages");
    drop(frames_rx);
    let _ = capture.join();
    dest.send_line("poweroff -f");
    let (status, stderr) = dest.wait(Duration::from_secs(120));
    assert_eq!(status, Some(0), "destination:\n{stderr}");
}
