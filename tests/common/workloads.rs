//! Reading the probe's workloads: the counter's and blk-seq's progress lines, and the
//! disk blk-seq leaves behind (guest/probe/README.md documents both).

use std::path::Path;
use std::time::{Duration, Instant};

use super::{complete_lines, Session};

const WAIT: Duration = Duration::from_secs(60);

/// (round, count) of every complete counter progress line in `text`.
pub fn counter_progress(text: &str) -> Vec<(u64, u64)> {
    complete_lines(text)
        .lines()
        .filter_map(|l| {
            let rest = l.split_once("probe: counter round=")?.1;
            let (r, c) = rest.split_once(" count=")?;
            Some((r.parse().ok()?, c.trim().parse().ok()?))
        })
        .collect()
}

/// Waits until `s` has printed `n` more counter progress lines after `from`.
pub fn wait_counter(s: &mut Session, from: usize, n: usize) -> Vec<(u64, u64)> {
    wait_lines(s, from, n, counter_progress)
}

/// The `k=` of every complete blk-seq progress line.
pub fn blkseq_ks(text: &str) -> Vec<u64> {
    complete_lines(text)
        .lines()
        .filter_map(|l| l.split_once("probe: blk-seq k=")?.1.split_once(' '))
        .filter_map(|(k, _)| k.parse().ok())
        .collect()
}

/// Waits until `s` has printed `n` more blk-seq progress lines after `from`.
pub fn wait_blkseq(s: &mut Session, from: usize, n: usize) -> Vec<u64> {
    wait_lines(s, from, n, blkseq_ks)
}

fn wait_lines<T>(s: &mut Session, from: usize, n: usize, parse: fn(&str) -> Vec<T>) -> Vec<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = parse(s.seen.get(from..).unwrap_or_default());
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "no progress; output:\n{}",
            s.seen
        );
        s.poll(Duration::from_millis(100));
    }
}

/// After a move (restore, migration) of a blk-seq guest whose last progress before was
/// `before`: the new session `s` continues from there (k does not go back) and writes
/// well past four rings of `sectors`. Returns its first k.
pub fn blkseq_continues(s: &mut Session, before: &[u64], sectors: u64) -> u64 {
    let after = wait_blkseq(s, 0, 3);
    let last = *before.last().expect("progress before the move");
    assert!(after[0] >= last, "k went back: {} after {last}", after[0]);
    let deadline = Instant::now() + WAIT;
    while blkseq_ks(&s.seen).last().copied().unwrap_or(0) < after[0] + 4 * sectors {
        assert!(Instant::now() < deadline, "stalled:\n{}", s.seen);
        s.poll(Duration::from_millis(100));
    }
    after[0]
}

/// Every sector of the ring in `image` holds a complete write for it, all from the
/// last ring's worth, and all written after write `since`.
pub fn assert_blkseq_ring(image: &Path, sectors: u64, since: u64) {
    let written = check_blkseq_disk(image, sectors);
    let (lo, hi) = (
        *written.iter().min().expect("sectors"),
        *written.iter().max().expect("sectors"),
    );
    assert!(hi - lo < sectors + 8, "stale sectors: writes {lo}..={hi}");
    assert!(lo > since, "the ring was not rewritten after the move");
}

/// splitmix64, the probe's check word (guest/probe/README.md, blk-seq).
fn splitmix64(k: u64) -> u64 {
    let mut z = k.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Every sector of a blk-seq ring of `sectors` holds one complete write meant for it;
/// returns the writes' numbers.
pub fn check_blkseq_disk(image: &Path, sectors: u64) -> Vec<u64> {
    let bytes = std::fs::read(image).expect("read image");
    (0..sectors)
        .map(|sector| {
            let at = (sector * 512) as usize;
            let word = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&bytes[at + i * 8..at + i * 8 + 8]);
                u64::from_le_bytes(w)
            };
            let k = word(0);
            assert_eq!(k % sectors, sector, "sector {sector} holds write {k}");
            let check = splitmix64(k);
            assert_eq!(word(1), check, "sector {sector}: check word");
            for i in 2..64 {
                assert_eq!(
                    word(i),
                    check ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    "sector {sector} word {i}"
                );
            }
            k
        })
        .collect()
}
