//! `blk-seq:SECTORS[:ROUNDS]`: a block workload with several requests in
//! flight at once, for snapshot/restore tests.
//!
//! Write number k (0, 1, 2, ..., never repeated within the command) goes
//! to sector `k % SECTORS` and holds k, a check word and a fill derived
//! from k (see [`word`]). Batches of B writes (B = [`BATCH`], fewer on a
//! small queue) are submitted together with one notification, then all B
//! completions are awaited: each must be a chain in flight, none may come
//! twice, each status must be 0. After each batch one read checks the
//! sector of the previous batch's last write (of the first batch: its own
//! last write) against the latest write to that sector.
//!
//! Chain `c` (0..=B) uses descriptors 3c (header), 3c + 1 (one 512-byte
//! data buffer), 3c + 2 (status); its head id is 3c. Chains 0..B are the
//! writes, chain B the read-back, so every id in flight is distinct.

use crate::blk::{self, Blk, NO_ANSWER, SECTOR};
use crate::counter::{splitmix64, GOLDEN};
use crate::virtqueue::{self, Desc, Dma, WaitError};
use crate::{io, status, tsc};

/// Writes per batch on a queue of at least 3 * (BATCH + 1) descriptors.
pub const BATCH: usize = 8;
/// Smallest SECTORS (at least BATCH: a batch's writes hit distinct sectors).
pub const MIN_SECTORS: u64 = 8;
/// Largest SECTORS.
pub const MAX_SECTORS: u64 = 4096;
/// Chains: BATCH writes and the read-back.
const CHAINS: usize = BATCH + 1;
/// u64 words per sector.
const WORDS: usize = SECTOR / 8;
/// No two progress lines closer than this.
const MIN_GAP_MS: u64 = 200;

/// Header (device-readable, 16 bytes) and status byte of one chain.
#[repr(C)]
struct Hdr {
    typ: u32,
    reserved: u32,
    sector: u64,
    status: u8,
}

const HDR_ZERO: Hdr = Hdr {
    typ: 0,
    reserved: 0,
    sector: 0,
    status: 0,
};

static HDRS: Dma<[Hdr; CHAINS]> = Dma::new([HDR_ZERO; CHAINS]);
static BUFS: Dma<[[u64; WORDS]; CHAINS]> = Dma::new([[0; WORDS]; CHAINS]);

/// Word `i` (0..64) of the sector content of write `k`: k, then the check
/// word `splitmix64(k)`, then `check ^ (i * GOLDEN)` (wrapping).
fn word(k: u64, check: u64, i: usize) -> u64 {
    match i {
        0 => k,
        1 => check,
        _ => check ^ (i as u64).wrapping_mul(GOLDEN),
    }
}

/// Pointer to word `i` of chain `c`'s data buffer.
fn buf_word(c: usize, i: usize) -> *mut u64 {
    assert!(c < CHAINS && i < WORDS);
    // SAFETY: in bounds (asserted) of the static; u64-aligned.
    unsafe { BUFS.ptr().cast::<u64>().add(c * WORDS + i) }
}

fn hdr(c: usize) -> *mut Hdr {
    assert!(c < CHAINS);
    // SAFETY: in bounds (asserted) of the static.
    unsafe { HDRS.ptr().cast::<Hdr>().add(c) }
}

/// The write loop's state.
pub struct Seq<'a> {
    cmd: &'a str,
    b: Blk,
    /// Writes per batch.
    batch: usize,
    /// Chains the device holds.
    pending: [bool; CHAINS],
}

