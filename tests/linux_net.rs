//! Real Linux guests on a host bridge, in a network namespace the test creates (so no
//! traffic leaves the machine), and a root file system on virtio-blk that keeps its
//! data across boots. Guest A boots from its disk while guest B is restored from the
//! test run's boot snapshot, then A boots again from its disk: slow where guest kernel
//! mode is emulated (about a minute here).

mod common;

use std::process::Command;
use std::time::Duration;

use common::linux_snapshot::{linux_snapshot, tcp_reply};
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

#[test]
fn guests_on_a_bridge_talk_to_the_host_and_each_other_and_the_root_disk_persists() {
    guest_file("vmlinux");
    // Before A boots: the first test of a run boots and snapshots the default guest.
    let snap = linux_snapshot();
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
    a.expect_from(0, "WISP-READY", BOOT);
    // B is the test run's booted default guest, restored onto the bridge (after A's
    // boot, so it does not slow it down) and readdressed.
    let mut b = Session::start(&[
        "restore",
        snap.to_str().expect("utf-8"),
        "--name",
        "net-b",
        "--net",
        "bridge=br0",
    ]);
    let b_addr = b.query(
        "BADDR",
        &format!(
            "ip addr flush dev eth0 && ip addr add {B_IP}/24 dev eth0 && \
             ip -4 -o addr show eth0 | awk '{{print $4}}'"
        ),
        CMD,
    );
    assert_eq!(b_addr, format!("{B_IP}/24"), "guest B output:\n{}", b.seen);

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
