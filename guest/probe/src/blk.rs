//! Polled virtio-blk driver (queue 0, one request at a time) and the
//! `blk-*` commands (`blk-seq`, several requests at once, is in blkseq.rs).
//!
//! A request is a chain of descriptors 0 (16-byte header, device-readable),
//! 1 (data, if any) and 2 (status byte, device-writable). Every command
//! resets and re-initialises the device first, so a command never depends
//! on what an earlier one left behind.

use core::sync::atomic::{AtomicU8, Ordering};

use crate::serial::Escaped;
use crate::virtio::{self, Device, InitError};
use crate::virtqueue::{self, Desc, Dma, Queue, Ring, WaitError};
use crate::{io, status};

/// VIRTIO_BLK_F_RO: the disk is read-only.
const F_RO: u64 = 1 << 5;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Status byte value before the device answers (not a virtio status).
pub const NO_ANSWER: u8 = 0xff;

pub const SECTOR: usize = 512;
/// Sectors per request of `blk-write` / `blk-verify`.
pub const MAX_REQ_SECTORS: usize = 64;
/// Largest sector count of `blk-write` / `blk-verify`.
pub const MAX_SECTORS: u64 = 4096;
const ID_LEN: usize = 20;
/// Data address of `blk-bad:oob`: far beyond any guest RAM.
const OOB_ADDR: u64 = 0x10_0000_0000_0000;

#[repr(C)]
struct Req {
    typ: u32,
    reserved: u32,
    sector: u64,
    status: u8,
    id: [u8; ID_LEN],
}

static RING: Dma<Ring> = Dma::new(Ring::ZERO);
static REQ: Dma<Req> = Dma::new(Req {
    typ: 0,
    reserved: 0,
    sector: 0,
    status: 0,
    id: [0; ID_LEN],
});
static DATA: Dma<[u8; MAX_REQ_SECTORS * SECTOR]> = Dma::new([0; MAX_REQ_SECTORS * SECTOR]);

/// Which virtio-blk device (0-based, slot order) the commands use.
static SELECTED: AtomicU8 = AtomicU8::new(0);

/// `blk-dev:N`: use the N-th block device from now on.
pub fn select(n: u8) {
    SELECTED.store(n, Ordering::Relaxed);
}

/// Where a request's data goes or comes from.
struct Data {
    addr: u64,
    len: u32,
    /// Device-writable (IN, GET_ID).
    write: bool,
}

impl Data {
    fn buf(len: usize, write: bool) -> Data {
        Data {
            addr: DATA.addr(),
            len: len as u32,
            write,
        }
    }
}

pub struct Blk {
    pub dev: Device,
    pub q: Queue,
    offered: u64,
}

impl Blk {
    /// Full init: features (VERSION_1 only), queue 0, DRIVER_OK.
    fn init(dev: Device) -> Result<Blk, InitError> {
        let offered = dev.negotiate(virtio::F_VERSION_1)?;
        let q = Queue::new(&dev, 0, &RING)?;
        dev.driver_ok()?;
        Ok(Blk { dev, q, offered })
    }

    /// Finds the selected device and initialises it, or ends the run.
    pub fn open(cmd: &str) -> Blk {
        let Some(dev) = Device::find(virtio::DEVICE_BLK, SELECTED.load(Ordering::Relaxed)) else {
            println!("probe: no blk device");
            io::exit(status::NO_DEVICE)
        };
        Blk::init(dev).unwrap_or_else(|e| virtio::init_failed(cmd, e))
    }

    /// Fills the header and the descriptors of a request; `last_next`
    /// overrides the status descriptor's flags/next (for `blk-bad:loop`).
    fn prepare(&mut self, typ: u32, sector: u64, data: Option<Data>, last_next: Option<u16>) {
        let r = REQ.ptr();
        // SAFETY: REQ is not in the device's hands (no request in flight).
        unsafe {
            (*r).typ = typ;
            (*r).reserved = 0;
            (*r).sector = sector;
            (*r).status = NO_ANSWER;
        }
        let req = REQ.addr();
        let hdr = Desc::new(req, 16, virtqueue::DESC_NEXT, 1);
        self.q.set_desc(0, hdr);
        let mut i = 1;
        if let Some(d) = data {
            let flags = virtqueue::DESC_NEXT | if d.write { virtqueue::DESC_WRITE } else { 0 };
            self.q.set_desc(1, Desc::new(d.addr, d.len, flags, 2));
            i = 2;
        }
        let (flags, next) = match last_next {
            Some(n) => (virtqueue::DESC_WRITE | virtqueue::DESC_NEXT, n),
            None => (virtqueue::DESC_WRITE, 0),
        };
        let status = req + core::mem::offset_of!(Req, status) as u64;
        self.q.set_desc(i, Desc::new(status, 1, flags, next));
    }

