//! virtio-blk and virtio-net driven by the probe's polling CPL3 drivers: fast and
//! deterministic. Network tests run in a namespace with a TAP that the test creates.

mod common;

use std::time::Duration;

use common::netns::{parse_mac, test_frame, NetNs, PacketSocket};
use common::{probe, run_probe, Session, TempDir};

const SECTOR: usize = 512;
const WAIT: Duration = Duration::from_secs(60);

/// The probe's disk pattern: sector `s` is 128 LE u32 words, word j =
/// (seed << 24) ^ (s * 0x9E3779B1) ^ j (u32 arithmetic).
fn pattern(seed: u32, sector: u32) -> Vec<u8> {
    (0..128u32)
        .flat_map(|j| ((seed << 24) ^ sector.wrapping_mul(0x9E37_79B1) ^ j).to_le_bytes())
        .collect()
}

fn image(dir: &TempDir, name: &str, mib: usize) -> String {
    let p = dir.file(name, &[]);
    std::fs::File::options()
        .write(true)
        .open(&p)
        .and_then(|f| f.set_len((mib << 20) as u64))
        .expect("size image");
    p.to_str().expect("utf-8").to_string()
}

fn assert_lines(out: &common::Output, lines: &[&str]) {
    for l in lines {
        assert!(
            out.stdout.lines().any(|x| x == *l),
            "missing {l:?}\nstdout:\n{}\nstderr:\n{}",
            out.stdout,
            out.stderr
        );
    }
}

#[test]
fn blk_data_survives_a_restart_and_lands_on_the_right_sectors() {
    let dir = TempDir::new("blk-restart");
    let img = image(&dir, "disk.img", 8);
    let disk = format!("{img},id=probe-disk");
    let out = run_probe(
        "virtio,blk-info,blk-write:100:200:9,blk-flush",
        &["--disk", &disk],
    );
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_lines(
        &out,
        &[
            "probe: virtio slot=0 device=2 version=2",
            "probe: blk capacity=16384 ro=0 id=probe-disk",
            "probe: blk-write sectors=200 status=0",
            "probe: blk-flush status=0",
        ],
    );
    // On the host: exactly sectors 100..300 hold the pattern, the rest is still zero.
    let data = std::fs::read(&img).expect("read image");
    for s in 0..400usize {
        let got = &data[s * SECTOR..(s + 1) * SECTOR];
        if (100..300).contains(&s) {
            assert_eq!(got, pattern(9, s as u32).as_slice(), "sector {s}");
        } else {
            assert!(got.iter().all(|&b| b == 0), "sector {s} was touched");
        }
    }
    // A new wisp reads it back.
    let out = run_probe("blk-verify:100:200:9", &["--disk", &img]);
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_lines(&out, &["probe: blk-verify sectors=200 ok"]);
    // ... and the check can fail: another seed does not match.
    let out = run_probe("blk-verify:100:1:8", &["--disk", &img]);
    assert_ne!(out.status, Some(0), "{out:?}");
    assert_lines(&out, &["probe: blk-verify mismatch sector=100"]);
}

#[test]
fn read_only_disk_rejects_writes_with_ioerr() {
    let dir = TempDir::new("blk-ro");
    let img = image(&dir, "ro.img", 1);
    let disk = format!("{img},ro");
    let out = run_probe(
        "blk-info,blk-write:0:8:1,blk-verify:0:1:1",
        &["--disk", &disk],
    );
    assert_lines(
        &out,
        &[
            "probe: blk capacity=2048 ro=1 id=ro.img",
            "probe: blk-write sectors=8 status=1",
            "probe: blk-verify mismatch sector=0",
        ],
    );
    let data = std::fs::read(&img).expect("read image");
    assert!(data.iter().all(|&b| b == 0), "read-only image was written");
}

#[test]
fn hostile_descriptors_get_errors_and_the_vmm_survives() {
    let dir = TempDir::new("blk-bad");
    let img = image(&dir, "bad.img", 1);
    let out = run_probe(
        "blk-bad:loop,blk-bad:oob,blk-bad:zero,blk-bad:qsize,blk-write:0:1:3,blk-verify:0:1:3",
        &["--disk", &img],
    );
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_lines(
        &out,
        &[
            "probe: blk-bad loop needs_reset=1 recovered=1",
            "probe: blk-bad oob status=1 recovered=1",
            "probe: blk-bad zero status=1 recovered=1",
            "probe: blk-bad qsize ready=0 needs_reset=1 recovered=1",
            "probe: blk-verify sectors=1 ok",
        ],
    );
    for logged in [
        "loops, leaves the table",
        "outside guest memory",
        "zero-length data buffer",
        "invalid queue size",
    ] {
        assert!(
            out.stderr.contains(logged),
            "{logged:?} not logged:\n{}",
            out.stderr
        );
    }
}

