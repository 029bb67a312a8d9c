//! Regression tests for the file-system defects a hostile-input review found: wisp
//! never replaces or deletes what it did not create, never writes outside what the
//! user named or its own runtime directory, refuses in a snapshot whatever `wisp run`
//! refuses, and never waits on something that is not a file. Probe guest only.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    arg, copy_snapshot, craft_state, probe, restore_refused, run_cmd, wisp, wisp_run, Session,
    TempDir,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(arg(path)).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// `wisp ARGS` with XDG_RUNTIME_DIR set to `runtime`, to completion (30 s at most).
fn wisp_in(runtime: &Path, args: &[&str]) -> common::Output {
    let mut cmd = Command::new(wisp());
    cmd.args(args).env("XDG_RUNTIME_DIR", runtime);
    run_cmd(cmd, b"", Duration::from_secs(30))
}

/// Runs the probe's `hello` with `--api api`; returns the run.
fn hello_with_api(api: &Path) -> common::Output {
    wisp_run(
        &[
            "run",
            "--kernel",
            arg(&probe()),
            "--api",
            arg(api),
            "--cmdline",
            "probe.cmd=hello",
        ],
        b"",
        WAIT,
    )
}

fn assert_one_error(out: &common::Output, want: &str) {
    assert_eq!(out.status, Some(1), "{out:#?}");
    assert_eq!(out.error_lines().len(), 1, "{out:#?}");
    assert!(out.stderr.contains(want), "expected {want:?}: {out:#?}");
}

#[test]
fn api_paths_that_are_not_stale_sockets_are_refused_and_kept() {
    let dir = TempDir::new("api-paths");
    let file = dir.file("notes.txt", b"keep me");
    assert_one_error(
        &hello_with_api(&file),
        "is a regular file, not a control socket",
    );
    assert_eq!(std::fs::read(&file).expect("file"), b"keep me", "file kept");
    let sub = dir.0.join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    assert_one_error(
        &hello_with_api(&sub),
        "is a directory, not a control socket",
    );
    assert!(sub.is_dir());
    let fifo = dir.0.join("fifo");
    mkfifo(&fifo);
    assert_one_error(&hello_with_api(&fifo), "is a FIFO");

    // Missing parents are made private for the run and removed after it; an existing
    // directory keeps its mode.
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let deep = dir.0.join("a/b/vm.sock");
    let out = hello_with_api(&deep);
    assert_eq!(out.status, Some(0), "{out:#?}");
    assert!(
        !dir.0.join("a").exists(),
        "the directories wisp made are gone"
    );
    assert_eq!(mode(&dir.0), 0o755);
}

/// A snapshot of the probe's counter under `name`, taken with --stop, with wisp's
/// runtime directory at `runtime`.
fn counter_snapshot(dir: &TempDir, runtime: &Path, name: &str) -> PathBuf {
    let env = [("XDG_RUNTIME_DIR", arg(runtime))];
    let (mut s, api) = common::start_probe(dir, name, "counter:4", &[], &env);
    s.expect_from(0, "count=", WAIT);
    let snap = dir.0.join(format!("{name}.snap"));
    let out = wisp_in(
        runtime,
        &["snapshot", arg(&api), "--to", arg(&snap), "--stop"],
    );
    assert_eq!(out.status, Some(0), "{out:#?}");
    let (status, stderr) = s.wait(WAIT);
    assert_eq!(status, Some(0), "{stderr}");
    snap
}

