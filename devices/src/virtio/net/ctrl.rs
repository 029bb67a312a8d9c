//! The control queue of virtio-net, for one command: the guest's acknowledgement of a
//! link announcement (VIRTIO_NET_F_GUEST_ANNOUNCE).
//!
//! After a restore or a migration the card sets VIRTIO_NET_S_ANNOUNCE in its status
//! and raises a configuration interrupt; the guest then sends gratuitous ARPs (and
//! IPv6 neighbour advertisements) for every address it has, so switches and neighbours
//! learn its new port at once, and acknowledges with VIRTIO_NET_CTRL_ANNOUNCE_ACK,
//! which clears the bit. QEMU and Cloud Hypervisor do the same.
//!
//! A command is a chain: a 2-byte header (class, command) and any data the driver
//! reads out, then one device-writable byte for the answer. Any other command gets
//! VIRTIO_NET_ERR: no other control feature is offered.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::QueueT;
use vm_memory::Bytes;

use super::{next_chain, Net};
use crate::virtio::chain;
use crate::virtio::{DeviceError, QueueContext};

/// The control queue's index.
pub(super) const CTRL: usize = 2;

impl Net {
    /// Answers the commands on the control queue.
    pub(super) fn process_ctrl(&mut self, ctx: &mut QueueContext) -> Result<(), DeviceError> {
        let mem = ctx.mem;
        let mut used = false;
        while let Some(c) = next_chain(&mut ctx.queues[CTRL], mem)? {
            let head = c.head_index();
            let descs = chain::collect(c)?;
            let (Some(ack), Some(hdr)) = (descs.last(), descs.first()) else {
                return Err(DeviceError::Protocol("empty control command".into()));
            };
            if !ack.writable || ack.len < 1 || hdr.writable || hdr.len < 2 {
                return Err(DeviceError::Protocol(
                    "control command without a readable header or a writable answer".into(),
                ));
            }
            let mut class_cmd = [0u8; 2];
            mem.read_slice(&mut class_cmd, hdr.addr)
                .map_err(|e| DeviceError::Protocol(format!("control header: {e}")))?;
            let answer = match (u32::from(class_cmd[0]), u32::from(class_cmd[1])) {
                (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) => {
                    self.announce = false;
                    self.write_status();
                    VIRTIO_NET_OK
                }
                (class, cmd) => {
                    self.log.warn(
                        &self.name,
                        &format!("control command class {class} command {cmd} refused"),
                    );
                    VIRTIO_NET_ERR
                }
            };
            mem.write_obj(answer as u8, ack.addr)
                .map_err(|e| DeviceError::Protocol(format!("control answer: {e}")))?;
            ctx.queues[CTRL].add_used(mem, head, 1)?;
            used = true;
        }
        if used {
            ctx.notify(CTRL)?;
        }
        Ok(())
    }
}
