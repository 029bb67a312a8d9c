//! `blk-hold:KIB[:ROUNDS[:GAP_MS]]`: guest memory written only by the device, for
//! migration tests.
//!
//! Setup: the pattern of `blk-write` (seed 0) is written over REGIONS regions of KIB
//! KiB each, from sector 0. Then round r reads region `r % REGIONS` into one buffer of
//! KIB KiB (virtio-blk IN requests: the device writes the buffer, the guest's CPU never
//! does), checks every word, and keeps checking the same buffer (reads only) for
//! GAP_MS (default 100) before it prints `probe: blk-hold round=<r> ok` and goes on.
//! Consecutive regions hold different contents, so a page of the buffer that a
//! migration failed to carry over (it was dirtied by the device alone) shows up as
//! `probe: blk-hold mismatch round=<r> sector=<s> word=<j>` (exit status 8). After
//! ROUNDS rounds (0: forever): `probe: blk-hold done rounds=<ROUNDS>`.

use crate::blk::{Blk, MAX_REQ_SECTORS, SECTOR, T_IN, T_OUT};
use crate::virtqueue::{self, Dma};
use crate::{io, status, tsc};

/// Largest KIB.
pub const MAX_KIB: u64 = 1024;
/// Regions read in turn.
const REGIONS: u64 = 16;
const WORDS_PER_SECTOR: usize = SECTOR / 4;

static HOLD: Dma<[u8; MAX_KIB as usize * 1024]> = Dma::new([0; MAX_KIB as usize * 1024]);

/// Word `j` of sector `s` in the `blk-write` pattern of seed 0.
fn pattern(s: u64, j: usize) -> u32 {
    (s as u32).wrapping_mul(0x9E37_79B1) ^ j as u32
}

fn word(k: usize) -> *mut u32 {
    assert!(k < MAX_KIB as usize * 256);
    // SAFETY: in bounds (asserted); HOLD is page-aligned, so u32-aligned.
    unsafe { HOLD.ptr().cast::<u32>().add(k) }
}

/// Moves `sectors` sectors between the disk at `first` and HOLD (`read`: IN).
fn transfer(cmd: &str, b: &mut Blk, first: u64, sectors: u64, read: bool) {
    let mut done = 0;
    while done < sectors {
        let n = (sectors - done).min(MAX_REQ_SECTORS as u64);
        let addr = HOLD.addr() + done * SECTOR as u64;
        let typ = if read { T_IN } else { T_OUT };
        let st = b
            .request_at(typ, first + done, addr, (n as usize * SECTOR) as u32, read)
            .unwrap_or_else(|e| virtqueue::fail(cmd, e));
        if st != 0 {
            println!("probe: blk-hold status={st} sector={}", first + done);
            io::exit(status::DEVICE_ERROR)
        }
        done += n;
    }
}

/// The first word of HOLD that is not region `first`'s pattern.
fn check(first: u64, sectors: u64) -> Option<(u64, usize)> {
    for k in 0..sectors as usize * WORDS_PER_SECTOR {
        let s = first + (k / WORDS_PER_SECTOR) as u64;
        let j = k % WORDS_PER_SECTOR;
        // SAFETY: k is within the buffer; no request is in flight.
        let w = u32::from_le(unsafe { core::ptr::read_volatile(word(k)) });
        if w != pattern(s, j) {
            return Some((s, j));
        }
    }
    None
}

fn verify(round: u64, first: u64, sectors: u64) {
    if let Some((s, j)) = check(first, sectors) {
        println!("probe: blk-hold mismatch round={round} sector={s} word={j}");
        io::exit(status::CHECK_FAILED)
    }
}

pub fn run(cmd: &str, kib: u64, rounds: u64, gap_ms: u64) {
    let mut b = Blk::open(cmd);
    let sectors = kib * 1024 / SECTOR as u64;
    let capacity = b.dev.config_u64(0);
    if capacity < REGIONS * sectors {
        println!(
            "probe: blk-hold needs {} sectors, capacity={capacity}",
            REGIONS * sectors
        );
        io::exit(status::USAGE)
    }
    for region in 0..REGIONS {
        let first = region * sectors;
        for k in 0..sectors as usize * WORDS_PER_SECTOR {
            let s = first + (k / WORDS_PER_SECTOR) as u64;
            // SAFETY: in bounds; no request in flight.
            unsafe { word(k).write(pattern(s, k % WORDS_PER_SECTOR).to_le()) };
        }
        transfer(cmd, &mut b, first, sectors, false);
    }
    println!("probe: blk-hold kib={kib} regions={REGIONS}");
    let (hz, _) = tsc::frequency();
    let gap = tsc::ticks_ms(hz, gap_ms);
    let mut r = 0u64;
    while rounds == 0 || r < rounds {
        let first = (r % REGIONS) * sectors;
        transfer(cmd, &mut b, first, sectors, true);
        let mut pace = tsc::Pace::start();
        loop {
            verify(r, first, sectors);
            if pace.due(gap) {
                break;
            }
        }
        println!("probe: blk-hold round={r} ok");
        // Once more after the (slow) output, so that no stretch of a round leaves the
        // buffer unchecked before the next read replaces it.
        verify(r, first, sectors);
        r += 1;
    }
    println!("probe: blk-hold done rounds={rounds}");
}
