//! virtio-net over a host TAP or a user-mode network stack ([`backend::Backend`]).
//!
//! Flow control, without busy loops and without silent loss:
//! - RX: a frame read from the backend waits in `rx_frame` until the guest posts a
//!   buffer; while it waits, the backend is not read (its queue fills and the host
//!   side applies its own backpressure). A guest notification on the RX queue resumes
//!   reading.
//! - TX: a chain the backend refuses (EAGAIN) goes back to the ring and TX stops until
//!   the backend reports writable again.
//!
//! The backend fd is watched edge-triggered, so `rx_ready`/`tx_blocked` remember the
//! last edge. A backend whose connection dies (passt exiting) takes the link down
//! (VIRTIO_NET_S_LINK_UP clears, with a configuration interrupt); the device then
//! asks for a new connection, a few times per minute at most, and brings the link back
//! up when it comes (the answer arrives on the backend's fd: nothing here waits).
//!
//! Everything that touches the host runs on the event-loop thread: the driver's status
//! writes (on a vCPU thread) only record the offloads it accepted, and the next queue
//! or backend event tells the backend (TUNSETOFFLOAD), before any frame moves.

pub mod backend;
mod ctrl;
mod rx;
pub mod stream;
pub mod tap;

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;

use self::backend::{is_disconnect, Backend};
use self::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use super::chain::{self, Desc};
use super::persist::{DeviceState, NetState, PersistError};
use super::{
    DeviceError, GuestMemory, LogLimiter, QueueContext, VirtioDevice, F_EVENT_IDX, F_VERSION_1,
    QUEUE_MAX_SIZE, TYPE_NET,
};

/// VIRTIO_NET_F_MRG_RXBUF: a frame may span several RX chains.
const F_MRG_RXBUF: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
/// VIRTIO_NET_F_GUEST_ANNOUNCE: the guest announces itself when asked (ctrl.rs).
const F_GUEST_ANNOUNCE: u64 = 1 << VIRTIO_NET_F_GUEST_ANNOUNCE;
const RX: usize = 0;
const TX: usize = 1;
/// Largest frame with its header: a 64 KiB GSO packet plus Ethernet and virtio headers.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;
/// Reconnects allowed per [`RECONNECT_WINDOW`]; past that the link stays down.
const MAX_RECONNECTS: usize = 3;
const RECONNECT_WINDOW: Duration = Duration::from_secs(60);
const EPOLLIN: u32 = libc::EPOLLIN as u32;
const EPOLLOUT: u32 = libc::EPOLLOUT as u32;
const EPOLLHUP: u32 = libc::EPOLLHUP as u32;
const EPOLLERR: u32 = libc::EPOLLERR as u32;

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Parses `aa:bb:cc:dd:ee:ff`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next()?;
            if p.len() != 2 {
                return None;
            }
            *b = u8::from_str_radix(p, 16).ok()?;
        }
        parts.next().is_none().then_some(Self(out))
    }

    /// A stable, locally administered unicast MAC (52:54:00:xx:xx:xx, as QEMU uses)
    /// derived from `seed` (the VM name and device index).
    pub fn derived(seed: &str) -> Self {
        let mut h: u32 = 0x811c_9dc5;
        for b in seed.bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        let [a, b, c, _] = h.to_be_bytes();
        Self([0x52, 0x54, 0x00, a, b, c])
    }

    /// True for multicast (including broadcast) addresses.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A virtio-net device.
pub struct Net {
    name: String,
    backend: Box<dyn Backend>,
    generation: u64,
    link_up: bool,
    reconnects: Vec<Instant>,
    /// A new backend connection was asked for and has not come yet.
    reconnecting: bool,
    /// Offloads to tell the backend at the next event, and whether an activation (not
    /// a reset) asked for them.
    offloads_pending: Option<(u32, bool)>,
    acked: u64,
    /// VIRTIO_NET_S_ANNOUNCE is set: the guest was asked to announce itself.
    announce: bool,
    config: [u8; 8],
    rx_frame: Vec<u8>,
    rx_len: usize,
    rx_ready: bool,
    tx_blocked: bool,
    tx_frame: Vec<u8>,
    log: LogLimiter,
}

