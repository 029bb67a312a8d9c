//! Seeds of the device targets: a driver's well-formed requests.

use crate::input::Writer;
use crate::ring::{layout, publish, put, put_desc, QueueParams, INDIRECT, NEXT, WRITE};
use crate::targets::mmio::opcode;

type Seeds = Vec<(&'static str, Vec<u8>)>;

const fn params(size: u16, base: u64, start: u16, event_idx: bool) -> QueueParams {
    QueueParams {
        size,
        base,
        event_idx,
        start,
    }
}

/// Chains: good ones, an indirect table, a ring that wraps, a loop.
pub fn chain() -> Seeds {
    let mut out = Vec::new();
    let p = params(8, 0, 0, false);
    let mut image = Vec::new();
    put_desc(&mut image, &p, 0, (0x400, 16, NEXT, 1));
    put_desc(&mut image, &p, 1, (0x800, 512, NEXT | WRITE, 2));
    put_desc(&mut image, &p, 2, (0xa00, 1, WRITE, 0));
    put_desc(&mut image, &p, 3, (0xc00, 64, 0, 0));
    publish(&mut image, &p, &[0, 3]);
    out.push(("two-chains", with_params(&p, &[], &image)));

    let p = params(4, 0, 0xfffe, true);
    let mut image = Vec::new();
    for i in 0..3 {
        put_desc(
            &mut image,
            &p,
            i,
            (0x400 + 0x100 * u64::from(i), 32, WRITE, 0),
        );
    }
    publish(&mut image, &p, &[2, 0, 1]);
    out.push(("wrapping-ring", with_params(&p, &[], &image)));

    let p = params(8, 0, 0, false);
    let mut image = Vec::new();
    put_desc(&mut image, &p, 0, (0x400, 48, INDIRECT, 0));
    // The indirect table: three descriptors chained by index within it.
    put(&mut image, 0x400, &desc(0x800, 16, NEXT, 1));
    put(&mut image, 0x410, &desc(0x900, 256, NEXT | WRITE, 2));
    put(&mut image, 0x420, &desc(0xa00, 1, WRITE, 0));
    publish(&mut image, &p, &[0]);
    out.push(("indirect", with_params(&p, &[], &image)));

    let p = params(8, 0x100, 0, false);
    let mut image = vec![0; 0x100];
    put_desc(&mut image, &p, 0, (0x400, 16, NEXT, 1));
    put_desc(&mut image, &p, 1, (0x800, 16, NEXT, 0));
    publish(&mut image, &p, &[0]);
    out.push(("loop", with_params(&p, &[], &image)));
    out
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(addr).u32(len).u16(flags).u16(next);
    w.0
}

fn with_params(p: &QueueParams, extra: &[u8], image: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    p.encode(&mut w);
    w.bytes(extra).bytes(image);
    w.0
}

/// A virtio-blk request header.
fn blk_header(kind: u32, sector: u64) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(kind).u32(0).u64(sector);
    w.0
}

/// Requests for a queue `p`: read, write (two buffers), flush, get-id.
fn blk_requests(p: &QueueParams, image: &mut Vec<u8>) {
    put(image, 0x300, &blk_header(0, 1));
    put_desc(image, p, 0, (0x300, 16, NEXT, 1));
    put_desc(image, p, 1, (0x1000, 512, NEXT | WRITE, 2));
    put_desc(image, p, 2, (0x310, 1, WRITE, 0));
    put(image, 0x320, &blk_header(1, 2));
    put_desc(image, p, 3, (0x320, 16, NEXT, 4));
    put_desc(image, p, 4, (0x2000, 512, NEXT, 5));
    put_desc(image, p, 5, (0x2200, 512, NEXT, 6));
    put_desc(image, p, 6, (0x330, 1, WRITE, 0));
    put(image, 0x340, &blk_header(4, 0));
    put_desc(image, p, 7, (0x340, 16, NEXT, 8));
    put_desc(image, p, 8, (0x350, 1, WRITE, 0));
    put(image, 0x360, &blk_header(8, 0));
    put_desc(image, p, 9, (0x360, 16, NEXT, 10));
    put_desc(image, p, 10, (0x380, 20, NEXT | WRITE, 11));
    put_desc(image, p, 11, (0x3a0, 1, WRITE, 0));
    publish(image, p, &[0, 3, 7, 9]);
}

