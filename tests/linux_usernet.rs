//! The default Linux guest in user-mode NAT networking (passt), as in the seed labs'
//! "NAT mode": DHCP, SSH in through a port forward, out to a host service through the
//! gateway, and no way in without a forward. The guest is restored from the test run's
//! boot snapshot (common/linux_snapshot.rs) with its card moved to passt, in a network
//! namespace with a veth uplink (passt needs a default route); no traffic leaves the
//! machine.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::linux_snapshot::linux_snapshot;
use common::netns::NetNs;
use common::{descendants_named, guest_file, process_named, Session, TempDir};

const CMD: Duration = Duration::from_secs(90);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Runs `command` in the guest over SSH (dropbear's client, the build's key).
fn ssh(port: u16, home: &TempDir, command: &str) -> std::process::Output {
    let key = guest_file("ssh/id_ed25519.dropbear");
    Command::new("dbclient")
        .env("HOME", &home.0)
        .args(["-y", "-i"])
        .arg(&key)
        .args(["-p", &port.to_string(), "root@127.0.0.1", command])
        .output()
        .expect("run dbclient (apt-get install dropbear-bin)")
}

#[test]
fn nat_mode_dhcp_ssh_through_a_forward_and_out_to_the_host() {
    let snap = linux_snapshot();
    let ns = NetNs::new("usernet");
    ns.enter();
    ns.uplink();
    let home = TempDir::new("ssh-home");

    // A host service the guest reaches through the gateway address.
    let service = TcpListener::bind("127.0.0.1:0").expect("bind host service");
    let service_port = service.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (mut c, _) = service.accept().expect("accept");
        c.write_all(b"host-says-hi\n").expect("write");
    });

    let ssh_port = free_port();
    let net = format!("user,hostfwd=tcp::{ssh_port}-:22");
    let mut s = Session::start_env(
        &[
            "restore",
            snap.to_str().expect("utf-8"),
            "--name",
            "nat",
            "--net",
            &net,
        ],
        &[("WISP_LOG", "debug")],
    );
    // DHCP: the snapshot's guest has a static address; a fresh lease from passt's
    // DHCP server gives the NAT plan's address.
    let addr = s.query(
        "ADDR",
        "ip -4 addr flush dev eth0; udhcpc -i eth0 -s /etc/udhcpc.script -n -q -t 10 -T 2 \
         >/dev/null 2>&1; ip -4 -o addr show eth0 | awk '{print $4}'",
        CMD,
    );
    assert_eq!(addr, "10.0.2.15/24", "guest output:\n{}", s.seen);
    let passt = descendants_named(s.pid(), "passt");
    assert_eq!(passt.len(), 1, "one passt child: {passt:?}");

    // SSH in through the forward.
    let deadline = Instant::now() + CMD;
    let out = loop {
        let out = ssh(ssh_port, &home, "uname -a");
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Linux wisp"),
        "ssh: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Out to the host through the gateway. nc's stdin stays open until the host has
    // answered and closed: the passt in Debian 12 does not pass the host's FIN on to a
    // guest that half-closed first (seen in a capture), which would leave nc waiting.
    let got = s.query(
        "HOSTSVC",
        &format!("sleep 5 | nc -w 10 10.0.2.2 {service_port}"),
        CMD,
    );
    assert_eq!(got, "host-says-hi", "guest output:\n{}", s.seen);
    server.join().expect("host service");

    // Without a forward, the host cannot reach the guest: no listener on another port,
    // and no route to the guest's address.
    assert!(TcpStream::connect(("127.0.0.1", free_port())).is_err());
    assert!(TcpStream::connect_timeout(
        &"10.0.2.15:22".parse().expect("addr"),
        Duration::from_secs(3)
    )
    .is_err());

    s.send_line("poweroff -f");
    let (status, stderr) = s.wait(CMD);
    assert_eq!(status, Some(0), "stderr:\n{stderr}");
    for pid in passt {
        assert!(!process_named(pid, "passt"), "passt {pid} outlived wisp");
    }
}
