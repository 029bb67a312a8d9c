//! `mmio`: the virtio-mmio transport (`devices::virtio::mmio::MmioTransport`) with a
//! virtio-blk device behind it, driven through its registers as a guest driver would.
//!
//! Input: a flags byte (bit 0: read-only disk), then operations, each an opcode byte
//! whose low three bits pick it (see [`op`]); guest memory starts zeroed and the
//! operations write it. Oracle: at any point, the transport's saved state survives JSON
//! (as in a snapshot) and restores into a fresh transport, which then saves the same.

use devices::virtio::block::Block;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::persist::TransportState;
use devices::virtio::GuestMemory;
use devices::BusDevice;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::disk;
use crate::input::Input;
use crate::memory::{fill, guest_memory};

/// Largest number of operations in one run.
const MAX_OPS: usize = 256;
/// Snapshots taken in one run at most (each builds a transport: they are slow).
const MAX_SNAPSHOTS: usize = 2;

/// Operation codes (the low three bits of the opcode byte).
pub mod opcode {
    /// Register write: offset byte (times 4, below 0x100), u32 value.
    pub const WRITE: u8 = 0;
    /// Register read: offset byte (times 4).
    pub const READ: u8 = 1;
    /// Access of another width (bits 4-6 of the opcode, plus one; bit 3: a write)
    /// anywhere in the window, configuration space included: u16 offset, data.
    pub const ODD: u8 = 2;
    /// Guest memory write: u16 address, u8 length, bytes.
    pub const MEMORY: u8 = 3;
    /// The eventfd of queue (opcode >> 4) fired: the event loop processes it.
    pub const QUEUE: u8 = 4;
    /// The backend reported events: u8 epoll mask.
    pub const BACKEND: u8 = 5;
    /// Save the state, through JSON, and restore it into a fresh transport.
    pub const SNAPSHOT: u8 = 6;
    /// Configuration space read: u8 offset, 8 bytes.
    pub const CONFIG: u8 = 7;
}

fn transport(mem: &GuestMemory, read_only: bool, locked: bool) -> MmioTransport {
    let cfg = disk::config(read_only);
    let dev = if locked {
        Block::open(&cfg, "fuzz-blk".into())
    } else {
        Block::open_unlocked(&cfg, "fuzz-blk".into())
    }
    .expect("open the disk image");
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    MmioTransport::new(Box::new(dev), mem.clone(), irq).expect("a transport")
}

fn snapshot(t: &MmioTransport, mem: &GuestMemory, read_only: bool) {
    let state = t.save();
    let json = serde_json::to_vec(&state).expect("encode a transport state");
    let back: TransportState = serde_json::from_slice(&json).expect("decode it");
    assert_eq!(back, state, "JSON changed the state");
    let mut fresh = transport(mem, read_only, false);
    fresh
        .restore(&back)
        .unwrap_or_else(|e| panic!("a saved state does not restore: {e}\n{state:?}"));
    assert_eq!(
        fresh.save(),
        state,
        "the restored transport saves another state"
    );
}

struct Run<'a, 'i> {
    input: &'a mut Input<'i>,
    read_only: bool,
    snapshots: usize,
}

fn op(t: &mut MmioTransport, mem: &GuestMemory, run: &mut Run) {
    let Run {
        input, read_only, ..
    } = run;
    let read_only = *read_only;
    let code = input.u8();
    match code & 7 {
        opcode::WRITE => {
            let off = u64::from(input.u8() & 0x3f) * 4;
            t.write(0, off, &input.u32().to_le_bytes());
        }
        opcode::READ => {
            let mut b = [0u8; 4];
            t.read(0, u64::from(input.u8() & 0x3f) * 4, &mut b);
        }
        opcode::ODD => {
            let off = u64::from(input.u16() % 0x1000);
            let len = usize::from((code >> 4) & 7) + 1;
            if code & 8 != 0 {
                let mut b = [0u8; 8];
                let src = input.bytes(len);
                b[..src.len()].copy_from_slice(src);
                t.write(0, off, &b[..len]);
            } else {
                let mut b = [0u8; 8];
                t.read(0, off, &mut b[..len]);
            }
        }
        opcode::MEMORY => {
            let addr = u64::from(input.u16());
            let len = usize::from(input.u8());
            // Writes that leave guest memory fail, as a guest's cannot happen.
            let _ = mem.write_slice(input.bytes(len), GuestAddress(addr));
        }
        opcode::QUEUE => t.queue_event(usize::from(code >> 4)),
        opcode::BACKEND => t.backend_event(u32::from(input.u8())),
        opcode::SNAPSHOT if run.snapshots < MAX_SNAPSHOTS => {
            run.snapshots += 1;
            snapshot(t, mem, read_only);
        }
        opcode::SNAPSHOT => {}
        _ => {
            let mut b = [0u8; 8];
            t.read(0, 0x100 + u64::from(input.u8()), &mut b);
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let read_only = input.u8() & 1 != 0;
    let mem = guest_memory();
    fill(&mem, &[]);
    disk::reset(read_only);
    let mut t = transport(&mem, read_only, true);
    let mut run = Run {
        input: &mut input,
        read_only,
        snapshots: 0,
    };
    for _ in 0..MAX_OPS {
        if run.input.is_empty() {
            break;
        }
        op(&mut t, &mem, &mut run);
    }
}
