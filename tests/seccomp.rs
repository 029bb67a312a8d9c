//! seccomp: every thread of a running VM carries its filter, a filter that denies a
//! call wisp needs ends wisp with a line naming that call, and bad filter options are
//! one error line before anything starts.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{arg, repo_root, run_probe, start_probe, stop_vm, wisp_ok, TempDir};

const WAIT: Duration = Duration::from_secs(60);

/// Each task of process `pid`: its name and the `Seccomp:` mode of its status.
fn task_modes(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field("Seccomp:")));
    }
    out.sort();
    out
}

/// The built-in filters as JSON, with `edit` applied.
fn edited_filters(edit: impl FnOnce(&mut serde_json::Value)) -> serde_json::Value {
    let path = repo_root().join("vmm/src/seccomp/x86_64.json");
    let text = std::fs::read_to_string(path).expect("built-in filters");
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
    edit(&mut json);
    json
}

/// Drops every rule for `syscall` (with `arg1`, the ioctl request, if given) from
/// thread kind `kind`'s filter.
fn without(json: &mut serde_json::Value, kind: &str, syscall: &str, arg1: Option<u64>) {
    let rules = json[kind]["filter"].as_array_mut().expect("filter");
    let before = rules.len();
    rules.retain(|r| {
        let same_call = r["syscall"] == syscall;
        let same_arg = arg1.is_none_or(|v| r["args"][0]["val"] == v);
        !(same_call && same_arg)
    });
    assert!(rules.len() < before, "{kind} has no {syscall} rule");
}

#[test]
fn every_thread_of_a_running_vm_runs_under_its_filter() {
    let dir = TempDir::new("seccomp-threads");
    let (mut s, api) = start_probe(&dir, "sc", "counter:4", &["--cpus", "2"], &[]);
    s.expect_from(0, "probe: counter", WAIT);
    let modes = task_modes(s.pid());
    let names: Vec<&str> = modes.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["vcpu0", "vcpu1", "migrate", "wisp"] {
        assert!(names.contains(&want), "no {want} thread: {modes:?}");
    }
    for (name, mode) in &modes {
        assert_eq!(mode, "2", "thread {name} is not filtered: {modes:?}");
    }
    // The VMM thread's filter allows what a snapshot needs (files, the vCPUs' state).
    let snap = dir.0.join("snap");
    wisp_ok(&["snapshot", arg(&api), "--to", arg(&snap)]);
    for file in ["state", "memory"] {
        assert!(snap.join(file).is_file(), "snapshot without {file}");
    }
    wisp_ok(&["pause", arg(&api)]);
    wisp_ok(&["resume", arg(&api)]);
    stop_vm(s, &api, WAIT);
}

#[test]
fn seccomp_off_leaves_every_thread_unfiltered() {
    let dir = TempDir::new("seccomp-off");
    let (mut s, api) = start_probe(&dir, "off", "counter:4", &["--seccomp", "off"], &[]);
    s.expect_from(0, "probe: counter", WAIT);
    let modes = task_modes(s.pid());
    for (name, mode) in &modes {
        assert_eq!(mode, "0", "thread {name}: {modes:?}");
    }
    stop_vm(s, &api, WAIT);
}

/// Runs the probe's `hello` under the filters in `json`; returns the output.
fn hello_under(dir: &TempDir, json: &serde_json::Value) -> common::Output {
    let file = dir.file("filters.json", json.to_string().as_bytes());
    run_probe("hello", &["--seccomp-filter", arg(&file)])
}

fn assert_killed_naming(out: &common::Output, want: &str) {
    assert_eq!(out.status, Some(159), "{out:?}");
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("seccomp"))
        .unwrap_or_else(|| panic!("no seccomp line: {out:?}"));
    assert!(line.contains(want), "{line}");
    assert!(line.contains("--seccomp off"), "{line}");
}

#[test]
fn a_filter_that_denies_a_needed_call_stops_wisp_naming_the_call() {
    let dir = TempDir::new("seccomp-deny");
    // The unchanged file works: the probe says hello and wisp exits 0.
    let out = hello_under(&dir, &edited_filters(|_| {}));
    assert_eq!(out.status, Some(0), "{out:?}");
    assert!(out.stdout.contains("probe: hello"), "{out:?}");

    let vmm = edited_filters(|j| without(j, "vmm", "epoll_wait", None));
    assert_killed_naming(
        &hello_under(&dir, &vmm),
        "the vmm thread made system call epoll_wait (232)",
    );
    const KVM_RUN: u64 = 0xae80;
    let vcpu = edited_filters(|j| without(j, "vcpu", "ioctl", Some(KVM_RUN)));
    assert_killed_naming(
        &hello_under(&dir, &vcpu),
        "the vcpu0 thread made system call ioctl (16)",
    );
}

#[test]
fn bad_filter_options_are_one_line_before_anything_starts() {
    let dir = TempDir::new("seccomp-bad");
    let missing = dir.0.join("missing.json");
    let not_json = dir.file("bad.json", b"{ not json");
    let no_vcpu = dir.file(
        "partial.json",
        edited_filters(|j| {
            j.as_object_mut().expect("object").remove("vcpu");
        })
        .to_string()
        .as_bytes(),
    );
    let unknown = dir.file(
        "unknown.json",
        edited_filters(|j| {
            j["vmm"]["filter"]
                .as_array_mut()
                .expect("filter")
                .push(serde_json::json!({"syscall": "no_such_call"}));
        })
        .to_string()
        .as_bytes(),
    );
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--seccomp-filter", arg(&missing)],
            format!("--seccomp-filter {}: No such file", missing.display()),
        ),
        (vec!["--seccomp-filter", arg(&not_json)], "bad.json:".into()),
        (
            vec!["--seccomp-filter", arg(&no_vcpu)],
            "no filter for the \"vcpu\" thread".into(),
        ),
        (
            vec!["--seccomp-filter", arg(&unknown)],
            "no_such_call".into(),
        ),
        (
            vec!["--seccomp", "off", "--seccomp-filter", arg(&not_json)],
            "cannot be used with".into(),
        ),
        (vec!["--seccomp", "maybe"], "invalid value 'maybe'".into()),
    ];
    for (extra, want) in cases {
        let out = run_probe("hello", &extra);
        assert_eq!(out.status, Some(1), "{extra:?}: {out:?}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{extra:?}: one line only:\n{}", out.stderr);
        assert!(lines[0].starts_with("wisp: error: "), "{}", lines[0]);
        assert!(lines[0].contains(&want), "{extra:?}: {}", lines[0]);
        assert!(out.stdout.is_empty(), "{extra:?}: the VM ran: {out:?}");
    }
}

#[test]
fn the_built_in_filters_are_the_documented_file() {
    // The README and --help send users to this file to start their own.
    let path = repo_root().join("vmm/src/seccomp/x86_64.json");
    assert!(Path::new(&path).is_file());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    for kind in ["vmm", "vcpu", "migrate"] {
        assert_eq!(json[kind]["mismatch_action"], "trap", "{kind}");
    }
}