impl Net {
    /// A device with address `mac` on `backend`; `name` is used in logs.
    pub fn new(name: String, backend: Box<dyn Backend>, mac: MacAddr) -> Self {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac.0);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Self {
            name,
            backend,
            generation: 0,
            link_up: true,
            reconnects: Vec::new(),
            reconnecting: false,
            offloads_pending: None,
            acked: 0,
            announce: false,
            config,
            rx_frame: vec![0; MAX_FRAME],
            rx_len: 0,
            rx_ready: true,
            tx_blocked: false,
            tx_frame: Vec::with_capacity(MAX_FRAME),
            log: LogLimiter::default(),
        }
    }

    fn set_link(&mut self, ctx: &mut QueueContext, up: bool) {
        self.set_link_status(up);
        ctx.config_changed();
    }

    /// Link status in the device and its configuration space (no interrupt).
    fn set_link_status(&mut self, up: bool) {
        self.link_up = up;
        self.write_status();
    }

    /// The configuration space's status field from the link and announce state.
    fn write_status(&mut self) {
        let mut status = 0u16;
        if self.link_up {
            status |= VIRTIO_NET_S_LINK_UP as u16;
        }
        if self.announce {
            status |= VIRTIO_NET_S_ANNOUNCE as u16;
        }
        self.config[6..8].copy_from_slice(&status.to_le_bytes());
    }

    /// The configured MAC address.
    pub fn mac(&self) -> MacAddr {
        let [a, b, c, d, e, f, _, _] = self.config;
        MacAddr([a, b, c, d, e, f])
    }

    /// The backend's connection died: link down, then ask for a new one if the budget
    /// allows.
    fn backend_lost(&mut self, ctx: &mut QueueContext, e: &io::Error) {
        if self.reconnecting {
            return;
        }
        log::error!(
            "{}: lost {} ({e}); link down",
            self.name,
            self.backend.describe()
        );
        self.set_link(ctx, false);
        self.rx_len = 0;
        self.rx_ready = false;
        let now = Instant::now();
        self.reconnects
            .retain(|t| now.duration_since(*t) < RECONNECT_WINDOW);
        if self.reconnects.len() >= MAX_RECONNECTS {
            log::error!(
                "{}: {} reconnects within {:?}: giving up, the link stays down",
                self.name,
                MAX_RECONNECTS,
                RECONNECT_WINDOW
            );
            return;
        }
        self.reconnects.push(now);
        match self.backend.start_reconnect() {
            Ok(()) => {
                self.reconnecting = true;
                // The backend's fd is now the one the answer comes on.
                self.generation += 1;
            }
            Err(e) => log::error!("{}: cannot reconnect: {e}; the link stays down", self.name),
        }
    }

    /// An event while a new connection is awaited: takes it if it came.
    fn reconnect_event(&mut self, ctx: &mut QueueContext) -> Result<(), DeviceError> {
        match self.backend.finish_reconnect() {
            Ok(false) => return Ok(()),
            Ok(true) => {
                self.rx_ready = true;
                self.tx_blocked = false;
                log::warn!(
                    "{}: reconnected to {}; link up",
                    self.name,
                    self.backend.describe()
                );
                self.set_link(ctx, true);
            }
            Err(e) => log::error!("{}: cannot reconnect: {e}; the link stays down", self.name),
        }
        self.reconnecting = false;
        self.generation += 1;
        Ok(())
    }

    /// Tells the backend the offloads the driver's last activation or reset left.
    fn sync_offloads(&mut self) -> Result<(), DeviceError> {
        let Some((flags, activation)) = self.offloads_pending.take() else {
            return Ok(());
        };
        match self.backend.set_offloads(flags) {
            Ok(()) => Ok(()),
            // A reset device does not move frames: a failure only needs a word.
            Err(e) if !activation => {
                log::warn!("{}: {e}", self.name);
                Ok(())
            }
            Err(e) => Err(DeviceError::Protocol(format!(
                "cannot match {} offloads: {e}",
                self.backend.describe()
            ))),
        }
    }

    fn offloads(&self) -> u32 {
        let mut f = 0;
        if self.acked & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0 {
            f |= TUN_F_CSUM;
            if self.acked & (1 << VIRTIO_NET_F_GUEST_TSO4) != 0 {
                f |= TUN_F_TSO4;
            }
            if self.acked & (1 << VIRTIO_NET_F_GUEST_TSO6) != 0 {
                f |= TUN_F_TSO6;
            }
        }
        f
    }

    /// Sends guest TX chains to the TAP until the ring is empty or the TAP is full.
    fn process_tx(&mut self, ctx: &mut QueueContext) -> Result<(), DeviceError> {
        let mem = ctx.mem;
        let mut used = false;
        while !self.tx_blocked {
            let Some(chain) = next_chain(&mut ctx.queues[TX], mem)? else {
                break;
            };
            let head = chain.head_index();
            let descs = chain::collect(chain)?;
            gather(mem, &descs, &mut self.tx_frame)?;
            let result = if self.tx_frame.len() < VNET_HDR_LEN + 14 {
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "TX buffer shorter than its headers",
                ))
            } else if !self.link_up {
                // Like a NIC with no carrier: the frame is dropped.
                Ok(())
            } else {
                self.backend.write_frame(&mut self.tx_frame)
            };
            match result {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ctx.queues[TX].go_to_previous_position();
                    self.tx_blocked = true;
                    break;
                }
                Err(e) if is_disconnect(&e) => self.backend_lost(ctx, &e),
                Err(e) => {
                    let msg = format!(
                        "dropped a {}-byte frame to {}: {e}",
                        self.tx_frame.len(),
                        self.backend.describe()
                    );
                    self.log.warn(&self.name, &msg);
                }
            }
            ctx.queues[TX].add_used(mem, head, 0)?;
            used = true;
        }
        if used {
            ctx.notify(TX)?;
        }
        Ok(())
    }
}

