//! Live migration with the probe guest, between two wisp processes on this host:
//! memory that keeps changing (the counter verifies every page each round) over a unix
//! socket; the same with block writes and network frames in flight all the while, over
//! TCP; memory only a device writes (blk-hold, which a migration ignoring the device
//! bitmap fails); a user-mode card.
//! Then what must not lose the VM: no convergence (abort, stop-copy), a destination
//! killed or closing mid-transfer, a refused offer, cancel and Ctrl-C; and a
//! `wisp receive` fed garbage.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::netns::{assert_exactly_once, collect_seqs, drain_seqs, NetNs, PacketSocket};
use common::workloads::{
    assert_blkseq_ring, blkseq_continues, counter_progress, wait_blkseq, wait_counter,
};
use common::{arg, probe, stop_vm, wisp_cmd, Session, TempDir};
use vmm::migration::protocol::{self, Hello, Kind};

const WAIT: Duration = Duration::from_secs(60);

/// Starts the probe under `name` with `cmds`, its control socket at DIR/NAME.sock.
fn start(dir: &TempDir, name: &str, cmds: &str, extra: &[&str]) -> (Session, PathBuf) {
    common::start_probe(dir, name, cmds, extra, &[])
}

/// `wisp receive ADDR --name NAME --api DIR/NAME.sock EXTRA`, once it listens.
fn receive(dir: &TempDir, addr: &str, name: &str, extra: &[&str]) -> (Session, PathBuf) {
    let api = dir.0.join(format!("{name}.sock"));
    let mut args = vec!["receive", addr, "--name", name, "--api", arg(&api)];
    args.extend_from_slice(extra);
    let s = Session::start(&args);
    wait_listening(addr);
    (s, api)
}

/// Waits until something listens at `addr` (`unix:PATH`, or `tcp:HOST:PORT`, found
/// in this thread's network namespace's socket table: connecting to find out would be
/// the one migration `wisp receive` takes).
fn wait_listening(addr: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let up = match (addr.strip_prefix("unix:"), addr.rsplit_once(':')) {
            (Some(p), _) => Path::new(p).exists(),
            (None, Some((_, port))) => {
                let port: u16 = port.parse().expect("port");
                let table =
                    std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
                table.lines().skip(1).any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3
                        && f[3] == "0A"
                        && f[1].rsplit_once(':').map(|(_, p)| p) == Some(&format!("{port:04X}"))
                })
            }
            _ => panic!("bad address {addr}"),
        };
        if up {
            return;
        }
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `wisp migrate API --to ADDR EXTRA`: exit status, stdout, stderr.
fn migrate(api: &Path, to: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["migrate", arg(api), "--to", to];
    args.extend_from_slice(extra);
    wisp_cmd(&args)
}

/// Asserts the source handed over: `wisp migrate` succeeded and the source wisp
/// exited 0 naming the destination.
fn handed_over(result: (i32, String, String), source: Session) -> String {
    let (code, out, err) = result;
    assert_eq!(code, 0, "migrate: {err}");
    assert!(
        out.contains("migrated to") && out.contains("downtime"),
        "{out}"
    );
    let (status, stderr) = source.wait(WAIT);
    assert_eq!(status, Some(0), "source:\n{stderr}");
    assert!(stderr.contains("the VM runs there now"), "{stderr}");
    out
}

