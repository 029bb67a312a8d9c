use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::bus::BusDevice;
use crate::virtio::block::tests::image;
use crate::virtio::block::{Block, BlockConfig};
use crate::virtio::chain::tests::{mem, publish, put_desc, AVAIL, DESC, NEXT, USED, WRITE};
use crate::virtio::mmio::tests::{rd, wr};
use crate::virtio::net::backend::Backend;
use crate::virtio::net::{Net, MAX_FRAME};
use crate::virtio::{GuestMemory, TYPE_NET};

const BLK_NAME: &str = "virtio-blk test";
const NET_NAME: &str = "virtio-net test";
const HDR: u64 = 0x8000;
const STATUS: u64 = 0x9000;
const DATA: u64 = 0x1_0000;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

/// Driver side up to FEATURES_OK, accepting `features`.
fn negotiate(t: &mut MmioTransport, features: u64) {
    wr(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    wr(t, 0x24, 0);
    wr(t, 0x20, features as u32);
    wr(t, 0x24, 1);
    wr(t, 0x20, (features >> 32) as u32);
    wr(
        t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
}

/// Writes the registers of queue `index`; enables it if `ready`.
fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, rings: [u64; 3], ready: bool) {
    wr(t, 0x30, index);
    wr(t, 0x38, size);
    for (reg, addr) in [0x80, 0x90, 0xa0].into_iter().zip(rings) {
        wr(t, reg, addr as u32);
        wr(t, reg + 4, (addr >> 32) as u32);
    }
    if ready {
        wr(t, 0x44, 1);
    }
}

fn driver_ok(t: &mut MmioTransport) {
    let st = rd(t, 0x70);
    wr(t, 0x70, st | status::DRIVER_OK);
    for evt in t.queue_evts() {
        let _ = evt.read();
    }
}

fn block_transport(cfg: &BlockConfig, m: &GuestMemory) -> (MmioTransport, EventFd) {
    let dev = Block::open(cfg, BLK_NAME.into()).unwrap();
    let irq = eventfd();
    let t = MmioTransport::new(Box::new(dev), m.clone(), irq.try_clone().unwrap()).unwrap();
    (t, irq)
}

/// A block transport the driver has brought to DRIVER_OK with queue 0 (size 16).
fn running_block(cfg: &BlockConfig, m: &GuestMemory) -> MmioTransport {
    let (mut t, _) = block_transport(cfg, m);
    let features = t.device.features();
    negotiate(&mut t, features);
    setup_queue(&mut t, 0, 16, [DESC, AVAIL, USED], true);
    driver_ok(&mut t);
    assert_eq!(rd(&mut t, 0x70) & status::DRIVER_OK, status::DRIVER_OK);
    t
}

/// A one-sector request in descriptors `first..first + 3`, with its header and status
/// byte at `HDR`/`STATUS` + `slot`.
fn put_request(m: &GuestMemory, first: u16, kind: u32, sector: u64, data: u64, slot: u64) {
    m.write_obj(kind, GuestAddress(HDR + slot)).unwrap();
    m.write_obj(0u32, GuestAddress(HDR + slot + 4)).unwrap();
    m.write_obj(sector, GuestAddress(HDR + slot + 8)).unwrap();
    m.write_obj(0xffu8, GuestAddress(STATUS + slot)).unwrap();
    let data_flags = if kind == T_IN { NEXT | WRITE } else { NEXT };
    put_desc(m, first, HDR + slot, 16, NEXT, first + 1);
    put_desc(m, first + 1, data, 512, data_flags, first + 2);
    put_desc(m, first + 2, STATUS + slot, 1, WRITE, 0);
}

fn used_idx(m: &GuestMemory) -> u16 {
    m.read_obj(GuestAddress(USED + 2)).unwrap()
}

/// (id, len) of used-ring entry `i`.
fn used_elem(m: &GuestMemory, i: u64) -> (u32, u32) {
    let at = USED + 4 + 8 * i;
    (
        m.read_obj(GuestAddress(at)).unwrap(),
        m.read_obj(GuestAddress(at + 4)).unwrap(),
    )
}

/// Asserts that a failed restore left `t` as it was: fresh, nothing signalled.
fn assert_untouched(t: &mut MmioTransport, fresh: &TransportState, irq: &EventFd) {
    assert_eq!(&t.save(), fresh);
    assert_eq!(rd(t, 0x70), 0);
    assert!(t.queues.iter().all(|q| !q.ready()));
    assert!(t.queue_evts().iter().all(|e| e.read().is_err()));
    assert!(irq.read().is_err(), "no interrupt raised");
}

#[test]
fn block_round_trip_continues_the_ring() {
    let m = mem();
    let (cfg, _file) = image(16, false);
    let mut t = running_block(&cfg, &m);
    // Request 1: write 0xa1 to sector 1.
    m.write_slice(&[0xa1; 512], GuestAddress(DATA)).unwrap();
    put_request(&m, 0, T_OUT, 1, DATA, 0);
    publish(&m, &[0]);
    t.queue_event(0);
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert_eq!(used_idx(&m), 1);

    let saved = t.save();
    assert!(saved.queues[0].ready && saved.queues[0].event_idx);
    assert_eq!(
        (saved.queues[0].next_avail, saved.queues[0].next_used),
        (1, 1)
    );
    assert_eq!(saved.interrupt_status, INT_VRING);
    let json = serde_json::to_string(&saved).unwrap();
    assert!(json.contains(r#""kind":"block""#), "{json}");
    let back: TransportState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);
    drop(t);

    let (mut t, irq) = block_transport(&cfg, &m);
    t.restore(&back).unwrap();
    assert_eq!(t.save(), saved);
    assert_eq!(rd(&mut t, 0x70), saved.status);
    assert_eq!(rd(&mut t, 0x60), INT_VRING, "ISR restored");
    assert_eq!(irq.read().unwrap(), 1, "pending interrupt raised again");
    assert_eq!(t.queue_evts()[0].read().unwrap(), 1, "queue kicked");

    // Re-processing request 1 would now write 0xbb to sector 1.
    m.write_slice(&[0xbb; 512], GuestAddress(DATA)).unwrap();
    // Request 2 (descriptors 3..6): read sector 1.
    put_request(&m, 3, T_IN, 1, DATA + 0x1000, 0x100);
    publish(&m, &[0, 3]);
    t.queue_event(0);
    assert_eq!(used_idx(&m), 2, "next_used continued, nothing re-processed");
    assert_eq!(used_elem(&m, 1), (3, 513));
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS + 0x100)).unwrap(), 0);
    let mut back = [0u8; 512];
    m.read_slice(&mut back, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(back, [0xa1; 512]);
}