/// The next available chain, or None once the ring is empty with notifications on.
pub(super) fn next_chain<'m>(
    q: &mut Queue,
    mem: &'m GuestMemory,
) -> Result<Option<virtio_queue::DescriptorChain<&'m GuestMemory>>, DeviceError> {
    loop {
        if let Some(c) = q.iter(mem)?.next() {
            return Ok(Some(c));
        }
        if !q.enable_notification(mem)? {
            return Ok(None);
        }
    }
}

/// Copies the readable descriptors of a TX chain into `out`.
fn gather(mem: &GuestMemory, descs: &[Desc], out: &mut Vec<u8>) -> Result<(), DeviceError> {
    out.clear();
    for d in descs {
        let end = out.len() + d.len as usize;
        if d.writable || end > MAX_FRAME {
            return Err(DeviceError::Protocol(format!(
                "TX chain has a writable buffer or exceeds {MAX_FRAME} bytes"
            )));
        }
        let start = out.len();
        out.resize(end, 0);
        mem.read_slice(&mut out[start..], d.addr).map_err(|e| {
            DeviceError::Protocol(format!("TX buffer {:#x}+{}: {e}", d.addr.0, d.len))
        })?;
    }
    Ok(())
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        // RX, TX, control.
        &[QUEUE_MAX_SIZE, QUEUE_MAX_SIZE, 64]
    }

    fn features(&self) -> u64 {
        let base = F_MRG_RXBUF
            | F_VERSION_1
            | F_EVENT_IDX
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_CTRL_VQ)
            | F_GUEST_ANNOUNCE;
        if !self.backend.supports_offloads() {
            return base;
        }
        base | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activate(&mut self, _ctx: QueueContext) -> Result<(), DeviceError> {
        // Runs on a vCPU thread: the event loop tells the backend (sync_offloads) when
        // it next handles this device, which the transport's queue signals make soon.
        self.offloads_pending = Some((self.offloads(), true));
        // Frames may have queued up before the driver was ready: the RX queue event the
        // transport sends next reads them.
        self.rx_ready = true;
        self.tx_blocked = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.tx_blocked = false;
        self.announce = false;
        self.write_status();
        self.offloads_pending = Some((0, false));
    }

    fn sync_host(&mut self) -> Result<(), DeviceError> {
        self.sync_offloads()
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.backend.fd())
    }

    fn save(&self) -> DeviceState {
        DeviceState::Net(NetState {
            acked_features: self.acked,
            mac: self.mac(),
            link_up: self.link_up,
            announce: self.announce,
            rx_pending: self
                .rx_frame
                .get(..self.rx_len)
                .map(<[u8]>::to_vec)
                .unwrap_or_default(),
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), PersistError> {
        let name = || self.name.clone();
        let DeviceState::Net(s) = state else {
            return Err(PersistError::Kind {
                name: name(),
                snapshot: state.kind(),
                device: "net",
            });
        };
        PersistError::check_features(
            &self.name,
            "acked features",
            s.acked_features,
            self.features(),
        )?;
        if s.mac != self.mac() {
            return Err(PersistError::Mac {
                name: name(),
                snapshot: s.mac,
                device: self.mac(),
            });
        }
        let len = s.rx_pending.len();
        let (min, max) = (VNET_HDR_LEN, self.rx_frame.len());
        if len != 0 && !(min..=max).contains(&len) {
            return Err(PersistError::RxPending {
                name: name(),
                len,
                min,
                max,
            });
        }
        // Cannot fail: len <= max was checked.
        if let Some(slot) = self.rx_frame.get_mut(..len) {
            slot.copy_from_slice(&s.rx_pending);
            self.rx_len = len;
        }
        self.acked = s.acked_features;
        self.announce = s.announce;
        self.set_link_status(s.link_up);
        Ok(())
    }

    /// Running again somewhere else (a restore, a migration): a guest that supports it
    /// is asked to announce itself, so the network learns where it is now.
    fn restored(&mut self, mut ctx: QueueContext) {
        if self.acked & F_GUEST_ANNOUNCE != 0 {
            self.announce = true;
            self.write_status();
            ctx.config_changed();
        }
    }

    fn backend_generation(&self) -> u64 {
        self.generation
    }

    fn queue_event(&mut self, mut ctx: QueueContext, index: usize) -> Result<(), DeviceError> {
        if self.reconnecting {
            // The answer may have come while the device was reset (no backend events
            // then): look again whenever the driver notifies.
            self.reconnect_event(&mut ctx)?;
        }
        match index {
            RX => self.process_rx(&mut ctx),
            TX => self.process_tx(&mut ctx),
            ctrl::CTRL => self.process_ctrl(&mut ctx),
            _ => Ok(()),
        }
    }

    fn backend_event(&mut self, mut ctx: QueueContext, events: u32) -> Result<(), DeviceError> {
        if self.reconnecting {
            return self.reconnect_event(&mut ctx);
        }
        if events & EPOLLOUT != 0 {
            // The rest of a partly written frame goes first, even if the guest has
            // nothing new to send.
            let flushed = match self.backend.flush() {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                Err(e) if is_disconnect(&e) => {
                    self.backend_lost(&mut ctx, &e);
                    true
                }
                Err(e) => {
                    self.log.warn(&self.name, &format!("flush: {e}"));
                    true
                }
            };
            if flushed && self.tx_blocked {
                self.tx_blocked = false;
                self.process_tx(&mut ctx)?;
            }
        }
        // A hang-up or error shows up as a read error, which process_rx handles.
        if events & (EPOLLIN | EPOLLHUP | EPOLLERR) != 0 {
            self.rx_ready = true;
            self.process_rx(&mut ctx)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parse_and_display() {
        let m = MacAddr::parse("52:54:00:ab:cd:EF").unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "5:54:00:ab:cd:ef",
            "zz:54:00:ab:cd:ef",
        ] {
            assert!(MacAddr::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn derived_mac_is_stable_unicast_and_distinct() {
        let a = MacAddr::derived("vm1/0");
        assert_eq!(a, MacAddr::derived("vm1/0"));
        assert_ne!(a, MacAddr::derived("vm1/1"));
        assert!(!a.is_multicast());
        assert_eq!(&a.0[..3], &[0x52, 0x54, 0x00]);
    }
}
