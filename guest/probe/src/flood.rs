//! `flood-console` and `flood-notify`: a guest that never stops writing its console or
//! notifying a queue, for the VMM's fairness tests (the control socket and the other
//! devices must still be served meanwhile). Neither returns: the test stops the VM.

use crate::blk::Blk;
use crate::serial::Serial;

/// `flood-console`: console lines as fast as the UART takes them, forever.
pub fn console() -> ! {
    println!("probe: flooding the console");
    let mut s = Serial;
    loop {
        s.write_bytes(b"flood: 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghij\n");
    }
}

/// `flood-notify`: the block device's queue 0 notified in a tight loop with nothing
/// in its ring, forever.
pub fn notify(cmd: &str) -> ! {
    let b = Blk::open(cmd);
    println!("probe: flooding notifications");
    loop {
        b.dev.notify(0);
    }
}
