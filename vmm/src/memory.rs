//! Guest RAM: anonymous mappings with a dirty-page bitmap (so that every device write
//! into guest memory is tracked for live migration), registered with KVM.
//!
//! For a migration, KVM also logs the pages vCPUs (and KVM itself) write
//! (`KVM_MEM_LOG_DIRTY_PAGES`); [`dirty_log`] ORs the two: a page missing from either
//! would be a page the destination never gets.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{GuestRegionMmap, MmapRegion};
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
    /// KVM_GET_DIRTY_LOG failed.
    #[error("cannot read KVM's dirty log of memory slot {slot}: {source}")]
    DirtyLog {
        /// Slot number.
        slot: u32,
        /// Cause.
        source: kvm_ioctls::Error,
    },
}

/// Pages written, one bit per 4 KiB page (bit `i % 64` of word `i / 64` is page `i`),
/// one bitmap per region in guest-address order.
pub type DirtyBitmap = Vec<Vec<u64>>;

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
    set_slots(vm, mem, 0)
}

/// Turns KVM's dirty-page logging on or off for every slot of `mem` (registered by
/// [`register`]). Turning it on starts from a clean log.
pub fn set_dirty_logging(vm: &VmFd, mem: &GuestMemory, on: bool) -> Result<(), MemoryError> {
    set_slots(vm, mem, if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
}

fn set_slots(vm: &VmFd, mem: &GuestMemory, flags: u32) -> Result<(), MemoryError> {
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
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` points to a live mapping of `region.len()` bytes owned by `mem`,
        // which callers keep alive for as long as the VM exists (`Vm` drops its memory
        // after the VM fd; the timing guest declares its memory before its VM). No other
        // slot overlaps: regions come from non-overlapping ranges. Re-registering a slot
        // with the same range only changes its flags.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

/// The pages written since the previous call (or since logging was turned on): KVM's
/// log (writes by vCPUs and by KVM itself) OR'ed with vm-memory's bitmap (writes by
/// wisp's devices). Both are reset, so a page written after its bit was taken shows up
/// in the next call.
pub fn dirty_log(vm: &VmFd, mem: &GuestMemory) -> Result<DirtyBitmap, MemoryError> {
    mem.iter()
        .enumerate()
        .map(|(slot, region)| {
            let slot = slot as u32;
            let len = region.len() as usize;
            let mut bits = vm
                .get_dirty_log(slot, len)
                .map_err(|source| MemoryError::DirtyLog { slot, source })?;
            let devices = device_bitmap(region).get_and_reset();
            for (word, dev) in bits.iter_mut().zip(devices) {
                *word |= dev;
            }
            Ok(bits)
        })
        .collect()
}

/// Forgets what vm-memory's bitmap recorded so far (device writes before a migration
/// starts).
pub fn reset_device_bitmap(mem: &GuestMemory) {
    for region in mem.iter() {
        device_bitmap(region).reset();
    }
}

/// The whole-region bitmap of `region` (the trait's `bitmap()` gives a slice view).
fn device_bitmap(region: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let mapping: &MmapRegion<AtomicBitmap> = region;
    mapping.bitmap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestMemoryBackend};

    /// A guest that writes one byte at 2 MiB and one at 3 MiB + 0x123 in long mode,
    /// then leaves through port 0x80: both pages are in the dirty log, and a device
    /// write (through vm-memory) is too; the next read of the log is empty of them.
    #[test]
    fn vcpu_and_device_writes_are_both_in_the_dirty_log() {
        use crate::arch::regs::{boot_regs, setup_sregs, EntryPoint};
        use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
        use kvm_ioctls::VcpuExit;
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let mem = create(16 << 20).unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(crate::arch::layout::KVM_TSS_ADDRESS as usize)
            .unwrap();
        register(&vm, &mem).unwrap();
        let code: Vec<u8> = [
            &[0xc6, 0x04, 0x25][..],
            &0x20_0000u32.to_le_bytes(),
            &[0x01, 0xc6, 0x04, 0x25],
            &0x30_0123u32.to_le_bytes(),
            &[0x02, 0xe6, 0x80, 0xf4],
        ]
        .concat();
        mem.write_slice(&code, GuestAddress(0x1_0000)).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap())
            .unwrap();
        let entry = EntryPoint::Linux64(0x1_0000);
        let mut sregs = vcpu.get_sregs().unwrap();
        setup_sregs(&mem, entry, &mut sregs).unwrap();
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&boot_regs(entry)).unwrap();
        set_dirty_logging(&vm, &mem, true).unwrap();
        reset_device_bitmap(&mem);
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(0x80, _) => {}
            other => panic!("guest: {other:?}"),
        }
        mem.write_obj(7u8, GuestAddress(0x40_0000)).unwrap();
        let is_set = |log: &DirtyBitmap, page: usize| log[0][page / 64] & (1 << (page % 64)) != 0;
        let log = dirty_log(&vm, &mem).unwrap();
        assert!(is_set(&log, 0x200), "vCPU write at 2 MiB");
        assert!(is_set(&log, 0x300), "vCPU write at 3 MiB");
        assert!(is_set(&log, 0x400), "device write at 4 MiB");
        assert!(!is_set(&log, 0x500), "untouched page");
        let again = dirty_log(&vm, &mem).unwrap();
        for page in [0x200, 0x300, 0x400] {
            assert!(!is_set(&again, page), "page {page:#x} reset");
        }
    }

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