/// Every path below `root`, sorted.
fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn a_snapshot_cannot_name_a_path_outside_the_runtime_directory() {
    let dir = TempDir::new("snap-names");
    let runtime = dir.0.join("run/user");
    std::fs::create_dir_all(&runtime).expect("mkdir");
    let snap = counter_snapshot(&dir, &runtime, "names");
    let victim = dir.0.join("victim");
    std::fs::create_dir(&victim).expect("mkdir");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let bad = dir.0.join("bad.snap");
    for name in [
        "../../victim/x",
        "x/../../../victim/y",
        "",
        ".hidden",
        "a b",
    ] {
        copy_snapshot(&snap, &bad);
        craft_state(&bad, |s| s["config"]["name"] = json!(name));
        let before = tree(&dir.0);
        let out = wisp_in(&runtime, &["restore", arg(&bad), "--console", "none"]);
        assert_one_error(&out, "restore it with --name NAME");
        assert_eq!(tree(&dir.0), before, "{name:?}: nothing created or removed");
        assert_eq!(mode(&victim), 0o755, "{name:?}: no mode changed");
    }
    // Under a name of the user's, the same snapshot restores, in the runtime directory.
    let mut s = Session::start_env(
        &["restore", arg(&bad), "--name", "renamed"],
        &[("XDG_RUNTIME_DIR", arg(&runtime))],
    );
    s.expect_from(0, "count=", WAIT);
    let sock = runtime.join("wisp/renamed.sock");
    assert!(sock.exists(), "socket at {}", sock.display());
    let out = wisp_in(&runtime, &["stop", "renamed"]);
    assert_eq!(out.status, Some(0), "{out:#?}");
    let (status, stderr) = s.wait(WAIT);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(!sock.exists());
}

#[test]
fn a_snapshot_is_refused_what_run_refuses() {
    let dir = TempDir::new("snap-crafted");
    let runtime = dir.0.join("run");
    std::fs::create_dir_all(&runtime).expect("mkdir");
    let snap = counter_snapshot(&dir, &runtime, "crafted");
    let bad = dir.0.join("bad.snap");
    let vcpu0 = |s: &Value| s["vcpus"][0].clone();
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "--cpus must be at least 1",
            Box::new(|s| {
                s["config"]["cpus"] = json!(0);
                s["vcpus"] = json!([]);
            }),
        ),
        (
            "--cpus 255 is more than",
            Box::new(move |s| {
                let one = vcpu0(s);
                let all: Vec<Value> = (0..255)
                    .map(|i| {
                        let mut v = one.clone();
                        v["index"] = json!(i);
                        v
                    })
                    .collect();
                s["config"]["cpus"] = json!(255);
                s["vcpus"] = Value::Array(all);
            }),
        ),
        (
            "kvm_regs is 143 bytes, KVM's is 144",
            Box::new(|s| {
                s["vcpus"][0]["regs"].as_array_mut().expect("regs").pop();
            }),
        ),
        (
            "kvm_lapic_state is 1025 bytes, KVM's is 1024",
            Box::new(|s| {
                s["vcpus"][0]["lapic"]
                    .as_array_mut()
                    .expect("lapic")
                    .push(json!(0));
            }),
        ),
        (
            "kvm_pit_state2 is 0 bytes",
            Box::new(|s| s["vm"]["pit"] = json!([])),
        ),
        (
            "MiB of RAM",
            Box::new(|s| s["config"]["memory_mib"] = json!(u64::MAX / 1024)),
        ),
        (
            "more than this host's RAM",
            Box::new(|s| {
                // Consistent with itself, too big for any host here.
                s["config"]["memory_mib"] = json!(1u64 << 40);
                s["memory"]["regions"] = json!([
                    {"guest_addr": 0, "len": 0xd000_0000u64},
                    {"guest_addr": 1u64 << 32, "len": (1u64 << 60) - 0xd000_0000u64}
                ]);
            }),
        ),
    ];
    for (want, edit) in cases {
        copy_snapshot(&snap, &bad);
        craft_state(&bad, |s| edit(s));
        restore_refused(&dir, &bad, &[], want);
    }
}

