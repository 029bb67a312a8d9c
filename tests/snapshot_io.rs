//! Snapshots taken while virtio-blk and virtio-net requests are in flight: after the
//! restore, no request is lost or done twice. The probe keeps batches of block writes
//! in flight and checks every completion (an unexpected or repeated used entry, a
//! timeout or a wrong read-back ends it with a non-zero status), and streams numbered
//! frames that the host counts across the restore. Whether a notification is still
//! unprocessed at the moment of the snapshot depends on timing; the devices' unit
//! tests check deterministically that a restore re-examines every ring.

mod common;

use std::path::Path;
use std::time::Duration;

use common::netns::{assert_exactly_once, collect_seqs, drain_seqs, NetNs, PacketSocket};
use common::workloads::{assert_blkseq_ring, blkseq_continues, wait_blkseq as wait_ks};
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
    let since = blkseq_continues(&mut b, &before, SECTORS);
    stop_vm(b, &api_b, WAIT);
    assert_blkseq_ring(&copy, SECTORS, since);
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
    collect_seqs(&old, &mut seqs, 300, || a.seen.clone());
    let snap = dir.0.join("net.snap");
    snapshot_stop(&api, &snap);
    let (status, stderr) = a.wait(WAIT);
    assert_eq!(status, Some(0), "{stderr}");
    // What the old TAP still holds.
    drain_seqs(&old, &mut seqs);
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
    collect_seqs(&new, &mut seqs, at_snapshot + 300, || b.seen.clone());
    stop_vm(b, &api_b, WAIT);
    assert_exactly_once(&seqs, at_snapshot);
}
