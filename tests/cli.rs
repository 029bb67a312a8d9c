//! Bad input from the user: one-line errors, non-zero status, never a panic.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{run_cmd, wisp, wisp_run, TempDir};

fn assert_one_line_error(args: &[&str], needle: &str) {
    let out = wisp_run(args, b"", Duration::from_secs(30));
    assert_ne!(out.status, Some(0), "{args:?}: {out:#?}");
    let errors = out.error_lines();
    assert_eq!(errors.len(), 1, "{args:?}: {out:#?}");
    assert!(errors[0].contains(needle), "{args:?}: {out:#?}");
    assert!(!out.stderr.contains("panicked"), "{out:#?}");
    assert!(!out.stderr.contains("RUST_BACKTRACE"), "{out:#?}");
}

#[test]
fn missing_kernel() {
    assert_one_line_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "cannot read kernel /nonexistent/vmlinux",
    );
}

#[test]
fn unreadable_kernel() {
    let dir = TempDir::new("unreadable");
    // A directory cannot be read as a kernel.
    assert_one_line_error(
        &["run", "--kernel", dir.0.to_str().unwrap()],
        "cannot read kernel",
    );
}

#[test]
fn not_a_kernel() {
    let dir = TempDir::new("notkernel");
    let f = dir.file("vmlinux", b"#!/bin/sh\necho this is not a kernel\n");
    assert_one_line_error(&["run", "--kernel", f.to_str().unwrap()], "is not a kernel");
    // Refused before the host's kernel-mode speed is looked at (and logged): one line.
    let out = wisp_run(
        &["run", "--kernel", f.to_str().unwrap()],
        b"",
        Duration::from_secs(30),
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}

#[test]
fn missing_initrd() {
    let probe = common::probe();
    assert_one_line_error(
        &[
            "run",
            "--kernel",
            probe.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        "cannot read initrd /nonexistent/initrd",
    );
}

#[test]
fn memory_limits() {
    let probe = common::probe();
    let k = probe.to_str().unwrap();
    assert_one_line_error(&["run", "--kernel", k, "--memory", "1"], "too little");
    assert_one_line_error(
        &["run", "--kernel", k, "--memory", "100000000"],
        "more than this host's RAM",
    );
}

#[test]
fn cpu_limits() {
    let probe = common::probe();
    let k = probe.to_str().unwrap();
    assert_one_line_error(
        &["run", "--kernel", k, "--cpus", "0"],
        "--cpus must be at least 1",
    );
    assert_one_line_error(
        &["run", "--kernel", k, "--cpus", "100000"],
        "--cpus 100000 is more than",
    );
}

#[test]
fn bad_console_and_name() {
    let probe = common::probe();
    let k = probe.to_str().unwrap();
    assert_one_line_error(
        &["run", "--kernel", k, "--console", "tty"],
        "expected stdio, file:PATH or none",
    );
    assert_one_line_error(&["run", "--kernel", k, "--name", "a/b"], "--name must be");
}

#[test]
fn no_dev_kvm() {
    // A private mount namespace with an empty /dev: /dev/kvm does not exist there.
    let probe = common::probe();
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --kernel {}",
        wisp().display(),
        probe.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let out = run_cmd(cmd, b"", Duration::from_secs(30));
    assert_eq!(out.status, Some(1), "{out:#?}");
    assert_eq!(out.error_lines().len(), 1, "{out:#?}");
    assert!(out.stderr.contains("/dev/kvm does not exist"), "{out:#?}");
}

#[test]
fn no_permission_on_dev_kvm() {
    // /dev/kvm is root-only (0600) on the test machines: run as nobody.
    let probe = common::probe();
    let dir = TempDir::new("perm");
    let k = dir.file("probe", &std::fs::read(&probe).unwrap());
    let bin = dir.file("wisp", &std::fs::read(wisp()).unwrap());
    let set_mode = |p: &std::path::Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    set_mode(&dir.0, 0o755);
    set_mode(&bin, 0o755);
    set_mode(&k, 0o644);
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["run", "--kernel"])
        .arg(&k);
    let out = run_cmd(cmd, b"", Duration::from_secs(30));
    assert_eq!(out.status, Some(1), "{out:#?}");
    assert_eq!(out.error_lines().len(), 1, "{out:#?}");
    assert!(
        out.stderr.contains("no permission to open /dev/kvm"),
        "{out:#?}"
    );
}

#[test]
fn help_explains_every_run_option() {
    let out = wisp_run(&["run", "--help"], b"", Duration::from_secs(10));
    assert_eq!(out.status, Some(0));
    for opt in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--cpus",
        "--memory",
        "--console",
        "--name",
        "Ctrl-A",
        "EXIT STATUS",
    ] {
        assert!(
            out.stdout.contains(opt),
            "run --help lacks {opt}: {}",
            out.stdout
        );
    }
    let out = wisp_run(&["--help"], b"", Duration::from_secs(10));
    assert!(out.stdout.contains("run") && out.stdout.contains("doctor"));
}