    /// Publishes the prepared request and notifies the device.
    fn submit(&mut self) {
        self.q.push(0);
        self.q.kick(&self.dev);
    }

    /// Waits for the request and returns its status byte.
    fn complete(&mut self) -> Result<u8, WaitError> {
        let u = self.q.wait_used(&self.dev, virtqueue::POLLS)?;
        if u.id != 0 {
            return Err(WaitError::BadUsed(u32::from(u.id)));
        }
        // SAFETY: the device has returned the request.
        Ok(unsafe { core::ptr::read_volatile(&raw const (*REQ.ptr()).status) })
    }

    /// One synchronous request.
    fn request(&mut self, typ: u32, sector: u64, data: Option<Data>) -> Result<u8, WaitError> {
        self.prepare(typ, sector, data, None);
        self.submit();
        self.complete()
    }

    /// One synchronous request with `len` bytes of data at guest address `addr`
    /// (device-writable if `write`).
    pub fn request_at(
        &mut self,
        typ: u32,
        sector: u64,
        addr: u64,
        len: u32,
        write: bool,
    ) -> Result<u8, WaitError> {
        self.request(typ, sector, Some(Data { addr, len, write }))
    }
}

/// Word `j` of sector `s` in the pattern of `blk-write:_:_:SEED`.
fn pattern(seed: u32, s: u64, j: u32) -> u32 {
    (seed << 24) ^ (s as u32).wrapping_mul(0x9E37_79B1) ^ j
}

const WORDS: usize = SECTOR / 4;

/// Pointer to word `k` of DATA (k < 64 * 128).
fn word(k: usize) -> *mut u32 {
    assert!(k < MAX_REQ_SECTORS * WORDS);
    // SAFETY: in bounds (asserted); DATA is page-aligned, so u32-aligned.
    unsafe { DATA.ptr().cast::<u32>().add(k) }
}

/// `blk-info`.
pub fn info(cmd: &str) {
    let mut b = Blk::open(cmd);
    let capacity = b.dev.config_u64(0);
    let ro = u8::from(b.offered & F_RO != 0);
    let id_addr = REQ.addr() + core::mem::offset_of!(Req, id) as u64;
    let st = b
        .request(
            T_GET_ID,
            0,
            Some(Data {
                addr: id_addr,
                len: ID_LEN as u32,
                write: true,
            }),
        )
        .unwrap_or_else(|e| virtqueue::fail(cmd, e));
    // SAFETY: the device has returned the request.
    let raw = unsafe { (*REQ.ptr()).id };
    let id = if st == 0 {
        &raw[..raw.iter().position(|&c| c == 0).unwrap_or(ID_LEN)]
    } else {
        &[]
    };
    println!("probe: blk capacity={capacity} ro={ro} id={}", Escaped(id));
}

/// Runs `blk-write` (`verify` false) or `blk-verify` over `count` sectors.
pub fn write_or_verify(cmd: &str, verify: bool, sector: u64, count: u64, seed: u32) {
    let mut b = Blk::open(cmd);
    let mut done = 0;
    while done < count {
        let n = (count - done).min(MAX_REQ_SECTORS as u64) as usize;
        let first = sector + done;
        let data = Data::buf(n * SECTOR, verify);
        let st = if verify {
            b.request(T_IN, first, Some(data))
        } else {
            for k in 0..n * WORDS {
                let s = first + (k / WORDS) as u64;
                // SAFETY: k < n * WORDS <= DATA's words; no request in flight.
                unsafe { word(k).write(pattern(seed, s, (k % WORDS) as u32).to_le()) };
            }
            b.request(T_OUT, first, Some(data))
        }
        .unwrap_or_else(|e| virtqueue::fail(cmd, e));
        if st != 0 {
            if verify {
                println!("probe: blk-verify status={st}");
            } else {
                println!("probe: blk-write sectors={count} status={st}");
            }
            return;
        }
        if verify {
            for k in 0..n * WORDS {
                let s = first + (k / WORDS) as u64;
                // SAFETY: as above; the device has returned the buffer.
                let w = u32::from_le(unsafe { word(k).read() });
                if w != pattern(seed, s, (k % WORDS) as u32) {
                    println!("probe: blk-verify mismatch sector={s}");
                    io::exit(status::CHECK_FAILED)
                }
            }
        }
        done += n as u64;
    }
    if verify {
        println!("probe: blk-verify sectors={count} ok");
    } else {
        println!("probe: blk-write sectors={count} status=0");
    }
}

