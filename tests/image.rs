//! `wisp run --image`: images the tests write themselves (no network), as an OCI layout
//! and as a `docker save` archive, with busybox for a userland. The layers' whiteouts,
//! owners, modes and links, the image's config (Entrypoint, Cmd, Env, WorkingDir, User)
//! and `-- CMD` are checked by what the process prints; its exit status is wisp's; the
//! second run converts nothing and no run writes the cached disk. Bad images get one
//! line each, before any boot.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{run_cmd, wisp, Output, TempDir};
use wisp_image::fixture::{self, Item};

/// A boot where guest kernel mode is emulated takes seconds.
const RUN: Duration = Duration::from_secs(300);

const APPLETS: [&str; 11] = [
    "sh", "cat", "ls", "stat", "id", "pwd", "readlink", "touch", "httpd", "sleep", "kill",
];

/// The userland layer: busybox, its applets, a user `app` (1000:1001).
fn base_layer() -> Vec<u8> {
    fixture::busybox_layer(
        &APPLETS,
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n",
        b"root:x:0:\napp:x:1001:\n",
        &[
            Item::File("etc/gone", b"lower layer", 0o644, 0),
            Item::Dir("opq", 0o755),
            Item::File("opq/lower", b"hidden by the opaque marker", 0o644, 0),
        ],
    )
    .expect("layer")
}

/// The upper layer: a whiteout, an opaque directory, a setuid file of uid 1000, a
/// symlink and a hard link.
fn upper_layer() -> Vec<u8> {
    fixture::tar(&[
        Item::Whiteout("etc/gone"),
        Item::Opaque("opq"),
        Item::File("opq/upper", b"upper", 0o644, 0),
        Item::File("srv/suid", b"#!/bin/sh\n", 0o4755, 1000),
        Item::Symlink("srv/link", "suid"),
        Item::HardLink("srv/hard", "srv/suid"),
    ])
    .expect("tar")
}

const SCRIPT: &str =
    "echo pwd=$(pwd); echo id=$(id -u):$(id -g); echo env=$GREETING,$EXTRA,$HOSTNAME; \
    test -e /etc/gone && echo gone=present || echo gone=absent; echo opq=$(ls /opq); \
    echo suid=$(stat -c '%u:%g:%a' /srv/suid); echo link=$(readlink /srv/link); \
    test $(stat -c %i /srv/hard) = $(stat -c %i /srv/suid) && echo hard=same; exit 7";

fn image_config(layers: &[Vec<u8>]) -> Vec<u8> {
    fixture::config(
        serde_json::json!({
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": [SCRIPT],
            "Env": ["PATH=/bin", "GREETING=hello"],
            "WorkingDir": "/srv",
            "User": "app",
        }),
        layers,
    )
}

/// `wisp run --image REF ARGS...` with the test's image cache.
fn run_image(cache: &Path, reference: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(wisp());
    cmd.env("XDG_CACHE_HOME", cache)
        .args(["run", "--image", reference, "--console", "stdio"])
        .args(args);
    run_cmd(cmd, b"", RUN)
}

fn lines(out: &Output) -> Vec<&str> {
    out.stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .collect()
}

fn oci_image(dir: &TempDir) -> (PathBuf, String) {
    let layers = vec![base_layer(), upper_layer()];
    let stored = vec![fixture::gzip(&layers[0]).expect("gzip"), layers[1].clone()];
    let layout = dir.0.join("layout");
    fixture::oci_layout(&layout, "v1", &image_config(&layers), &stored).expect("layout");
    let r = format!("oci:{}:v1", layout.display());
    (layout, r)
}

#[test]
fn an_oci_image_runs_with_its_layers_config_and_exit_status() {
    let dir = TempDir::new("image-oci");
    let cache = dir.0.join("cache");
    let (_, reference) = oci_image(&dir);
    let out = run_image(&cache, &reference, &["--env", "EXTRA=x", "--name", "img1"]);
    assert_eq!(out.status, Some(7), "{out:#?}");
    let got = lines(&out);
    for want in [
        "pwd=/srv",
        "id=1000:1001",
        "env=hello,x,img1",
        "gone=absent",
        "opq=upper",
        "suid=1000:1000:4755",
        "link=suid",
        "hard=same",
    ] {
        assert!(got.contains(&want), "{want} missing: {out:#?}");
    }
    assert!(out.stderr.contains("image: layer 2/2"), "{}", out.stderr);
}