#[test]
fn a_device_snapshotted_mid_probe_restores() {
    let m = mem();
    let (cfg, _file) = image(16, false);
    let (mut t, _) = block_transport(&cfg, &m);
    let features = t.device.features();
    negotiate(&mut t, features);
    setup_queue(&mut t, 0, 8, [DESC, AVAIL, USED], false);
    let saved = t.save();
    assert!(!saved.queues[0].ready);
    assert_eq!(
        (saved.queues[0].size, saved.queues[0].desc_table),
        (8, DESC)
    );
    drop(t);

    let (mut t, irq) = block_transport(&cfg, &m);
    t.restore(&saved).unwrap();
    assert_eq!(t.save(), saved);
    assert!(t.queue_evts()[0].read().is_err(), "not running: no kick");
    assert!(irq.read().is_err(), "no interrupt pending");
    // The driver carries on where it was.
    wr(&mut t, 0x44, 1);
    assert_eq!(rd(&mut t, 0x44), 1);
    assert_eq!(t.queues[0].size(), 8);
    driver_ok(&mut t);
    put_request(&m, 0, T_IN, 2, DATA, 0);
    publish(&m, &[0]);
    t.queue_event(0);
    assert_eq!(used_idx(&m), 1);
    assert_eq!(m.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 2);
}