/// `blk-flush`.
pub fn flush(cmd: &str) {
    let mut b = Blk::open(cmd);
    let st = b
        .request(T_FLUSH, 0, None)
        .unwrap_or_else(|e| virtqueue::fail(cmd, e));
    println!("probe: blk-flush status={st}");
}

/// Hostile requests of `blk-bad:KIND`.
#[derive(Clone, Copy)]
pub enum Bad {
    Loop,
    Oob,
    Zero,
    Qsize,
}

/// `blk-bad:KIND`: one hostile operation, then a reset and a read of
/// sector 0 to check that the device recovered.
pub fn bad(cmd: &str, kind: Bad) {
    let Some(dev) = Device::find(virtio::DEVICE_BLK, SELECTED.load(Ordering::Relaxed)) else {
        println!("probe: no blk device");
        io::exit(status::NO_DEVICE)
    };
    match kind {
        Bad::Loop => {
            let mut b = Blk::init(dev).unwrap_or_else(|e| virtio::init_failed(cmd, e));
            // Header -> data -> status -> back to the header.
            b.prepare(T_IN, 0, Some(Data::buf(SECTOR, true)), Some(0));
            b.submit();
            let needs_reset = match b.q.wait_used(&dev, virtqueue::POLLS) {
                Err(WaitError::NeedsReset) => true,
                _ => dev.needs_reset(),
            };
            let r = u8::from(recover(dev));
            println!(
                "probe: blk-bad loop needs_reset={} recovered={r}",
                u8::from(needs_reset)
            );
        }
        Bad::Oob | Bad::Zero => {
            let mut b = Blk::init(dev).unwrap_or_else(|e| virtio::init_failed(cmd, e));
            let (name, data) = match kind {
                Bad::Oob => (
                    "oob",
                    Data {
                        addr: OOB_ADDR,
                        len: SECTOR as u32,
                        write: true,
                    },
                ),
                _ => (
                    "zero",
                    Data {
                        addr: DATA.addr(),
                        len: 0,
                        write: true,
                    },
                ),
            };
            // A timeout or a reset request leaves NO_ANSWER (255).
            let st = b.request(T_IN, 0, Some(data)).unwrap_or(NO_ANSWER);
            let r = u8::from(recover(dev));
            println!("probe: blk-bad {name} status={st} recovered={r}");
        }
        Bad::Qsize => {
            dev.negotiate(virtio::F_VERSION_1)
                .unwrap_or_else(|e| virtio::init_failed(cmd, e));
            dev.write(virtio::REG_QUEUE_SEL, 0);
            let max = dev.read(virtio::REG_QUEUE_NUM_MAX);
            dev.write(virtio::REG_QUEUE_NUM, max.checked_mul(2).unwrap_or(3));
            dev.set_queue_addrs(Ring::addrs(&RING));
            dev.write(virtio::REG_QUEUE_READY, 1);
            let ready = dev.read(virtio::REG_QUEUE_READY);
            let needs_reset = (0..1000).any(|_| dev.needs_reset());
            let r = u8::from(recover(dev));
            println!(
                "probe: blk-bad qsize ready={ready} needs_reset={} recovered={r}",
                u8::from(needs_reset)
            );
        }
    }
}

/// Resets and re-initialises `dev`, then reads sector 0: true if that
/// read succeeds (status 0).
fn recover(dev: Device) -> bool {
    match Blk::init(dev) {
        Ok(mut b) => matches!(b.request(T_IN, 0, Some(Data::buf(SECTOR, true))), Ok(0)),
        Err(_) => false,
    }
}
