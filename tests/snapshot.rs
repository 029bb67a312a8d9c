//! Snapshot and restore with the probe guest: the counter workload continues in two
//! restored copies with verified memory; the CLI's rules (existing directories,
//! --force, --stop, a paused VM, a failed snapshot); corrupt or incomplete snapshots
//! are refused before anything starts.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::workloads::{counter_progress as progress, wait_counter as wait_progress};
use common::{
    arg, restore_refused as refused_with, stop_vm, wisp_cmd, wisp_cmd_in, Session, TempDir,
};

const WAIT: Duration = Duration::from_secs(60);
/// Counter area: 16 MiB = 4096 pages per round.
const AREA_MIB: u64 = 16;

/// Starts the counter workload under `name` with its control socket in `dir`.
fn start_counter(dir: &TempDir, name: &str) -> (Session, PathBuf) {
    common::start_probe(dir, name, &format!("counter:{AREA_MIB}"), &[], &[])
}

/// Restores `snap` under `name`.
fn restore(dir: &TempDir, snap: &Path, name: &str) -> (Session, PathBuf) {
    let api = dir.0.join(format!("{name}.sock"));
    let session = Session::start(&["restore", arg(snap), "--name", name, "--api", arg(&api)]);
    (session, api)
}

fn stop(session: Session, api: &Path) {
    let stderr = stop_vm(session, api, WAIT);
    assert!(!stderr.contains("corrupt"), "{stderr}");
}

#[test]
fn counter_snapshot_restores_twice_side_by_side_with_verified_memory() {
    let dir = TempDir::new("snap-counter");
    let (mut a, a_api) = start_counter(&dir, "snap-a");
    wait_progress(&mut a, 0, 2);
    // Settle: everything printed so far is before the snapshot.
    a.poll(Duration::from_millis(100));
    let before = progress(&a.seen);
    let before_max = before.iter().map(|p| p.1).max().expect("progress");

    let snap = dir.0.join("a.snap");
    let (code, out, err) = wisp_cmd(&["snapshot", arg(&a_api), "--to", arg(&snap)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("snap-a: snapshot written to") && out.contains("VM running"),
        "{out}"
    );
    // The original keeps running.
    let mark = a.seen.len();
    wait_progress(&mut a, mark, 1);
    stop(a, &a_api);

    // Files: private, and sparse (128 MiB of RAM, about 16 MiB touched).
    for f in ["state", "memory"] {
        let m = std::fs::metadata(snap.join(f)).expect("snapshot file");
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f} mode");
    }
    let mem = std::fs::metadata(snap.join("memory")).expect("memory file");
    assert_eq!(mem.len(), 128 << 20);
    assert!(
        mem.blocks() * 512 < 48 << 20,
        "memory file not sparse: {} bytes on disk",
        mem.blocks() * 512
    );

    // Two copies from the same snapshot, side by side: both continue where the
    // snapshot was taken (no reboot, no count below what was printed before it) and
    // run three more rounds, each verifying every page of the area.
    let (mut b, b_api) = restore(&dir, &snap, "snap-b");
    let (mut c, c_api) = restore(&dir, &snap, "snap-c");
    for copy in [&mut b, &mut c] {
        let first = wait_progress(copy, 0, 1)[0];
        let deadline = Instant::now() + WAIT;
        loop {
            let p = progress(&copy.seen);
            let last = *p.last().expect("progress");
            if last.0 >= first.0 + 3 {
                break;
            }
            assert!(Instant::now() < deadline, "stalled:\n{}", copy.seen);
            copy.poll(Duration::from_millis(100));
        }
        assert!(
            !copy.seen.contains("probe: start") && !copy.seen.contains("area="),
            "the restored guest booted again:\n{}",
            copy.seen
        );
        let p = progress(&copy.seen);
        assert!(
            p[0].1 >= before_max,
            "count went backwards: {} < {before_max}",
            p[0].1
        );
        assert!(
            p.windows(2).all(|w| w[1].1 > w[0].1 && w[1].0 >= w[0].0),
            "progress not monotonic: {p:?}"
        );
    }
    stop(b, &b_api);
    stop(c, &c_api);
}