#[test]
fn a_docker_archive_with_a_command_and_the_cache_that_nothing_writes() {
    let dir = TempDir::new("image-archive");
    let cache = dir.0.join("cache");
    let layers = vec![base_layer(), upper_layer()];
    let archive = dir.0.join("img.tar");
    fixture::docker_archive(&archive, "test:v1", &image_config(&layers), &layers).expect("archive");
    let reference = format!("docker-archive:{}", archive.display());
    // `-- CMD` replaces Cmd; the Entrypoint (sh -c) stays.
    let write = "touch /tmp/written && echo wrote; test -e /tmp/written && exit 3";
    let first = run_image(&cache, &reference, &["--", write]);
    assert_eq!(first.status, Some(3), "{first:#?}");
    assert!(lines(&first).contains(&"wrote"), "{first:#?}");
    assert!(first.stderr.contains("converted"), "{}", first.stderr);
    let disk = std::fs::read_dir(cache.join("wisp/images"))
        .expect("cache")
        .flatten()
        .map(|e| e.path().join("rootfs.ext4"))
        .find(|p| p.is_file())
        .expect("a cached disk");
    let before = std::fs::read(&disk).expect("disk");
    let check = "test -e /tmp/written && exit 4; echo clean; exit 0";
    let second = run_image(&cache, &reference, &["--", check]);
    assert_eq!(second.status, Some(0), "{second:#?}");
    assert!(lines(&second).contains(&"clean"), "{second:#?}");
    assert!(
        !second.stderr.contains("image: layer") && !second.stderr.contains("converted"),
        "the second run converted again: {}",
        second.stderr
    );
    assert!(
        std::fs::read(&disk).expect("disk") == before,
        "a run wrote the cached disk"
    );
}

/// A bad image: one line naming the problem, a non-zero exit, no boot.
fn refused(cache: &Path, reference: &str, args: &[&str], want: &str) {
    let out = run_image(cache, reference, args);
    assert_eq!(out.status, Some(1), "{reference}: {out:#?}");
    let errors = out.error_lines();
    assert_eq!(errors.len(), 1, "{reference}: {}", out.stderr);
    assert!(
        errors[0].contains(want),
        "{reference}: wanted {want:?} in {}",
        errors[0]
    );
    assert!(out.stdout.is_empty(), "{reference} booted: {}", out.stdout);
}

#[test]
fn bad_images_are_refused_in_one_line_before_any_boot() {
    let dir = TempDir::new("image-bad");
    let cache = dir.0.join("cache");
    let (layout, _) = oci_image(&dir);
    let missing = dir.0.join("nothing");
    refused(
        &cache,
        &format!("oci:{}", missing.display()),
        &[],
        "not an OCI image layout",
    );
    refused(&cache, "alpine:3", &[], "oci:DIR[:TAG]");
    refused(
        &cache,
        &format!("oci:{}:v9", layout.display()),
        &[],
        "no image tagged \"v9\"",
    );
    refused(
        &cache,
        &format!("docker-archive:{}", missing.display()),
        &[],
        "cannot read",
    );

    // A layer blob cut short: its digest no longer matches.
    let corrupt = dir.0.join("corrupt");
    let layers = vec![base_layer(), upper_layer()];
    fixture::oci_layout(&corrupt, "v1", &image_config(&layers), &layers).expect("layout");
    let blob = corrupt
        .join("blobs/sha256")
        .join(wisp_image::digest::sha256_of(&layers[1]));
    let bytes = std::fs::read(&blob).expect("blob");
    std::fs::write(&blob, &bytes[..bytes.len() / 2]).expect("truncate");
    refused(
        &cache,
        &format!("oci:{}:v1", corrupt.display()),
        &[],
        "truncated",
    );

    // A layer blob of the right size with one byte changed: a digest mismatch.
    let flipped = dir.0.join("flipped");
    fixture::oci_layout(&flipped, "v1", &image_config(&layers), &layers).expect("layout");
    let blob = flipped
        .join("blobs/sha256")
        .join(wisp_image::digest::sha256_of(&layers[1]));
    let mut bytes = std::fs::read(&blob).expect("blob");
    bytes[600] ^= 0xff;
    std::fs::write(&blob, &bytes).expect("write");
    refused(
        &cache,
        &format!("oci:{}:v1", flipped.display()),
        &[],
        "is corrupt: its digest is",
    );
    // A REF that cannot be read as what it says it is.
    refused(
        &cache,
        &format!("docker-archive:{}", dir.0.display()),
        &[],
        "is a directory",
    );

    // Another architecture, and no command at all.
    let arm = String::from_utf8(image_config(&layers))
        .expect("utf-8")
        .replace("amd64", "arm64");
    fixture::oci_layout(&dir.0.join("arm"), "v1", arm.as_bytes(), &layers).expect("layout");
    refused(
        &cache,
        &format!("oci:{}:v1", dir.0.join("arm").display()),
        &[],
        "linux/arm64",
    );
    let bare = fixture::config(serde_json::json!({}), &layers);
    fixture::oci_layout(&dir.0.join("bare"), "v1", &bare, &layers).expect("layout");
    refused(
        &cache,
        &format!("oci:{}:v1", dir.0.join("bare").display()),
        &[],
        "give one after `--`",
    );
    assert!(
        !cache.join("wisp/images").exists()
            || std::fs::read_dir(cache.join("wisp/images"))
                .expect("dir")
                .flatten()
                .all(|e| e.file_name().to_string_lossy().ends_with(".lock")),
        "a refused image left a cache entry"
    );
}