/// The VM keeps running on the source after a failed migration: it answers `status`
/// as running, and its counter goes on (verifying every page each round).
fn still_running(s: &mut Session, api: &Path) {
    let (code, out, err) = wisp_cmd(&["status", arg(api)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("running"), "{out}");
    let mark = s.seen.len();
    wait_counter(s, mark, 2);
    assert!(!s.seen.contains("corrupt"), "{}", s.seen);
}

#[test]
fn changing_memory_moves_over_a_unix_socket_and_is_verified_there() {
    let dir = TempDir::new("mig-counter");
    let (mut a, a_api) = start(&dir, "mig-a", "counter:16:0:20", &[]);
    wait_counter(&mut a, 0, 3);
    let addr = format!("unix:{}", arg(&dir.0.join("mig.sock")));
    let (mut b, b_api) = receive(&dir, &addr, "mig-b", &[]);
    a.poll(Duration::from_millis(50));
    let before = counter_progress(&a.seen).last().copied().expect("progress");
    handed_over(migrate(&a_api, &addr, &["--downtime-ms", "50"]), a);
    // The destination continues the same run: counts do not go back, and three more
    // full rounds verify every page.
    let after = wait_counter(&mut b, 0, 1)[0];
    assert!(
        after.1 >= before.1,
        "count went back: {after:?} after {before:?}"
    );
    let deadline = Instant::now() + WAIT;
    while counter_progress(&b.seen).last().map_or(0, |p| p.0) < after.0 + 3 {
        assert!(
            Instant::now() < deadline,
            "no rounds after the move:\n{}",
            b.seen
        );
        b.poll(Duration::from_millis(100));
    }
    assert!(!b.seen.contains("corrupt"), "{}", b.seen);
    assert!(!b.seen.contains("probe: start"), "the guest booted again");
    assert!(
        !dir.0.join("mig.sock").exists(),
        "the listening socket is gone"
    );
    stop_vm(b, &b_api, WAIT);
}

#[test]
fn memory_disk_and_network_move_together_over_tcp_exactly_once() {
    // The probe's `mix`: counter pages rewritten and verified, blk-seq batches in
    // flight and numbered frames, interleaved, all the time.
    const SECTORS: u64 = 1000;
    let dir = TempDir::new("mig-mix");
    let ns = NetNs::new("migmix");
    ns.enter();
    ns.tap("mx0");
    ns.tap("mx1");
    let old = PacketSocket::open("mx0");
    let new = PacketSocket::open("mx1");
    let image = dir.file("disk.img", &vec![0u8; 1 << 20]);
    let cmds = format!("mix:16:{SECTORS}:100");
    let (mut a, a_api) = start(
        &dir,
        "mix-a",
        &cmds,
        &["--disk", arg(&image), "--net", "tap=mx0"],
    );
    let mut seqs = Vec::new();
    collect_seqs(&old, &mut seqs, 500, || a.seen.clone());
    let before = wait_blkseq(&mut a, 0, 2);
    // Shared storage: the destination opens the same image, locking it only when the
    // source has released it; the card moves to the destination's TAP.
    let (mut b, b_api) = receive(&dir, "tcp:127.0.0.1:4444", "mix-b", &["--net", "tap=mx1"]);
    handed_over(migrate(&a_api, "tcp:127.0.0.1:4444", &[]), a);
    drain_seqs(&old, &mut seqs);
    let at_switch = seqs.len();
    let since = blkseq_continues(&mut b, &before, SECTORS);
    collect_seqs(&new, &mut seqs, at_switch + 500, || b.seen.clone());
    let mark = b.seen.len();
    wait_counter(&mut b, mark, 2);
    assert!(
        !b.seen.contains("corrupt") && !b.seen.contains("mismatch"),
        "{}",
        b.seen
    );
    stop_vm(b, &b_api, WAIT);
    assert_blkseq_ring(&image, SECTORS, since);
    assert_exactly_once(&seqs, at_switch);
}

#[test]
fn memory_written_only_by_a_device_moves_too() {
    // blk-hold fills a 1 MiB buffer by virtio-blk reads and keeps checking it; in a
    // 1 GiB guest, round 0 takes long enough for several reads to land after it.
    // Moved twice: a migration that missed device writes fails the check almost
    // surely on one of them.
    let dir = TempDir::new("mig-hold");
    let image = dir.file("disk.img", &vec![0u8; 16 << 20]);
    let (mut a, a_api) = start(
        &dir,
        "hold-a",
        "blk-hold:1024:0:50",
        &["--disk", arg(&image), "--memory", "1024"],
    );
    a.expect_from(0, "round=2 ok", WAIT);
    let mut source = (a, a_api);
    for hop in ["hold-b", "hold-c"] {
        let addr = format!("unix:{}", arg(&dir.0.join(format!("{hop}.mig"))));
        let (mut next, next_api) = receive(&dir, &addr, hop, &[]);
        handed_over(migrate(&source.1, &addr, &[]), source.0);
        let at = next.expect_from(0, " ok", WAIT);
        next.expect_from(at, " ok\n", WAIT);
        let at = next.seen.len();
        next.expect_from(at, " ok\n", WAIT);
        assert!(!next.seen.contains("mismatch"), "{hop}:\n{}", next.seen);
        source = (next, next_api);
    }
    stop_vm(source.0, &source.1, WAIT);
}

#[test]
fn a_dirty_rate_that_cannot_converge_aborts_or_stops_and_copies() {
    let dir = TempDir::new("mig-dirty");
    // 64 MiB rewritten continuously; at 4 MB/s nothing converges.
    let (mut a, a_api) = start(&dir, "dirty-a", "counter:64:0:20", &[]);
    wait_counter(&mut a, 0, 2);
    let addr = format!("unix:{}", arg(&dir.0.join("d1.mig")));
    let (b, _) = receive(&dir, &addr, "dirty-b", &[]);
    let slow = ["--bandwidth", "4", "--timeout-s", "2"];
    let (code, _, err) = migrate(&a_api, &addr, &slow);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("did not converge in 2 s"), "{err}");
    assert!(err.contains("the VM keeps running here"), "{err}");
    still_running(&mut a, &a_api);
    let (status, stderr) = b.wait(WAIT);
    assert_eq!(status, Some(1), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.contains("error")).count(),
        1,
        "{stderr}"
    );

    // stop-copy finishes anyway and says so; the destination verifies every page.
    let addr = format!("unix:{}", arg(&dir.0.join("d2.mig")));
    let (mut c, c_api) = receive(&dir, &addr, "dirty-c", &[]);
    let mut args = slow.to_vec();
    args.extend(["--on-timeout", "stop-copy", "--json"]);
    let (code, out, err) = migrate(&a_api, &addr, &args);
    assert_eq!(code, 0, "{err}");
    let last: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("output")).expect("json");
    assert_eq!(last["event"], "done", "{out}");
    assert_eq!(last["summary"]["forced"], true, "{out}");
    assert!(last["summary"]["downtime_ms"].as_f64().expect("downtime") > 0.0);
    assert!(
        out.lines().any(|l| l.contains("\"event\":\"progress\"")),
        "{out}"
    );
    let (status, _) = a.wait(WAIT);
    assert_eq!(status, Some(0));
    let first = wait_counter(&mut c, 0, 1)[0];
    let deadline = Instant::now() + WAIT;
    while counter_progress(&c.seen).last().map_or(0, |p| p.0) < first.0 + 2 {
        assert!(Instant::now() < deadline, "no rounds:\n{}", c.seen);
        c.poll(Duration::from_millis(100));
    }
    assert!(!c.seen.contains("corrupt"), "{}", c.seen);
    stop_vm(c, &c_api, WAIT);
}

