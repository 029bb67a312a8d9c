//! Guest RAM: anonymous mappings with a dirty-page bitmap (so that every device write
//! into guest memory is tracked for live migration), registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::ram_ranges;

/// Guest memory as wisp uses it everywhere.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Errors creating or registering guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// mmap failed (usually: not enough address space or memory).
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Allocate {
        /// Requested size.
        mib: u64,
        /// Cause.
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("KVM refused guest memory slot {slot}: {source}")]
    Register {
        /// Slot number.
        slot: u32,
        /// Cause.
        source: kvm_ioctls::Error,
    },
}

/// Allocates `size` bytes of guest RAM laid out around the 32-bit MMIO gap.
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        mib: size >> 20,
        source,
    })
}

/// Registers every region of `mem` as a KVM memory slot.
pub fn register(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host =
            mem.get_host_address(region.start_addr())
                .map_err(|_| MemoryError::Register {
                    slot,
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` points to a live mapping of `region.len()` bytes owned by `mem`,
        // which callers keep alive for as long as the VM exists (`Vm` drops its memory
        // after the VM fd; the timing guest declares its memory before its VM). No other
        // slot overlaps: regions come from non-overlapping ranges.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn layout_and_dirty_tracking() {
        let mem = create(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xabu8, GuestAddress(0x5000)).unwrap();
        let region = mem.find_region(GuestAddress(0x5000)).unwrap();
        assert!(region.bitmap().dirty_at(0x5000));
        assert!(!region.bitmap().dirty_at(0x9000));
    }
}