#[test]
fn bad_block_snapshots_are_refused_and_change_nothing() {
    let m = mem();
    let (cfg, _file) = image(16, false);
    let saved = running_block(&cfg, &m).save();
    type Mutate = fn(&mut TransportState);
    let cases: &[(&str, Mutate, &str)] = &[
        ("type", |s| s.device_type = TYPE_NET, "device type 1"),
        (
            "queue count",
            |s| s.queues.push(s.queues[0].clone()),
            "snapshot has 2 queues, the device has 1",
        ),
        ("size 1000", |s| s.queues[0].size = 1000, "queue 0"),
        ("size 3", |s| s.queues[0].size = 3, "size 3"),
        ("max size", |s| s.queues[0].max_size = 128, "maximum size"),
        (
            "desc outside",
            |s| s.queues[0].desc_table = 0x7fff_0000,
            "outside guest memory",
        ),
        (
            "desc at the top",
            |s| s.queues[0].desc_table = 0xffff_ffff_ffff_fff0,
            "outside guest memory",
        ),
        (
            "used straddles the end",
            |s| s.queues[0].used_ring = 0xf_fff0,
            "outside guest memory",
        ),
        ("misaligned", |s| s.queues[0].desc_table = DESC + 1, "desc"),
        (
            "in flight",
            |s| s.queues[0].next_avail = 100,
            "buffers in flight",
        ),
        ("event idx", |s| s.queues[0].event_idx = false, "EVENT_IDX"),
        (
            "unknown features",
            |s| s.driver_features |= 1 << 40,
            "driver features",
        ),
        (
            "capacity",
            |s| {
                s.device = DeviceState::Block(BlockState {
                    acked_features: s.driver_features,
                    capacity: 17,
                })
            },
            "17 sectors, the disk now has 16",
        ),
        ("status bits", |s| s.status |= 0x10, "unknown bits"),
        (
            "driver ok alone",
            |s| s.status &= !status::FEATURES_OK,
            "DRIVER_OK without FEATURES_OK",
        ),
        ("isr", |s| s.interrupt_status = 4, "interrupt status"),
        (
            "acked",
            |s| {
                s.device = DeviceState::Block(BlockState {
                    acked_features: 0,
                    capacity: 16,
                })
            },
            "acked features",
        ),
        (
            "kind",
            |s| {
                s.device = DeviceState::Net(NetState {
                    acked_features: s.driver_features,
                    mac: MacAddr([0; 6]),
                    link_up: true,
                    announce: false,
                    rx_pending: Vec::new(),
                })
            },
            "holds net device state, the device is block",
        ),
    ];
    for (what, mutate, expect) in cases {
        let mut bad = saved.clone();
        mutate(&mut bad);
        let (mut t, irq) = block_transport(&cfg, &m);
        let fresh = t.save();
        let Err(e) = t.restore(&bad) else {
            panic!("{what}: restored");
        };
        let msg = e.to_string();
        assert!(msg.starts_with(BLK_NAME), "{what}: {msg}");
        assert!(msg.contains(expect), "{what}: {msg}");
        assert!(!msg.contains('\n'), "{what}: {msg}");
        assert_untouched(&mut t, &fresh, &irq);
    }
}

#[test]
fn restore_needs_a_fresh_device() {
    let m = mem();
    let (cfg, _file) = image(16, false);
    let mut t = running_block(&cfg, &m);
    let saved = t.save();
    assert!(matches!(
        t.restore(&saved),
        Err(PersistError::NotFresh { .. })
    ));
}

/// A backend that hands out queued frames and accepts everything.
struct Fake {
    rx: Arc<Mutex<VecDeque<Vec<u8>>>>,
    refuse_offloads: bool,
    fd: EventFd,
}

impl Backend for Fake {
    fn describe(&self) -> String {
        "fake".into()
    }
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn supports_offloads(&self) -> bool {
        false
    }
    fn set_offloads(&mut self, _flags: u32) -> io::Result<()> {
        if self.refuse_offloads {
            return Err(io::Error::other("refused"));
        }
        Ok(())
    }
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(f) = self.rx.lock().unwrap().pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        buf[..f.len()].copy_from_slice(&f);
        Ok(f.len())
    }
    fn write_frame(&mut self, _frame: &mut [u8]) -> io::Result<()> {
        Ok(())
    }
}

const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 1, 2, 3]);
const TX_RINGS: [u64; 3] = [0x4000, 0x5000, 0x6000];

fn net_transport(
    frames: &[Vec<u8>],
    mac: MacAddr,
    refuse_offloads: bool,
    m: &GuestMemory,
) -> (MmioTransport, EventFd) {
    let backend = Fake {
        rx: Arc::new(Mutex::new(frames.iter().cloned().collect())),
        refuse_offloads,
        fd: eventfd(),
    };
    let dev = Net::new(NET_NAME.into(), Box::new(backend), mac);
    let irq = eventfd();
    let t = MmioTransport::new(Box::new(dev), m.clone(), irq.try_clone().unwrap()).unwrap();
    (t, irq)
}