/// A slow migration of a busy guest: about 10 s at 2 MB/s.
const SLOW: [&str; 4] = ["--bandwidth", "2", "--timeout-s", "120"];

#[test]
fn a_destination_that_dies_or_hangs_up_leaves_the_source_running() {
    let dir = TempDir::new("mig-faults");
    let (mut a, a_api) = start(&dir, "fault-a", "counter:32:0:20", &[]);
    wait_counter(&mut a, 0, 2);

    // Killed mid-transfer.
    let addr = format!("unix:{}", arg(&dir.0.join("k.mig")));
    let (b, _) = receive(&dir, &addr, "fault-b", &[]);
    let client = {
        let (api, addr) = (a_api.clone(), addr.clone());
        std::thread::spawn(move || migrate(&api, &addr, &SLOW))
    };
    // While it copies, status says so, with the progress.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, out, _) = wisp_cmd(&["status", arg(&a_api)]);
        if out.contains("migrating") && out.contains("MB sent") {
            break;
        }
        assert!(Instant::now() < deadline, "never migrating: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on the child's pid.
    unsafe { libc::kill(b.pid() as i32, libc::SIGKILL) };
    let _ = b.wait(WAIT);
    let (code, _, err) = client.join().expect("client");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("keeps running here"), "{err}");
    still_running(&mut a, &a_api);

    // A destination that accepts, takes some memory and hangs up.
    let path = dir.0.join("fake.mig");
    let listener = UnixListener::bind(&path).expect("bind");
    let fake = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        let mut r = c.try_clone().expect("clone");
        protocol::read_preamble(&mut r).expect("preamble");
        protocol::expect_frame(&mut r, Kind::Hello).expect("hello");
        protocol::write_frame(&mut c, Kind::Accept, &[]).expect("accept");
        let mut some = vec![0u8; 1 << 20];
        r.read_exact(&mut some).expect("pages");
    });
    let (code, _, err) = migrate(&a_api, &format!("unix:{}", arg(&path)), &SLOW);
    fake.join().expect("fake destination");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("keeps running here"), "{err}");
    still_running(&mut a, &a_api);

    // A destination that refuses the offer: the source says why.
    let addr = format!("unix:{}", arg(&dir.0.join("r.mig")));
    let (r, _) = receive(&dir, &addr, "fault-r", &["--disk", "/nonexistent.img"]);
    let (code, _, err) = migrate(&a_api, &addr, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("the destination refused") && err.contains("the saved VM has 0 disk(s)"),
        "{err}"
    );
    let (status, stderr) = r.wait(WAIT);
    assert_eq!(status, Some(1), "{stderr}");
    still_running(&mut a, &a_api);
    stop_vm(a, &a_api, WAIT);
}

