use std::io::Write;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::virtio::chain::tests::{mem, publish, put_desc, queue, NEXT, USED, WRITE};
use crate::virtio::{GuestMemory, Interrupt};

const HDR: u64 = 0x8000;
const STATUS: u64 = 0x9000;
const DATA: u64 = 0x1_0000;

struct Rig {
    mem: GuestMemory,
    queues: Vec<virtio_queue::Queue>,
    irq: Interrupt,
    generation: u32,
    dev: Block,
    heads: Vec<u16>,
    _file: tempfile_path::TempFile,
}

/// A minimal self-deleting temp file (no extra crates).
pub(crate) mod tempfile_path {
    /// Deletes the file when dropped.
    pub(crate) struct TempFile(pub std::path::PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// A temporary image of `sectors` sectors (sector `i` filled with byte `i`) and the
/// configuration to open it.
pub(crate) fn image(sectors: u64, read_only: bool) -> (BlockConfig, tempfile_path::TempFile) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("wisp-blk-{}-{n}.img", std::process::id()));
    let mut f = std::fs::File::create(&path).unwrap();
    let content: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
    f.write_all(&content).unwrap();
    let cfg = BlockConfig {
        path: path.clone(),
        read_only,
        id: "disk-id-0123456789abcdef".into(),
    };
    (cfg, tempfile_path::TempFile(path))
}

fn rig(sectors: u64, read_only: bool) -> Rig {
    let (cfg, file) = image(sectors, read_only);
    let dev = Block::open(&cfg, "test".into()).unwrap();
    Rig {
        mem: mem(),
        queues: vec![queue(16)],
        irq: Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        generation: 0,
        dev,
        heads: Vec::new(),
        _file: file,
    }
}

impl Rig {
    /// Submits header(kind, sector) + `data` descriptors + status; returns (status, used len).
    fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        let m = &self.mem;
        m.write_obj(kind, GuestAddress(HDR)).unwrap();
        m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        put_desc(m, 0, HDR, 16, NEXT, 1);
        for (i, &(addr, len, w)) in data.iter().enumerate() {
            let flags = NEXT | if w { WRITE } else { 0 };
            put_desc(m, i as u16 + 1, addr, len, flags, i as u16 + 2);
        }
        put_desc(m, data.len() as u16 + 1, STATUS, 1, WRITE, 0);
        self.heads.push(0);
        publish(m, &self.heads);
        let ctx = QueueContext {
            mem: &self.mem,
            queues: &mut self.queues,
            irq: &mut self.irq,
            config_generation: &mut self.generation,
        };
        self.dev.queue_event(ctx, 0).unwrap();
        let slot = (self.heads.len() - 1) as u64;
        let used_len: u32 = m.read_obj(GuestAddress(USED + 4 + 8 * slot + 4)).unwrap();
        (m.read_obj(GuestAddress(STATUS)).unwrap(), used_len)
    }
}

#[test]
fn read_write_flush_and_get_id() {
    let mut r = rig(16, false);
    assert_eq!(r.dev.capacity(), 16);
    // Read sectors 2..4 into two buffers.
    let (st, len) = r.request(0, 2, &[(DATA, 512, true), (DATA + 0x1000, 512, true)]);
    assert_eq!((st, len), (0, 1025));
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 2);
    assert_eq!(
        r.mem
            .read_obj::<u8>(GuestAddress(DATA + 0x1000 + 511))
            .unwrap(),
        3
    );
    // Write sector 5 from a pattern, read it back.
    r.mem
        .write_slice(&[0x5a; 512], GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(r.request(1, 5, &[(DATA + 0x2000, 512, false)]), (0, 1));
    assert_eq!(r.request(4, 0, &[]).0, 0, "flush");
    let (st, _) = r.request(0, 5, &[(DATA + 0x3000, 512, true)]);
    assert_eq!(st, 0);
    let mut back = [0u8; 512];
    r.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x3000))
        .unwrap();
    assert_eq!(back, [0x5a; 512]);
    // GET_ID: 20 bytes of the id.
    let (st, len) = r.request(8, 0, &[(DATA + 0x4000, 20, true)]);
    assert_eq!((st, len), (0, 21));
    let mut id = [0u8; 20];
    r.mem
        .read_slice(&mut id, GuestAddress(DATA + 0x4000))
        .unwrap();
    assert_eq!(&id, b"disk-id-0123456789ab");
    // Unknown request type.
    assert_eq!(r.request(99, 0, &[]).0, 2, "UNSUPP");
}