/// A running net transport whose backend already delivered `frame` to the device,
/// which holds it because the guest has posted no RX buffers yet.
fn net_with_pending(frame: &[u8], m: &GuestMemory) -> TransportState {
    let (mut t, _) = net_transport(&[frame.to_vec()], MAC, false, m);
    let features = t.device.features();
    negotiate(&mut t, features);
    setup_queue(&mut t, 0, 16, [DESC, AVAIL, USED], true);
    setup_queue(&mut t, 1, 16, TX_RINGS, true);
    driver_ok(&mut t);
    t.backend_event(libc::EPOLLIN as u32);
    t.save()
}

#[test]
fn net_pending_rx_frame_is_delivered_after_restore() {
    let m = mem();
    let frame: Vec<u8> = (0..72u8).collect();
    let saved = net_with_pending(&frame, &m);
    let DeviceState::Net(n) = &saved.device else {
        panic!("not net state");
    };
    assert_eq!(n.rx_pending, frame);
    assert_eq!((n.mac, n.link_up), (MAC, true));
    let json = serde_json::to_string(&saved).unwrap();
    assert!(json.contains(r#""kind":"net""#), "{json}");
    let back: TransportState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);

    let (mut t, _irq) = net_transport(&[], MAC, false, &m);
    t.restore(&back).unwrap();
    // The same, asking the guest to announce: the status bit, a new configuration
    // generation and the configuration interrupt.
    let mut announced = saved.clone();
    if let DeviceState::Net(n) = &mut announced.device {
        n.announce = true;
    }
    announced.config_generation += 1;
    announced.interrupt_status |= crate::virtio::INT_CONFIG;
    assert_eq!(t.save(), announced);
    assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
    assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
    // The guest posts a buffer: the frame from before the snapshot arrives first.
    put_desc(&m, 0, DATA, 2048, WRITE, 0);
    publish(&m, &[0]);
    t.queue_event(0);
    assert_eq!(used_idx(&m), 1);
    assert_eq!(used_elem(&m, 0), (0, frame.len() as u32));
    let mut got = vec![0u8; frame.len()];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    let mut want = frame.clone();
    want[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
    assert_eq!(got, want);
    let DeviceState::Net(n) = t.save().device else {
        panic!("not net state");
    };
    assert!(n.rx_pending.is_empty());
}

#[test]
fn net_link_status_is_restored_into_the_config_space() {
    let m = mem();
    let mut saved = net_with_pending(&[0; 20], &m);
    let DeviceState::Net(n) = &mut saved.device else {
        panic!("not net state");
    };
    n.link_up = false;
    let (mut t, _irq) = net_transport(&[], MAC, false, &m);
    let mut status = [0xffu8; 2];
    t.read(0, 0x106, &mut status);
    assert_eq!(status, [1, 0], "link up before");
    t.restore(&saved).unwrap();
    t.read(0, 0x106, &mut status);
    assert_eq!(status[0] & 1, 0, "link down after");
    let mut mac = [0u8; 6];
    t.read(0, 0x100, &mut mac);
    assert_eq!(mac, MAC.0);
}

#[test]
fn bad_net_snapshots_are_refused_and_change_nothing() {
    let m = mem();
    let saved = net_with_pending(&[7; 64], &m);
    let with_pending = |len: usize| {
        let mut s = saved.clone();
        if let DeviceState::Net(n) = &mut s.device {
            n.rx_pending = vec![7; len];
        }
        s
    };
    let cases = [
        ("short frame", with_pending(5), MAC, false, "5 bytes"),
        (
            "long frame",
            with_pending(MAX_FRAME + 1),
            MAC,
            false,
            "pending RX frame",
        ),
        (
            "mac",
            saved.clone(),
            MacAddr([2, 0, 0, 0, 0, 1]),
            false,
            "snapshot MAC is 52:54:00:01:02:03, the device is configured with 02:00:00:00:00:01",
        ),
        (
            "activation fails",
            saved.clone(),
            MAC,
            true,
            "cannot activate",
        ),
    ];
    for (what, state, mac, refuse, expect) in cases {
        let (mut t, irq) = net_transport(&[], mac, refuse, &m);
        let fresh = t.save();
        let Err(e) = t.restore(&state) else {
            panic!("{what}: restored");
        };
        let msg = e.to_string();
        assert!(msg.starts_with(NET_NAME), "{what}: {msg}");
        assert!(msg.contains(expect), "{what}: {msg}");
        assert_untouched(&mut t, &fresh, &irq);
    }
}

#[test]
fn a_restored_net_card_asks_the_guest_to_announce_and_the_ack_clears_it() {
    let m = mem();
    let (mut t, _) = net_transport(&[], MAC, false, &m);
    let features = t.device.features();
    negotiate(&mut t, features);
    setup_queue(&mut t, 0, 16, [0xa000, 0xb000, 0xc000], true);
    setup_queue(&mut t, 1, 16, TX_RINGS, true);
    setup_queue(&mut t, 2, 16, [DESC, AVAIL, USED], true);
    driver_ok(&mut t);
    let saved = t.save();

    let (mut t, irq) = net_transport(&[], MAC, false, &m);
    let mut status = [0u8; 2];
    t.read(0, 0x106, &mut status);
    assert_eq!(status, [1, 0], "link up, nothing to announce");
    t.restore(&saved).unwrap();
    t.read(0, 0x106, &mut status);
    assert_eq!(status, [3, 0], "link up and announce");
    assert!(irq.read().is_ok(), "configuration interrupt");
    assert_ne!(rd(&mut t, 0x60) & crate::virtio::INT_CONFIG, 0);

    // The guest acknowledges (class 3, command 0), then sends something unknown.
    let send = |t: &mut MmioTransport, head: u16, class: u8, cmd: u8| {
        let hdr = HDR + u64::from(head) * 16;
        m.write_slice(&[class, cmd], GuestAddress(hdr)).unwrap();
        put_desc(&m, head, hdr, 2, NEXT, head + 1);
        put_desc(&m, head + 1, STATUS + u64::from(head), 1, WRITE, 0);
        // Chains 0 and 2 in that order: the avail ring grows by one each time.
        let heads: &[u16] = if head == 0 { &[0] } else { &[0, 2] };
        publish(&m, heads);
        t.queue_event(2);
        m.read_obj::<u8>(GuestAddress(STATUS + u64::from(head)))
            .unwrap()
    };
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(send(&mut t, 0, 3, 0), 0, "VIRTIO_NET_OK");
    t.read(0, 0x106, &mut status);
    assert_eq!(status, [1, 0], "announce cleared");
    assert_eq!(
        send(&mut t, 2, 1, 0),
        1,
        "VIRTIO_NET_ERR for a command not offered"
    );
    assert_eq!(used_idx(&m), 2);
}

/// Found by fuzz/ (target mmio): a driver's status write with reserved bits
/// (0x0707_0000, nothing else) made the transport save a status that no restore takes,
/// so the VM could be snapshotted but never restored or migrated. Reserved bits are now
/// ignored.
#[test]
fn reserved_status_bits_are_ignored_and_the_state_restores() {
    let m = mem();
    let (cfg, _file) = image(16, true);
    let (mut t, _irq) = block_transport(&cfg, &m);
    wr(&mut t, 0x70, 0x0707_0000);
    assert_eq!(rd(&mut t, 0x70), 0);
    wr(&mut t, 0x70, 0x0100_0003);
    assert_eq!(rd(&mut t, 0x70), status::ACKNOWLEDGE | status::DRIVER);
    let saved = t.save();
    let dev = Block::open_unlocked(&cfg, BLK_NAME.into()).unwrap();
    let mut fresh = MmioTransport::new(Box::new(dev), m.clone(), eventfd()).unwrap();
    fresh.restore(&saved).unwrap();
    assert_eq!(fresh.save(), saved);
}

#[test]
fn a_net_card_tells_its_backend_at_the_next_queue_event_not_at_driver_ok() {
    // DRIVER_OK arrives on a vCPU thread, whose filter allows no host calls: the
    // backend hears of the offloads only when the event loop handles the card.
    let m = mem();
    let (mut t, _) = net_transport(&[], MAC, true, &m);
    let features = t.device.features();
    negotiate(&mut t, features);
    setup_queue(&mut t, 0, 16, [DESC, AVAIL, USED], true);
    setup_queue(&mut t, 1, 16, TX_RINGS, true);
    driver_ok(&mut t);
    assert_eq!(
        rd(&mut t, 0x70) & status::NEEDS_RESET,
        0,
        "no host call yet"
    );
    // The refusing backend now fails the card: DEVICE_NEEDS_RESET, as an activation
    // that cannot match the offloads did before.
    t.queue_event(0);
    assert_eq!(rd(&mut t, 0x70) & status::NEEDS_RESET, status::NEEDS_RESET);
}