#[test]
fn bad_disk_and_net_options_are_one_line_errors() {
    let dir = TempDir::new("bad-opts");
    let empty = dir.file("empty.img", &[]);
    let empty = empty.to_str().expect("utf-8");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--disk", "/nonexistent/x.img"],
            "cannot open disk /nonexistent/x.img",
        ),
        (&["--disk", empty], "smaller than one 512-byte sector"),
        (&["--disk", "x.img,rw"], "expected PATH[,ro][,id=NAME]"),
        (
            &["--net", "tap=nosuchtap0"],
            "TAP nosuchtap0 does not exist",
        ),
        (
            &["--net", "bridge=nosuchbr0"],
            "bridge nosuchbr0 does not exist",
        ),
        (
            &["--net", "vde=x"],
            "it must start with user, tap=NAME or bridge=BR",
        ),
    ];
    for (args, msg) in cases {
        let out = run_probe("hello", args);
        assert_eq!(out.status, Some(1), "{args:?}: {out:?}");
        let errors = out.error_lines();
        assert_eq!(errors.len(), 1, "{args:?}: {}", out.stderr);
        assert!(errors[0].contains(msg), "{args:?}: {}", errors[0]);
    }
}

#[test]
fn bridge_mode_on_an_interface_that_is_not_a_bridge_says_so() {
    let ns = NetNs::new("notbridge");
    ns.enter();
    ns.ip(&["link", "add", "vx0", "type", "veth", "peer", "name", "vx1"]);
    let out = run_probe("hello", &["--net", "bridge=vx0"]);
    assert_eq!(out.status, Some(1), "{out:?}");
    let errors = out.error_lines();
    assert_eq!(errors.len(), 1, "{}", out.stderr);
    assert!(errors[0].contains("vx0 is not a bridge"), "{}", errors[0]);
}

