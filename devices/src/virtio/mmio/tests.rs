use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::*;
use crate::virtio::chain::tests::{mem, AVAIL, DESC, USED};
use crate::virtio::persist::{BlockState, DeviceState, PersistError};
use crate::virtio::TYPE_BLOCK;

/// A device that counts queue events and fails when told to.
struct Mock {
    events: Arc<AtomicUsize>,
    fail: bool,
    acked: u64,
}

impl VirtioDevice for Mock {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn name(&self) -> &str {
        "mock"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | 1
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn config_space(&self) -> &[u8] {
        &[0xaa, 0xbb]
    }
    fn activate(&mut self, _ctx: QueueContext) -> Result<(), DeviceError> {
        Ok(())
    }
    fn reset(&mut self) {}
    fn queue_event(&mut self, _ctx: QueueContext, _index: usize) -> Result<(), DeviceError> {
        self.events.fetch_add(1, Ordering::SeqCst);
        if self.fail {
            return Err(DeviceError::Protocol("mock failure".into()));
        }
        Ok(())
    }
    fn save(&self) -> DeviceState {
        DeviceState::Block(BlockState {
            acked_features: self.acked,
            capacity: 0,
        })
    }
    fn restore(&mut self, state: &DeviceState) -> Result<(), PersistError> {
        self.acked = state.acked_features();
        Ok(())
    }
}

fn transport(fail: bool) -> (MmioTransport, Arc<AtomicUsize>, EventFd) {
    let events = Arc::new(AtomicUsize::new(0));
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let dev = Mock {
        events: events.clone(),
        fail,
        acked: 0,
    };
    let t = MmioTransport::new(Box::new(dev), mem(), irq.try_clone().unwrap()).unwrap();
    (t, events, irq)
}

pub(crate) fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(0, off, &mut b);
    u32::from_le_bytes(b)
}

pub(crate) fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(0, off, &v.to_le_bytes());
}