impl Seq<'_> {
    /// Fills chain `c`'s header and descriptors and publishes it (no
    /// notification). The driver must own the chain.
    fn post(&mut self, c: usize, typ: u32, sector: u64) {
        let h = hdr(c);
        // SAFETY: chain c is not in flight (pending[c] is false), so the
        // device does not use its header.
        unsafe {
            (*h).typ = typ;
            (*h).reserved = 0;
            (*h).sector = sector;
            (*h).status = NO_ANSWER;
        }
        let hdr_addr = h.expose_provenance() as u64;
        let data = buf_word(c, 0).expose_provenance() as u64;
        let status = hdr_addr + core::mem::offset_of!(Hdr, status) as u64;
        let d = (3 * c) as u16;
        let write = if typ == blk::T_IN {
            virtqueue::DESC_WRITE
        } else {
            0
        };
        let q = &mut self.b.q;
        q.set_desc(d, Desc::new(hdr_addr, 16, virtqueue::DESC_NEXT, d + 1));
        let flags = virtqueue::DESC_NEXT | write;
        q.set_desc(d + 1, Desc::new(data, SECTOR as u32, flags, d + 2));
        q.set_desc(d + 2, Desc::new(status, 1, virtqueue::DESC_WRITE, 0));
        self.pending[c] = true;
        q.push(d);
    }

    /// Waits for `n` chains in flight to complete (one poll budget for
    /// all): each used id must be the head of a chain in flight, each
    /// status 0.
    fn complete(&mut self, n: usize) {
        let mut budget = virtqueue::POLLS;
        for _ in 0..n {
            let u = match self.b.q.poll_used(&self.b.dev, &mut budget) {
                Ok(Some(u)) => u,
                Ok(None) => virtqueue::fail(self.cmd, WaitError::Timeout),
                Err(e) => virtqueue::fail(self.cmd, e),
            };
            let id = usize::from(u.id);
            let c = id / 3;
            if id % 3 != 0 || c >= CHAINS || !self.pending[c] {
                virtqueue::fail(self.cmd, WaitError::BadUsed(u32::from(u.id)));
            }
            self.pending[c] = false;
            // SAFETY: the device returned chain c: its status is final.
            let st = unsafe { core::ptr::read_volatile(&raw const (*hdr(c)).status) };
            if st != 0 {
                // SAFETY: as above; the header is the driver's again.
                let sector = unsafe { (*hdr(c)).sector };
                println!("probe: {} status={st} sector={sector}", self.cmd);
                io::exit(status::DEVICE_ERROR)
            }
        }
        // Nothing in flight now: any further used entry is a stray
        // (duplicated or invented) completion.
        match self.b.q.pop_used() {
            Ok(None) => {}
            Ok(Some(u)) => virtqueue::fail(self.cmd, WaitError::BadUsed(u32::from(u.id))),
            Err(e) => virtqueue::fail(self.cmd, e),
        }
    }

    /// Writes `k .. k + batch` as one batch.
    fn write_batch(&mut self, k: u64, sectors: u64) {
        for c in 0..self.batch {
            let kc = k + c as u64;
            let check = splitmix64(kc);
            for i in 0..WORDS {
                // SAFETY: chain c is not in flight: the driver owns its buffer.
                unsafe { buf_word(c, i).write_volatile(word(kc, check, i).to_le()) };
            }
            self.post(c, blk::T_OUT, kc % sectors);
        }
        self.b.q.kick(&self.b.dev);
        self.complete(self.batch);
    }

    /// Reads `sector` and checks that it holds write `want`.
    fn check(&mut self, sector: u64, want: u64) {
        let c = self.batch;
        self.post(c, blk::T_IN, sector);
        self.b.q.kick(&self.b.dev);
        self.complete(1);
        let check = splitmix64(want);
        for i in 0..WORDS {
            // SAFETY: the device returned chain c: the driver owns its buffer.
            let got = u64::from_le(unsafe { buf_word(c, i).read_volatile() });
            if got != word(want, check, i) {
                // SAFETY: as above.
                let got_k = u64::from_le(unsafe { buf_word(c, 0).read_volatile() });
                println!("probe: blk-seq mismatch sector={sector} got_k={got_k} want_k={want}");
                io::exit(status::CHECK_FAILED)
            }
        }
    }
}

impl<'a> Seq<'a> {
    /// Opens the block device for a ring of `sectors`, printing the start line.
    pub fn open(cmd: &'a str, sectors: u64) -> Seq<'a> {
        let b = Blk::open(cmd);
        let capacity = b.dev.config_u64(0);
        if capacity < sectors {
            println!("probe: blk-seq needs {sectors} sectors, capacity={capacity}");
            io::exit(status::USAGE)
        }
        let size = usize::from(b.q.size);
        let batch = (size / 3).saturating_sub(1).min(BATCH);
        if batch == 0 {
            println!("probe: {cmd} init failed: queue size {size} too small");
            io::exit(status::DEVICE_ERROR)
        }
        println!("probe: blk-seq sectors={sectors} batch={batch}");
        Seq {
            cmd,
            b,
            batch,
            pending: [false; CHAINS],
        }
    }

    /// Batch number `n` (1, 2, ...) of a ring of `sectors`: its writes, from write
    /// `k`, then the read-back check; returns the next k.
    pub fn batch(&mut self, k: u64, n: u64, sectors: u64) -> u64 {
        let bsz = self.batch as u64;
        self.write_batch(k, sectors);
        let k = k + bsz;
        // The previous batch's last write (first batch: its own).
        let w = if n == 1 { k - 1 } else { k - bsz - 1 };
        let sector = w % sectors;
        // The latest write to that sector: the largest j < k, j = w mod S.
        let want = k - 1 - (k - 1 - sector) % sectors;
        self.check(sector, want);
        k
    }
}

/// The progress line of `blk-seq` (and `mix`).
pub fn progress(k: u64, n: u64) {
    println!("probe: blk-seq k={k} batches={n}");
}

/// Runs `blk-seq`: `rounds` batches, or forever if `rounds` is 0.
pub fn run(cmd: &str, sectors: u64, rounds: u64) {
    let mut s = Seq::open(cmd, sectors);
    let (hz, _) = tsc::frequency();
    let gap = tsc::ticks_ms(hz, MIN_GAP_MS);
    let mut pace = tsc::Pace::start();
    // Writes done (the next k) and batches done.
    let mut k: u64 = 0;
    let mut n: u64 = 0;
    loop {
        n += 1;
        k = s.batch(k, n, sectors);
        if n == rounds {
            println!("probe: blk-seq done k={k}");
            return;
        }
        if pace.due(gap) {
            progress(k, n);
        }
    }
}
