//! Integration tests with the `probe` test guest: millisecond boots through the real
//! loader, devices and exit paths.

mod common;

use std::time::Duration;

use common::{run_probe, tiny_elf, wisp_run, TempDir};

#[test]
fn hello_prints_and_exits_zero() {
    let out = run_probe("hello", &[]);
    assert!(out.stdout.contains("probe: hello"), "{out:#?}");
    assert_eq!(out.status, Some(0), "{out:#?}");
}

#[test]
fn boots_through_pvh_entry() {
    let out = run_probe("boot", &[]);
    assert!(out.stdout.contains("probe: boot=pvh"), "{out:#?}");
}

#[test]
fn cmdline_reaches_guest_after_defaults() {
    let probe = common::probe();
    let out = wisp_run(
        &[
            "run",
            "--kernel",
            probe.to_str().unwrap(),
            "--cmdline",
            "probe.cmd=cmdline wisp.test=abc123",
        ],
        b"",
        Duration::from_secs(60),
    );
    let line = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("probe: cmdline="))
        .unwrap_or_else(|| panic!("no cmdline line: {out:#?}"));
    assert!(
        line.starts_with("console=ttyS0 reboot=k panic=-1"),
        "{line}"
    );
    assert!(
        line.ends_with("probe.cmd=cmdline wisp.test=abc123"),
        "{line}"
    );
    assert_eq!(out.status, Some(0));
}

#[test]
fn memory_seen_by_guest_equals_memory_option() {
    for mib in ["16", "64", "300"] {
        let out = run_probe("meminfo", &["--memory", mib]);
        assert!(
            out.stdout.contains(&format!("probe: mem={mib}\n")),
            "--memory {mib}: {out:#?}"
        );
        assert_eq!(out.status, Some(0));
    }
}

#[test]
fn guest_above_the_mmio_gap_sees_all_its_memory() {
    let out = run_probe("meminfo,e820", &["--memory", "4096"]);
    assert!(out.stdout.contains("probe: mem=4096\n"), "{out:#?}");
    assert!(out.stdout.contains("probe: e820 0x100000000-"), "{out:#?}");
}

#[test]
fn exit_status_propagates() {
    for code in [0, 3, 42, 255] {
        let out = run_probe(&format!("hello,exit:{code}"), &[]);
        assert_eq!(out.status, Some(code), "{out:#?}");
    }
}

#[test]
fn guest_exception_is_reported_by_the_probe() {
    let out = run_probe("fault:ud", &[]);
    assert!(out.stdout.contains("probe: exception #UD"), "{out:#?}");
    assert_eq!(out.status, Some(0xe0 + 6));
}

#[test]
fn sixty_four_bit_entry_without_pvh_note() {
    // mov dx, 0x500; mov al, 7; out dx, al; hlt
    let code = [0x66, 0xba, 0x00, 0x05, 0xb0, 0x07, 0xee, 0xf4];
    let dir = TempDir::new("elf64");
    let k = dir.file("exit7.elf", &tiny_elf(&code));
    let out = wisp_run(
        &["run", "--kernel", k.to_str().unwrap()],
        b"",
        Duration::from_secs(30),
    );
    assert_eq!(out.status, Some(7), "{out:#?}");
}

#[test]
fn triple_fault_ends_with_error() {
    // With wisp's boot IDT (limit 0), ud2 escalates to a triple fault.
    let dir = TempDir::new("triple");
    let k = dir.file("ud2.elf", &tiny_elf(&[0x0f, 0x0b]));
    let out = wisp_run(
        &["run", "--kernel", k.to_str().unwrap()],
        b"",
        Duration::from_secs(30),
    );
    assert_eq!(out.status, Some(1), "{out:#?}");
    let errors = out.error_lines();
    assert_eq!(errors.len(), 1, "{out:#?}");
    assert!(errors[0].contains("triple fault"), "{out:#?}");
}

#[test]
fn boot_complete_port_is_timed() {
    let out = run_probe("bootdone", &[]);
    assert!(out.stdout.contains("probe: bootdone"), "{out:#?}");
    assert!(
        out.stderr.contains("guest boot complete:") && out.stderr.contains("ms after wisp started"),
        "{out:#?}"
    );
}

#[test]
fn console_file_and_none() {
    let dir = TempDir::new("console");
    let log = dir.0.join("console.log");
    let spec = format!("file:{}", log.display());
    let out = run_probe("hello", &["--console", &spec]);
    assert_eq!(out.status, Some(0));
    assert!(!out.stdout.contains("probe: hello"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("probe: hello"), "{text}");
    let out = run_probe("hello", &["--console", "none"]);
    assert_eq!(out.status, Some(0));
    assert!(out.stdout.is_empty(), "{out:#?}");
}

/// FNV-1a, 32-bit, as the probe's `readin` prints it.
fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

#[test]
fn piped_stdin_reaches_guest_without_loss() {
    // More than the UART FIFO (64 bytes) many times over, every byte value included.
    let input: Vec<u8> = (0..6000u32).map(|i| (i * 7 + i / 256) as u8).collect();
    let probe = common::probe();
    let cmdline = format!("probe.cmd=readin:{}", input.len());
    let out = wisp_run(
        &[
            "run",
            "--kernel",
            probe.to_str().unwrap(),
            "--cmdline",
            &cmdline,
        ],
        &input,
        Duration::from_secs(120),
    );
    let expected = format!("probe: readin n={} fnv={}", input.len(), fnv1a(&input));
    assert!(out.stdout.contains(&expected), "want {expected}: {out:#?}");
    assert_eq!(out.status, Some(0));
}

#[test]
fn file_stdin_reaches_guest_without_loss() {
    let input: Vec<u8> = (0..3000u32).map(|i| (i * 13) as u8).collect();
    let dir = TempDir::new("stdin-file");
    let f = dir.file("input.bin", &input);
    let probe = common::probe();
    let mut cmd = std::process::Command::new(common::wisp());
    cmd.args(["run", "--kernel", probe.to_str().unwrap(), "--cmdline"])
        .arg(format!("probe.cmd=readin:{}", input.len()))
        .stdin(std::fs::File::open(&f).unwrap());
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = format!("probe: readin n={} fnv={}", input.len(), fnv1a(&input));
    assert!(stdout.contains(&expected), "want {expected}: {stdout}");
    assert_eq!(out.status.code(), Some(0));
}
