//! Polled virtio-net driver (queue 0 RX, queue 1 TX) and the `net-*`
//! commands.
//!
//! Descriptor `i` of each queue always describes buffer `i` (one
//! descriptor per buffer: the 12-byte `virtio_net_hdr_v1`, then the
//! frame). Pushes are batched: queues are notified just before the probe
//! would wait for the device, or when a batch is complete.

use core::fmt;

use crate::virtio::{self, Device};
use crate::virtqueue::{self, Desc, Dma, Queue, Ring, WaitError, QSIZE};
use crate::{io, status, tsc};

/// VIRTIO_NET_F_MAC: config space holds the MAC address.
const F_MAC: u64 = 1 << 5;
/// `virtio_net_hdr_v1` size (VERSION_1 without MRG_RXBUF still has it).
const HDR: usize = 12;
/// Largest Ethernet frame without FCS.
pub const MAX_FRAME: usize = 1514;
/// Smallest frame `net-send` sends.
pub const MIN_FRAME: usize = 60;
const BUF_LEN: usize = HDR + MAX_FRAME;
const STRIDE: usize = 1536;
const ETH_HDR: usize = 14;
/// Ethertype of `net-send` / `net-recv` frames (local experimental).
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
/// RX waits are longer than device waits (~2 min here): the peer may be
/// slow to start.
const RX_POLLS: u64 = virtqueue::POLLS * 4;

const RX: u16 = 0;
const TX: u16 = 1;

static RX_RING: Dma<Ring> = Dma::new(Ring::ZERO);
static TX_RING: Dma<Ring> = Dma::new(Ring::ZERO);
static RX_BUFS: Dma<[[u8; STRIDE]; QSIZE]> = Dma::new([[0; STRIDE]; QSIZE]);
static TX_BUFS: Dma<[[u8; STRIDE]; QSIZE]> = Dma::new([[0; STRIDE]; QSIZE]);

fn buf_addr(bufs: &Dma<[[u8; STRIDE]; QSIZE]>, id: u16) -> u64 {
    bufs.addr() + u64::from(id) * STRIDE as u64
}

/// Buffer `id` (< QSIZE) of `bufs` (`RX_BUFS.ptr()` or `TX_BUFS.ptr()`).
///
/// # Safety
/// `bufs` points to one of those statics, the driver owns the buffer (the
/// device does not hold it), and no other reference to it is live.
unsafe fn buf(bufs: *mut [[u8; STRIDE]; QSIZE], id: u16) -> &'static mut [u8; STRIDE] {
    // SAFETY: forwarded contract; indexing panics if id >= QSIZE.
    unsafe { &mut (*bufs)[usize::from(id)] }
}

pub struct Net<'a> {
    cmd: &'a str,
    dev: Device,
    rx: Queue,
    tx: Queue,
    mac: [u8; 6],
    /// RX buffers the device holds.
    rx_posted: [bool; QSIZE],
    /// TX buffers the device holds.
    tx_busy: [bool; QSIZE],
    /// Free TX buffer ids (a stack); size - 1 buffers in all.
    tx_free: [u16; QSIZE],
    tx_nfree: usize,
    /// Pushed without a notification yet.
    rx_pending: bool,
    tx_pending: bool,
}

