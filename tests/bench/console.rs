//! Console input benchmark (not a test: it reports, it never fails on a number).
//!
//! The default Linux guest boots once (2 vCPUs, 256 MiB); then, round after round, a
//! raw-mode shell runs `head -c N | md5sum` while N bytes of pseudo-random data are
//! written to wisp's stdin as fast as wisp takes them. Each round reports the time
//! from the command to the digest, the throughput, and whether the digest matches the
//! host's (a stall shows as a round that never ends; the bench gives up after
//! `--timeout-s`). Reported: every round, then min / median / max throughput.
//!
//! This is the issue-13 check "1 MiB through the console three times in a row with no
//! stall" (the default). Where guest kernel mode is emulated, each MiB takes about two
//! minutes: the guest's UART driver and tty layer run instruction by instruction.
//!
//! Run: `scripts/bench.sh console`. Options: `--kib N` (default 1024), `--rounds N`
//! (default 3), `--timeout-s N` (default 900).

#[path = "../common/mod.rs"]
mod common;

use std::time::Duration;

use common::{console_stream, guest_file, noise, Session};

fn main() {
    let kib = common::option_arg("--kib", 1024) as usize;
    let rounds = common::option_arg("--rounds", 3);
    let timeout = Duration::from_secs(common::option_arg("--timeout-s", 900));
    let _ = guest_file("vmlinux");
    println!("console input: {rounds} rounds of {kib} KiB through `head -c N | md5sum` in the default guest");
    let mut s = Session::start(&["run", "--cpus", "2", "--memory", "256"]);
    s.expect_from(0, "WISP-READY", Duration::from_secs(300));
    let mut rates = Vec::new();
    for round in 1..=rounds {
        let data = noise(kib << 10, 0x2545_f491 + round as u32);
        let took = console_stream(&mut s, data, timeout).as_secs_f64();
        let rate = kib as f64 / took;
        rates.push(rate);
        println!(
            "  round {round}: {kib} KiB in {took:.1} s, {rate:.1} KiB/s, digest matches, no stall"
        );
    }
    rates.sort_by(f64::total_cmp);
    if let (Some(min), Some(max)) = (rates.first(), rates.last()) {
        println!(
            "throughput KiB/s: min {min:.1}  median {:.1}  max {max:.1}",
            rates[rates.len() / 2]
        );
    }
    s.send_line("poweroff -f");
    let (status, _) = s.wait(Duration::from_secs(120));
    println!("guest powered off (wisp exit status {status:?})");
}
