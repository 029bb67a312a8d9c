//! Executing one virtio-blk request.
//!
//! Layout (virtio 1.x, 5.2.6): a device-readable 16-byte header {type, reserved,
//! sector}, data buffers, and a device-writable status byte (the last byte of the last
//! descriptor). A chain without a readable header or a writable status byte is a
//! protocol error (the device needs a reset). Everything else that is wrong with a
//! request (buffers outside guest memory, zero-length or misdirected buffers, sectors
//! past the end, writes to a read-only disk, I/O errors) is answered with
//! VIRTIO_BLK_S_IOERR, and an unknown type with VIRTIO_BLK_S_UNSUPP.

use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::{Bytes, GuestMemoryBackend};

use super::{Block, SECTOR_SIZE};
use crate::virtio::chain::Desc;
use crate::virtio::{DeviceError, GuestMemory};

/// Bytes moved per file access: bounds the host buffer whatever the guest asks for.
const CHUNK: usize = 128 << 10;
const HEADER_LEN: u32 = 16;

/// How a request ended: status byte and bytes written into guest buffers before it.
struct Outcome {
    status: u32,
    written: u32,
}

impl Outcome {
    fn status(status: u32) -> Self {
        Self { status, written: 0 }
    }
}

impl Block {
    /// Runs the request in `descs`; returns the used length (bytes written to the guest,
    /// including the status byte).
    pub(super) fn process(
        &mut self,
        mem: &GuestMemory,
        descs: &[Desc],
    ) -> Result<u32, DeviceError> {
        let (Some(header), Some(status)) = (descs.first(), descs.last()) else {
            return Err(DeviceError::Protocol("empty block request".into()));
        };
        if descs.len() < 2 || header.writable || header.len < HEADER_LEN {
            return Err(DeviceError::Protocol(format!(
                "block request without a readable {HEADER_LEN}-byte header and a status descriptor"
            )));
        }
        let status_addr = match status
            .addr
            .0
            .checked_add(u64::from(status.len).wrapping_sub(1))
        {
            Some(a)
                if status.writable
                    && status.len > 0
                    && mem.check_range(vm_memory::GuestAddress(a), 1) =>
            {
                vm_memory::GuestAddress(a)
            }
            _ => {
                return Err(DeviceError::Protocol(format!(
                "block request status descriptor {:#x}+{} is not a writable byte of guest memory",
                status.addr.0, status.len
            )))
            }
        };
        let raw: [u8; 16] = mem.read_obj(header.addr).map_err(|e| {
            DeviceError::Protocol(format!("block request header at {:#x}: {e}", header.addr.0))
        })?;
        let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let sector = u64::from_le_bytes([
            raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
        ]);
        let data = &descs[1..descs.len() - 1];
        let out = self.execute(mem, kind, sector, data);
        mem.write_obj(out.status as u8, status_addr)
            .map_err(|e| DeviceError::Protocol(format!("block status byte: {e}")))?;
        Ok(out.written.saturating_add(1))
    }

    fn execute(&mut self, mem: &GuestMemory, kind: u32, sector: u64, data: &[Desc]) -> Outcome {
        match kind {
            VIRTIO_BLK_T_IN => self.transfer(mem, sector, data, true),
            VIRTIO_BLK_T_OUT if self.read_only => {
                self.reject("write to a read-only disk");
                Outcome::status(VIRTIO_BLK_S_IOERR)
            }
            VIRTIO_BLK_T_OUT => self.transfer(mem, sector, data, false),
            VIRTIO_BLK_T_FLUSH => match self.file.sync_data() {
                Ok(()) => Outcome::status(VIRTIO_BLK_S_OK),
                Err(e) => {
                    self.reject(&format!("flush: {e}"));
                    Outcome::status(VIRTIO_BLK_S_IOERR)
                }
            },
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, data),
            other => {
                log::debug!("{}: unsupported request type {other}", self.name);
                Outcome::status(VIRTIO_BLK_S_UNSUPP)
            }
        }
    }

    fn get_id(&mut self, mem: &GuestMemory, data: &[Desc]) -> Outcome {
        let Some(d) = data.first().filter(|d| d.writable && d.len > 0) else {
            self.reject("GET_ID without a writable buffer");
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        };
        let n = self.id.len().min(d.len as usize);
        match mem.write_slice(&self.id[..n], d.addr) {
            Ok(()) => Outcome {
                status: VIRTIO_BLK_S_OK,
                written: n as u32,
            },
            Err(e) => {
                self.reject(&format!("GET_ID buffer: {e}"));
                Outcome::status(VIRTIO_BLK_S_IOERR)
            }
        }
    }

    /// Checks the data buffers of a read (`read` = device writes guest memory) or write.
    fn check_buffers(
        &self,
        mem: &GuestMemory,
        sector: u64,
        data: &[Desc],
        read: bool,
    ) -> Result<u64, String> {
        let mut total: u64 = 0;
        for d in data {
            if d.writable != read {
                return Err(format!(
                    "data buffer {:#x}+{} has the wrong direction",
                    d.addr.0, d.len
                ));
            }
            if d.len == 0 {
                return Err(format!("zero-length data buffer at {:#x}", d.addr.0));
            }
            if !mem.check_range(d.addr, d.len as usize) {
                return Err(format!(
                    "data buffer {:#x}+{} is outside guest memory",
                    d.addr.0, d.len
                ));
            }
            total += u64::from(d.len);
        }
        if total == 0 || !total.is_multiple_of(SECTOR_SIZE) {
            return Err(format!(
                "data length {total} is not a positive multiple of 512"
            ));
        }
        let end = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(total));
        match end {
            Some(end) if end <= self.capacity * SECTOR_SIZE => Ok(total),
            _ => Err(format!(
                "sectors {sector}+{} are past the end of the disk ({} sectors)",
                total / SECTOR_SIZE,
                self.capacity
            )),
        }
    }

    fn transfer(&mut self, mem: &GuestMemory, sector: u64, data: &[Desc], read: bool) -> Outcome {
        if let Err(why) = self.check_buffers(mem, sector, data, read) {
            self.reject(&why);
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(CHUNK, 0);
        let mut offset = sector * SECTOR_SIZE;
        let mut written: u32 = 0;
        let mut result = Ok(());
        'outer: for d in data {
            let mut done: u32 = 0;
            while done < d.len {
                let n = (d.len - done).min(CHUNK as u32);
                let buf = &mut scratch[..n as usize];
                let addr = vm_memory::GuestAddress(d.addr.0 + u64::from(done));
                let r = if read {
                    self.file
                        .read_exact_at(buf, offset)
                        .map_err(|e| format!("read at byte {offset}: {e}"))
                        .and_then(|()| mem.write_slice(buf, addr).map_err(|e| e.to_string()))
                } else {
                    mem.read_slice(buf, addr)
                        .map_err(|e| e.to_string())
                        .and_then(|()| {
                            self.file
                                .write_all_at(buf, offset)
                                .map_err(|e| format!("write at byte {offset}: {e}"))
                        })
                };
                if let Err(e) = r {
                    result = Err(e);
                    break 'outer;
                }
                done += n;
                offset += u64::from(n);
                if read {
                    written = written.saturating_add(n);
                }
            }
        }
        self.scratch = scratch;
        match result {
            Ok(()) => Outcome {
                status: VIRTIO_BLK_S_OK,
                written,
            },
            Err(e) => {
                self.reject(&e);
                Outcome {
                    status: VIRTIO_BLK_S_IOERR,
                    written,
                }
            }
        }
    }
}
