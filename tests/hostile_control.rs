//! Regression tests for the control-socket and console defects a hostile-input review
//! found: clients that idle or trickle hold up nobody, requests are JSON objects, two
//! wisps racing for one name get a clear answer, and console output errors are words.
//! Probe guest only.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{arg, probe, run_cmd, stop_vm, wisp, wisp_cmd, wisp_run, Session, TempDir};

const WAIT: Duration = Duration::from_secs(60);

fn start_counter(name: &str, api: &Path) -> Session {
    let mut s = Session::start(&[
        "run",
        "--name",
        name,
        "--api",
        arg(api),
        "--kernel",
        arg(&probe()),
        "--cmdline",
        "probe.cmd=counter:4",
    ]);
    s.expect_from(0, "count=", WAIT);
    s
}

/// Sends `line` (no newline added) on a new connection and reads the answer line.
fn raw_request(api: &Path, line: &[u8]) -> String {
    let mut c = UnixStream::connect(api).expect("connect");
    c.set_read_timeout(Some(WAIT)).expect("timeout");
    c.write_all(line).expect("send");
    let mut answer = String::new();
    BufReader::new(c).read_line(&mut answer).expect("answer");
    answer
}

#[test]
fn idle_and_trickling_clients_hold_up_nobody() {
    let dir = TempDir::new("ctl-idle");
    let api = dir.0.join("vm.sock");
    let s = start_counter("ctl-idle", &api);
    // 100 clients that connect and say nothing, and one that sends a byte every
    // 300 ms for as long as the test runs.
    let idle: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&api).expect("connect"))
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let trickler = {
        let (api, done) = (api.clone(), done.clone());
        std::thread::spawn(move || {
            let mut c = UnixStream::connect(&api).expect("connect");
            for b in b"{\"op\":\"status\"          ".iter().cycle() {
                if done.load(Ordering::Relaxed) || c.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    // Each command answers (today's CLI waits 30 s at most).
    for cmd in ["status", "pause", "resume", "status"] {
        let (code, out, err) = wisp_cmd(&[cmd, arg(&api)]);
        assert_eq!(code, 0, "{cmd}: {err}");
        assert!(out.contains("ctl-idle"), "{cmd}: {out}");
    }
    done.store(true, Ordering::Relaxed);
    trickler.join().expect("trickler");
    drop(idle);
    stop_vm(s, &api, WAIT);
}

#[test]
fn requests_are_json_objects_and_stop_says_stopping() {
    let dir = TempDir::new("ctl-json");
    let api = dir.0.join("vm.sock");
    let s = start_counter("ctl-json", &api);
    for bad in [
        &b"[\"status\"]\n"[..],
        b"\"status\"\n",
        b"{\"op\":\"reboot\"}\n",
        b"{\n",
    ] {
        let answer = raw_request(&api, bad);
        assert!(
            answer.contains("\"ok\":false") && answer.contains("bad request"),
            "{:?}: {answer}",
            String::from_utf8_lossy(bad)
        );
    }
    let long = vec![b'x'; 5000];
    let answer = raw_request(&api, &long);
    assert!(answer.contains("longer than 4096 bytes"), "{answer}");
    // Still running; then stop answers with the state it is in.
    assert!(raw_request(&api, b"{\"op\":\"status\"}\n").contains("\"state\":\"running\""));
    let answer = raw_request(&api, b"{\"op\":\"stop\"}\n");
    assert!(
        answer.contains("\"ok\":true") && answer.contains("\"state\":\"stopping\""),
        "{answer}"
    );
    let (status, stderr) = s.wait(WAIT);
    assert_eq!(status, Some(0), "{stderr}");
}

#[test]
fn wisps_racing_for_one_name_get_a_clear_answer() {
    const RACERS: usize = 4;
    let dir = TempDir::new("ctl-race");
    let kernel = probe();
    for round in 0..6 {
        let api = dir.0.join(format!("race{round}.sock"));
        let args = [
            "run",
            "--name",
            "race",
            "--api",
            arg(&api),
            "--kernel",
            arg(&kernel),
            "--cmdline",
            "probe.cmd=counter:4",
            "--console",
            "none",
        ];
        let mut racers: Vec<Session> = (0..RACERS).map(|_| Session::start(&args)).collect();
        // All but one give up with a clear line; the last runs until stopped.
        let deadline = Instant::now() + WAIT;
        while racers.iter_mut().map(|s| s.exited()).filter(|&e| e).count() < RACERS - 1 {
            assert!(Instant::now() < deadline, "round {round}: several run");
            std::thread::sleep(Duration::from_millis(20));
        }
        let winner = racers
            .iter_mut()
            .position(|s| !s.exited())
            .expect("one runs");
        let winner = racers.swap_remove(winner);
        for loser in racers {
            let (status, stderr) = loser.wait(WAIT);
            assert_eq!(status, Some(1), "round {round}: {stderr}");
            assert!(
                stderr.contains("a VM is already running with control socket")
                    && !stderr.contains("os error"),
                "round {round}: {stderr}"
            );
        }
        stop_vm(winner, &api, WAIT);
    }
}

#[test]
fn console_output_errors_are_words_and_the_vm_runs_on() {
    let out = wisp_run(
        &[
            "run",
            "--kernel",
            arg(&probe()),
            "--console",
            "file:/dev/full",
            "--cmdline",
            "probe.cmd=hello",
        ],
        b"",
        WAIT,
    );
    assert_eq!(out.status, Some(0), "{out:#?}");
    assert!(
        out.stderr.contains("No space left on device") && !out.stderr.contains("Os {"),
        "{out:#?}"
    );
    // A FIFO without a reader is refused at once instead of waited on.
    let dir = TempDir::new("console-fifo");
    let fifo = dir.0.join("fifo");
    let c = std::ffi::CString::new(arg(&fifo)).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut cmd = std::process::Command::new(wisp());
    let console = format!("file:{}", arg(&fifo));
    cmd.args(["run", "--kernel", arg(&probe()), "--console", &console]);
    let out = run_cmd(cmd, b"", WAIT);
    assert_eq!(out.status, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains("no process has open for reading"),
        "{out:#?}"
    );
}

/// Raises this process's descriptor limit to at least `n` (for a thousand clients).
fn raise_fd_limit(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit on our stack.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < n {
            lim.rlim_cur = n.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

#[test]
fn a_thousand_clients_and_clients_that_leave_mid_answer_hold_up_nobody() {
    raise_fd_limit(4096);
    let dir = TempDir::new("ctl-many");
    let api = dir.0.join("vm.sock");
    let s = start_counter("ctl-many", &api);
    // 1000 connections at once, none of which says anything: wisp keeps 32 and makes
    // room by dropping the one that waited longest.
    let crowd: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&api).expect("connect"))
        .collect();
    let (code, out, err) = wisp_cmd(&["status", arg(&api)]);
    assert_eq!(code, 0, "status with a crowd: {err}");
    assert!(out.contains("running"), "{out}");
    drop(crowd);
    // Clients that ask and leave before the answer: for status, and for pause and
    // resume (which change the VM), 200 times over.
    for i in 0..200 {
        let op = ["status", "pause", "resume"][i % 3];
        let mut c = UnixStream::connect(&api).expect("connect");
        c.write_all(format!("{{\"op\":\"{op}\"}}\n").as_bytes())
            .expect("send");
        drop(c);
    }
    // One that reads half of nothing: it shuts its reading side down first.
    let mut c = UnixStream::connect(&api).expect("connect");
    c.shutdown(std::net::Shutdown::Read).expect("shutdown");
    c.write_all(b"{\"op\":\"status\"}\n").expect("send");
    drop(c);
    // The VM runs on (resumed: the last pause/resume pair left it running, and
    // resume answers even if it already runs), and a good request gets its answer.
    let _ = wisp_cmd(&["resume", arg(&api)]);
    let answer = raw_request(&api, b"{\"op\":\"status\"}\n");
    assert!(answer.contains("\"state\":\"running\""), "{answer}");
    stop_vm(s, &api, WAIT);
}
