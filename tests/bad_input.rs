//! Walks the README's bad-input table (section "Security", between the
//! `bad-input:begin` and `bad-input:end` markers): every row is tried as written, and
//! wisp's answer must contain the row's answer column. A row this file cannot run
//! fails the test, so the table cannot list what nobody tried.
//!
//! Row kinds (the "Try" column):
//! - `wisp ARGS`: wisp with ARGS exits 1 with one stderr line, before any VM runs.
//! - `socket LINE`: LINE sent on a running VM's control socket; the answer line (the
//!   VM must still run after every row).
//! - `guest CMD`: the probe guest runs CMD (with a 1 MiB disk); its output.
//! - `snapshot EDIT`: a snapshot of the probe, edited (`truncate memory`, `flip state`,
//!   or `set /JSON/POINTER VALUE` on the state with a valid checksum), then restored:
//!   one error line.
//! - `stream WHAT`: a migration stream to `wisp receive` (`http`: not one at all,
//!   `version:N`: another protocol version): one error line from receive.
//!
//! In ARGS, `{probe}` is the probe guest and `{tmp}` a directory holding `not-a-kernel`
//! (text), `empty.img` (0 bytes) and `dir/` (a directory).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    arg, copy_snapshot, craft_state, probe, repo_root, restore_refused, start_probe, stop_vm,
    wisp_ok, wisp_run, TempDir,
};

const WAIT: Duration = Duration::from_secs(60);

/// One row: what is tried, and the text the answer must contain.
struct Row {
    what: String,
    answer: String,
}

/// The text between the first pair of backticks in `cell`.
fn code(cell: &str) -> Option<String> {
    let start = cell.find('`')? + 1;
    let end = start + cell[start..].find('`')?;
    Some(cell[start..end].replace("\\|", "|"))
}

fn table() -> Vec<Row> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README");
    let start = readme
        .find("<!-- bad-input:begin -->")
        .expect("begin marker");
    let end = readme.find("<!-- bad-input:end -->").expect("end marker");
    let mut rows = Vec::new();
    for line in readme[start..end].lines() {
        // | input | `try` | `answer` |
        let cells: Vec<&str> = line.split(" | ").collect();
        if cells.len() < 3 || !line.starts_with('|') || line.contains("---") {
            continue;
        }
        let (Some(what), Some(answer)) = (code(cells[1]), code(cells[2])) else {
            continue;
        };
        rows.push(Row { what, answer });
    }
    assert!(rows.len() >= 20, "the table has {} rows", rows.len());
    rows
}

struct Fixtures {
    dir: TempDir,
    probe: PathBuf,
    disk: PathBuf,
}

impl Fixtures {
    fn new() -> Fixtures {
        let dir = TempDir::new("bad-input");
        dir.file("not-a-kernel", b"hello, I am text\n");
        dir.file("empty.img", b"");
        std::fs::create_dir_all(dir.0.join("dir")).expect("mkdir");
        let disk = dir.file("disk.img", &vec![0u8; 1 << 20]);
        Fixtures {
            dir,
            probe: probe(),
            disk,
        }
    }

    fn expand(&self, s: &str) -> String {
        s.replace("{probe}", arg(&self.probe))
            .replace("{tmp}", arg(&self.dir.0))
    }
}

fn wisp_row(fx: &Fixtures, args: &str, want: &str) {
    let expanded = fx.expand(args);
    let argv: Vec<&str> = expanded.split_whitespace().collect();
    let out = wisp_run(&argv, b"", WAIT);
    assert_eq!(out.status, Some(1), "wisp {args}: {out:?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "wisp {args}: one line:\n{}", out.stderr);
    assert!(
        lines[0].starts_with("wisp: error: "),
        "wisp {args}: {}",
        lines[0]
    );
    assert!(lines[0].contains(want), "wisp {args}: {}", lines[0]);
}

fn socket_row(api: &Path, line: &str, want: &str) {
    let mut c = UnixStream::connect(api).expect("connect");
    c.set_read_timeout(Some(WAIT)).expect("timeout");
    let bytes = match line.strip_prefix("x*") {
        // `x*N`: N bytes of 'x' and no newline.
        Some(n) => vec![b'x'; n.parse().expect("count")],
        None => format!("{line}\n").into_bytes(),
    };
    c.write_all(&bytes).expect("send");
    let mut answer = String::new();
    BufReader::new(c).read_line(&mut answer).expect("answer");
    assert!(answer.contains(want), "socket {line}: {answer}");
}

fn guest_row(fx: &Fixtures, cmd: &str, want: &str) {
    let cmdline = format!("probe.cmd={cmd}");
    let out = wisp_run(
        &[
            "run",
            "--kernel",
            arg(&fx.probe),
            "--disk",
            arg(&fx.disk),
            "--cmdline",
            &cmdline,
        ],
        b"",
        WAIT,
    );
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains(want), "guest {cmd}: {out:?}");
}

