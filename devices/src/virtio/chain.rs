//! Walking a descriptor chain into a validated list.
//!
//! `virtio_queue::DescriptorChain` stops quietly at a loop (its TTL runs out), at a
//! `next` index outside the table, or at an unreadable descriptor. Here any of those is
//! an error: the chain is cut short while its last descriptor still says NEXT.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory};

use super::DeviceError;

/// One descriptor of a well-formed chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address of the buffer (not yet checked against guest memory).
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// Collects every descriptor of `chain`, or fails if the chain is empty or malformed
/// (loops, leaves the table, or cannot be read).
pub fn collect<M>(chain: DescriptorChain<M>) -> Result<Vec<Desc>, DeviceError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let mut out = Vec::new();
    let mut last: Option<SplitDescriptor> = None;
    for d in chain {
        out.push(Desc {
            addr: d.addr(),
            len: d.len(),
            writable: d.is_write_only(),
        });
        last = Some(d);
    }
    match last {
        None => Err(DeviceError::Protocol(format!(
            "descriptor chain {head} is empty or its head is outside the table"
        ))),
        Some(d) if d.has_next() => Err(DeviceError::Protocol(format!(
            "descriptor chain {head} loops, leaves the table or is unreadable after {} descriptors",
            out.len()
        ))),
        Some(_) => Ok(out),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::{Bytes, GuestMemoryMmap};

    /// Queue rings used by the tests: descriptors at 0x1000, avail at 0x2000, used at 0x3000.
    pub(crate) const DESC: u64 = 0x1000;
    pub(crate) const AVAIL: u64 = 0x2000;
    pub(crate) const USED: u64 = 0x3000;

    pub(crate) fn mem() -> GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// A ready queue of `size` over the test rings.
    pub(crate) fn queue(size: u16) -> Queue {
        let mut q = Queue::new(size).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `i` = (addr, len, flags, next).
    pub(crate) fn put_desc<M: Bytes<GuestAddress>>(
        m: &M,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) where
        M::E: std::fmt::Debug,
    {
        let at = DESC + u64::from(i) * 16;
        m.write_obj(addr, GuestAddress(at)).unwrap();
        m.write_obj(len, GuestAddress(at + 8)).unwrap();
        m.write_obj(flags, GuestAddress(at + 12)).unwrap();
        m.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Publishes `heads` in the avail ring (idx = heads.len()).
    pub(crate) fn publish<M: Bytes<GuestAddress>>(m: &M, heads: &[u16])
    where
        M::E: std::fmt::Debug,
    {
        for (i, h) in heads.iter().enumerate() {
            m.write_obj(*h, GuestAddress(AVAIL + 4 + 2 * i as u64))
                .unwrap();
        }
        m.write_obj(heads.len() as u16, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    pub(crate) const NEXT: u16 = 1;
    pub(crate) const WRITE: u16 = 2;

    #[test]
    fn good_chain_is_collected() {
        let m = mem();
        put_desc(&m, 0, 0x8000, 16, NEXT, 1);
        put_desc(&m, 1, 0x9000, 1, WRITE, 0);
        publish(&m, &[0]);
        let mut q = queue(8);
        let chain = q.iter(&m).unwrap().next().unwrap();
        let d = collect(chain).unwrap();
        assert_eq!(d.len(), 2);
        assert!(!d[0].writable && d[1].writable);
        assert_eq!(d[1].addr, GuestAddress(0x9000));
    }

    #[test]
    fn loop_is_rejected() {
        let m = mem();
        put_desc(&m, 0, 0x8000, 16, NEXT, 1);
        put_desc(&m, 1, 0x9000, 16, NEXT, 0);
        publish(&m, &[0]);
        let mut q = queue(8);
        let chain = q.iter(&m).unwrap().next().unwrap();
        assert!(matches!(collect(chain), Err(DeviceError::Protocol(_))));
    }

    #[test]
    fn next_outside_table_is_rejected() {
        let m = mem();
        put_desc(&m, 0, 0x8000, 16, NEXT, 200);
        publish(&m, &[0]);
        let mut q = queue(8);
        let chain = q.iter(&m).unwrap().next().unwrap();
        assert!(collect(chain).is_err());
    }

    #[test]
    fn head_outside_table_is_rejected() {
        let m = mem();
        publish(&m, &[9]);
        let mut q = queue(8);
        let chain = q.iter(&m).unwrap().next().unwrap();
        assert!(collect(chain).is_err());
    }
}
