//! A split virtqueue laid out from a base address the input picks (usually 0, so the
//! first bytes of a fuzzer's memory image are the rings): the available ring first
//! (flags, idx, then the heads), the used ring after it, then the descriptor table
//! (16-byte aligned). Data buffers are wherever the descriptors point. Queues of one
//! device may overlap, as a hostile driver's may.

use crate::input::Input;
use virtio_queue::{Queue, QueueT};

/// Where the rings of a queue of `size` entries from `base` are: (descriptor table,
/// available ring, used ring).
pub fn layout(size: u16, base: u64) -> (u64, u64, u64) {
    let size = u64::from(size);
    let avail = base;
    let used = (avail + 6 + 2 * size).next_multiple_of(4);
    let desc = (used + 6 + 8 * size).next_multiple_of(16);
    (desc, avail, used)
}

/// Queue parameters read from an input: 4 bytes.
#[derive(Clone, Copy, Debug)]
pub struct QueueParams {
    /// Queue size, a power of two from 1 to 256.
    pub size: u16,
    /// Where its rings start: a multiple of 256 below 64 KiB.
    pub base: u64,
    /// VIRTIO_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// Where the device's next available and next used indices start (ring wrap).
    pub start: u16,
}

impl QueueParams {
    /// Decodes the parameters.
    pub fn read(input: &mut Input) -> Self {
        let b = input.u8();
        Self {
            size: 1 << ((b & 0xf) % 9),
            base: u64::from(input.u8()) << 8,
            event_idx: b & 0x80 != 0,
            start: input.u16(),
        }
    }

    /// Encodes them (seeds).
    pub fn encode(&self, out: &mut crate::input::Writer) {
        let log2 = self.size.trailing_zeros() as u8;
        out.u8(log2 | if self.event_idx { 0x80 } else { 0 })
            .u8((self.base >> 8) as u8)
            .u16(self.start);
    }

    /// The queue over the rings of [`layout`], as a driver would have set it up. It
    /// is ready only if its rings lie in `mem`, as the transport checks at QueueReady.
    pub fn queue(&self, max: u16, mem: &devices::virtio::GuestMemory) -> Queue {
        let size = self.size.min(max);
        let (desc, avail, used) = layout(size, self.base);
        let mut q = Queue::new(max).expect("a valid maximum size");
        q.set_size(size);
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_event_idx(self.event_idx);
        q.set_next_avail(self.start);
        q.set_next_used(self.start);
        q.set_ready(true);
        if devices::virtio::rings_in_memory(&q, mem).is_err() {
            q.set_ready(false);
        }
        q
    }
}

/// One descriptor: address, length, flags, next.
pub type Desc = (u64, u32, u16, u16);

/// Writes descriptor `i` of the queue `p` into `image` (seeds).
pub fn put_desc(image: &mut Vec<u8>, p: &QueueParams, i: u16, d: Desc) {
    let (addr, len, flags, next) = d;
    let (desc, _, _) = layout(p.size, p.base);
    let at = (desc + 16 * u64::from(i)) as usize;
    let mut d = Vec::with_capacity(16);
    d.extend_from_slice(&addr.to_le_bytes());
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&next.to_le_bytes());
    put(image, at, &d);
}

/// Publishes `heads` in the available ring of `p` from its start position (seeds).
pub fn publish(image: &mut Vec<u8>, p: &QueueParams, heads: &[u16]) {
    let (_, avail, _) = layout(p.size, p.base);
    let start = p.start;
    for (k, h) in heads.iter().enumerate() {
        let slot = (usize::from(start) + k) % usize::from(p.size);
        put(image, avail as usize + 4 + 2 * slot, &h.to_le_bytes());
    }
    let idx = start.wrapping_add(heads.len() as u16);
    put(image, avail as usize + 2, &idx.to_le_bytes());
}

/// Writes `bytes` at `at` in `image`, growing it as needed (seeds).
pub fn put(image: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    if image.len() < at + bytes.len() {
        image.resize(at + bytes.len(), 0);
    }
    image[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Descriptor flags.
pub const NEXT: u16 = 1;
/// Device-writable.
pub const WRITE: u16 = 2;
/// An indirect table.
pub const INDIRECT: u16 = 4;
