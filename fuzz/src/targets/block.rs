//! `block`: virtio-blk requests (`devices::virtio::block`), straight on the device.
//!
//! Input: queue parameters (4 bytes), a flags byte (bit 0: read-only disk, bit 1:
//! EVENT_IDX acked), then the memory image. The device processes its queue once, on a
//! 16-sector disk image. Oracles: the bytes after the last whole sector (not part of the
//! capacity) never change, the file keeps its length, and a read-only disk is never
//! written.

use devices::virtio::block::{Block, SECTOR_SIZE};
use devices::virtio::{Interrupt, QueueContext, VirtioDevice, F_EVENT_IDX, F_VERSION_1};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::disk;
use crate::input::Input;
use crate::memory::{fill, guest_memory};
use crate::ring::QueueParams;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let p = QueueParams::read(&mut input);
    let flags = input.u8();
    let read_only = flags & 1 != 0;
    let mem = guest_memory();
    fill(&mem, input.rest());
    let cfg = disk::reset(read_only);
    let before = disk::contents();
    let mut dev = Block::open(&cfg, "fuzz-blk".into()).expect("open the disk image");
    assert_eq!(dev.capacity(), disk::SECTORS);
    let mut acked = F_VERSION_1;
    if flags & 2 != 0 {
        acked |= F_EVENT_IDX;
    }
    dev.set_acked_features(acked & dev.features());
    let q = p.queue(256, &mem);
    let mut queues = vec![q];
    let mut irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let mut generation = 0;
    let ctx = QueueContext {
        mem: &mem,
        queues: &mut queues,
        irq: &mut irq,
        config_generation: &mut generation,
    };
    let _ = dev.queue_event(ctx, 0);
    drop(dev);
    let after = disk::contents();
    assert_eq!(after.len(), before.len(), "the disk changed size");
    let capacity = (disk::SECTORS * SECTOR_SIZE) as usize;
    assert_eq!(
        after[capacity..],
        before[capacity..],
        "bytes past the capacity changed"
    );
    if read_only {
        assert!(after == before, "a read-only disk was written");
    }
}
