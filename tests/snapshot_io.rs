//! Snapshots taken while virtio-blk and virtio-net requests are in flight: after the
//! restore, no request is lost or done twice. The probe keeps batches of block writes
//! in flight and checks every completion (an unexpected or repeated used entry, a
//! timeout or a wrong read-back ends it with a non-zero status), and streams numbered
//! frames that the host counts across the restore. Whether a notification is still
//! unprocessed at the moment of the snapshot depends on timing; the devices' unit
//! tests check deterministically that a restore re-examines every ring.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::netns::{NetNs, PacketSocket};
use common::workloads::{blkseq_ks as ks, check_blkseq_disk, wait_blkseq as wait_ks};
use common::{arg, probe, stop_vm, wisp_ok, Session, TempDir};

const WAIT: Duration = Duration::from_secs(60);
const SECTORS: u64 = 1000;

fn snapshot_stop(api: &Path, to: &Path) {
    wisp_ok(&["snapshot", arg(api), "--to", arg(to), "--stop"]);
}

#[test]
fn block_writes_in_flight_survive_a_snapshot_exactly_once() {
    let dir = TempDir::new("snap-blk");
    let image = dir.file("disk.img", &vec![0u8; 1 << 20]);
    let api = dir.0.join("a.sock");
    let cmdline = format!("probe.cmd=blk-seq:{SECTORS}");
    let mut a = Session::start(&[
        "run",
        "--name",
        "snap-blk-a",
        "--api",
        arg(&api),
        "--kernel",
        arg(&probe()),
        "--disk",
        arg(&image),
        "--cmdline",
        &cmdline,
    ]);
    let before = wait_ks(&mut a, 0, 2);
    let snap = dir.0.join("blk.snap");
    snapshot_stop(&api, &snap);
    let (status, stderr) = a.wait(WAIT);
    assert_eq!(status, Some(0), "{stderr}");

    // The restored guest writes to a copy of the image as it was at the snapshot.
    let copy = dir.0.join("copy.img");
    std::fs::copy(&image, &copy).expect("copy image");
    let api_b = dir.0.join("b.sock");
    let mut b = Session::start(&[
        "restore",
        arg(&snap),
        "--name",
        "snap-blk-b",
        "--api",
        arg(&api_b),
        "--disk",
        arg(&copy),
    ]);
    let after = wait_ks(&mut b, 0, 3);
    let last_before = *before.last().expect("progress");
    assert!(
        after[0] >= last_before,
        "k went backwards: {} after {last_before}",
        after[0]
    );
    // Well past a full ring of writes after the restore.
    let deadline = Instant::now() + WAIT;
    while ks(&b.seen).last().copied().unwrap_or(0) < after[0] + 4 * SECTORS {
        assert!(Instant::now() < deadline, "stalled:\n{}", b.seen);
        b.poll(Duration::from_millis(100));
    }
    stop_vm(b, &api_b, WAIT);
    // Every sector holds a complete write for it, all from the last ring's worth.
    let written = check_blkseq_disk(&copy, SECTORS);
    let (lo, hi) = (
        *written.iter().min().expect("sectors"),
        *written.iter().max().expect("sectors"),
    );
    assert!(hi - lo < SECTORS + 8, "stale sectors: writes {lo}..={hi}");
    assert!(
        lo > after[0],
        "the ring was not rewritten after the restore"
    );
}

#[test]
fn frames_in_flight_survive_a_snapshot_exactly_once_onto_a_new_tap() {
    let dir = TempDir::new("snap-net");
    let ns = NetNs::new("snapnet");
    ns.enter();
    ns.tap("sn0");
    ns.tap("sn1");
    let old = PacketSocket::open("sn0");
    let new = PacketSocket::open("sn1");
    let api = dir.0.join("a.sock");
    // 64-byte frames at most every 200 us: a steady stream the host keeps up with.
    let a = Session::start(&[
        "run",
        "--name",
        "snap-net-a",
        "--api",
        arg(&api),
        "--kernel",
        arg(&probe()),
        "--net",
        "tap=sn0",
        "--cmdline",
        "probe.cmd=net-send:0:64:200",
    ]);
    let mut seqs = Vec::new();
    let seq_of = |f: &[u8]| u32::from_le_bytes([f[14], f[15], f[16], f[17]]);
    while seqs.len() < 300 {
        let f = old
            .recv_test_frame(WAIT)
            .unwrap_or_else(|| panic!("no frames; output:\n{}", a.seen));
        seqs.push(seq_of(&f));
    }
    let snap = dir.0.join("net.snap");
    snapshot_stop(&api, &snap);
    let (status, stderr) = a.wait(WAIT);
    assert_eq!(status, Some(0), "{stderr}");
    // What the old TAP still holds.
    while let Some(f) = old.recv_test_frame(Duration::from_millis(500)) {
        seqs.push(seq_of(&f));
    }
    let at_snapshot = seqs.len();

    let api_b = dir.0.join("b.sock");
    let b = Session::start(&[
        "restore",
        arg(&snap),
        "--name",
        "snap-net-b",
        "--api",
        arg(&api_b),
        "--net",
        "tap=sn1",
    ]);
    while seqs.len() < at_snapshot + 300 {
        let f = new
            .recv_test_frame(WAIT)
            .unwrap_or_else(|| panic!("no frames after the restore; output:\n{}", b.seen));
        seqs.push(seq_of(&f));
    }
    stop_vm(b, &api_b, WAIT);
    let expected: Vec<u32> = (seqs[0]..seqs[0] + seqs.len() as u32).collect();
    assert_eq!(seqs[0], 0, "the stream starts at 0");
    if seqs != expected {
        let bad = seqs
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        panic!(
            "frames lost or repeated around index {bad} (snapshot at {at_snapshot}): {:?}",
            &seqs[bad.saturating_sub(3)..(bad + 5).min(seqs.len())]
        );
    }
}
