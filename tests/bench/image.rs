//! Image benchmark (not a test: it reports, it never fails on a number).
//!
//! An image of busybox and a payload layer (`--mib` MiB in 4 MiB files, plus 2000
//! small files), written as an OCI layout with gzip layers, runs `echo` as a microVM:
//! - first start: a cache of its own, so the run converts the image (digests checked,
//!   layers applied, ext4 packed) and then boots;
//! - conversion: the part of that the run's log reports as converting;
//! - later start: the same image again, from the cache.
//!
//! First and later starts alternate within one run. Reported: min / median / max of each,
//! and the ratio of the medians. Timed from spawning `wisp run` to the process's output.
//!
//! Run: `scripts/bench.sh image` (needs root: converting keeps file owners). Options:
//! `--runs N` (default 3), `--mib N` (default 64).

#[path = "../common/mod.rs"]
mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{option_arg, wisp, TempDir};
use wisp_image::fixture::{self, Item};

const MARK: &str = "bench-image-ready";

fn image(dir: &Path, mib: u64) -> String {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static");
    let base = fixture::tar(&[
        Item::Dir("bin", 0o755),
        Item::File("bin/busybox", &busybox, 0o755, 0),
        Item::Symlink("bin/sh", "busybox"),
        Item::Symlink("bin/echo", "busybox"),
    ])
    .expect("tar");
    // Incompressible-ish payload: a xorshift stream, so gzip does real work.
    let mut x: u32 = 0x9e37_79b9;
    let mut chunk = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    };
    let big: Vec<(String, Vec<u8>)> = (0..mib.div_ceil(4))
        .map(|i| (format!("data/big{i}"), chunk(4 << 20)))
        .collect();
    let small: Vec<(String, Vec<u8>)> = (0..2000)
        .map(|i| (format!("data/small/{i}"), chunk(512)))
        .collect();
    let mut items = vec![Item::Dir("data", 0o755), Item::Dir("data/small", 0o755)];
    items.extend(
        big.iter()
            .chain(&small)
            .map(|(p, d)| Item::File(p, d, 0o644, 0)),
    );
    let payload = fixture::tar(&items).expect("tar");
    let layers = vec![base, payload];
    let stored: Vec<Vec<u8>> = layers
        .iter()
        .map(|l| fixture::gzip(l).expect("gzip"))
        .collect();
    let config = fixture::config(
        serde_json::json!({ "Cmd": ["/bin/sh", "-c", format!("echo {MARK}")] }),
        &layers,
    );
    let layout = dir.join("layout");
    fixture::oci_layout(&layout, "bench", &config, &stored).expect("layout");
    format!("oci:{}:bench", layout.display())
}

/// Runs the image with `cache`; returns the time to its output and the conversion
/// time the log reports (if it converted).
fn start(reference: &str, cache: &Path) -> (Duration, Option<f64>) {
    let t0 = Instant::now();
    let mut child = Command::new(wisp())
        .env("XDG_CACHE_HOME", cache)
        .args(["run", "--image", reference])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wisp");
    let mut out = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut at = None;
    while let Ok(n) = out.read(&mut buf) {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if at.is_none() && String::from_utf8_lossy(&seen).contains(MARK) {
            at = Some(t0.elapsed());
        }
    }
    let mut err = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    let status = child.wait().expect("wait");
    let at = at.unwrap_or_else(|| panic!("no output ({status}):\n{err}"));
    let converted = err
        .lines()
        .find_map(|l| l.split(" converted in ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|s| s.parse().ok());
    (at, converted)
}

fn summary(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[0], s[s.len() / 2], s[s.len() - 1])
}

fn main() {
    let runs = option_arg("--runs", 3).max(1) as usize;
    let mib = option_arg("--mib", 64).max(1);
    let dir = TempDir::new("bench-image");
    let reference = image(&dir.0, mib);
    let (mut first, mut conv, mut later) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..runs {
        let cache = dir.0.join(format!("cache-{r}"));
        let (t, c) = start(&reference, &cache);
        first.push(t.as_secs_f64());
        conv.push(c.expect("the first start converts"));
        let (t, c) = start(&reference, &cache);
        assert!(c.is_none(), "the second start converted again");
        later.push(t.as_secs_f64());
        let _ = std::fs::remove_dir_all(&cache);
        eprintln!("bench: run {}/{runs} done", r + 1);
    }
    println!(
        "image benchmark: busybox + {mib} MiB payload (2 gzip layers), {runs} runs, min / median / max"
    );
    for (name, v) in [
        ("first start (converts)", &first),
        ("  of which conversion", &conv),
        ("later start (cached)", &later),
    ] {
        let (lo, med, hi) = summary(v);
        println!("  {name:<24} {lo:8.2} {med:8.2} {hi:8.2} s");
    }
    println!(
        "  first / later start: {:.2}",
        summary(&first).1 / summary(&later).1
    );
}
