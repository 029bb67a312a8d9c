//! `chain`: descriptor-chain walking (`devices::virtio::chain::collect`).
//!
//! Input: queue parameters (4 bytes, [`QueueParams`]), then the memory image (rings at
//! the queue's base, descriptors, buffers). Every available chain is collected and put
//! in the used ring, as a device does. Oracle: for chains without indirect descriptors,
//! the result must equal an independent walk of the descriptor table by the virtio
//! rules (a chain is good when it ends without NEXT within the table, within the queue
//! size's descriptors and 4 GiB of buffers).

use devices::virtio::chain::{self, Desc};
use devices::virtio::{GuestMemory, QUEUE_MAX_SIZE};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::input::Input;
use crate::memory::{fill, guest_memory};
use crate::ring::{layout, QueueParams, INDIRECT, NEXT, WRITE};

/// The reference walk: `None` if the chain has an indirect descriptor (not modelled),
/// else `Some(Ok(descriptors))` for a good chain and `Some(Err(()))` for a bad one.
fn reference(mem: &GuestMemory, table: u64, size: u16, head: u16) -> Option<Result<Vec<Desc>, ()>> {
    let mut out = Vec::new();
    let (mut index, mut ttl, mut bytes) = (head, size, 0u32);
    loop {
        if ttl == 0 || index >= size {
            return Some(Err(()));
        }
        let Ok(raw) = mem.read_obj::<[u8; 16]>(GuestAddress(table + 16 * u64::from(index))) else {
            return Some(Err(()));
        };
        let addr = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        if flags & INDIRECT != 0 {
            return None;
        }
        let Some(total) = bytes.checked_add(len) else {
            return Some(Err(()));
        };
        bytes = total;
        out.push(Desc {
            addr: GuestAddress(addr),
            len,
            writable: flags & WRITE != 0,
        });
        if flags & NEXT == 0 {
            return Some(Ok(out));
        }
        index = next;
        ttl -= 1;
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let p = QueueParams::read(&mut input);
    let mem = guest_memory();
    fill(&mem, input.rest());
    let mut q = p.queue(QUEUE_MAX_SIZE, &mem);
    if !q.ready() {
        return;
    }
    let (table, _, _) = layout(q.size(), p.base);
    for _ in 0..q.size() {
        let Ok(mut avail) = q.iter(&mem) else {
            return;
        };
        let Some(c) = avail.next() else {
            return;
        };
        let head = c.head_index();
        let got = chain::collect(c);
        if let Some(want) = reference(&mem, table, q.size(), head) {
            match (&got, &want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "chain {head}"),
                (Err(_), Err(())) => {}
                _ => panic!("chain {head}: collect gave {got:?}, the reference {want:?}"),
            }
        }
        let Ok(descs) = got else {
            // A protocol error: the device stops until the driver resets it.
            return;
        };
        let len = descs
            .iter()
            .filter(|d| d.writable)
            .map(|d| d.len)
            .sum::<u32>()
            & 0xff;
        if q.add_used(&mem, head, len).is_err() {
            return;
        }
    }
    let _ = q.needs_notification(&mem);
    let _ = q.enable_notification(&mem);
}
