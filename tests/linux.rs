//! The default Linux guest: booted once per test run (SMP, 256 MiB, boot-complete
//! reported, a TCP service started; see common/linux_snapshot.rs) and snapshotted, then
//! restored here: the console shell answers, the TCP service is reachable again over
//! a TAP, the restored VM can itself be snapshotted and restored, and ACPI power-off
//! ends it with status 0.

mod common;

use std::path::Path;
use std::time::Duration;

use common::linux_snapshot::{
    linux_snapshot, tcp_reply, CPUS, GATEWAY, GUEST_IP, MEMORY_MIB, SERVICE_PORT, SERVICE_REPLY,
};
use common::netns::NetNs;
use common::{wisp_ok, Session, TempDir};

const MIB_KB: u64 = 1024;
const CMD: Duration = Duration::from_secs(60);

fn restore(snap: &Path, name: &str, api: &Path) -> Session {
    Session::start(&[
        "restore",
        snap.to_str().expect("utf-8"),
        "--name",
        name,
        "--api",
        api.to_str().expect("utf-8"),
        "--net",
        "tap=wtap0",
    ])
}

#[test]
fn default_guest_restores_from_its_boot_snapshot_with_console_smp_memory_and_network() {
    let snap = linux_snapshot();
    let dir = TempDir::new("linux-restore");
    let ns = NetNs::new("lrestore");
    ns.enter();
    ns.tap("wtap0");
    ns.ip(&["addr", "add", &format!("{GATEWAY}/24"), "dev", "wtap0"]);

    let api = dir.0.join("r1.sock");
    let mut s = restore(&snap, "linux-r1", &api);
    // The console continues: the shell answers without a new boot.
    let sum = s.query("SUM", "echo $((6*7))", CMD);
    assert_eq!(sum, "42", "guest output:\n{}", s.seen);
    assert!(
        !s.seen.contains("Linux version"),
        "the guest booted again:\n{}",
        s.seen
    );

    let cpus = s.query("CPUS", "nproc", CMD);
    assert_eq!(cpus, CPUS.to_string(), "guest output:\n{}", s.seen);
    let mem_kb: u64 = s
        .query("MEMKB", "awk '/^MemTotal:/ {print $2}' /proc/meminfo", CMD)
        .parse()
        .expect("MemTotal is a number");
    // MemTotal is RAM minus what the kernel reserves for itself (image, memmap).
    let configured = MEMORY_MIB * MIB_KB;
    assert!(
        mem_kb <= configured && mem_kb >= configured * 85 / 100,
        "MemTotal {mem_kb} kB for a {MEMORY_MIB} MiB guest"
    );

    // The TCP service started before the snapshot answers over the new TAP.
    let reply = tcp_reply(GUEST_IP, SERVICE_PORT);
    assert_eq!(reply.trim(), SERVICE_REPLY, "guest output:\n{}", s.seen);

    // A restored VM snapshots and restores too (its memory is a private mapping of
    // the first snapshot).
    let w = s.query("W", "echo second-generation >/tmp/gen && echo written", CMD);
    assert_eq!(w, "written");
    let again = dir.0.join("again.snap");
    wisp_ok(&[
        "snapshot",
        api.to_str().expect("utf-8"),
        "--to",
        again.to_str().expect("utf-8"),
        "--stop",
    ]);
    let (status, stderr) = s.wait(CMD);
    assert_eq!(status, Some(0), "stderr:\n{stderr}");

    let api2 = dir.0.join("r2.sock");
    let mut s2 = restore(&again, "linux-r2", &api2);
    let gen = s2.query("GEN", "cat /tmp/gen", CMD);
    assert_eq!(gen, "second-generation", "guest output:\n{}", s2.seen);
    let reply = tcp_reply(GUEST_IP, SERVICE_PORT);
    assert_eq!(reply.trim(), SERVICE_REPLY);

    s2.send_line("poweroff -f");
    let (status, stderr) = s2.wait(Duration::from_secs(120));
    assert_eq!(status, Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("guest powered off"), "stderr:\n{stderr}");
}