/// virtio-blk: the four request kinds, on a writable and a read-only disk, with and
/// without EVENT_IDX.
pub fn block() -> Seeds {
    let mut out = Vec::new();
    for (name, flags, event_idx) in [("requests", 0u8, false), ("read-only-event-idx", 3, true)] {
        let p = params(16, 0, 0, event_idx);
        let mut image = Vec::new();
        blk_requests(&p, &mut image);
        out.push((name, with_params(&p, &[flags], &image)));
    }
    out
}

const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const F_CTRL_VQ: u64 = 1 << 17;
const F_GUEST_ANNOUNCE: u64 = 1 << 21;
const F_EVENT_IDX: u64 = 1 << 29;

/// Events of the net target (see `targets::net`).
mod ev {
    pub const RX: u8 = 0;
    pub const TX: u8 = 1;
    pub const CTRL: u8 = 2;
    pub const BACKEND_IN: u8 = 4 | 0x10;
    pub const BACKEND_OUT: u8 = 4 | 0x20;
    pub const SNAPSHOT: u8 = 5;
    pub const RESTORED: u8 = 6;
}

/// One frame from the scripted backend: `len` bytes after the header.
fn frame(len: u16) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(4).u16(len).u8(0xab).bytes(&[0; 12]);
    w.0
}

struct NetSeed {
    features: u64,
    script: Vec<u8>,
    events: Vec<u8>,
}

/// Queues of the net seeds: RX at 0, TX at 0x100, control at 0x200, 8 entries each.
const NET_QUEUES: [QueueParams; 3] = [
    params(8, 0, 0, false),
    params(8, 0x100, 0, false),
    params(8, 0x200, 0, false),
];

fn net_input(s: &NetSeed, image: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    for p in &NET_QUEUES {
        p.encode(&mut w);
    }
    w.u64(s.features)
        .u8(0)
        .u16(s.script.len() as u16)
        .bytes(&s.script);
    w.u8(s.events.len() as u8).bytes(&s.events).bytes(image);
    w.0
}

/// virtio-net: TX, RX with and without merged buffers, a full backend, a lost and
/// regained connection, the control queue's announce acknowledgement.
pub fn net() -> Seeds {
    let [rx, tx, ctrl] = &NET_QUEUES;
    let base = F_MAC | F_STATUS;
    let mut out = Vec::new();

    let mut image = Vec::new();
    put_desc(&mut image, tx, 0, (0x400, 12, NEXT, 1));
    put_desc(&mut image, tx, 1, (0x410, 60, 0, 0));
    put(&mut image, 0x410, &[0xff; 12]);
    publish(&mut image, tx, &[0]);
    let s = NetSeed {
        features: base,
        script: vec![4],
        events: vec![ev::TX],
    };
    out.push(("tx", net_input(&s, &image)));
    // The backend is full once, then writable.
    let s = NetSeed {
        features: base | F_EVENT_IDX,
        script: vec![0, 4, 4],
        events: vec![ev::TX, ev::BACKEND_OUT],
    };
    out.push(("tx-blocked", net_input(&s, &image)));
    // The connection dies on a write; a reconnection is asked for and comes.
    let s = NetSeed {
        features: base,
        script: vec![2, 1, 2, 4],
        events: vec![ev::TX, ev::TX, ev::SNAPSHOT],
    };
    out.push(("tx-reconnect", net_input(&s, &image)));

    let mut image = Vec::new();
    for i in 0..2u16 {
        put_desc(
            &mut image,
            rx,
            i,
            (0x1000 + 0x800 * u64::from(i), 1526, WRITE, 0),
        );
    }
    publish(&mut image, rx, &[0, 1]);
    let mut script = frame(60);
    script.extend(frame(1000));
    script.push(0);
    let s = NetSeed {
        features: base,
        script,
        events: vec![ev::RX, ev::BACKEND_IN, ev::SNAPSHOT],
    };
    out.push(("rx", net_input(&s, &image)));

    let mut image = Vec::new();
    for i in 0..6u16 {
        put_desc(
            &mut image,
            rx,
            i,
            (0x1000 + 0x100 * u64::from(i), 256, WRITE, 0),
        );
    }
    publish(&mut image, rx, &[0, 1, 2, 3, 4, 5]);
    let mut script = frame(600);
    script.push(0);
    let s = NetSeed {
        features: base | F_MRG_RXBUF,
        script,
        events: vec![ev::BACKEND_IN, ev::SNAPSHOT],
    };
    out.push(("rx-merged", net_input(&s, &image)));

    let mut image = Vec::new();
    // VIRTIO_NET_CTRL_ANNOUNCE (3), VIRTIO_NET_CTRL_ANNOUNCE_ACK (0).
    put(&mut image, 0x400, &[3, 0]);
    put_desc(&mut image, ctrl, 0, (0x400, 2, NEXT, 1));
    put_desc(&mut image, ctrl, 1, (0x410, 1, WRITE, 0));
    publish(&mut image, ctrl, &[0]);
    let s = NetSeed {
        features: base | F_CTRL_VQ | F_GUEST_ANNOUNCE,
        script: vec![],
        events: vec![ev::RESTORED, ev::SNAPSHOT, ev::CTRL, ev::SNAPSHOT],
    };
    out.push(("ctrl-announce", net_input(&s, &image)));
    out
}