/// Runs the driver side of initialisation up to FEATURES_OK.
fn negotiate(t: &mut MmioTransport) {
    wr(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    wr(t, 0x24, 1);
    wr(t, 0x20, 1); // VERSION_1 is bit 0 of the high word
    wr(
        t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
}

fn setup_queue(t: &mut MmioTransport, index: u32, size: u32) {
    wr(t, 0x30, index);
    wr(t, 0x38, size);
    wr(t, 0x80, DESC as u32);
    wr(t, 0x90, AVAIL as u32);
    wr(t, 0xa0, USED as u32);
    wr(t, 0x44, 1);
}

#[test]
fn identity_and_config() {
    let (mut t, _, _) = transport(false);
    assert_eq!(rd(&mut t, 0x00), 0x7472_6976);
    assert_eq!(rd(&mut t, 0x04), 2);
    assert_eq!(rd(&mut t, 0x08), TYPE_BLOCK);
    wr(&mut t, 0x14, 1);
    assert_eq!(rd(&mut t, 0x10), 1, "VERSION_1 in the high word");
    wr(&mut t, 0x14, 7);
    assert_eq!(rd(&mut t, 0x10), 0);
    let mut b = [0u8; 4];
    t.read(0, 0x100, &mut b);
    assert_eq!(b, [0xaa, 0xbb, 0, 0]);
    // Unaligned or narrow register accesses read zero and do nothing.
    let mut one = [0xffu8; 1];
    t.read(0, 0x00, &mut one);
    assert_eq!(one, [0]);
    wr(&mut t, 0x30, 1);
    assert_eq!(rd(&mut t, 0x34), 16);
    wr(&mut t, 0x30, 2);
    assert_eq!(rd(&mut t, 0x34), 0, "no queue 2");
}

#[test]
fn features_are_masked_and_version_1_is_required() {
    let (mut t, _, _) = transport(false);
    wr(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    wr(&mut t, 0x24, 0);
    wr(&mut t, 0x20, 0xffff_ffff);
    wr(
        &mut t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(
        rd(&mut t, 0x70) & status::FEATURES_OK,
        0,
        "legacy driver refused"
    );
    wr(&mut t, 0x24, 1);
    wr(&mut t, 0x20, 0xffff_ffff);
    wr(
        &mut t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_ne!(rd(&mut t, 0x70) & status::FEATURES_OK, 0);
    assert_eq!(
        t.driver_features,
        F_VERSION_1 | 1,
        "only offered bits stick"
    );
}

#[test]
fn valid_queue_becomes_ready_and_notifies_through_the_eventfd() {
    let (mut t, events, _) = transport(false);
    negotiate(&mut t);
    setup_queue(&mut t, 0, 8);
    assert_eq!(rd(&mut t, 0x44), 1);
    let st = rd(&mut t, 0x70);
    wr(&mut t, 0x70, st | status::DRIVER_OK);
    // Activation only kicks every queue's eventfd, for the event loop to look at.
    assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
    assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
    assert_eq!(events.load(Ordering::SeqCst), 0);
    // A notify that reaches the transport (no ioeventfd) only signals the eventfd:
    // processing happens on the event loop, not on the vCPU thread.
    wr(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(events.load(Ordering::SeqCst), 0);
    assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
    t.queue_evts()[0].write(1).unwrap();
    t.queue_event(0);
    assert_eq!(events.load(Ordering::SeqCst), 1);
    // Out-of-range notifications and events are ignored.
    wr(&mut t, QUEUE_NOTIFY, 9);
    t.queue_event(9);
    assert_eq!(events.load(Ordering::SeqCst), 1);
}

#[test]
fn bad_queue_size_or_rings_need_a_reset() {
    for (size, desc) in [
        (32u32, DESC),
        (3, DESC),
        (0, DESC),
        (8, 0x7fff_0000u64),
        (8, DESC + 1),
    ] {
        let (mut t, _, _) = transport(false);
        negotiate(&mut t);
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x38, size);
        wr(&mut t, 0x80, desc as u32);
        wr(&mut t, 0x90, AVAIL as u32);
        wr(&mut t, 0xa0, USED as u32);
        wr(&mut t, 0x44, 1);
        assert_eq!(rd(&mut t, 0x44), 0, "size {size} desc {desc:#x}");
        assert_ne!(rd(&mut t, 0x70) & status::NEEDS_RESET, 0);
        // A reset brings the device back.
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 8);
        assert_eq!(rd(&mut t, 0x44), 1);
    }
}

#[test]
fn device_error_sets_needs_reset_and_raises_a_config_interrupt() {
    let (mut t, events, irq) = transport(true);
    negotiate(&mut t);
    setup_queue(&mut t, 0, 8);
    let st = rd(&mut t, 0x70);
    wr(&mut t, 0x70, st | status::DRIVER_OK);
    t.queue_event(0);
    assert_eq!(events.load(Ordering::SeqCst), 1);
    assert_ne!(rd(&mut t, 0x70) & status::NEEDS_RESET, 0);
    assert_ne!(rd(&mut t, 0x60) & INT_CONFIG, 0);
    assert!(irq.read().is_ok(), "interrupt raised");
    // Stopped until reset: further events are not processed.
    t.queue_event(0);
    assert_eq!(events.load(Ordering::SeqCst), 1);
    wr(&mut t, 0x64, INT_CONFIG);
    assert_eq!(rd(&mut t, 0x60), 0);
}

#[test]
fn queue_registers_are_frozen_once_ready() {
    let (mut t, _, _) = transport(false);
    negotiate(&mut t);
    setup_queue(&mut t, 0, 8);
    wr(&mut t, 0x38, 16);
    wr(&mut t, 0x80, 0x5000);
    assert_eq!(t.queues[0].size(), 8);
    assert_eq!(t.queues[0].desc_table(), DESC);
}