#[test]
fn two_vms_cannot_write_one_image() {
    let dir = TempDir::new("blk-lock");
    let img = image(&dir, "shared.img", 1);
    // The first VM waits for console input that never comes, holding the image.
    let mut first = Session::start(&[
        "run",
        "--kernel",
        probe().to_str().expect("utf-8"),
        "--disk",
        &img,
        "--cmdline",
        "probe.cmd=blk-info,readin:1",
    ]);
    first.expect_from(0, "probe: blk capacity", WAIT);
    let out = run_probe("hello", &["--disk", &img]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(
        out.error_lines()[0].contains("in use by another process"),
        "{out:?}"
    );
}

/// Starts the probe with `cmds` on TAP tp0 in `ns`; returns the session and the guest MAC.
fn probe_on_tap(cmds: &str) -> (Session, [u8; 6]) {
    let cmdline = format!("probe.cmd=net-info,{cmds}");
    let mut s = Session::start(&[
        "run",
        "--kernel",
        probe().to_str().expect("utf-8"),
        "--net",
        "tap=tp0",
        "--cmdline",
        &cmdline,
    ]);
    let at = s.expect_from(0, "probe: net mac=", WAIT);
    let end = s.expect_from(at, "\n", WAIT);
    let mac = parse_mac(s.seen[at..end].trim());
    s.expect_from(end, "probe: net-ready", WAIT);
    (s, mac)
}

const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

#[test]
fn net_frames_injected_on_the_tap_are_echoed_back() {
    let ns = NetNs::new("echo");
    ns.enter();
    ns.tap("tp0");
    let sock = PacketSocket::open("tp0");
    let (s, mac) = probe_on_tap("net-echo:5");
    for seq in 0..5u32 {
        let sent = test_frame(mac, HOST_MAC, seq, 60 + 100 * seq as usize);
        sock.send(&sent);
        let echo = sock.recv_test_frame(WAIT).expect("echo");
        assert_eq!(&echo[..6], &HOST_MAC, "echo goes back to the sender");
        assert_eq!(&echo[6..12], &mac, "echo comes from the guest");
        assert_eq!(&echo[12..], &sent[12..], "payload of frame {seq}");
    }
    let (status, stderr) = s.wait(WAIT);
    assert_eq!(status, Some(0), "{stderr}");
}

#[test]
fn net_1000_frames_each_way_none_lost() {
    let ns = NetNs::new("bulk");
    ns.enter();
    ns.tap("tp0");
    let sock = PacketSocket::open("tp0");
    let (mut s, mac) = probe_on_tap("net-recv:1000,net-send:1000:300");
    for seq in 0..1000u32 {
        sock.send(&test_frame(
            mac,
            HOST_MAC,
            seq,
            60 + (seq as usize * 7) % 1400,
        ));
    }
    s.expect_from(0, "probe: net-recv n=1000 ok", WAIT);
    for seq in 0..1000u32 {
        let f = sock
            .recv_test_frame(WAIT)
            .unwrap_or_else(|| panic!("frame {seq} from the guest never came"));
        assert_eq!(f, test_frame([0xff; 6], mac, seq, 300), "frame {seq}");
    }
    let (status, stderr) = s.wait(WAIT);
    assert_eq!(status, Some(0), "{stderr}");
}

#[test]
fn net_frames_wait_while_the_guest_is_not_receiving() {
    let ns = NetNs::new("backpressure");
    ns.enter();
    ns.tap("tp0");
    let sock = PacketSocket::open("tp0");
    // The probe learns its MAC, then blocks on the console before it posts RX buffers:
    // 600 frames must wait (in the TAP's queue, then one in wisp) and all arrive, in
    // order, once it starts receiving.
    let mut s = Session::start(&[
        "run",
        "--kernel",
        probe().to_str().expect("utf-8"),
        "--net",
        "tap=tp0",
        "--cmdline",
        "probe.cmd=net-info,readin:1,net-recv:600",
    ]);
    let at = s.expect_from(0, "probe: net mac=", WAIT);
    let end = s.expect_from(at, "\n", WAIT);
    let mac = parse_mac(s.seen[at..end].trim());
    for seq in 0..600u32 {
        sock.send(&test_frame(mac, HOST_MAC, seq, 200));
    }
    s.send_line("x");
    s.expect_from(end, "probe: net-recv n=600 ok", WAIT);
    let (status, stderr) = s.wait(WAIT);
    assert_eq!(status, Some(0), "{stderr}");
}

#[test]
fn devices_are_announced_on_the_cmdline_only_with_acpi_off() {
    let dir = TempDir::new("announce");
    let a = image(&dir, "a.img", 1);
    let b = image(&dir, "b.img", 1);
    let out = run_probe("cmdline", &["--disk", &a, "--disk", &b]);
    assert!(!out.stdout.contains("virtio_mmio.device="), "{out:?}");
    // (run_probe puts its argument after probe.cmd=, so this adds a second word.)
    let out = run_probe("cmdline,virtio acpi=off", &["--disk", &a, "--disk", &b]);
    assert!(
        out.stdout
            .contains("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"),
        "{out:?}"
    );
    assert_lines(&out, &["probe: virtio devices=2"]);
}

#[test]
fn bad_user_net_input_is_a_one_line_error_and_leaves_no_passt() {
    // Orphans of the wisps below become our children, so a passt that wisp failed to
    // reap would show up here.
    // SAFETY: prctl with integer arguments only.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
    let no_passt = || {
        let me = std::process::id();
        let left = common::children_named(me, "passt");
        assert!(left.is_empty(), "passt left behind: {left:?}");
        let supervisors: Vec<_> = common::children_named(me, "wisp")
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.windows(7).any(|w| w == b"__passt"))
            })
            .collect();
        assert!(
            supervisors.is_empty(),
            "supervisor left behind: {supervisors:?}"
        );
    };
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let in_use = format!("user,hostfwd=tcp::{port}-:22");
    let in_use_msg = format!("127.0.0.1:{port}: already in use");
    let cases: &[(&str, &str)] = &[
        (
            "user,hostfwd=tcp::2222",
            "expected PROTO:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT",
        ),
        ("user,hostfwd=icmp::1-:1", "PROTO must be tcp or udp"),
        (
            "user,hostfwd=tcp::2222-10.0.2.99:22",
            "GUESTADDR must be the guest's address",
        ),
        ("user,net=10.0.0.0/40", "prefix must be 8..30"),
        (&in_use, &in_use_msg),
    ];
    for (net, msg) in cases {
        let out = run_probe("hello", &["--net", net]);
        assert_eq!(out.status, Some(1), "{net}: {out:?}");
        let errors = out.error_lines();
        assert_eq!(errors.len(), 1, "{net}: {}", out.stderr);
        assert!(errors[0].contains(msg), "{net}: {}", errors[0]);
        no_passt();
    }
    // passt starts for the first card, then the second one fails: passt goes too.
    let out = run_probe("hello", &["--net", "user", "--net", "tap=nosuchtap0"]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(
        out.error_lines()[0].contains("TAP nosuchtap0 does not exist"),
        "{out:?}"
    );
    no_passt();
    // passt missing: wisp names the package.
    let out = common::run_cmd(
        {
            let mut c = std::process::Command::new(common::wisp());
            c.env("PATH", "/nonexistent").args([
                "run",
                "--kernel",
                probe().to_str().expect("utf-8"),
                "--net",
                "user",
            ]);
            c
        },
        b"",
        WAIT,
    );
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(
        out.error_lines()[0].contains("apt-get install passt"),
        "{out:?}"
    );
    drop(busy);
}