impl<'a> Net<'a> {
    /// Finds the first net device and initialises it, or ends the run.
    pub fn open(cmd: &'a str) -> Net<'a> {
        let Some(dev) = Device::find(virtio::DEVICE_NET, 0) else {
            println!("probe: no net device");
            io::exit(status::NO_DEVICE)
        };
        let init = || {
            dev.negotiate(virtio::F_VERSION_1 | F_MAC)?;
            let rx = Queue::new(&dev, RX, &RX_RING)?;
            let tx = Queue::new(&dev, TX, &TX_RING)?;
            dev.driver_ok()?;
            Ok((rx, tx))
        };
        let (mut rx, tx) = init().unwrap_or_else(|e| virtio::init_failed(cmd, e));
        let mut mac = [0; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = dev.config_u8(i);
        }
        for i in 0..rx.size {
            let d = Desc::new(
                buf_addr(&RX_BUFS, i),
                BUF_LEN as u32,
                virtqueue::DESC_WRITE,
                0,
            );
            rx.set_desc(i, d);
        }
        let mut tx_free = [0; QSIZE];
        let tx_nfree = usize::from(tx.size - 1);
        for (i, f) in tx_free.iter_mut().take(tx_nfree).enumerate() {
            *f = i as u16;
        }
        Net {
            cmd,
            dev,
            rx,
            tx,
            mac,
            rx_posted: [false; QSIZE],
            tx_busy: [false; QSIZE],
            tx_free,
            tx_nfree,
            rx_pending: false,
            tx_pending: false,
        }
    }

    pub fn fail(&self, e: WaitError) -> ! {
        virtqueue::fail(self.cmd, e)
    }

    /// Notifies the queues that have unannounced buffers.
    fn kick(&mut self) {
        if self.rx_pending {
            self.rx.kick(&self.dev);
            self.rx_pending = false;
        }
        if self.tx_pending {
            self.tx.kick(&self.dev);
            self.tx_pending = false;
        }
    }

    /// Gives RX buffer `id` to the device (not notified yet).
    fn rx_post(&mut self, id: u16) {
        self.rx_posted[usize::from(id)] = true;
        self.rx.push(id);
        self.rx_pending = true;
    }

    /// Posts every RX buffer and notifies the device.
    pub fn rx_post_all(&mut self) {
        for id in 0..self.rx.size {
            self.rx_post(id);
        }
        self.kick();
    }

    /// Waits for a received frame: its buffer id and frame length. The
    /// driver owns the buffer until it posts it again.
    fn rx_wait(&mut self) -> (u16, usize) {
        let mut budget = RX_POLLS;
        match self.rx_poll(&mut budget) {
            Some(r) => r,
            None => self.fail(WaitError::Timeout),
        }
    }

    /// As `rx_wait`, spending at most `*budget` polls: `None` once the
    /// budget is used up.
    fn rx_poll(&mut self, budget: &mut u64) -> Option<(u16, usize)> {
        let u = match self.rx.pop_used() {
            Ok(Some(u)) => u,
            Ok(None) => {
                self.kick();
                self.rx
                    .poll_used(&self.dev, budget)
                    .unwrap_or_else(|e| self.fail(e))?
            }
            Err(e) => self.fail(e),
        };
        let len = u.len as usize;
        if !self.rx_posted[usize::from(u.id)] || !(HDR..=BUF_LEN).contains(&len) {
            println!("probe: {} bad rx used id={} len={len}", self.cmd, u.id);
            io::exit(status::DEVICE_ERROR)
        }
        self.rx_posted[usize::from(u.id)] = false;
        Some((u.id, len - HDR))
    }

    /// Our MAC address (config space).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Waits (at most `*budget` polls, see `rx_poll`) for one received
    /// frame, passes it to `f`, then posts its buffer again. `None` once
    /// the budget is used up.
    pub fn recv_with<R>(&mut self, budget: &mut u64, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let (id, len) = self.rx_poll(budget)?;
        // SAFETY: the device returned `id`: the driver owns the buffer
        // until rx_post below.
        let r = f(unsafe { &buf(RX_BUFS.ptr(), id)[HDR..HDR + len] });
        self.rx_post(id);
        Some(r)
    }

    /// Sends one `len`-byte frame (at most MAX_FRAME) that `fill` writes
    /// (the buffer holds stale bytes), and notifies the device.
    pub fn send_with(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) {
        let id = self.tx_alloc();
        // SAFETY: tx_alloc returned a free buffer: the driver owns it.
        fill(unsafe { &mut buf(TX_BUFS.ptr(), id)[HDR..HDR + len] });
        self.tx_submit(id, len);
        self.kick();
    }

    /// A free TX buffer holding `net-send` frame `seq` of `len` bytes (not submitted).
    fn test_frame(&mut self, seq: u32, len: usize) -> u16 {
        let id = self.tx_alloc();
        // SAFETY: tx_alloc returned a free buffer: the driver owns it.
        let f = unsafe { &mut buf(TX_BUFS.ptr(), id)[HDR..HDR + len] };
        f[..6].fill(0xff);
        f[6..12].copy_from_slice(&self.mac);
        f[12..14].copy_from_slice(&ETHERTYPE);
        f[14..18].copy_from_slice(&seq.to_le_bytes());
        for (i, b) in f[ETH_HDR..].iter_mut().enumerate().skip(4) {
            *b = seq.wrapping_add(i as u32) as u8;
        }
        id
    }

    /// Sends `net-send` frame `seq` of `len` bytes, notified at once.
    pub fn send_test_frame(&mut self, seq: u32, len: usize) {
        let id = self.test_frame(seq, len);
        self.tx_submit(id, len);
        self.kick();
    }

    /// Returns one used TX buffer to the free list, waiting if `block`.
    /// False if none was ready (`block` false).
    fn tx_reclaim(&mut self, block: bool) -> bool {
        let u = if block {
            self.kick();
            self.tx
                .wait_used(&self.dev, virtqueue::POLLS)
                .unwrap_or_else(|e| self.fail(e))
        } else {
            match self.tx.pop_used() {
                Ok(Some(u)) => u,
                Ok(None) => return false,
                Err(e) => self.fail(e),
            }
        };
        let id = usize::from(u.id);
        if !self.tx_busy[id] {
            self.fail(WaitError::BadUsed(u32::from(u.id)));
        }
        self.tx_busy[id] = false;
        self.tx_free[self.tx_nfree] = u.id;
        self.tx_nfree += 1;
        true
    }

    /// A free TX buffer id, waiting for the device if none is free.
    fn tx_alloc(&mut self) -> u16 {
        while self.tx_reclaim(false) {}
        if self.tx_nfree == 0 {
            self.tx_reclaim(true);
        }
        self.tx_nfree -= 1;
        self.tx_free[self.tx_nfree]
    }

    /// Sends TX buffer `id` holding a `len`-byte frame after the header
    /// (zeroed here); not notified yet.
    fn tx_submit(&mut self, id: u16, len: usize) {
        // SAFETY: `id` came from tx_alloc: the driver owns the buffer.
        unsafe { buf(TX_BUFS.ptr(), id)[..HDR].fill(0) };
        let d = Desc::new(buf_addr(&TX_BUFS, id), (HDR + len) as u32, 0, 0);
        self.tx.set_desc(id, d);
        self.tx_busy[usize::from(id)] = true;
        self.tx.push(id);
        self.tx_pending = true;
    }

    /// Waits until the device has consumed every TX buffer.
    fn tx_drain(&mut self) {
        while self.tx.in_flight() > 0 {
            self.tx_reclaim(true);
        }
    }
}

/// `net-info`.
pub fn info(cmd: &str) {
    let net = Net::open(cmd);
    println!("probe: net mac={}", Mac(net.mac));
}

/// Displays a MAC address as `aa:bb:cc:dd:ee:ff`.
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// `net-echo:N`: sends each of N received frames back to its source.
pub fn echo(cmd: &str, n: u32) {
    let mut net = Net::open(cmd);
    net.rx_post_all();
    println!("probe: net-ready");
    let mut count = 0;
    while count < n {
        let (rx_id, len) = net.rx_wait();
        if len >= ETH_HDR {
            let tx_id = net.tx_alloc();
            // SAFETY: the device returned rx_id and tx_id is free: the
            // driver owns both buffers, which are distinct statics.
            let (rb, tb) = unsafe { (buf(RX_BUFS.ptr(), rx_id), buf(TX_BUFS.ptr(), tx_id)) };
            let (rf, tf) = (&rb[HDR..HDR + len], &mut tb[HDR..HDR + len]);
            tf[..6].copy_from_slice(&rf[6..12]);
            tf[6..12].copy_from_slice(&net.mac);
            tf[12..].copy_from_slice(&rf[12..]);
            net.tx_submit(tx_id, len);
            count += 1;
        }
        net.rx_post(rx_id);
    }
    net.tx_drain();
    println!("probe: net-echo n={n}");
}

/// `net-send:N:LEN[:GAP_US]` (N = 0: forever): with a GAP_US, each
/// frame is notified on its own, at least GAP_US after the previous one.
pub fn send(cmd: &str, n: u32, len: usize, gap_us: u64) {
    let mut net = Net::open(cmd);
    let gap = tsc::ticks_us(tsc::frequency().0, gap_us);
    let mut last = 0;
    let mut seq: u32 = 0;
    while n == 0 || seq < n {
        let id = net.test_frame(seq, len);
        if gap > 0 {
            // A TSC that went backwards (a restore) ends the wait at once.
            while seq > 0 && tsc::now().wrapping_sub(last) < gap {
                core::hint::spin_loop();
            }
            last = tsc::now();
            net.tx_submit(id, len);
            net.kick();
        } else {
            // Batched: tx_alloc notifies when the ring is full, tx_drain at the end.
            net.tx_submit(id, len);
        }
        seq = seq.wrapping_add(1);
    }
    net.tx_drain();
    println!("probe: net-send n={n}");
}

/// `net-recv:N`: expects sequence numbers 0..N-1 in 0x88b5 frames.
pub fn recv(cmd: &str, n: u32) {
    let mut net = Net::open(cmd);
    net.rx_post_all();
    println!("probe: net-ready");
    let mut expected = 0;
    while expected < n {
        let (id, len) = net.rx_wait();
        // SAFETY: the device returned `id`: the driver owns the buffer.
        let f = unsafe { &buf(RX_BUFS.ptr(), id)[HDR..HDR + len] };
        if len >= ETH_HDR + 4 && f[12..14] == ETHERTYPE {
            let got = u32::from_le_bytes([f[14], f[15], f[16], f[17]]);
            if got != expected {
                println!("probe: net-recv expected={expected} got={got}");
                io::exit(status::CHECK_FAILED)
            }
            expected += 1;
        }
        net.rx_post(id);
    }
    println!("probe: net-recv n={n} ok");
}
