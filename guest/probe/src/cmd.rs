//! `probe.cmd=LIST` parsing and the commands.
//!
//! LIST is a comma-separated sequence of `name` or `name:arg`, run in
//! order. Empty items are skipped. Without any `probe.cmd=` word the list
//! is `hello`; with several, the last one wins (as for Linux parameters).

use crate::blk::{self, Bad};
use crate::bootinfo::BootInfo;
use crate::serial::Escaped;
use crate::{blkhold, blkseq, counter, flood, io, mix, net, netproto, status, tsc, virtio};

const PARAM: &[u8] = b"probe.cmd=";
const DEFAULT_LIST: &[u8] = b"hello";
/// Largest byte count `readin:N` accepts (16 MiB).
const READIN_MAX: u32 = 16 << 20;
/// Largest GAP_US of `net-send:N:LEN:GAP_US` (1 s).
const NET_GAP_US_MAX: u64 = 1_000_000;

/// Address the hidden `fault` (`fault:pf`) command reads: just past the
/// probe's identity map, so it raises a page fault. (`fault:gp` runs `hlt`
/// in CPL3, `fault:ud` runs `ud2`.)
const FAULT_ADDR: u64 = crate::bootinfo::MAPPED_LIMIT;

/// Returns the value of the last `probe.cmd=` word of `cmdline`.
pub fn find_list(cmdline: &[u8]) -> &[u8] {
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter_map(|w| w.strip_prefix(PARAM))
        .next_back()
        .unwrap_or(DEFAULT_LIST)
}

/// Runs every command of `list` in order. Returns when all have run;
/// commands that end the run (`exit:N`, errors) do not return.
pub fn run_list(list: &[u8], boot: &BootInfo) {
    for item in list.split(|&b| b == b',').filter(|i| !i.is_empty()) {
        let (name, arg) = match item.iter().position(|&b| b == b':') {
            Some(i) => (&item[..i], Some(&item[i + 1..])),
            None => (item, None),
        };
        run_one(item, name, arg, boot);
    }
}

fn run_one(item: &[u8], name: &[u8], arg: Option<&[u8]>, boot: &BootInfo) {
    if run_device(item, name, arg) {
        return;
    }
    match (name, arg) {
        (b"hello", None) => println!("probe: hello"),
        (b"exit", Some(arg)) => match parse_u8(arg) {
            Some(n) => io::exit(n),
            None => usage_error(item, "exit status must be 0..255"),
        },
        (b"meminfo", None) => {
            let mib = boot.ram_bytes().div_ceil(1 << 20);
            println!("probe: mem={mib}");
        }
        (b"e820", None) => {
            for r in boot.memory_map() {
                let end = r.addr.wrapping_add(r.size).wrapping_sub(1);
                println!("probe: e820 {:#x}-{:#x} {}", r.addr, end, r.kind);
            }
        }
        (b"cmdline", None) => println!("probe: cmdline={}", Escaped(boot.cmdline())),
        (b"boot", None) => println!("probe: boot={}", boot.protocol.name()),
        (b"readin", Some(arg)) => match parse_num(arg, READIN_MAX) {
            Some(n) if n > 0 => readin(n),
            _ => usage_error(item, "byte count must be 1..16777216"),
        },
        (b"mix", Some(a)) => {
            match parse_some_args(a, [counter::MAX_MIB, blkseq::MAX_SECTORS, 10_000]) {
                Some([mib, sectors, gap]) if mib >= 1 && sectors >= blkseq::MIN_SECTORS => {
                    mix::run("mix", boot, mib, sectors, if gap == 0 { 200 } else { gap })
                }
                _ => usage_error(
                    item,
                    "use mix:MIB:SECTORS[:GAP_MS] with MIB 1..1024, SECTORS 8..4096",
                ),
            }
        }
        (b"mix", None) => usage_error(item, "needs MIB:SECTORS[:GAP_MS]"),
        (b"counter", arg) => match parse_counter(arg) {
            Some((mib, rounds, gap)) => counter::run(boot, mib, rounds, gap),
            None => usage_error(
                item,
                "use counter[:MIB[:ROUNDS[:GAP_MS]]] with MIB 1..1024, GAP_MS 1..1000",
            ),
        },
        (b"flood-console", None) => flood::console(),
        (b"tsc", None) => {
            let (hz, source) = tsc::frequency();
            println!("probe: tsc khz={} source={}", hz / 1000, source.name());
        }
        (b"bootdone", None) => {
            io::boot_done();
            println!("probe: bootdone");
        }
        // Hidden: exercise the exception path (see `fault`).
        (b"fault", None | Some(b"pf")) => fault_pf(),
        (b"fault", Some(b"gp")) => {
            // SAFETY: deliberately faults: `hlt` in CPL3 raises #GP(0) and
            // the exception path ends the run.
            unsafe { core::arch::asm!("hlt", options(nomem, nostack)) };
        }
        (b"fault", Some(b"ud")) => {
            // SAFETY: deliberately faults: `ud2` raises #UD and the
            // exception path ends the run.
            unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
        }
        (
            b"hello" | b"meminfo" | b"e820" | b"cmdline" | b"boot" | b"bootdone" | b"tsc"
            | b"flood-console",
            Some(_),
        ) => usage_error(item, "takes no argument"),
        (b"exit", None) => usage_error(item, "needs an argument: exit:N"),
        (b"readin", None) => usage_error(item, "needs an argument: readin:N"),
        (b"fault", Some(_)) => usage_error(item, "use fault, fault:pf, fault:gp or fault:ud"),
        _ => {
            println!("probe: unknown command '{}'", Escaped(item));
            io::exit(status::USAGE)
        }
    }
}