#[test]
fn doctor_reports_kvm_and_kernel_mode() {
    let out = wisp_run(&["doctor"], b"", Duration::from_secs(120));
    assert_eq!(out.status, Some(0), "{out:#?}");
    assert!(out.stdout.contains("KVM API version      12"), "{out:#?}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("guest kernel mode"))
        .expect("kernel mode line");
    assert!(
        (line.contains("emulated") || line.contains("hardware-virtualized"))
            && line.contains("M instructions/s"),
        "{line}"
    );
}

#[test]
fn bad_numbers_are_one_line_with_status_1() {
    let probe = common::probe();
    let k = probe.to_str().unwrap();
    for (args, want) in [
        (
            vec!["--memory", "1.5"],
            "invalid value '1.5' for '--memory <MiB>'",
        ),
        (
            vec!["--memory", "-1"],
            "invalid value '-1' for '--memory <MiB>'",
        ),
        (
            vec!["--cpus", "two"],
            "invalid value 'two' for '--cpus <N>'",
        ),
        (vec!["--frobnicate"], "unexpected argument '--frobnicate'"),
    ] {
        let mut all = vec!["run", "--kernel", k];
        all.extend(args);
        let out = wisp_run(&all, b"", Duration::from_secs(30));
        assert_eq!(out.status, Some(1), "{all:?}: {out:#?}");
        assert_eq!(out.stderr.lines().count(), 1, "{all:?}: {out:#?}");
        assert!(
            out.stderr.starts_with("wisp: error: ")
                && out.stderr.contains(want)
                && out.stderr.contains("see `wisp run --help`"),
            "{all:?}: {out:#?}"
        );
    }
}

#[test]
fn disks_and_initrds_must_be_files_and_each_disk_its_own() {
    let probe = common::probe();
    let k = probe.to_str().unwrap();
    let dir = TempDir::new("disk-kinds");
    let img = dir.0.join("d.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let img = img.to_str().unwrap();
    let link = dir.0.join("same.img");
    std::os::unix::fs::symlink(img, &link).unwrap();
    let fifo = dir.0.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let fifo = fifo.to_str().unwrap();
    assert_one_line_error(
        &["run", "--kernel", k, "--disk", img, "--disk", img],
        "is given twice",
    );
    assert_one_line_error(
        &[
            "run",
            "--kernel",
            k,
            "--disk",
            img,
            "--disk",
            link.to_str().unwrap(),
        ],
        "is given twice",
    );
    assert_one_line_error(
        &["run", "--kernel", k, "--disk", "/dev/null"],
        "cannot open disk /dev/null: it is a character device",
    );
    assert_one_line_error(
        &["run", "--kernel", k, "--disk", fifo],
        "it is a FIFO, not an image file or a block device",
    );
    assert_one_line_error(
        &["run", "--kernel", k, "--initrd", "/dev/zero"],
        "cannot read initrd /dev/zero: it is a character device, not a regular file",
    );
    assert_one_line_error(
        &["run", "--kernel", fifo],
        "it is a FIFO, not a regular file",
    );
}

#[test]
fn a_truncated_kernel_says_so() {
    let dir = TempDir::new("truncated");
    let whole = std::fs::read(common::probe()).unwrap();
    let cut = dir.file("probe-cut", &whole[..whole.len() / 2]);
    assert_one_line_error(
        &["run", "--kernel", cut.to_str().unwrap()],
        "is truncated: its headers describe",
    );
}
