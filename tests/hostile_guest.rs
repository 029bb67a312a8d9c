//! A guest that floods: its console without pause, or a queue's notifications in a
//! tight loop. The control socket must still answer at once (here: within the CLI's
//! own wait, which no timing is asserted beyond), a snapshot must still be taken, and
//! the VM must stop when told. Probe guest only.

mod common;

use std::time::Duration;

use common::{arg, start_probe, stop_vm, wisp_cmd, wisp_ok, TempDir};

const WAIT: Duration = Duration::from_secs(60);

/// Asks `api` for status, pause, resume and a snapshot while the guest floods.
fn control_still_answers(dir: &TempDir, api: &std::path::Path) {
    for _ in 0..5 {
        let (code, out, err) = wisp_cmd(&["status", arg(api)]);
        assert_eq!(code, 0, "status: {err}");
        assert!(out.contains("running"), "{out}");
    }
    wisp_ok(&["pause", arg(api)]);
    let (_, out, _) = wisp_cmd(&["status", arg(api)]);
    assert!(out.contains("paused"), "{out}");
    wisp_ok(&["resume", arg(api)]);
    let snap = dir.0.join("snap");
    wisp_ok(&["snapshot", arg(api), "--to", arg(&snap)]);
    assert!(snap.join("state").is_file());
}

#[test]
fn a_console_flood_does_not_starve_the_control_socket() {
    let dir = TempDir::new("flood-console");
    let log = dir.0.join("console.log");
    let console = format!("file:{}", log.display());
    let (s, api) = start_probe(&dir, "fc", "flood-console", &["--console", &console], &[]);
    let deadline = std::time::Instant::now() + WAIT;
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("flood: 0123")) {
        assert!(std::time::Instant::now() < deadline, "no flood started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let size = || std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let before = size();
    control_still_answers(&dir, &api);
    // The guest was flooding all along (and still is).
    while size() <= before {
        assert!(std::time::Instant::now() < deadline, "the flood stopped");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop_vm(s, &api, WAIT);
}

#[test]
fn a_notification_flood_does_not_starve_the_control_socket() {
    let dir = TempDir::new("flood-notify");
    let disk = dir.file("disk.img", &vec![0u8; 1 << 20]);
    let (mut s, api) = start_probe(&dir, "fn", "flood-notify", &["--disk", arg(&disk)], &[]);
    s.expect_from(0, "probe: flooding notifications", WAIT);
    control_still_answers(&dir, &api);
    stop_vm(s, &api, WAIT);
}
