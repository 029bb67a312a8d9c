//! One real Linux boot of the default guest (slow where guest kernel mode is emulated:
//! tens of seconds). It checks SMP, memory, the console shell, boot-complete timing and
//! ACPI power-off, all in one boot.

mod common;

use std::time::Duration;

use common::{guest_file, Session};

const MIB_KB: u64 = 1024;

#[test]
fn default_guest_boots_smp_to_a_shell_and_powers_off() {
    guest_file("vmlinux");
    guest_file("initramfs.cpio.gz");
    let mut s = Session::start(&[
        "run",
        "--cpus",
        "2",
        "--memory",
        "256",
        "--name",
        "linux-test",
    ]);
    s.expect_from(0, "WISP-READY", Duration::from_secs(240));

    let cpus = s.query("CPUS", "nproc", Duration::from_secs(60));
    assert_eq!(cpus, "2", "guest output:\n{}", s.seen);

    let mem_kb: u64 = s
        .query(
            "MEMKB",
            "awk '/^MemTotal:/ {print $2}' /proc/meminfo",
            Duration::from_secs(60),
        )
        .parse()
        .expect("MemTotal is a number");
    // MemTotal is RAM minus what the kernel reserves for itself (image, memmap).
    let configured = 256 * MIB_KB;
    assert!(
        mem_kb <= configured && mem_kb >= configured * 85 / 100,
        "MemTotal {mem_kb} kB for a 256 MiB guest"
    );

    s.send_line("poweroff -f");
    let (status, stderr) = s.wait(Duration::from_secs(120));
    assert_eq!(status, Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("guest boot complete:"), "stderr:\n{stderr}");
    assert!(stderr.contains("guest powered off"), "stderr:\n{stderr}");
}
