//! `counter[:MIB[:ROUNDS[:GAP_MS]]]`: a memory workload for pause/resume and
//! snapshot/restore tests.
//!
//! MIB MiB of RAM above the probe image (the "area") are rewritten in
//! rounds. Round r, for every 4 KiB page p of the area in order: verify
//! that the page holds round r-1's content, write round r's content, and
//! increment [`COUNT`]. Round 0 (initialisation) only writes. Page
//! content for round r (u64 words): word 0 = r, word 1 = p, word i
//! (2..512) = `seed(r, p) ^ (i * GOLDEN)` (wrapping; see [`seed`]).
//!
//! Output is paced by the TSC (tsc.rs): a progress line when a round
//! completes at least [`MIN_GAP_MS`] after the previous line, and within a
//! round once [`MAX_GAP_MS`] have passed without a line. With GAP_MS, both
//! gaps are GAP_MS (and the clock is read more often below 200 ms).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::bootinfo::{BootInfo, E820_RAM, MAPPED_LIMIT};
use crate::{io, status, tsc};

/// Area size without an argument (MiB).
pub const DEFAULT_MIB: u64 = 4;
/// Largest area (MiB).
pub const MAX_MIB: u64 = 1024;

const PAGE: u64 = 4096;
const WORDS: usize = (PAGE / 8) as usize;
/// Alignment of the area's start.
const AREA_ALIGN: u64 = 2 << 20;
/// Pages between two looks at the clock within a round.
const CLOCK_PAGES: u64 = 64;
/// As [`CLOCK_PAGES`] for a GAP_MS below [`MIN_GAP_MS`].
const CLOCK_PAGES_FAST: u64 = 8;
/// No two progress lines closer than this (without GAP_MS).
const MIN_GAP_MS: u64 = 200;
/// A progress line within a round once this much passed without one
/// (without GAP_MS).
const MAX_GAP_MS: u64 = 1000;
/// Range of GAP_MS.
pub const GAP_MS_RANGE: core::ops::RangeInclusive<u64> = 1..=1000;
/// 2^64 / golden ratio (the splitmix64 increment).
pub const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Pages processed (written in round 0, verified and rewritten in later
/// rounds) by all `counter` commands of this run: only ever grows. It
/// lives in probe memory (.bss), so a snapshot carries it.
static COUNT: AtomicU64 = AtomicU64::new(0);

extern "C" {
    /// End of the probe image, .bss and stacks (link.ld).
    static __image_end: u8;
}

/// Runs the workload: `rounds` rounds after the initialisation, or
/// forever if `rounds` is 0; `gap_ms` (in [`GAP_MS_RANGE`]) replaces both
/// pacing gaps. Exits with [`status::USAGE`] if the area does not fit,
/// [`status::CHECK_FAILED`] on a verification failure.
pub fn run(boot: &BootInfo, mib: u64, rounds: u64, gap_ms: Option<u64>) {
    let start = area(boot, mib);
    let pages = (mib << 20) / PAGE;
    let (hz, _) = tsc::frequency();
    let (min_ms, max_ms) = gap_ms.map_or((MIN_GAP_MS, MAX_GAP_MS), |g| (g, g));
    let mut pace = Pace {
        clock: tsc::Pace::start(),
        min_gap: tsc::ticks_ms(hz, min_ms),
        max_gap: tsc::ticks_ms(hz, max_ms),
        every: if min_ms < MIN_GAP_MS {
            CLOCK_PAGES_FAST
        } else {
            CLOCK_PAGES
        },
    };
    for p in 0..pages {
        // SAFETY: p < pages: the page lies in the area, which is RAM
        // inside the identity map that nothing else uses.
        unsafe { fill(page_ptr(start, p), 0, p) };
        step(&mut pace, 0, p);
    }
    pace.line_if(pace.min_gap, 0);
    let mut r: u64 = 1;
    loop {
        for p in 0..pages {
            let page = page_ptr(start, p);
            // SAFETY: as for the initialisation above.
            if let Err((i, got, want)) = unsafe { verify(page, r - 1, p) } {
                println!(
                    "probe: counter corrupt round={r} page={p} word={i} got={got:#x} want={want:#x}"
                );
                io::exit(status::CHECK_FAILED)
            }
            // SAFETY: as above.
            unsafe { fill(page, r, p) };
            step(&mut pace, r, p);
        }
        if r == rounds {
            let c = COUNT.load(Ordering::Relaxed);
            println!("probe: counter done rounds={r} count={c}");
            return;
        }
        pace.line_if(pace.min_gap, r);
        r += 1;
    }
}

/// Finds an area of `mib` MiB (or ends the run) and prints its start line.
fn area(boot: &BootInfo, mib: u64) -> u64 {
    let Some(start) = find_area(boot, mib << 20) else {
        println!("probe: counter needs {mib} MiB");
        io::exit(status::USAGE)
    };
    println!("probe: counter area={start:#x} mib={mib}");
    start
}

/// The counter's rounds taken a few pages at a time, for `mix`: round 0 writes every
/// page, round r verifies round r-1's content and writes its own.
pub struct Stepper {
    start: u64,
    pages: u64,
    round: u64,
    page: u64,
}

impl Stepper {
    /// An area of `mib` MiB, round 0 about to start.
    pub fn new(boot: &BootInfo, mib: u64) -> Stepper {
        Stepper {
            start: area(boot, mib),
            pages: (mib << 20) / PAGE,
            round: 0,
            page: 0,
        }
    }

    /// Processes the next `n` pages; ends the run on a verification failure.
    pub fn step(&mut self, n: u64) {
        for _ in 0..n {
            let (r, p) = (self.round, self.page);
            let page = page_ptr(self.start, p);
            if r > 0 {
                // SAFETY: p < pages: the page lies in the area, which is RAM inside
                // the identity map that nothing else uses.
                if let Err((i, got, want)) = unsafe { verify(page, r - 1, p) } {
                    println!(
                        "probe: counter corrupt round={r} page={p} word={i} got={got:#x} want={want:#x}"
                    );
                    io::exit(status::CHECK_FAILED)
                }
            }
            // SAFETY: as above.
            unsafe { fill(page, r, p) };
            COUNT.fetch_add(1, Ordering::Relaxed);
            self.page += 1;
            if self.page == self.pages {
                self.page = 0;
                self.round += 1;
            }
        }
    }

    /// Prints the counter's progress line.
    pub fn progress(&self) {
        let c = COUNT.load(Ordering::Relaxed);
        println!("probe: counter round={} count={c}", self.round);
    }
}

/// The lowest [`AREA_ALIGN`]-aligned address at or above the image end
/// where `bytes` of one RAM entry of the memory map (clipped to the
/// identity map) fit.
fn find_area(boot: &BootInfo, bytes: u64) -> Option<u64> {
    let image_end = core::ptr::addr_of!(__image_end).addr() as u64;
    boot.memory_map()
        .iter()
        .filter(|r| r.kind == E820_RAM)
        .filter_map(|r| {
            let end = r.addr.saturating_add(r.size).min(MAPPED_LIMIT);
            let start = r.addr.max(image_end).checked_next_multiple_of(AREA_ALIGN)?;
            (start.checked_add(bytes)? <= end).then_some(start)
        })
        .min()
}

/// Output pacing state: the clock of the last line, the gaps in TSC
/// ticks, and the pages between two looks at the clock within a round.
struct Pace {
    clock: tsc::Pace,
    min_gap: u64,
    max_gap: u64,
    every: u64,
}

impl Pace {
    /// Prints a progress line if at least `gap` ticks passed since the
    /// last one. A TSC that went backwards (e.g. after a restore) counts
    /// as a long gap.
    fn line_if(&mut self, gap: u64, round: u64) {
        if self.clock.due(gap) {
            let c = COUNT.load(Ordering::Relaxed);
            println!("probe: counter round={round} count={c}");
        }
    }
}

/// Counts one page and, every `pace.every` pages, prints a progress line
/// if the round has been silent for `pace.max_gap`.
#[inline(always)]
fn step(pace: &mut Pace, round: u64, p: u64) {
    COUNT.fetch_add(1, Ordering::Relaxed);
    if p % pace.every == pace.every - 1 {
        pace.line_if(pace.max_gap, round);
    }
}

fn page_ptr(start: u64, p: u64) -> *mut u64 {
    core::ptr::with_exposed_provenance_mut((start + p * PAGE) as usize)
}

/// Per-page seed of words 2..512: [`splitmix64`] of `(r << 32) ^ p`.
fn seed(r: u64, p: u64) -> u64 {
    splitmix64((r << 32) ^ p)
}

/// The splitmix64 finalizer of `x + GOLDEN` (wrapping); not 0 for x = 0.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes round `r`'s content of page `p`. Volatile, so that the
/// compiler can neither drop the writes nor assume what later reads see.
///
/// # Safety
/// `page` must be a 4 KiB page of RAM, identity-mapped, used by nothing
/// else.
unsafe fn fill(page: *mut u64, r: u64, p: u64) {
    let s = seed(r, p);
    // SAFETY (all writes): the caller guarantees the whole page.
    unsafe {
        page.write_volatile(r);
        page.add(1).write_volatile(p);
    }
    let mut k = GOLDEN.wrapping_mul(2);
    for i in 2..WORDS {
        // SAFETY: i < WORDS, inside the page.
        unsafe { page.add(i).write_volatile(s ^ k) };
        k = k.wrapping_add(GOLDEN);
    }
}

/// Checks that page `p` holds round `r`'s content; the first bad word
/// as `(index, got, want)`.
///
/// # Safety
/// As for [`fill`].
unsafe fn verify(page: *const u64, r: u64, p: u64) -> Result<(), (usize, u64, u64)> {
    let s = seed(r, p);
    let mut k = 0;
    for i in 0..WORDS {
        let want = match i {
            0 => r,
            1 => p,
            _ => s ^ k,
        };
        // SAFETY: i < WORDS, inside the page the caller guarantees.
        let got = unsafe { page.add(i).read_volatile() };
        if got != want {
            return Err((i, got, want));
        }
        k = k.wrapping_add(GOLDEN);
    }
    Ok(())
}