#[test]
fn snapshot_files_that_are_not_files_are_refused_not_waited_on() {
    let dir = TempDir::new("snap-fifo");
    let runtime = dir.0.join("run");
    std::fs::create_dir_all(&runtime).expect("mkdir");
    let snap = counter_snapshot(&dir, &runtime, "fifo");
    let bad = dir.0.join("bad.snap");
    for (file, want) in [
        ("state", "state: it is a FIFO"),
        ("memory", "memory: it is a FIFO"),
    ] {
        copy_snapshot(&snap, &bad);
        std::fs::remove_file(bad.join(file)).expect("rm");
        mkfifo(&bad.join(file));
        restore_refused(&dir, &bad, &[], want);
    }
    copy_snapshot(&snap, &bad);
    std::fs::remove_file(bad.join("state")).expect("rm");
    std::fs::create_dir(bad.join("state")).expect("mkdir");
    restore_refused(&dir, &bad, &[], "it is a directory");
}

#[test]
fn a_queue_outside_guest_memory_is_one_error_line() {
    let dir = TempDir::new("snap-ring");
    let disk = dir.0.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    let api = dir.0.join("ring.sock");
    let mut s = Session::start(&[
        "run",
        "--api",
        arg(&api),
        "--kernel",
        arg(&probe()),
        "--disk",
        arg(&disk),
        "--cmdline",
        "probe.cmd=blk-seq:64:1000000",
    ]);
    s.expect_from(0, "blk-seq", WAIT);
    let snap = dir.0.join("ring.snap");
    let (code, _, err) = common::wisp_cmd(&["snapshot", arg(&api), "--to", arg(&snap), "--stop"]);
    assert_eq!(code, 0, "{err}");
    let (status, stderr) = s.wait(WAIT);
    assert_eq!(status, Some(0), "{stderr}");
    craft_state(&snap, |s| {
        s["devices"]["virtio"][0]["queues"][0]["desc_table"] = json!(0xffff_0000u64)
    });
    restore_refused(&dir, &snap, &[], "descriptor table at 0xffff0000");
}

#[test]
fn stale_sockets_are_named_by_status_and_removed_by_ls() {
    let dir = TempDir::new("stale");
    let runtime = dir.0.join("run");
    std::fs::create_dir_all(&runtime).expect("mkdir");
    let start = |name: &str| {
        Session::start_env(
            &[
                "run",
                "--name",
                name,
                "--kernel",
                arg(&probe()),
                "--cmdline",
                "probe.cmd=counter:4",
            ],
            &[("XDG_RUNTIME_DIR", arg(&runtime))],
        )
    };
    let mut live = start("live");
    live.expect_from(0, "count=", WAIT);
    let mut killed = start("killed");
    killed.expect_from(0, "count=", WAIT);
    // SAFETY: kill(2) on the child's pid.
    unsafe { libc::kill(killed.pid() as i32, libc::SIGKILL) };
    let _ = killed.wait(WAIT);
    let sock = runtime.join("wisp/killed.sock");
    assert!(sock.exists(), "SIGKILL leaves the socket");

    let out = wisp_in(&runtime, &["status", "killed"]);
    assert_one_error(&out, "is stale");
    let out = wisp_in(&runtime, &["ls"]);
    assert_eq!(out.status, Some(0), "{out:#?}");
    assert!(out.stdout.contains("live"), "{out:#?}");
    assert!(!out.stdout.contains("killed"), "{out:#?}");
    assert!(
        out.stderr.contains("removed stale control socket") && out.stderr.contains("killed.sock"),
        "{out:#?}"
    );
    assert!(!sock.exists(), "ls removed it");
    assert!(
        runtime.join("wisp/live.sock").exists(),
        "the live one stays"
    );
    let out = wisp_in(&runtime, &["status", "killed"]);
    assert_one_error(&out, "no control socket");
    let out = wisp_in(&runtime, &["stop", "live"]);
    assert_eq!(out.status, Some(0), "{out:#?}");
    let (status, _) = live.wait(WAIT);
    assert_eq!(status, Some(0));
}
