//! One booted default guest per test run, snapshotted, for the real-Linux tests to
//! restore instead of booting again (a boot costs tens of seconds where guest kernel
//! mode is emulated; a restore, a fraction of a second).
//!
//! The first test that asks boots the guest (2 vCPUs, 256 MiB, one network card on
//! user-mode networking in a private namespace, static address [`GUEST_IP`]/24 with
//! gateway [`GATEWAY`], the NAT plan's), checks that a console line typed ahead at
//! start runs whole and that it reported boot-complete, starts a TCP service on
//! [`SERVICE_PORT`] (answers [`SERVICE_REPLY`]), and takes a snapshot with `--stop`.
//! Test binaries share it through a directory under target/ named after the wisp
//! binary and the guest images, so a rebuild makes a new one; a lock file serialises
//! creation. The card starts on passt because a guest that negotiated a TAP's offloads
//! cannot move to passt (which has none), while the other way round works: restores
//! give `--net tap=...` or `--net user,...`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use super::netns::NetNs;
use super::{guest_file, wisp, Session};

/// The guest's address (the same as user-mode networking's plan).
pub const GUEST_IP: &str = "10.0.2.15";
/// Its gateway.
pub const GATEWAY: &str = "10.0.2.2";
/// The TCP service started before the snapshot.
pub const SERVICE_PORT: u16 = 7777;
/// What the service answers.
pub const SERVICE_REPLY: &str = "svc-alive";
/// vCPUs and memory of the snapshotted guest.
pub const CPUS: u32 = 2;
/// Guest RAM in MiB.
pub const MEMORY_MIB: u64 = 256;

const BOOT: Duration = Duration::from_secs(240);
const CMD: Duration = Duration::from_secs(60);

fn identity(path: &Path) -> String {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{}:{mtime}", m.len())
}

/// FNV-1a, to name the shared directory.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Connects to a TCP service (retrying while it starts) and reads its reply.
pub fn tcp_reply(addr: &str, port: u16) -> String {
    use std::io::Read;
    use std::net::{SocketAddr, TcpStream};
    use std::time::Instant;
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

/// The snapshot directory of the booted default guest, created on first use.
pub fn linux_snapshot() -> PathBuf {
    let vmlinux = guest_file("vmlinux");
    let initramfs = guest_file("initramfs.cpio.gz");
    let key = fnv(&format!(
        "{}|{}|{}|v2",
        identity(&wisp()),
        identity(&vmlinux),
        identity(&initramfs)
    ));
    let base = wisp().parent().expect("target dir").join("test-snapshots");
    std::fs::create_dir_all(&base).expect("create test-snapshots");
    let dir = base.join(format!("linux-{key:016x}"));
    let lock = File::create(base.join("lock")).expect("lock file");
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    let r = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock");
    if !dir.join("state").is_file() {
        // Snapshots of older builds are of no use any more.
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("linux-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        create(&dir);
    }
    dir
}

/// Boots the guest in its own namespace (on another thread, so the caller's thread
/// keeps its namespace) and snapshots it to `dir`.
fn create(dir: &Path) {
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let ns = NetNs::new("lsnap");
        ns.enter();
        ns.uplink();
        let api = dir.with_extension("sock");
        let cmdline = format!("ip={GUEST_IP}::{GATEWAY}:255.255.255.0::eth0:off");
        let cpus = CPUS.to_string();
        let memory = MEMORY_MIB.to_string();
        let mut s = Session::start(&[
            "run",
            "--name",
            &format!("linux-base-{}", std::process::id()),
            "--cpus",
            &cpus,
            "--memory",
            &memory,
            "--net",
            "user",
            "--api",
            api.to_str().expect("utf-8"),
            "--cmdline",
            &cmdline,
        ]);
        // Typed ahead, long before the guest's serial driver listens: the shell runs
        // the whole line (before wisp held input back until then, Linux's 8250 startup
        // ate its first bytes and the shell ran `o typed-ahead-...`).
        s.send_line("echo typed-ahead-$((6 * 7))");
        s.expect_from(0, "WISP-READY", BOOT);
        s.expect_from(0, "typed-ahead-42", CMD);
        s.send_line(&format!(
            "printf '#!/bin/sh\\necho {SERVICE_REPLY}\\n' >/tmp/svc; chmod +x /tmp/svc; \
             nc -ll -p {SERVICE_PORT} -e /tmp/svc </dev/null >/dev/null 2>&1 &"
        ));
        let up = s.query(
            "SVCUP",
            &format!("sleep 1; nc 127.0.0.1 {SERVICE_PORT} </dev/null"),
            CMD,
        );
        assert_eq!(up, SERVICE_REPLY, "service not answering:\n{}", s.seen);
        super::wisp_ok(&[
            "snapshot",
            api.to_str().expect("utf-8"),
            "--to",
            dir.to_str().expect("utf-8"),
            "--force",
            "--stop",
        ]);
        let (status, stderr) = s.wait(CMD);
        assert_eq!(status, Some(0), "stderr:\n{stderr}");
        assert!(
            stderr.contains("guest boot complete:"),
            "no boot-complete report:\n{stderr}"
        );
        drop(ns);
    })
    .join()
    .expect("booting and snapshotting the default guest failed");
}
