//! `net`: virtio-net TX, RX and the control queue (`devices::virtio::net`), on the
//! device with a [`ScriptedBackend`].
//!
//! Input: three queue parameter blocks (RX, TX, control: 4 bytes each), the features
//! the driver acks (u64, masked to those offered), a flags byte (bit 0: the backend
//! supports offloads), the backend's script (u16 length, then bytes), the events
//! (u8 count, then one byte each: see [`event`]), then the memory image. The device is
//! activated, then gets the events; a protocol error ends the run as it stops the
//! device until a reset. Oracles: the backend's contract (frame sizes) and a save and
//! restore of the device's state at any point must succeed.

use devices::virtio::net::{MacAddr, Net};
use devices::virtio::{GuestMemory, Interrupt, QueueContext, VirtioDevice, F_VERSION_1};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::ScriptedBackend;
use crate::input::Input;
use crate::memory::{fill, guest_memory};
use crate::ring::QueueParams;

/// Largest number of events in one run.
const MAX_EVENTS: usize = 64;

struct Rig {
    mem: GuestMemory,
    queues: Vec<Queue>,
    irq: Interrupt,
    generation: u32,
}

impl Rig {
    fn ctx(&mut self) -> QueueContext<'_> {
        QueueContext {
            mem: &self.mem,
            queues: &mut self.queues,
            irq: &mut self.irq,
            config_generation: &mut self.generation,
        }
    }
}

/// One event, from its byte: 0-2 a notification of queue `b % 4` (3: a queue that
/// does not exist), 4 a backend event with the epoll bits of the high nibble (IN, OUT,
/// HUP, ERR), 5 a save and restore, 6 the device restored running (announce), 7 a
/// reset, activation and the same features again.
fn event(dev: &mut Net, rig: &mut Rig, b: u8, setup: &Setup) -> bool {
    let Setup {
        params,
        acked,
        offloads,
    } = *setup;
    // The transport has the device catch up with the host before every queue or
    // backend event (it runs on the event loop's thread).
    let result = match b & 7 {
        0..=3 => dev
            .sync_host()
            .and_then(|()| dev.queue_event(rig.ctx(), usize::from(b & 3))),
        4 => {
            let bits = [
                libc::EPOLLIN,
                libc::EPOLLOUT,
                libc::EPOLLHUP,
                libc::EPOLLERR,
            ];
            let events = bits
                .iter()
                .enumerate()
                .filter(|(i, _)| b & (0x10 << i) != 0)
                .fold(0u32, |acc, (_, &e)| acc | e as u32);
            dev.sync_host()
                .and_then(|()| dev.backend_event(rig.ctx(), events))
        }
        5 => {
            // As a snapshot's restore does: into a fresh device on the same backend kind.
            let state = dev.save();
            let mut fresh = device(&[], offloads);
            fresh
                .restore(&state)
                .unwrap_or_else(|e| panic!("a saved state does not restore: {e}"));
            assert_eq!(fresh.save(), state, "restore changed the state");
            Ok(())
        }
        6 => {
            dev.restored(rig.ctx());
            Ok(())
        }
        _ => {
            // The transport's reset makes new queues; the driver sets them up again.
            dev.reset();
            rig.queues = queues(params, &rig.mem);
            dev.set_acked_features(acked);
            dev.activate(rig.ctx())
        }
    };
    result.is_ok()
}

/// What a reset goes back to.
#[derive(Clone, Copy)]
struct Setup {
    params: [QueueParams; 3],
    acked: u64,
    offloads: bool,
}

const MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

fn device(script: &[u8], offloads: bool) -> Net {
    let backend = ScriptedBackend::new(script, offloads);
    Net::new("fuzz-net".into(), Box::new(backend), MAC)
}

fn queues(params: [QueueParams; 3], mem: &GuestMemory) -> Vec<Queue> {
    // RX, TX, control: the sizes Net offers.
    params
        .iter()
        .zip([256, 256, 64])
        .map(|(p, max)| p.queue(max, mem))
        .collect()
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let params = [(); 3].map(|()| QueueParams::read(&mut input));
    let features = input.u64();
    let flags = input.u8();
    let script_len = usize::from(input.u16());
    let script = input.bytes(script_len);
    let count = usize::from(input.u8()).min(MAX_EVENTS);
    let events = input.bytes(count);
    let mem = guest_memory();
    fill(&mem, input.rest());

    let offloads = flags & 1 != 0;
    let mut dev = device(script, offloads);
    assert_eq!(dev.queue_max_sizes(), [256, 256, 64]);
    // A driver that got past FEATURES_OK acked VERSION_1 and only offered features.
    let acked = (features | F_VERSION_1) & dev.features();
    dev.set_acked_features(acked);
    let setup = Setup {
        params,
        acked,
        offloads,
    };
    let mut rig = Rig {
        queues: queues(params, &mem),
        mem,
        irq: Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")),
        generation: 0,
    };
    if dev.activate(rig.ctx()).is_err() {
        return;
    }
    for &b in events {
        if !event(&mut dev, &mut rig, b, &setup) {
            return;
        }
    }
}
