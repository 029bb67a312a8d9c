//! `mix:MIB:SECTORS[:GAP_MS]`: memory, disk and network busy at once, for migration
//! tests. Each step rewrites and verifies the next 64 pages of a `counter` area of MIB
//! MiB, writes one `blk-seq` batch over a ring of SECTORS sectors with its read-back
//! check (requests in flight), and sends one `net-send` frame (64 bytes, the next
//! sequence number, notified at once). Every GAP_MS (default 200) ms it prints the
//! counter's and blk-seq's progress lines; it runs until the VM ends. Failures are the
//! ones of `counter`, `blk-seq` and `net-send`.

use crate::blkseq::{self, Seq};
use crate::bootinfo::BootInfo;
use crate::counter::Stepper;
use crate::net::Net;
use crate::tsc;

/// Pages of the counter per step.
const PAGES_PER_STEP: u64 = 64;
/// Frame length.
const FRAME: usize = 64;

pub fn run(cmd: &str, boot: &BootInfo, mib: u64, sectors: u64, gap_ms: u64) -> ! {
    let mut counter = Stepper::new(boot, mib);
    let mut seq = Seq::open(cmd, sectors);
    let mut net = Net::open(cmd);
    let (hz, _) = tsc::frequency();
    let gap = tsc::ticks_ms(hz, gap_ms);
    let mut pace = tsc::Pace::start();
    let (mut k, mut n, mut frame) = (0u64, 0u64, 0u32);
    loop {
        counter.step(PAGES_PER_STEP);
        n += 1;
        k = seq.batch(k, n, sectors);
        net.send_test_frame(frame, FRAME);
        frame = frame.wrapping_add(1);
        if pace.due(gap) {
            counter.progress();
            blkseq::progress(k, n);
        }
    }
}
