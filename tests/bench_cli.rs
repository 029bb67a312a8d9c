//! `wisp bench` end to end on a short run: bad input is refused before any slow work,
//! and a real run (a restored wisp VM and runc containers, each checked ready) gives a
//! JSON report of schema wisp-bench/1 and an SVG chart. No timing is judged.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{arg, wisp_cmd, TempDir};
use serde_json::Value;

/// Bad options get one line, a non-zero exit, and nothing written.
#[test]
fn bad_options_are_refused_up_front() {
    let dir = TempDir::new("bench-bad");
    let svg_in_missing_dir = dir.0.join("no/such/dir/chart.svg");
    let cases: [(&[&str], &str); 7] = [
        (&["bench", "--only", "wisp,docker-desktop"], "unknown kind"),
        (&["bench", "--runs", "0"], "expected a whole number from 1"),
        (
            &["bench", "--memory", "12"],
            "expected a whole number from 64",
        ),
        (
            &["bench", "--svg", arg(&svg_in_missing_dir)],
            "does not exist",
        ),
        (&["bench", "--svg", arg(&dir.0)], "is a directory"),
        (
            &["bench", "--image", "dir:/srv"],
            "takes oci:DIR[:TAG] or docker-archive:FILE",
        ),
        (
            &["bench", "--", "echo"],
            "a command after -- is for --image",
        ),
    ];
    for (args, want) in cases {
        let t0 = Instant::now();
        let (code, out, err) = wisp_cmd(args);
        assert_ne!(code, 0, "{args:?} was accepted: {out}{err}");
        assert!(err.contains(want), "{args:?}: wanted {want:?} in: {err}");
        assert!(out.is_empty(), "{args:?} printed a report: {out}");
        // Refused before anything slow (a guest boot takes seconds): generous bound.
        assert!(t0.elapsed() < Duration::from_secs(20), "{args:?} was slow");
    }
    assert!(
        !dir.0.join("no").exists(),
        "a missing directory was created"
    );
}

fn figure<'a>(kind: &'a Value, key: &str) -> &'a Value {
    let f = &kind["figures"][key];
    assert!(f.is_object(), "{} has no {key}: {kind}", kind["kind"]);
    f
}

/// Checks a figure's summary: min <= median <= max, one sample per run, all finite
/// and not negative.
fn check_summary(kind: &Value, key: &str, runs: usize) {
    let f = figure(kind, key);
    let n = |k: &str| {
        f[k].as_f64()
            .unwrap_or_else(|| panic!("{key}.{k} is not a number: {f}"))
    };
    let (min, median, max) = (n("min"), n("median"), n("max"));
    assert!(
        0.0 <= min && min <= median && median <= max && max.is_finite(),
        "{key}: {f}"
    );
    let samples = f["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), runs, "{key}: {f}");
    for s in samples {
        let v = s.as_f64().expect("a sample is a number");
        assert!(min <= v && v <= max, "{key}: sample {v} outside {f}");
    }
}

fn kind<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["kinds"]
        .as_array()
        .expect("kinds")
        .iter()
        .find(|k| k["kind"] == name)
        .unwrap_or_else(|| panic!("{name} missing from the report: {report}"))
}

