//! `state`: the snapshot state file (`vmm::state::format::decode` of a
//! `vmm::snapshot::SnapshotState`), its checks (`SnapshotState::check`,
//! `VmConfig::validate`) and the devices' restore checks (`MmioTransport::restore`).
//!
//! Input: a mode byte, then the file. Mode bit 0: the rest is only the body (JSON), and
//! the target writes a valid header and CRC around it, so the fuzzer reaches the parser
//! and the checks; otherwise the rest is the whole file, header included. Oracles: a
//! decoded state encodes, and decoding that gives the same bytes again; a state that
//! passes the checks restores its virtio transports or refuses them, and a restored one
//! saves what it was given (but for a network card's announcement).

use devices::virtio::block::Block;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::{MacAddr, Net};
use devices::virtio::persist::{DeviceState, TransportState};
use devices::virtio::VirtioDevice;
use vmm::config::HostLimits;
use vmm::snapshot::SnapshotState;
use vmm::state::format;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::ScriptedBackend;
use crate::disk;
use crate::input::Input;
use crate::memory::{fill, guest_memory};

/// Limits that do not depend on the host running the fuzzer.
pub const LIMITS: HostLimits = HostLimits {
    max_vcpus: 255,
    ram_mib: 1 << 20,
};

/// A state file around `body`: header with its length and CRC.
pub fn wrap(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(format::HEADER_LEN + body.len());
    out.extend_from_slice(&format::MAGIC);
    out.extend_from_slice(&format::FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&format::crc64(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Restores one saved transport into a fresh device of its kind, as `wisp restore` does
/// (the result does not matter: only that it is an answer).
pub fn restore_transport(state: &TransportState, mac: Option<MacAddr>) {
    let mem = guest_memory();
    let dev: Box<dyn VirtioDevice> = match &state.device {
        DeviceState::Block(_) => Box::new(
            Block::open_unlocked(&disk::config(false), "fuzz-blk".into()).expect("open the disk"),
        ),
        DeviceState::Net(_) => {
            let mac = mac.unwrap_or(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
            Box::new(Net::new(
                "fuzz-net".into(),
                Box::new(ScriptedBackend::new(&[], false)),
                mac,
            ))
        }
    };
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let mut t = MmioTransport::new(dev, mem, irq).expect("a transport");
    if t.restore(state).is_ok() {
        // What was restored is what a later snapshot saves, but for what a running card
        // does on a restore: ask the guest to announce itself (a configuration change).
        assert_eq!(
            restorable(t.save()),
            restorable(state.clone()),
            "a restored transport saves another state"
        );
    }
}

/// `state` without what a restore may change.
fn restorable(mut state: TransportState) -> TransportState {
    state.config_generation = 0;
    state.interrupt_status = 0;
    if let DeviceState::Net(n) = &mut state.device {
        n.announce = false;
    }
    state
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let rest = input.rest();
    let wrapped;
    let bytes = if mode & 1 != 0 {
        wrapped = wrap(rest);
        &wrapped[..]
    } else {
        rest
    };
    let Ok(state) = format::decode::<SnapshotState>(bytes) else {
        return;
    };
    let encoded = format::encode(&state).expect("a decoded state encodes");
    let back: SnapshotState = format::decode(&encoded).expect("an encoded state decodes");
    let again = format::encode(&back).expect("and encodes again");
    assert!(encoded == again, "encoding is not stable");
    if state.check().is_err() || state.machine.config.validate(&LIMITS).is_err() {
        return;
    }
    fill(&guest_memory(), &[]);
    disk::reset(false);
    let config = &state.machine.config;
    let disks = config.disks.len();
    for (i, t) in state.machine.devices.virtio.iter().enumerate() {
        let mac = i.checked_sub(disks).and_then(|n| config.nets[n].mac);
        restore_transport(t, mac);
    }
}