/// Runs a virtio command (`virtio`, `blk-*`, `net-*`); false if `name`
/// is none of them.
fn run_device(item: &[u8], name: &[u8], arg: Option<&[u8]>) -> bool {
    // `name` matched an ASCII literal below whenever it is used.
    let cmd = core::str::from_utf8(name).unwrap_or("?");
    match (name, arg) {
        (b"virtio", None) => virtio::list(),
        (b"blk-info", None) => blk::info(cmd),
        (b"blk-flush", None) => blk::flush(cmd),
        (b"blk-write" | b"blk-verify", Some(a)) => {
            match parse_args(a, [u64::MAX, blk::MAX_SECTORS, u64::from(u32::MAX)]) {
                Some([sector, count, seed]) if count > 0 && sector.checked_add(count).is_some() => {
                    let verify = name == b"blk-verify";
                    blk::write_or_verify(cmd, verify, sector, count, seed as u32)
                }
                _ => usage_error(item, "use SECTOR:COUNT:SEED with COUNT 1..4096"),
            }
        }
        (b"blk-seq", Some(a)) => match parse_some_args(a, [blkseq::MAX_SECTORS, u64::MAX]) {
            Some([sectors, rounds]) if sectors >= blkseq::MIN_SECTORS => {
                blkseq::run(cmd, sectors, rounds)
            }
            _ => usage_error(item, "use blk-seq:SECTORS[:ROUNDS] with SECTORS 8..4096"),
        },
        (b"blk-hold", Some(a)) => match parse_some_args(a, [blkhold::MAX_KIB, u64::MAX, 10_000]) {
            Some([kib, rounds, gap]) if kib >= 1 && kib % 32 == 0 => {
                blkhold::run(cmd, kib, rounds, if gap == 0 { 100 } else { gap })
            }
            _ => usage_error(
                item,
                "use blk-hold:KIB[:ROUNDS[:GAP_MS]] with KIB a multiple of 32 up to 1024",
            ),
        },
        (b"blk-bad", Some(kind)) => {
            let kind = match kind {
                b"loop" => Bad::Loop,
                b"oob" => Bad::Oob,
                b"zero" => Bad::Zero,
                b"qsize" => Bad::Qsize,
                _ => usage_error(item, "use blk-bad:loop, oob, zero or qsize"),
            };
            blk::bad(cmd, kind)
        }
        (b"blk-dev", Some(a)) => match parse_u8(a) {
            Some(n) => blk::select(n),
            None => usage_error(item, "device index must be 0..255"),
        },
        (b"net-info", None) => net::info(cmd),
        (b"net-echo" | b"net-recv", Some(a)) => match parse_num(a, u32::MAX) {
            Some(n) if name == b"net-echo" => net::echo(cmd, n),
            Some(n) => net::recv(cmd, n),
            None => usage_error(item, "frame count must be 0..4294967295"),
        },
        (b"net-send", Some(a)) => {
            let max = [u64::from(u32::MAX), net::MAX_FRAME as u64, NET_GAP_US_MAX];
            match parse_some_args(a, max) {
                Some([n, len, gap_us]) if len >= net::MIN_FRAME as u64 => {
                    net::send(cmd, n as u32, len as usize, gap_us)
                }
                _ => usage_error(
                    item,
                    "use net-send:N:LEN[:GAP_US] with LEN 60..1514, GAP_US 0..1000000",
                ),
            }
        }
        (b"net-arp", Some(a)) => {
            let mut parts = a.splitn(2, |&b| b == b':');
            let target = parts.next().and_then(netproto::parse_ipv4);
            let sender = parts
                .next()
                .map_or(Some(netproto::GUEST_IP), netproto::parse_ipv4);
            match (target, sender) {
                (Some(t), Some(s)) => netproto::arp(cmd, t, s),
                _ => usage_error(item, "use net-arp:TARGET[:SENDER], dotted IPv4 addresses"),
            }
        }
        (b"net-dhcp", None) => netproto::dhcp(cmd),
        (b"flood-notify", None) => flood::notify(cmd),
        (
            b"virtio" | b"blk-info" | b"blk-flush" | b"net-info" | b"net-dhcp" | b"flood-notify",
            Some(_),
        ) => usage_error(item, "takes no argument"),
        (b"blk-write" | b"blk-verify", None) => usage_error(item, "needs SECTOR:COUNT:SEED"),
        (b"blk-bad", None) => usage_error(item, "needs a kind: loop, oob, zero or qsize"),
        (b"blk-seq", None) => usage_error(item, "needs SECTORS[:ROUNDS]"),
        (b"blk-hold", None) => usage_error(item, "needs KIB[:ROUNDS[:GAP_MS]]"),
        (b"blk-dev", None) => usage_error(item, "needs an argument: blk-dev:N"),
        (b"net-echo" | b"net-recv", None) => usage_error(item, "needs a frame count"),
        (b"net-send", None) => usage_error(item, "needs N:LEN[:GAP_US]"),
        (b"net-arp", None) => usage_error(item, "needs an address: net-arp:TARGET[:SENDER]"),
        _ => return false,
    }
    true
}