/// A port on 127.0.0.1 nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The body of `GET /` from 127.0.0.1:`port`, once something answers there.
fn http_get(port: u16, limit: Duration) -> Option<String> {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
            let mut body = String::new();
            if s.read_to_string(&mut body).is_ok() && body.starts_with("HTTP/1.") {
                return Some(body);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[test]
fn a_service_in_an_image_is_reachable_through_publish() {
    let dir = TempDir::new("image-publish");
    let cache = dir.0.join("cache");
    let (_, reference) = oci_image(&dir);
    let port = free_port();
    let api = dir.0.join("pub.sock");
    let serve = "mkdir -p /tmp/www && echo published-page >/tmp/www/index.html && \
                 exec httpd -f -p 8080 -h /tmp/www";
    let mut s = common::Session::start_env(
        &[
            "run",
            "--image",
            &reference,
            "--name",
            "pub",
            "--api",
            common::arg(&api),
            "--publish",
            &format!("{port}:8080"),
            "--",
            serve,
        ],
        &[("XDG_CACHE_HOME", common::arg(&cache))],
    );
    let body = http_get(port, RUN);
    s.poll(Duration::from_millis(100));
    let body = body.unwrap_or_else(|| panic!("nothing answered on port {port}:\n{}", s.seen));
    assert!(body.contains("published-page"), "{body}");
    let stderr = common::stop_vm(s, &api, Duration::from_secs(60));
    assert!(!stderr.contains("error"), "{stderr}");
}

#[test]
fn an_unpacked_root_runs_with_the_command_given() {
    let dir = TempDir::new("image-dir");
    let root = dir.0.join("root");
    std::fs::create_dir_all(&root).expect("root");
    for layer in [base_layer(), upper_layer()] {
        wisp_image::layer::apply(&root, &layer[..], "test", u64::MAX).expect("unpack");
    }
    let reference = format!("dir:{}", root.display());
    let bare = run_image(&dir.0.join("cache"), &reference, &[]);
    assert_eq!(bare.status, Some(1), "{bare:#?}");
    assert!(
        bare.stderr.contains("give one after `--`"),
        "{}",
        bare.stderr
    );
    let out = run_image(
        &dir.0.join("cache"),
        &reference,
        &[
            "--name",
            "dir-root-test",
            "--",
            "/bin/sh",
            "-c",
            "echo dir-root $(id -u); exit 5",
        ],
    );
    assert_eq!(out.status, Some(5), "{out:#?}");
    assert!(lines(&out).contains(&"dir-root 0"), "{out:#?}");
    // Packed for this run only: nothing cached, and the run's disk is gone.
    assert!(!dir.0.join("cache/wisp").exists());
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .map(|d| PathBuf::from(d).join("wisp"))
        .unwrap_or_else(|| PathBuf::from("/run/wisp"));
    let disk = runtime.join("dir-root-test.rootfs.ext4");
    assert!(!disk.exists(), "{} left behind", disk.display());
}

/// An OCI runtime bundle (as `runc run` takes): config.json's process, user with its
/// supplementary groups, environment, working directory and host name; with
/// `terminal: false` the console is raw, so the output has no "\r". Bad bundles get one
/// line before any boot.
#[test]
fn an_oci_runtime_bundle_runs_its_config() {
    let dir = TempDir::new("image-bundle");
    let bundle = dir.0.join("bundle");
    let root = bundle.join("rootfs");
    std::fs::create_dir_all(&root).expect("root");
    for layer in [base_layer(), upper_layer()] {
        wisp_image::layer::apply(&root, &layer[..], "test", u64::MAX).expect("unpack");
    }
    std::os::unix::fs::symlink("busybox", root.join("bin/hostname")).expect("applet");
    let bound = dir.file("motd", b"bound into the guest");
    let config = |process: serde_json::Value| {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": process,
            "root": { "path": "rootfs", "readonly": true },
            "hostname": "bundle-host",
            "mounts": [
                { "destination": "/proc", "type": "proc", "source": "proc" },
                { "destination": "/etc/motd", "type": "bind", "source": bound, "options": ["rbind", "ro"] }
            ],
            "linux": { "namespaces": [{ "type": "pid" }, { "type": "uts" }] }
        })
        .to_string()
    };
    std::fs::write(
        bundle.join("config.json"),
        config(serde_json::json!({
            "terminal": false,
            "user": { "uid": 1000, "gid": 1001, "additionalGids": [50, 60] },
            "args": ["/bin/sh", "-c", "echo $(hostname) $(pwd) $(id -u):$(id -g) $(id -G) $GREETING $(cat /etc/motd); exit 4"],
            "env": ["PATH=/bin", "GREETING=hi"],
            "cwd": "/srv"
        })),
    )
    .expect("config");
    let reference = format!("bundle:{}", bundle.display());
    let out = run_image(&dir.0.join("cache"), &reference, &["--name", "bundle-test"]);
    assert_eq!(out.status, Some(4), "{out:#?}");
    assert_eq!(
        out.stdout, "bundle-host /srv 1000:1001 1001 50 60 hi bound into the guest\n",
        "{out:#?}"
    );

    refused(
        &dir.0.join("cache"),
        &reference,
        &["--", "/bin/true"],
        "leave out -- CMD and --env",
    );
    std::fs::write(
        bundle.join("config.json"),
        config(serde_json::json!({ "args": [], "cwd": "/" })),
    )
    .expect("config");
    refused(
        &dir.0.join("cache"),
        &reference,
        &[],
        "process.args is empty",
    );
    refused(
        &dir.0.join("cache"),
        &format!("bundle:{}", dir.0.join("none").display()),
        &[],
        "config.json",
    );
}