#[test]
fn cancel_and_ctrl_c_stop_a_migration_and_the_vm_stays() {
    let dir = TempDir::new("mig-cancel");
    let (mut a, a_api) = start(&dir, "cancel-a", "counter:32:0:20", &[]);
    wait_counter(&mut a, 0, 2);
    for how in ["--cancel", "SIGINT"] {
        let addr = format!("unix:{}", arg(&dir.0.join("c.mig")));
        let (b, b_api) = receive(&dir, &addr, "cancel-b", &[]);
        let mut client = std::process::Command::new(common::wisp())
            .args(["migrate", arg(&a_api), "--to", &addr])
            .args(SLOW)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("migrate");
        std::thread::sleep(Duration::from_millis(1500));
        if how == "--cancel" {
            let (code, out, err) = wisp_cmd(&["migrate", arg(&a_api), "--cancel"]);
            assert_eq!(code, 0, "{err}");
            assert!(out.contains("cancelling"), "{out}");
        } else {
            // SAFETY: kill(2) on the child's pid.
            unsafe { libc::kill(client.id() as i32, libc::SIGINT) };
        }
        let mut err = String::new();
        client
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err)
            .expect("read");
        let status = client.wait().expect("wait");
        assert_eq!(status.code(), Some(1), "{how}: {err}");
        assert!(err.contains("cancelled"), "{how}: {err}");
        let (status, stderr) = b.wait(WAIT);
        assert_eq!(status, Some(1), "{how}: {stderr}");
        assert!(!b_api.exists(), "{how}: the destination left its socket");
        still_running(&mut a, &a_api);
    }
    stop_vm(a, &a_api, WAIT);
}

/// A HELLO for a 128 MiB probe guest, as a source would send it.
fn hello(cpu: Vec<protocol::CpuFeatures>) -> Hello {
    let config = serde_json::json!({
        "name": "fake", "kernel": arg(&probe()), "initrd": null, "cmdline": "",
        "cpus": 1, "memory_mib": 128, "disks": [], "nets": []
    });
    Hello {
        wisp_version: "test".into(),
        format_version: vmm::state::format::FORMAT_VERSION,
        config: serde_json::from_value(config).expect("config"),
        memory: vec![(0, 128 << 20)],
        cpu,
    }
}