#[test]
fn snapshot_rules_existing_dirs_force_stop_paused_and_failures() {
    let dir = TempDir::new("snap-rules");
    let (mut a, api) = start_counter(&dir, "snap-rules");
    let api_s = arg(&api).to_string();
    wait_progress(&mut a, 0, 1);

    // A relative --to is relative to the client's working directory.
    let (code, _, err) = wisp_cmd_in(&["snapshot", &api_s, "--to", "rel.snap"], Some(&dir.0));
    assert_eq!(code, 0, "{err}");
    assert!(dir.0.join("rel.snap/state").is_file());

    // An existing directory is refused, and the VM keeps running.
    let taken = dir.0.join("taken");
    std::fs::create_dir(&taken).expect("mkdir");
    std::fs::write(taken.join("keep"), b"x").expect("marker");
    let (code, _, err) = wisp_cmd(&["snapshot", &api_s, "--to", arg(&taken)]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert!(taken.join("keep").is_file(), "nothing lost");
    let (_, out, _) = wisp_cmd(&["status", &api_s]);
    assert!(out.contains("running"), "{out}");

    // A snapshot that cannot be written (no parent directory) fails cleanly; the VM
    // keeps running and nothing is left behind.
    let nowhere = dir.0.join("no/such/dir");
    let (code, _, err) = wisp_cmd(&["snapshot", &api_s, "--to", arg(&nowhere)]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let (_, out, _) = wisp_cmd(&["status", &api_s]);
    assert!(out.contains("running"), "{out}");
    let mark = a.seen.len();
    wait_progress(&mut a, mark, 1);

    // --force does not replace what is not a snapshot: a directory of the user's, a
    // file, a snapshot directory with something of the user's in it.
    let file = dir.0.join("file.txt");
    std::fs::write(&file, b"keep").expect("file");
    let rel = dir.0.join("rel.snap");
    std::fs::write(rel.join("notes"), b"mine").expect("notes");
    let link = dir.0.join("link.snap");
    std::os::unix::fs::symlink(&taken, &link).expect("symlink");
    for target in [&taken, &file, &rel, &link] {
        let (code, _, err) = wisp_cmd(&["snapshot", &api_s, "--to", arg(target), "--force"]);
        assert_eq!(code, 1, "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("is not a wisp snapshot"), "{err}");
    }
    assert!(taken.join("keep").is_file() && file.is_file() && rel.join("notes").is_file());
    std::fs::remove_file(rel.join("notes")).expect("rm notes");

    // --force replaces an earlier snapshot with a whole new one.
    let before = std::fs::read(rel.join("state")).expect("state");
    let (code, _, err) = wisp_cmd(&["snapshot", &api_s, "--to", arg(&rel), "--force"]);
    assert_eq!(code, 0, "{err}");
    assert_ne!(std::fs::read(rel.join("state")).expect("state"), before);
    let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
        .expect("list")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-") || n.contains(".old-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A paused VM stays paused after a snapshot.
    assert_eq!(wisp_cmd(&["pause", &api_s]).0, 0);
    let (code, out, err) = wisp_cmd(&["snapshot", &api_s, "--to", arg(&dir.0.join("p.snap"))]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("VM paused"), "{out}");
    assert_eq!(wisp_cmd(&["resume", &api_s]).0, 0);

    // --stop: the VM exits with status 0 once the snapshot is written.
    let (code, out, err) = wisp_cmd(&[
        "snapshot",
        &api_s,
        "--to",
        arg(&dir.0.join("last.snap")),
        "--stop",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("VM stopping"), "{out}");
    let (status, stderr) = a.wait(WAIT);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(!api.exists(), "socket removed");
    assert!(dir.0.join("last.snap/memory").is_file());
}

fn refused(dir: &TempDir, snap: &Path, want: &str) {
    refused_with(dir, snap, &[], want);
}

fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    b[0] ^= 0x20;
    f.write_all_at(&b, at).expect("write");
}

#[test]
fn corrupt_truncated_mismatched_or_missing_snapshots_are_refused() {
    let dir = TempDir::new("snap-corrupt");
    let (mut a, api) = start_counter(&dir, "snap-corrupt");
    wait_progress(&mut a, 0, 1);
    let snap = dir.0.join("c.snap");
    let (code, _, err) = wisp_cmd(&["snapshot", arg(&api), "--to", arg(&snap), "--stop"]);
    assert_eq!(code, 0, "{err}");
    let (status, _) = a.wait(WAIT);
    assert_eq!(status, Some(0));
    let state = snap.join("state");
    let memory = snap.join("memory");
    let state_len = std::fs::metadata(&state).expect("state").len();
    let memory_len = std::fs::metadata(&memory).expect("memory").len();

    // State file: one flipped byte in the magic, the version, the checksum and the
    // body; then truncated; then another format version.
    for (at, want) in [
        (0, "not a wisp snapshot"),
        (9, "format version"),
        (25, "checksum mismatch"),
        (state_len / 2, "checksum mismatch"),
        (state_len - 1, "checksum mismatch"),
    ] {
        flip(&state, at);
        refused(&dir, &snap, want);
        flip(&state, at);
    }
    let original = std::fs::read(&state).expect("read state");
    std::fs::write(&state, &original[..original.len() - 100]).expect("truncate");
    refused(&dir, &snap, "truncated");
    std::fs::write(&state, &original[..20]).expect("truncate");
    refused(&dir, &snap, "truncated");
    let mut other = original.clone();
    other[8..12].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&state, &other).expect("version");
    refused(
        &dir,
        &snap,
        "snapshot format version 1, but this wisp reads only version 2",
    );
    std::fs::write(&state, &original).expect("restore state");

    // Memory file: a flipped byte in a page the guest used (the probe's image at
    // 2 MiB) and in a hole; then a wrong size.
    for at in [0x20_0100, memory_len - 4096] {
        flip(&memory, at);
        refused(&dir, &snap, "is corrupt (digest mismatch)");
        flip(&memory, at);
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .expect("open memory");
    f.set_len(memory_len + 4096).expect("grow");
    refused(&dir, &snap, "the snapshot expects 134217728");
    f.set_len(memory_len).expect("shrink back");
    drop(f);

    // Missing files and directories.
    let moved = dir.0.join("memory.moved");
    std::fs::rename(&memory, &moved).expect("move");
    refused(&dir, &snap, "memory");
    std::fs::rename(&moved, &memory).expect("move back");
    std::fs::rename(&state, &moved).expect("move");
    refused(&dir, &snap, "state");
    std::fs::rename(&moved, &state).expect("move back");
    refused(&dir, &dir.0.join("nothing-here"), "cannot read");

    // Overrides that do not fit the snapshot (it has no disk and no network card).
    refused_with(
        &dir,
        &snap,
        &["--disk", "/tmp/x.img"],
        "the saved VM has 0 disk(s)",
    );
    refused_with(
        &dir,
        &snap,
        &["--net", "tap=t0"],
        "the saved VM has 0 network card(s)",
    );

    // After all that, the snapshot itself is intact and restores.
    let (mut b, b_api) = restore(&dir, &snap, "snap-intact");
    wait_progress(&mut b, 0, 2);
    stop(b, &b_api);
}