#[test]
fn bad_requests_get_ioerr() {
    let mut r = rig(16, false);
    type Case<'a> = (u32, u64, &'a [(u64, u32, bool)]);
    let cases: &[Case] = &[
        (0, 16, &[(DATA, 512, true)]),               // past the end
        (0, 15, &[(DATA, 1024, true)]),              // runs past the end
        (0, u64::MAX / 256, &[(DATA, 512, true)]),   // sector * 512 overflows
        (0, 0, &[(DATA, 100, true)]),                // not a multiple of 512
        (0, 0, &[(DATA, 0, true)]),                  // zero length
        (0, 0, &[(0x10_0000_0000_0000, 512, true)]), // outside guest memory
        (0, 0, &[(0xf_f000, 0x2000, true)]),         // straddles the end of memory
        (0, 0, &[(DATA, 512, false)]),               // read into a read-only buffer
        (1, 0, &[(DATA, 512, true)]),                // write from a writable buffer
        (8, 0, &[]),                                 // GET_ID without a buffer
    ];
    for (i, &(kind, sector, data)) in cases.iter().enumerate() {
        assert_eq!(r.request(kind, sector, data).0, 1, "case {i}");
    }
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut r = rig(4, true);
    assert_ne!(r.dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
    r.mem.write_slice(&[7; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(1, 0, &[(DATA, 512, false)]).0, 1);
    assert_eq!(r.request(0, 0, &[(DATA, 512, true)]).0, 0);
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(),
        0,
        "data unchanged"
    );
}

#[test]
fn malformed_chains_are_protocol_errors() {
    let mut r = rig(4, false);
    let m = &r.mem;
    // Header only, no status descriptor.
    put_desc(m, 0, HDR, 16, 0, 0);
    publish(m, &[0]);
    let ctx = QueueContext {
        mem: &r.mem,
        queues: &mut r.queues,
        irq: &mut r.irq,
        config_generation: &mut r.generation,
    };
    assert!(matches!(
        r.dev.queue_event(ctx, 0),
        Err(DeviceError::Protocol(_))
    ));
    // A status descriptor that is not writable.
    let mut r = rig(4, false);
    put_desc(&r.mem, 0, HDR, 16, NEXT, 1);
    put_desc(&r.mem, 1, STATUS, 1, 0, 0);
    publish(&r.mem, &[0]);
    let ctx = QueueContext {
        mem: &r.mem,
        queues: &mut r.queues,
        irq: &mut r.irq,
        config_generation: &mut r.generation,
    };
    assert!(r.dev.queue_event(ctx, 0).is_err());
}

#[test]
fn missing_and_empty_images_are_clear_errors() {
    let cfg = BlockConfig {
        path: "/nonexistent/wisp.img".into(),
        read_only: false,
        id: String::new(),
    };
    assert!(matches!(
        Block::open(&cfg, "t".into()),
        Err(BlockError::Open { .. })
    ));
    let path = std::env::temp_dir().join(format!("wisp-empty-{}.img", std::process::id()));
    std::fs::File::create(&path).unwrap();
    let cfg = BlockConfig {
        path: path.clone(),
        read_only: false,
        id: String::new(),
    };
    let Err(e) = Block::open(&cfg, "t".into()) else {
        panic!("opened");
    };
    assert!(e.to_string().contains("truncate -s"), "{e}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn an_image_in_use_is_refused() {
    let r = rig(4, false);
    let cfg = BlockConfig {
        path: r._file.0.clone(),
        read_only: false,
        id: String::new(),
    };
    let Err(e) = Block::open(&cfg, "t".into()) else {
        panic!("opened");
    };
    assert!(matches!(e, BlockError::Locked { .. }), "{e}");
}

#[test]
fn the_image_lock_is_handed_over_between_two_openers() {
    let (cfg, _file) = image(8, false);
    let mut source = Block::open(&cfg, "source".into()).unwrap();
    assert!(matches!(
        Block::open(&cfg, "other".into()),
        Err(BlockError::Locked { .. })
    ));
    let mut dest = Block::open_unlocked(&cfg, "dest".into()).unwrap();
    let e = dest.claim_host().unwrap_err();
    assert!(e.to_string().contains("in use by another process"), "{e}");
    source.release_host().unwrap();
    dest.claim_host().unwrap();
    assert!(source.claim_host().is_err(), "the destination holds it now");
    dest.release_host().unwrap();
    source.claim_host().unwrap();
}