/// Reads exactly `n` bytes from COM1 and prints their 32-bit FNV-1a hash.
fn readin(n: u32) {
    let mut hash = FNV_OFFSET_BASIS;
    crate::serial::Serial.read_bytes(n, |b| hash = (hash ^ u32::from(b)).wrapping_mul(FNV_PRIME));
    println!("probe: readin n={n} fnv={hash:08x}");
}

/// 32-bit FNV-1a parameters.
const FNV_OFFSET_BASIS: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// `counter` arguments: `None`, `MIB`, `MIB:ROUNDS` or
/// `MIB:ROUNDS:GAP_MS` (MIB 1..=1024, default 4; ROUNDS any u64, default
/// 0 = forever; GAP_MS 1..=1000, default none).
fn parse_counter(arg: Option<&[u8]>) -> Option<(u64, u64, Option<u64>)> {
    let Some(arg) = arg else {
        return Some((counter::DEFAULT_MIB, 0, None));
    };
    let mut parts = arg.splitn(3, |&b| b == b':');
    let mib = parse_u64(parts.next()?, counter::MAX_MIB).filter(|&m| m > 0)?;
    let rounds = match parts.next() {
        Some(r) => parse_u64(r, u64::MAX)?,
        None => 0,
    };
    let gap = match parts.next() {
        Some(g) => Some(parse_u64(g, u64::MAX).filter(|g| counter::GAP_MS_RANGE.contains(g))?),
        None => None,
    };
    Some((mib, rounds, gap))
}

/// Reads just past the probe's identity map: #PF (status 0xee).
fn fault_pf() {
    let p = core::ptr::with_exposed_provenance::<u64>(FAULT_ADDR as usize);
    // SAFETY: not sound on purpose: the address is unmapped, the CPU
    // raises #PF and the exception path ends the run, so the read never
    // completes.
    let v = unsafe { core::ptr::read_volatile(p) };
    println!("probe: read {v:#x} at {FAULT_ADDR:#x} without a fault");
}

fn usage_error(item: &[u8], why: &str) -> ! {
    println!("probe: bad command '{}': {why}", Escaped(item));
    io::exit(status::USAGE)
}

/// Parses a decimal (or `0x` hex) number 0..=255.
fn parse_u8(s: &[u8]) -> Option<u8> {
    parse_num(s, 255).and_then(|v| u8::try_from(v).ok())
}

/// Parses a decimal (or `0x` hex) number 0..=`max`.
fn parse_num(s: &[u8], max: u32) -> Option<u32> {
    parse_u64(s, u64::from(max)).and_then(|v| u32::try_from(v).ok())
}

/// Parses exactly `K` numbers separated by `:`, number `i` 0..=`max[i]`.
fn parse_args<const K: usize>(s: &[u8], max: [u64; K]) -> Option<[u64; K]> {
    let mut parts = s.split(|&b| b == b':');
    let mut out = [0; K];
    for (v, m) in out.iter_mut().zip(max) {
        *v = parse_u64(parts.next()?, m)?;
    }
    parts.next().is_none().then_some(out)
}

/// As [`parse_args`], but trailing numbers may be missing (then 0).
fn parse_some_args<const K: usize>(s: &[u8], max: [u64; K]) -> Option<[u64; K]> {
    let mut parts = s.split(|&b| b == b':');
    let mut out = [0; K];
    for (v, m) in out.iter_mut().zip(max) {
        match parts.next() {
            Some(p) => *v = parse_u64(p, m)?,
            None => break,
        }
    }
    parts.next().is_none().then_some(out)
}

/// Parses a decimal (or `0x` hex) number 0..=`max`.
fn parse_u64(s: &[u8], max: u64) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix(b"0x") {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in digits {
        let d = (b as char).to_digit(radix)?;
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
        if v > max {
            return None;
        }
    }
    Some(v)
}
