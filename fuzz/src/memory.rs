//! The guest memory every device target runs against: the fuzzer writes its contents.
//!
//! Three regions, as `GuestMemoryMmap<AtomicBitmap>` like wisp's own: two adjacent ones
//! (a buffer may cross from one into the other) and one after a hole (as RAM above the
//! MMIO gap is), so addresses in the hole and past the end are outside guest memory.
//! The mapping is made once per process; [`fill`] zeroes it and copies an input in
//! before every run, so runs do not see each other's writes.

use std::sync::OnceLock;

use devices::virtio::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

/// (start, length) of each region.
pub const REGIONS: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x8000), (0x2_0000, 0x1000)];
/// Bytes of an input [`fill`] copies, from guest address 0 (the two adjacent regions).
pub const IMAGE_MAX: usize = 0x1_0000;

static ZERO: [u8; 0x8000] = [0; 0x8000];

/// The process's guest memory (a cheap clone: the regions are shared).
pub fn guest_memory() -> GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| {
        let ranges: Vec<(GuestAddress, usize)> = REGIONS
            .iter()
            .map(|&(start, len)| (GuestAddress(start), len))
            .collect();
        GuestMemory::from_ranges(&ranges).expect("map the fuzz guest memory")
    })
    .clone()
}

/// Zeroes guest memory and writes `image` from address 0 (at most [`IMAGE_MAX`] bytes).
pub fn fill(mem: &GuestMemory, image: &[u8]) {
    for (start, len) in REGIONS {
        mem.write_slice(&ZERO[..len], GuestAddress(start))
            .expect("zero a region");
    }
    let image = &image[..image.len().min(IMAGE_MAX)];
    mem.write_slice(image, GuestAddress(0))
        .expect("the image fits the adjacent regions");
}