/// A short real run: JSON on stdout, progress on stderr, the chart in the file.
#[test]
fn a_short_run_reports_json_and_draws_the_chart() {
    let dir = TempDir::new("bench-run");
    let svg = dir.0.join("bench.svg");
    let (code, out, err) = wisp_cmd(&[
        "bench",
        "--runs",
        "1",
        "--only",
        "wisp-restore,runc,crun",
        "--requests",
        "5",
        "--density",
        "2",
        "--json",
        "--svg",
        arg(&svg),
    ]);
    assert_eq!(code, 0, "wisp bench failed: {err}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report["schema"], "wisp-bench/1");
    let host = &report["host"];
    assert!(host["cpus"].as_u64().is_some_and(|n| n >= 1), "{host}");
    assert!(host["kernel"].as_str().is_some_and(|k| !k.is_empty()));
    // The caveat is there exactly when kernel-mode emulation was measured.
    assert_eq!(
        host["emulated_kernel_mode_mips"].is_number(),
        host["caveat"].is_string(),
        "{host}"
    );
    let st = &report["settings"];
    assert_eq!(
        (&st["runs"], &st["requests"], &st["density"]),
        (&Value::from(1), &Value::from(5), &Value::from(2))
    );
    let kinds: Vec<&str> = report["kinds"]
        .as_array()
        .expect("kinds")
        .iter()
        .map(|k| k["kind"].as_str().expect("kind name"))
        .collect();
    assert_eq!(kinds, ["wisp-restore", "runc", "crun"], "report order");

    let common = [
        "start_ms",
        "cpu_ms",
        "memory_mib",
        "http_p50_ms",
        "http_p99_ms",
        "density_per_s",
        "density_mib_per_instance",
    ];
    for name in ["wisp-restore", "runc"] {
        let k = kind(&report, name);
        assert_eq!(k["status"], "ok", "{name}: {}", k["note"]);
        assert!(k["runs"].as_str().is_some_and(|r| !r.is_empty()), "{k}");
        for key in common {
            check_summary(k, key, 1);
        }
        // Nothing answers HTTP before it is ready: a latency is there and positive.
        assert!(figure(k, "http_p50_ms")["median"].as_f64() > Some(0.0));
        // No wisp kind in this run: nothing to take ratios against.
        assert_eq!(k["ratios"], serde_json::json!({}), "{name}");
    }
    let restore = kind(&report, "wisp-restore");
    check_summary(restore, "vmm_own_mib", 1);
    let own = figure(restore, "vmm_own_mib")["median"].as_f64();
    let all = figure(restore, "memory_mib")["median"].as_f64();
    assert!(
        own < all,
        "wisp's own share {own:?} not below the total {all:?}"
    );
    assert!(kind(&report, "runc")["figures"]["vmm_own_mib"].is_null());
    // crun either ran, or says why not.
    let crun = kind(&report, "crun");
    if crun["status"] != "ok" {
        assert!(
            crun["note"].as_str().is_some_and(|n| !n.is_empty()),
            "{crun}"
        );
    }

    assert!(err.contains("bench: ["), "no progress on stderr: {err}");
    assert!(
        err.contains("what each kind ran:"),
        "no table on stderr: {err}"
    );
    let chart = std::fs::read_to_string(&svg).expect("the chart was written");
    check_svg(&svg, &chart);
}

fn check_svg(path: &Path, chart: &str) {
    assert!(
        chart.starts_with("<svg"),
        "{}: {}",
        path.display(),
        &chart[..80]
    );
    assert!(chart.trim_end().ends_with("</svg>"));
    for text in ["start to ready", "HTTP latency p50", "wisp-restore", "runc"] {
        assert!(chart.contains(text), "{text} missing from the chart");
    }
    check_balanced(chart);
}

/// Every element that opens is closed, in order (a small well-formedness check).
fn check_balanced(xml: &str) {
    let mut open: Vec<&str> = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find('<') {
        let end = rest[at..].find('>').expect("a tag is not closed") + at;
        let tag = &rest[at + 1..end];
        rest = &rest[end + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                open.pop(),
                Some(name.trim()),
                "</{name}> closes the wrong element"
            );
        } else if !tag.ends_with('/') {
            open.push(tag.split_whitespace().next().unwrap_or(""));
        }
    }
    assert!(open.is_empty(), "never closed: {open:?}");
}

#[test]
fn the_balance_check_can_fail() {
    check_balanced("<svg><g/><text a=\"1\">x</text></svg>");
    let bad = std::panic::catch_unwind(|| check_balanced("<svg><g></svg>"));
    assert!(bad.is_err());
}

/// `--image`: an image's command as a microVM and as containers on the same disk.
#[test]
fn an_image_runs_as_a_microvm_and_as_containers() {
    use wisp_image::fixture::{self, Item};
    let dir = TempDir::new("bench-image");
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static");
    let layer = fixture::tar(&[
        Item::Dir("bin", 0o755),
        Item::File("bin/busybox", &busybox, 0o755, 0),
        Item::Symlink("bin/sh", "busybox"),
        Item::Symlink("bin/echo", "busybox"),
    ])
    .expect("tar");
    let config = fixture::config(
        serde_json::json!({ "Cmd": ["/bin/sh", "-c", "echo bench-image-ran"] }),
        std::slice::from_ref(&layer),
    );
    fixture::oci_layout(&dir.0.join("layout"), "v1", &config, &[layer]).expect("layout");
    let reference = format!("oci:{}:v1", dir.0.join("layout").display());
    let mut cmd = std::process::Command::new(common::wisp());
    cmd.env("XDG_CACHE_HOME", dir.0.join("cache")).args([
        "bench",
        "--image",
        &reference,
        "--only",
        "wisp,runc",
        "--runs",
        "1",
        "--json",
    ]);
    let out = common::run_cmd(cmd, b"", Duration::from_secs(600));
    assert_eq!(out.status, Some(0), "{out:#?}");
    let report: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:#?}"));
    assert_eq!(report["settings"]["image"], reference.as_str());
    for name in ["wisp", "runc"] {
        let k = kind(&report, name);
        assert_eq!(k["status"], "ok", "{name}: {}", k["note"]);
        assert_eq!(k["note"], "exit status 0", "{name}");
        for key in ["image_first_output_ms", "image_exit_ms", "image_cpu_ms"] {
            check_summary(k, key, 1);
        }
        let first = figure(k, "image_first_output_ms")["median"].as_f64();
        let exit = figure(k, "image_exit_ms")["median"].as_f64();
        assert!(
            first <= exit,
            "{name}: first output {first:?} after exit {exit:?}"
        );
        assert!(
            k["figures"]["start_ms"].is_null(),
            "{name}: workload figures in image mode"
        );
    }
    // The containers' mounts are gone.
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(!mounts.contains("target/bench/run-"), "{mounts}");
}