/// PID 1 forwards SIGTERM to the process; Ctrl-C on the console is SIGINT for it.
#[test]
fn signals_reach_the_process() {
    let dir = TempDir::new("image-signals");
    let root = dir.0.join("root");
    std::fs::create_dir_all(&root).expect("root");
    for layer in [base_layer(), upper_layer()] {
        wisp_image::layer::apply(&root, &layer[..], "test", u64::MAX).expect("unpack");
    }
    let reference = format!("dir:{}", root.display());
    // SIGTERM to PID 1 (the image's init), from inside: it goes on to the process.
    let term = "trap 'echo got-term; exit 9' TERM; (sleep 1; kill -TERM 1) & \
                sleep 60 & wait $!; echo no-signal";
    let out = run_image(
        &dir.0.join("cache"),
        &reference,
        &["--", "/bin/sh", "-c", term],
    );
    assert_eq!(out.status, Some(9), "{out:#?}");
    assert!(lines(&out).contains(&"got-term"), "{out:#?}");

    // Ctrl-C typed on the console: the process has the console as its terminal.
    let mut s = common::Session::start_env(
        &[
            "run",
            "--image",
            &reference,
            "--",
            "/bin/sh",
            "-c",
            "trap 'echo got-int; exit 8' INT; echo waiting-for-int; while :; do sleep 1; done",
        ],
        &[("XDG_CACHE_HOME", common::arg(&dir.0.join("cache")))],
    );
    s.expect_from(0, "waiting-for-int", RUN);
    s.feed(vec![0x03]).join().expect("feed");
    let at = s.expect_from(0, "got-int", Duration::from_secs(60));
    assert!(at > 0);
    let (status, stderr) = s.wait(Duration::from_secs(60));
    assert_eq!(status, Some(8), "{stderr}");
}