/// An mmio-target program.
#[derive(Default)]
struct Program(Writer);

impl Program {
    fn reg(&mut self, offset: u64, v: u32) -> &mut Self {
        self.0.u8(opcode::WRITE).u8((offset / 4) as u8).u32(v);
        self
    }

    fn read(&mut self, offset: u64) -> &mut Self {
        self.0.u8(opcode::READ).u8((offset / 4) as u8);
        self
    }

    fn memory(&mut self, addr: u16, bytes: &[u8]) -> &mut Self {
        for (i, chunk) in bytes.chunks(255).enumerate() {
            let at = addr + (i * 255) as u16;
            self.0
                .u8(opcode::MEMORY)
                .u16(at)
                .u8(chunk.len() as u8)
                .bytes(chunk);
        }
        self
    }

    /// A driver's initialisation up to DRIVER_OK with queue 0 of `size` at the rings
    /// of `ring::layout(size, 0)`.
    fn init(&mut self, size: u16) -> &mut Self {
        let (desc, avail, used) = layout(size, 0);
        self.read(0).read(4).read(8);
        self.reg(0x70, 1).reg(0x70, 3);
        self.reg(0x14, 0).read(0x10).reg(0x14, 1).read(0x10);
        self.reg(0x24, 0)
            .reg(0x20, 1 << 29)
            .reg(0x24, 1)
            .reg(0x20, 1);
        self.reg(0x70, 0xb).read(0x70);
        self.reg(0x30, 0).read(0x34).reg(0x38, u32::from(size));
        for (off, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
            self.reg(off, addr as u32).reg(off + 4, (addr >> 32) as u32);
        }
        self.reg(0x44, 1).read(0x44).reg(0x70, 0xf)
    }

    fn op(&mut self, code: u8) -> &mut Self {
        self.0.u8(code);
        self
    }
}

/// The transport: a driver's probe and requests, a snapshot, a reset; a rejected queue.
pub fn mmio() -> Seeds {
    let mut out = Vec::new();
    let p = params(16, 0, 0, false);
    let mut image = Vec::new();
    blk_requests(&p, &mut image);
    let mut prog = Program::default();
    prog.0.u8(0);
    prog.init(16).memory(0, &image).op(opcode::QUEUE);
    prog.read(0x60)
        .reg(0x64, 1)
        .op(opcode::SNAPSHOT)
        .op(opcode::CONFIG)
        .0
        .u8(0);
    prog.reg(0x70, 0).read(0x70);
    out.push(("probe-requests-reset", prog.0 .0));

    let mut prog = Program::default();
    prog.0.u8(1);
    prog.init(3)
        .read(0x70)
        .op(opcode::SNAPSHOT)
        .reg(0x70, 0)
        .init(8);
    // A 2-byte config read and a 1-byte register write.
    prog.0.u8(opcode::ODD | 0x10).u16(0x108);
    prog.0.u8(opcode::ODD | 0x08).u16(0x70).u8(0);
    prog.op(opcode::SNAPSHOT);
    out.push(("bad-queue-then-read-only", prog.0 .0));
    out
}
