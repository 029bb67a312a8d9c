//! Real Linux guests on a host bridge, in a network namespace the test creates (so no
//! traffic leaves the machine), and a root file system on virtio-blk that keeps its
//! data across boots. Two guests boot side by side, then one boots again from its
//! disk: slow where guest kernel mode is emulated (about a minute here).

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::{guest_file, Session, TempDir};

const BOOT: Duration = Duration::from_secs(240);
const CMD: Duration = Duration::from_secs(60);
const HOST_IP: &str = "10.0.3.1";
const A_IP: &str = "10.0.3.2";
const B_IP: &str = "10.0.3.3";

fn ip_param(addr: &str) -> String {
    format!("ip={addr}::{HOST_IP}:255.255.255.0::eth0:off")
}

/// Connects to the guest's TCP service (retrying while it starts) and reads its reply.
fn tcp_reply(addr: &str, port: u16) -> String {
    let addr: SocketAddr = format!("{addr}:{port}").parse().expect("address");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(20)))
                    .expect("timeout");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if !out.is_empty() || Instant::now() > deadline {
                    return out;
                }
            }
            Err(e) if Instant::now() > deadline => panic!("connect to {addr}: {e}"),
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn guests_on_a_bridge_talk_to_the_host_and_each_other_and_the_root_disk_persists() {
    guest_file("vmlinux");
    let rootfs = guest_file("rootfs.ext4");
    let dir = TempDir::new("linux-net");
    let disk = dir.0.join("root.ext4");
    std::fs::copy(&rootfs, &disk).expect("copy rootfs.ext4");
    let disk = disk.to_str().expect("utf-8 path").to_string();

    let ns = NetNs::new("bridge");
    ns.enter();
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);

    // Guest A boots from the ext4 disk; guest B from the default initramfs. Both get a
    // TAP that wisp creates on br0.
    let a_cmdline = format!("root=/dev/vda rw {}", ip_param(A_IP));
    let mut a = Session::start(&[
        "run",
        "--name",
        "net-a",
        "--memory",
        "192",
        "--disk",
        &disk,
        "--net",
        "bridge=br0",
        "--cmdline",
        &a_cmdline,
    ]);
    let b_cmdline = ip_param(B_IP);
    let mut b = Session::start(&[
        "run",
        "--name",
        "net-b",
        "--memory",
        "128",
        "--net",
        "bridge=br0",
        "--cmdline",
        &b_cmdline,
    ]);
    a.expect_from(0, "WISP-READY", BOOT);
    b.expect_from(0, "WISP-READY", BOOT);

    let root = a.query("ROOT", "awk '$2 == \"/\" {print $1, $3}' /proc/mounts", CMD);
    assert_eq!(root, "/dev/root ext4", "guest A output:\n{}", a.seen);

    // Guest -> host, host -> guest.
    let ping = "ping -c 1 -W 5";
    let r = a.query(
        "PINGHOST",
        &format!("{ping} {HOST_IP} >/dev/null && echo ok"),
        CMD,
    );
    assert_eq!(r, "ok", "guest A cannot ping the host:\n{}", a.seen);
    let out = Command::new("busybox")
        .args(["ping", "-c", "1", "-W", "5", A_IP])
        .output()
        .expect("busybox ping");
    assert!(
        out.status.success(),
        "host cannot ping guest A: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A TCP service in the guest, reached from the host.
    a.send_line(
        "printf '#!/bin/sh\\necho wisp-tcp-ok\\n' >/tmp/svc; chmod +x /tmp/svc; \
         nc -ll -p 8080 -e /tmp/svc &",
    );
    let reply = tcp_reply(A_IP, 8080);
    assert!(
        reply.contains("wisp-tcp-ok"),
        "TCP reply {reply:?}; guest A:\n{}",
        a.seen
    );

    // Guest A -> guest B over the bridge.
    let r = a.query(
        "PINGB",
        &format!("{ping} {B_IP} >/dev/null && echo ok"),
        CMD,
    );
    assert_eq!(r, "ok", "guest A cannot ping guest B:\n{}", a.seen);

    // Write and sync a file on A's root disk, then power both off.
    a.send_line("echo persisted-$((6*7)) >/root/mark && sync && poweroff -f");
    b.send_line("poweroff -f");
    let (status, stderr) = a.wait(CMD);
    assert_eq!(status, Some(0), "guest A stderr:\n{stderr}");
    assert!(stderr.contains("created TAP"), "{stderr}");
    let (status, stderr) = b.wait(CMD);
    assert_eq!(status, Some(0), "guest B stderr:\n{stderr}");
    // wisp's TAPs are gone with the VMs.
    let links = ns
        .command("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains("wisp"), "TAPs left behind:\n{links}");

    // The next boot from the same disk sees the file.
    let mut again = Session::start(&[
        "run",
        "--name",
        "net-a2",
        "--memory",
        "192",
        "--disk",
        &disk,
        "--cmdline",
        "root=/dev/vda rw",
    ]);
    again.expect_from(0, "WISP-READY", BOOT);
    let mark = again.query("MARK", "cat /root/mark", CMD);
    assert_eq!(mark, "persisted-42", "output:\n{}", again.seen);
    again.send_line("poweroff -f");
    let (status, stderr) = again.wait(CMD);
    assert_eq!(status, Some(0), "stderr:\n{stderr}");
}
