//! The default kernel as a bzImage (target/guest/bzImage, LZ4-compressed): wisp loads
//! it through the Linux boot protocol, its decompressor runs in the guest, and the
//! same initramfs comes up to a shell that powers the VM off.

mod common;

use std::time::Duration;

use common::{guest_file, Session};

/// A boot where guest kernel mode is emulated: decompression and boot take seconds.
const BOOT: Duration = Duration::from_secs(300);
const CMD: Duration = Duration::from_secs(60);

/// The legacy LZ4 frame magic the kernel's `lz4 -l` output starts with.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];

fn le32(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")) as usize
}

#[test]
fn the_default_kernel_as_an_lz4_bzimage_boots_to_a_shell_and_powers_off() {
    let bz = guest_file("bzImage");
    let image = std::fs::read(&bz).expect("read bzImage");
    // The setup header (boot protocol 2.08+): "HdrS", then the payload's place.
    assert_eq!(&image[0x202..0x206], b"HdrS", "not a bzImage");
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let payload = (setup_sects + 1) * 512 + le32(&image, 0x248);
    assert_eq!(
        image[payload..payload + 4],
        LZ4_LEGACY_MAGIC,
        "the payload is not LZ4 (CONFIG_KERNEL_LZ4 in guest/kernel/wisp.config)"
    );

    let initrd = guest_file("initramfs.cpio.gz");
    let mut s = Session::start(&[
        "run",
        "--kernel",
        bz.to_str().expect("utf-8"),
        "--initrd",
        initrd.to_str().expect("utf-8"),
        "--name",
        "bzimage",
    ]);
    s.expect_from(0, "WISP-READY", BOOT);
    let kernel = s.query("KERNEL", "uname -sr", CMD);
    assert!(kernel.starts_with("Linux 6.1"), "uname: {kernel}");
    let cmdline = s.query("CMDLINE", "cat /proc/cmdline", CMD);
    assert!(cmdline.contains("console=ttyS0"), "cmdline: {cmdline}");
    s.send_line("poweroff -f");
    let (status, stderr) = s.wait(CMD);
    assert_eq!(status, Some(0), "stderr:\n{stderr}");
    assert!(
        stderr.contains("guest boot complete"),
        "no boot-complete line:\n{stderr}"
    );
}
