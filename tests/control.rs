//! The control socket and the `wisp ls/status/pause/resume/stop` commands, with the
//! probe guest (milliseconds to boot).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{complete_lines, probe, wisp_cmd, Session, TempDir};

const WAIT: Duration = Duration::from_secs(60);

/// Starts the probe with `cmds` under `name`, with its control socket at `api`.
fn start(name: &str, api: &str, cmds: &str) -> Session {
    let cmdline = format!("probe.cmd={cmds}");
    Session::start(&[
        "run",
        "--name",
        name,
        "--api",
        api,
        "--kernel",
        probe().to_str().expect("utf-8"),
        "--cmdline",
        &cmdline,
    ])
}

/// The `count=` values of the counter's progress lines in `text`.
fn counts(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| {
            l.split_once("probe: counter round=")?
                .1
                .split_once(" count=")
        })
        .filter_map(|(_, c)| c.trim().parse().ok())
        .collect()
}

#[test]
fn status_pause_resume_stop_through_the_cli() {
    let dir = TempDir::new("ctl-cli");
    let api = dir.0.join("vm.sock");
    let api = api.to_str().expect("utf-8");
    let name = format!("ctl-{}", std::process::id());
    let mut s = start(&name, api, "counter:4");
    let at = s.expect_from(0, "count=", WAIT);

    let mode = std::fs::metadata(api)
        .expect("socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode");

    let (code, out, err) = wisp_cmd(&["status", api]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&name) && out.contains("running") && out.contains("128 MiB"),
        "{out}"
    );

    // Pause: the counter stops.
    let (code, out, err) = wisp_cmd(&["pause", api]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("{name}: paused").as_str()),
        "{err}"
    );
    // Take in what was printed before the pause took effect.
    let drain_until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < drain_until {
        s.poll(Duration::from_millis(50));
    }
    let frozen_at = complete_lines(&s.seen).len();
    // Collect whatever arrives over 1.5 s: nothing new may be printed.
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        s.poll(Duration::from_millis(100));
    }
    let before: Vec<u64> = counts(&s.seen[..frozen_at]);
    // Only whole lines count: one cut by the pause ends after the resume.
    let window = &s.seen[frozen_at..];
    let whole = complete_lines(window);
    assert!(
        counts(whole).is_empty(),
        "counter moved while paused:\n{window}"
    );
    let (_, out, _) = wisp_cmd(&["status", api]);
    assert!(out.contains("paused"), "{out}");

    // Resume: it continues, forwards.
    let (code, out, _) = wisp_cmd(&["resume", api]);
    assert_eq!((code, out.trim()), (0, format!("{name}: running").as_str()));
    let after_at = s.seen.len();
    s.expect_from(after_at, "count=", WAIT);
    s.expect_from(after_at, "\n", WAIT);
    let last_before = *before.last().expect("progress before the pause");
    let first_after = counts(&s.seen[after_at..]);
    assert!(
        first_after.first().is_some_and(|&c| c > last_before),
        "before {last_before}, after {first_after:?}"
    );
    assert!(at > 0);

    let (code, _, err) = wisp_cmd(&["stop", api]);
    assert_eq!(code, 0, "{err}");
    let (status, stderr) = s.wait(WAIT);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(
        stderr.contains("stopped through the control socket"),
        "{stderr}"
    );
    assert!(
        !std::path::Path::new(api).exists(),
        "socket removed on exit"
    );
}

#[test]
fn default_socket_ls_and_name_clash() {
    let name = format!("ctl-ls-{}", std::process::id());
    let mut s = Session::start(&[
        "run",
        "--name",
        &name,
        "--kernel",
        probe().to_str().expect("utf-8"),
        "--cmdline",
        "probe.cmd=hello,readin:1",
    ]);
    s.expect_from(0, "probe: hello", WAIT);
    let (code, out, err) = wisp_cmd(&["ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&name) && l.contains("running")),
        "{out}"
    );
    // The same name again: refused, and the first VM is untouched.
    let (code, _, err) = wisp_cmd(&[
        "run",
        "--name",
        &name,
        "--kernel",
        probe().to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("already running"), "{err}");
    let (code, _, err) = wisp_cmd(&["stop", &name]);
    assert_eq!(code, 0, "{err}");
    let (status, _) = s.wait(WAIT);
    assert_eq!(status, Some(0));
    let (code, _, err) = wisp_cmd(&["status", &name]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no running VM") && err.contains("wisp ls"),
        "{err}"
    );
}

#[test]
fn bad_requests_get_an_error_answer() {
    let dir = TempDir::new("ctl-bad");
    let api = dir.0.join("vm.sock");
    let mut s = Session::start(&[
        "run",
        "--api",
        api.to_str().expect("utf-8"),
        "--kernel",
        probe().to_str().expect("utf-8"),
        "--cmdline",
        "probe.cmd=hello,readin:1",
    ]);
    s.expect_from(0, "probe: hello", WAIT);
    for bad in ["hello", r#"{"op":"reboot"}"#, ""] {
        let mut c = UnixStream::connect(&api).expect("connect");
        c.write_all(format!("{bad}\n").as_bytes()).expect("send");
        let mut reply = String::new();
        BufReader::new(c).read_line(&mut reply).expect("reply");
        assert!(
            reply.contains(r#""ok":false"#) && reply.contains("bad request"),
            "{bad}: {reply}"
        );
    }
    // Still serving.
    let mut c = UnixStream::connect(&api).expect("connect");
    c.write_all(b"{\"op\":\"stop\"}\n").expect("send");
    let mut reply = String::new();
    BufReader::new(c).read_line(&mut reply).expect("reply");
    assert!(reply.contains(r#""ok":true"#), "{reply}");
    let (status, _) = s.wait(WAIT);
    assert_eq!(status, Some(0));
}