#[test]
fn passt_dying_takes_the_link_down_and_wisp_restarts_it() {
    let ns = NetNs::new("passt-restart");
    ns.enter();
    ns.uplink();
    let mut s = Session::start_env(
        &[
            "run",
            "--kernel",
            probe().to_str().expect("utf-8"),
            "--net",
            "user",
            "--cmdline",
            "probe.cmd=net-arp:10.0.2.2,readin:1,net-dhcp",
        ],
        &[("WISP_LOG", "debug")],
    );
    let at = s.expect_from(0, "probe: net-arp 10.0.2.2 is-at ", WAIT);
    let first = common::descendants_named(s.pid(), "passt");
    assert_eq!(first.len(), 1, "{first:?}");
    // SAFETY: kill(2) on a process id we just read; no memory involved.
    assert_eq!(unsafe { libc::kill(first[0] as i32, libc::SIGKILL) }, 0);
    let deadline = std::time::Instant::now() + WAIT;
    let second = loop {
        let now = common::descendants_named(s.pid(), "passt");
        if now.len() == 1 && now[0] != first[0] {
            break now[0];
        }
        assert!(
            std::time::Instant::now() < deadline,
            "passt not restarted: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !common::process_named(first[0], "passt"),
        "old passt not reaped"
    );
    // The VM kept running; over the new passt, DHCP works.
    s.send_line("x");
    s.expect_from(at, "probe: net-dhcp ack=10.0.2.15", WAIT);
    let (status, stderr) = s.wait(WAIT);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(stderr.contains("link down"), "{stderr}");
    assert!(stderr.contains("passt restarted"), "{stderr}");
    assert!(
        !common::process_named(second, "passt"),
        "passt outlived wisp"
    );
}

#[test]
fn user_net_answers_arp_and_dhcp_with_the_address_plan() {
    let ns = NetNs::new("usernet-probe");
    ns.enter();
    ns.uplink();
    for (net, guest, gw, dns) in [
        ("user", "10.0.2.15", "10.0.2.2", "10.0.2.3"),
        (
            "user,net=192.168.76.0/24",
            "192.168.76.15",
            "192.168.76.2",
            "192.168.76.3",
        ),
    ] {
        let cmds = format!("net-arp:{gw}:{guest},net-dhcp");
        let out = run_probe(&cmds, &["--net", net]);
        assert_eq!(out.status, Some(0), "{net}: {out:?}");
        assert!(
            out.stdout.contains(&format!("probe: net-arp {gw} is-at ")),
            "{net}: {out:?}"
        );
        let offer = out
            .stdout
            .lines()
            .find(|l| l.starts_with("probe: net-dhcp offer="))
            .unwrap_or_else(|| panic!("{net}: no offer: {out:?}"));
        for want in [
            format!("offer={guest} "),
            format!("router={gw} "),
            format!("dns={dns} "),
            "mask=255.255.255.0 ".to_string(),
            "mtu=1500 ".to_string(),
        ] {
            assert!(offer.contains(&want), "{net}: {want:?} not in {offer:?}");
        }
        assert_lines(&out, &[&format!("probe: net-dhcp ack={guest}")]);
    }
}
