//! virtio-net over a host TAP.
//!
//! Flow control, without busy loops and without silent loss:
//! - RX: a frame read from the TAP waits in `rx_frame` until the guest posts a buffer;
//!   while it waits, the TAP is not read (its queue fills and the host kernel applies
//!   its own backpressure). A guest notification on the RX queue resumes reading.
//! - TX: a chain the TAP refuses (EAGAIN) goes back to the ring and TX stops until
//!   the TAP reports writable again.
//!
//! The TAP is watched edge-triggered, so `tap_readable`/`tx_blocked` remember the
//! last edge.

pub mod tap;

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};

use self::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use super::chain::{self, Desc};
use super::{
    read_config_bytes, DeviceError, GuestMemory, LogLimiter, QueueContext, VirtioDevice,
    F_EVENT_IDX, F_VERSION_1, QUEUE_MAX_SIZE, TYPE_NET,
};

const RX: usize = 0;
const TX: usize = 1;
/// Largest frame with its header: a 64 KiB GSO packet plus Ethernet and virtio headers.
const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;
const EPOLLIN: u32 = libc::EPOLLIN as u32;
const EPOLLOUT: u32 = libc::EPOLLOUT as u32;

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

/// A virtio-net device on a TAP.
pub struct Net {
    name: String,
    tap: Tap,
    acked: u64,
    config: [u8; 8],
    rx_frame: Vec<u8>,
    rx_len: usize,
    tap_readable: bool,
    tx_blocked: bool,
    tx_frame: Vec<u8>,
    log: LogLimiter,
}

impl Net {
    /// A device with address `mac` on `tap`; `name` is used in logs.
    pub fn new(name: String, tap: Tap, mac: MacAddr) -> Self {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac.0);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Self {
            name,
            tap,
            acked: 0,
            config,
            rx_frame: vec![0; MAX_FRAME],
            rx_len: 0,
            tap_readable: true,
            tx_blocked: false,
            tx_frame: Vec::with_capacity(MAX_FRAME),
            log: LogLimiter::default(),
        }
    }

    /// The TAP's interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
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

    /// Moves frames from the TAP into guest RX buffers while both have some.
    fn process_rx(&mut self, ctx: &mut QueueContext) -> Result<(), DeviceError> {
        let mem = ctx.mem;
        let mut used = false;
        loop {
            if self.rx_len == 0 {
                if !self.tap_readable {
                    break;
                }
                match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(0) => break,
                    Ok(n) => self.rx_len = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.tap_readable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.log
                            .warn(&self.name, &format!("TAP {} read: {e}", self.tap.name()));
                        self.tap_readable = false;
                        break;
                    }
                }
            }
            let q = &mut ctx.queues[RX];
            let Some(chain) = next_chain(q, mem)? else {
                // No guest buffer: keep the frame and stop reading the TAP until the
                // driver adds buffers (it notifies: notifications are enabled).
                break;
            };
            let head = chain.head_index();
            let descs = chain::collect(chain)?;
            let frame = &mut self.rx_frame[..self.rx_len];
            if frame.len() >= VNET_HDR_LEN {
                // num_buffers = 1: one chain per frame without VIRTIO_NET_F_MRG_RXBUF.
                frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            }
            match write_chain(mem, &descs, frame)? {
                Some(n) => {
                    q.add_used(mem, head, n)?;
                    used = true;
                }
                None => {
                    // The buffer is too small for this frame: drop the frame, keep the
                    // buffer for the next one.
                    q.go_to_previous_position();
                    self.log.warn(
                        &self.name,
                        &format!("dropped a {}-byte frame: RX buffer too small", frame.len()),
                    );
                }
            }
            self.rx_len = 0;
        }
        if used {
            ctx.notify(RX)?;
        }
        Ok(())
    }

    /// Sends guest TX chains to the TAP until the ring is empty or the TAP is full.
    fn process_tx(&mut self, ctx: &mut QueueContext) -> Result<(), DeviceError> {
        let mem = ctx.mem;
        let mut used = false;
        while !self.tx_blocked {
            let q = &mut ctx.queues[TX];
            let Some(chain) = next_chain(q, mem)? else {
                break;
            };
            let head = chain.head_index();
            let descs = chain::collect(chain)?;
            gather(mem, &descs, &mut self.tx_frame)?;
            if self.tx_frame.len() < VNET_HDR_LEN + 14 {
                self.log.warn(
                    &self.name,
                    &format!(
                        "dropped a {}-byte TX buffer: shorter than headers",
                        self.tx_frame.len()
                    ),
                );
                q.add_used(mem, head, 0)?;
                used = true;
                continue;
            }
            match self.tap.write_frame(&self.tx_frame) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    q.go_to_previous_position();
                    self.tx_blocked = true;
                    break;
                }
                Err(e) => self.log.warn(
                    &self.name,
                    &format!(
                        "TAP {} write of {} bytes: {e}",
                        self.tap.name(),
                        self.tx_frame.len()
                    ),
                ),
            }
            q.add_used(mem, head, 0)?;
            used = true;
        }
        if used {
            ctx.notify(TX)?;
        }
        Ok(())
    }
}

/// The next available chain, or None once the ring is empty with notifications on.
fn next_chain<'m>(
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

/// Writes `frame` across the writable descriptors; `None` if they are too small.
fn write_chain(
    mem: &GuestMemory,
    descs: &[Desc],
    frame: &[u8],
) -> Result<Option<u32>, DeviceError> {
    let mut room: u64 = 0;
    for d in descs {
        if !d.writable || !mem.check_range(d.addr, d.len as usize) {
            return Err(DeviceError::Protocol(format!(
                "RX buffer {:#x}+{} is read-only or outside guest memory",
                d.addr.0, d.len
            )));
        }
        room += u64::from(d.len);
    }
    if room < frame.len() as u64 {
        return Ok(None);
    }
    let mut rest = frame;
    for d in descs {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(d.len as usize);
        mem.write_slice(&rest[..n], d.addr)
            .map_err(|e| DeviceError::Protocol(format!("RX buffer: {e}")))?;
        rest = &rest[n..];
    }
    Ok(Some(frame.len() as u32))
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
        &[QUEUE_MAX_SIZE, QUEUE_MAX_SIZE]
    }

    fn features(&self) -> u64 {
        F_VERSION_1
            | F_EVENT_IDX
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("{}: config write at {offset:#x} ignored", self.name);
    }

    fn activate(&mut self, _ctx: QueueContext) -> Result<(), DeviceError> {
        if let Err(e) = self.tap.set_offload(self.offloads()) {
            return Err(DeviceError::Protocol(format!(
                "cannot match TAP offloads: {e}"
            )));
        }
        // Frames may have queued up on the TAP before the driver was ready: the RX queue
        // event the transport sends next reads them.
        self.tap_readable = true;
        self.tx_blocked = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.tx_blocked = false;
        if let Err(e) = self.tap.set_offload(0) {
            log::warn!("{}: {e}", self.name);
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.tap.as_raw_fd())
    }

    fn queue_event(&mut self, mut ctx: QueueContext, index: usize) -> Result<(), DeviceError> {
        match index {
            RX => self.process_rx(&mut ctx),
            TX => self.process_tx(&mut ctx),
            _ => Ok(()),
        }
    }

    fn backend_event(&mut self, mut ctx: QueueContext, events: u32) -> Result<(), DeviceError> {
        if events & EPOLLOUT != 0 && self.tx_blocked {
            self.tx_blocked = false;
            self.process_tx(&mut ctx)?;
        }
        if events & EPOLLIN != 0 {
            self.tap_readable = true;
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