fn snapshot_row(fx: &Fixtures, base: &Path, edit: &str, want: &str, n: usize) {
    let snap = fx.dir.0.join(format!("edited-{n}"));
    copy_snapshot(base, &snap);
    let words: Vec<&str> = edit.split_whitespace().collect();
    match words.as_slice() {
        ["truncate", "memory"] => {
            // A fresh copy, not the hard link to the base's memory file.
            let mem = snap.join("memory");
            let bytes = std::fs::read(&mem).expect("memory");
            std::fs::remove_file(&mem).expect("unlink");
            std::fs::write(&mem, &bytes[..bytes.len() / 2]).expect("write");
        }
        ["flip", "state"] => {
            let path = snap.join("state");
            let mut bytes = std::fs::read(&path).expect("state");
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x20;
            std::fs::write(&path, bytes).expect("write");
        }
        ["set", pointer, value] => craft_state(&snap, |j| {
            let v: serde_json::Value = serde_json::from_str(value).expect("value");
            *j.pointer_mut(pointer)
                .unwrap_or_else(|| panic!("no {pointer} in the state")) = v;
        }),
        _ => panic!("snapshot row {edit:?}: unknown edit"),
    }
    restore_refused(&fx.dir, &snap, &[], want);
}

fn stream_row(fx: &Fixtures, what: &str, want: &str, n: usize) {
    use vmm::migration::protocol;
    let path = fx.dir.0.join(format!("in-{n}.mig"));
    let addr = format!("unix:{}", arg(&path));
    let api = fx.dir.0.join(format!("in-{n}.sock"));
    let mut receiver =
        common::Session::start(&["receive", &addr, "--api", arg(&api), "--console", "none"]);
    let deadline = std::time::Instant::now() + WAIT;
    let mut c = loop {
        if let Ok(c) = UnixStream::connect(&path) {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "receive never listened"
        );
        receiver.poll(Duration::from_millis(20));
    };
    match what.split_once(':') {
        None if what == "http" => c.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write"),
        Some(("version", v)) => {
            let mut p = Vec::new();
            protocol::write_preamble(&mut p).expect("preamble");
            p[8] = v.parse().expect("version");
            c.write_all(&p).expect("write");
        }
        _ => panic!("stream row {what:?}: unknown stream"),
    }
    drop(c);
    let (status, stderr) = receiver.wait(WAIT);
    assert_eq!(status, Some(1), "stream {what}: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "stream {what}: {stderr}");
    assert!(errors[0].contains(want), "stream {what}: {}", errors[0]);
}

#[test]
fn every_row_of_the_bad_input_table_gets_its_answer() {
    let fx = Fixtures::new();
    let rows = table();
    // One running VM for the socket rows, and one snapshot of it for the snapshot rows.
    let (mut vm, api) = start_probe(&fx.dir, "bad-input", "counter:4", &[], &[]);
    vm.expect_from(0, "count=", WAIT);
    let base = fx.dir.0.join("base-snap");
    wisp_ok(&["snapshot", arg(&api), "--to", arg(&base)]);
    // Every row is tried; the failures are listed together at the end.
    let mut failed = Vec::new();
    for (n, row) in rows.iter().enumerate() {
        let (kind, rest) = row.what.split_once(' ').unwrap_or((&row.what, ""));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match kind {
            "wisp" => wisp_row(&fx, rest, &row.answer),
            "socket" => socket_row(&api, rest, &row.answer),
            "guest" => guest_row(&fx, rest, &row.answer),
            "snapshot" => snapshot_row(&fx, &base, rest, &row.answer, n),
            "stream" => stream_row(&fx, rest, &row.answer, n),
            _ => panic!("unknown kind {kind:?}"),
        }));
        if let Err(e) = result {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failed.push(format!("{}: {msg}", row.what));
        }
    }
    assert!(failed.is_empty(), "rows failed:\n{}", failed.join("\n"));
    // After all of it, the VM still runs and answers.
    let (code, out, err) = common::wisp_cmd(&["status", arg(&api)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("running"), "{out}");
    stop_vm(vm, &api, WAIT);
}
