//! The RX path: frames from the backend into guest buffers.
//!
//! Without VIRTIO_NET_F_MRG_RXBUF each frame takes one chain, which must hold it whole
//! (a Linux guest that accepts TSO then posts 64 KiB chains of 17 pages). With it, a
//! frame spreads over as many chains as it needs and the header's `num_buffers` says
//! how many, so the guest can post small page-sized buffers.

use std::io;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};

use super::backend::is_disconnect;
use super::{next_chain, Net, F_MRG_RXBUF, RX};
use crate::virtio::chain::{self, Desc};
use crate::virtio::{DeviceError, GuestMemory, QueueContext};

/// Most chains one frame may use (num_buffers is a u16; a 64 KiB frame in 1 KiB
/// buffers needs about 64).
const MAX_MERGE: usize = 256;

/// Bytes the writable descriptors of a chain can take; a descriptor that is read-only
/// or outside guest memory breaks the rules.
fn capacity(mem: &GuestMemory, descs: &[Desc]) -> Result<u64, DeviceError> {
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
    Ok(room)
}

/// Writes `data` from the start of the chain (which must have room for it).
fn fill(mem: &GuestMemory, descs: &[Desc], data: &[u8]) -> Result<(), DeviceError> {
    let mut rest = data;
    for d in descs {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(d.len as usize);
        mem.write_slice(&rest[..n], d.addr)
            .map_err(|e| DeviceError::Protocol(format!("RX buffer: {e}")))?;
        rest = &rest[n..];
    }
    Ok(())
}

/// What happened to the frame waiting in `rx_frame`.
enum Delivery {
    /// In the guest's buffers.
    Done,
    /// Not enough buffers yet: keep the frame, wait for the driver.
    NoBuffers,
    /// The buffers cannot hold it: the frame is dropped.
    TooBig,
}

impl Net {
    /// Moves frames from the backend into guest RX buffers while both have some.
    pub(super) fn process_rx(&mut self, ctx: &mut QueueContext) -> Result<(), DeviceError> {
        let mut used = false;
        loop {
            if self.rx_len == 0 {
                if !self.rx_ready || !self.link_up {
                    break;
                }
                match self.backend.read_frame(&mut self.rx_frame) {
                    Ok(n) => self.rx_len = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.rx_ready = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if is_disconnect(&e) => {
                        self.backend_lost(ctx, &e);
                        continue;
                    }
                    Err(e) => {
                        let msg = format!("{} read: {e}", self.backend.describe());
                        self.log.warn(&self.name, &msg);
                        self.rx_ready = false;
                        break;
                    }
                }
            }
            let delivery = if self.acked & F_MRG_RXBUF != 0 {
                self.deliver_merged(ctx)?
            } else {
                self.deliver_single(ctx)?
            };
            match delivery {
                Delivery::Done => used = true,
                // Keep the frame and stop reading the backend until the driver adds
                // buffers (it notifies: notifications are enabled).
                Delivery::NoBuffers => break,
                Delivery::TooBig => {
                    let msg = format!("dropped a {}-byte frame: RX buffers too small", self.rx_len);
                    self.log.warn(&self.name, &msg);
                }
            }
            self.rx_len = 0;
        }
        if used {
            ctx.notify(RX)?;
        }
        Ok(())
    }

    fn deliver_single(&mut self, ctx: &mut QueueContext) -> Result<Delivery, DeviceError> {
        let mem = ctx.mem;
        let q = &mut ctx.queues[RX];
        let Some(chain) = next_chain(q, mem)? else {
            return Ok(Delivery::NoBuffers);
        };
        let head = chain.head_index();
        let descs = chain::collect(chain)?;
        let frame = &mut self.rx_frame[..self.rx_len];
        if (capacity(mem, &descs)? as usize) < frame.len() {
            // Keep the buffer for the next frame.
            q.go_to_previous_position();
            return Ok(Delivery::TooBig);
        }
        // num_buffers = 1 (the field exists in the virtio 1.x header either way).
        frame[10..12].copy_from_slice(&1u16.to_le_bytes());
        fill(mem, &descs, frame)?;
        q.add_used(mem, head, frame.len() as u32)?;
        Ok(Delivery::Done)
    }

    fn deliver_merged(&mut self, ctx: &mut QueueContext) -> Result<Delivery, DeviceError> {
        let mem = ctx.mem;
        let q = &mut ctx.queues[RX];
        let len = self.rx_len;
        let mut chains: Vec<(u16, Vec<Desc>, u64)> = Vec::new();
        let mut room: u64 = 0;
        while room < len as u64 {
            if chains.len() == MAX_MERGE {
                for _ in 0..chains.len() {
                    q.go_to_previous_position();
                }
                return Ok(Delivery::TooBig);
            }
            let Some(chain) = next_chain(q, mem)? else {
                // Not enough buffers yet: give these back until the driver adds more.
                for _ in 0..chains.len() {
                    q.go_to_previous_position();
                }
                return Ok(Delivery::NoBuffers);
            };
            let head = chain.head_index();
            let descs = chain::collect(chain)?;
            let cap = capacity(mem, &descs)?;
            room += cap;
            chains.push((head, descs, cap));
        }
        let frame = &mut self.rx_frame[..len];
        frame[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
        let mut offset = 0usize;
        for (head, descs, cap) in &chains {
            let n = (len - offset).min(*cap as usize);
            fill(mem, descs, &frame[offset..offset + n])?;
            q.add_used(mem, *head, n as u32)?;
            offset += n;
        }
        debug_assert_eq!(offset, len, "room covered the frame");
        Ok(Delivery::Done)
    }
}