#[test]
fn receive_refuses_garbage_and_leaves_nothing() {
    let dir = TempDir::new("mig-garbage");
    let mut bad_page = protocol::PageBatch::default();
    bad_page.push(0xf000_0000, &[0u8; 4096], false);
    let bad_page = bad_page.take_payload().to_vec();
    type Feed = Box<dyn Fn(&mut UnixStream)>;
    let cases: Vec<(&str, Feed)> = vec![
        (
            "not a wisp migration stream",
            Box::new(|c| c.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write")),
        ),
        (
            "protocol version 9",
            Box::new(|c| {
                let mut p = Vec::new();
                protocol::write_preamble(&mut p).expect("preamble");
                p[8] = 9;
                c.write_all(&p).expect("write");
            }),
        ),
        (
            "lacks features the guest uses",
            Box::new(|c| {
                protocol::write_preamble(c).expect("preamble");
                let cpu = vec![protocol::CpuFeatures {
                    leaf: 7,
                    subleaf: 0,
                    reg: 3,
                    bits: u32::MAX,
                }];
                protocol::write_hello(c, &hello(cpu)).expect("hello");
            }),
        ),
        (
            "page 0xf0000000 is outside guest RAM",
            Box::new(move |c| {
                protocol::write_preamble(c).expect("preamble");
                protocol::write_hello(c, &hello(Vec::new())).expect("hello");
                let mut r = c.try_clone().expect("clone");
                protocol::expect_frame(&mut r, Kind::Accept).expect("accept");
                protocol::write_frame(c, Kind::Pages, &bad_page).expect("pages");
            }),
        ),
        (
            "closed the connection",
            Box::new(|c| {
                protocol::write_preamble(c).expect("preamble");
                protocol::write_hello(c, &hello(Vec::new())).expect("hello");
                let mut r = c.try_clone().expect("clone");
                protocol::expect_frame(&mut r, Kind::Accept).expect("accept");
            }),
        ),
    ];
    for (want, feed) in cases {
        let path = dir.0.join("g.mig");
        let addr = format!("unix:{}", arg(&path));
        let (r, api) = receive(&dir, &addr, "garbage", &["--console", "none"]);
        let mut c = UnixStream::connect(&path).expect("connect");
        feed(&mut c);
        drop(c);
        let (status, stderr) = r.wait(WAIT);
        assert_eq!(status, Some(1), "{want}: {stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("wisp: error"))
            .collect();
        assert_eq!(errors.len(), 1, "{want}: {stderr}");
        assert!(errors[0].contains(want), "{want}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!api.exists() && !path.exists(), "{want}: left a socket");
    }
}

#[test]
fn a_user_mode_card_gets_a_new_passt_on_the_destination() {
    let dir = TempDir::new("mig-user");
    let ns = NetNs::new("miguser");
    ns.enter();
    ns.uplink();
    // The counter for a while, then DHCP through whatever passt the card has by then.
    let (mut a, a_api) = start(
        &dir,
        "user-a",
        "counter:4:150:20,net-dhcp",
        &["--net", "user"],
    );
    wait_counter(&mut a, 0, 2);
    let source_passt = common::descendants_named(a.pid(), "passt");
    assert_eq!(source_passt.len(), 1, "one passt for the source");
    let addr = format!("unix:{}", arg(&dir.0.join("u.mig")));
    let (mut b, b_api) = receive(&dir, &addr, "user-b", &[]);
    handed_over(migrate(&a_api, &addr, &[]), a);
    assert!(
        !common::process_named(source_passt[0], "passt"),
        "the source's passt is gone"
    );
    assert_eq!(common::descendants_named(b.pid(), "passt").len(), 1);
    b.expect_from(0, "probe: net-dhcp ack=10.0.2.15", WAIT);
    assert!(!b.seen.contains("corrupt"), "{}", b.seen);
    // The probe is done: it exits, and so does the destination, with its passt.
    let (status, stderr) = b.wait(WAIT);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(!b_api.exists());
}
