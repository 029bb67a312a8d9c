//! virtio-blk backed by a raw image file: read, write, flush, get-id and read-only.

mod request;

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
};
use virtio_queue::{QueueOwnedT, QueueT};

use crate::host_file::{self, Accept};

use super::persist::{BlockState, DeviceState, PersistError};
use super::{
    chain, DeviceError, LogLimiter, QueueContext, VirtioDevice, F_EVENT_IDX, F_VERSION_1,
    QUEUE_MAX_SIZE, TYPE_BLOCK,
};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Data segments per request the device announces (VIRTIO_BLK_F_SEG_MAX).
const SEG_MAX: u32 = 128;

/// Errors opening a disk image.
#[derive(Debug, Error)]
pub enum BlockError {
    /// open(2) failed.
    #[error("cannot open disk {}: {source}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Another process holds a conflicting lock.
    #[error("disk {} is in use by another process (it holds a lock on the file); stop that VM, or add ,ro to every user of the image", path.display())]
    Locked {
        /// The image.
        path: PathBuf,
    },
    /// The image has no complete sector.
    #[error("disk {} is smaller than one 512-byte sector; give it a size, e.g. truncate -s 1G {}", path.display(), path.display())]
    Empty {
        /// The image.
        path: PathBuf,
    },
    /// Seeking to find the size failed.
    #[error("cannot find the size of disk {}: {source}", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

/// How to open one disk.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockConfig {
    /// Raw image file (or block device).
    pub path: PathBuf,
    /// Refuse writes (and open the file read-only).
    pub read_only: bool,
    /// Serial number returned by GET_ID (at most 20 bytes are used).
    pub id: String,
}

/// A virtio-blk device.
pub struct Block {
    name: String,
    path: PathBuf,
    file: File,
    read_only: bool,
    capacity: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    acked: u64,
    config: [u8; 16],
    scratch: Vec<u8>,
    log: LogLimiter,
}

fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), BlockError> {
    let op = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let r = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(BlockError::Locked {
            path: path.to_path_buf(),
        });
    }
    // Filesystems without flock support: carry on unlocked.
    log::debug!("cannot lock {}: {e}", path.display());
    Ok(())
}

/// Releases a lock taken by [`lock`].
fn unlock(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Block {
    /// Opens the image of `config` and locks it (shared if read-only, else exclusive);
    /// `name` is used in logs (e.g. `virtio-blk vda`).
    pub fn open(config: &BlockConfig, name: String) -> Result<Self, BlockError> {
        let block = Self::open_unlocked(config, name)?;
        lock(&block.file, &config.path, config.read_only)?;
        Ok(block)
    }

    /// Opens the image of `config` without locking it: a migration's destination,
    /// which takes the lock ([`VirtioDevice::claim_host`]) only once the source has
    /// released it.
    pub fn open_unlocked(config: &BlockConfig, name: String) -> Result<Self, BlockError> {
        let path = &config.path;
        let mut file = host_file::open(
            path,
            OpenOptions::new().read(true).write(!config.read_only),
            Accept::RegularOrBlock,
        )
        .map_err(|source| BlockError::Open {
            path: path.clone(),
            source,
        })?;
        let bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?;
        let capacity = bytes / SECTOR_SIZE;
        if capacity == 0 {
            return Err(BlockError::Empty { path: path.clone() });
        }
        if !bytes.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "disk {}: size is not a multiple of 512; the last {} bytes are not visible to the guest",
                path.display(),
                bytes % SECTOR_SIZE
            );
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = config.id.len().min(id.len());
        id[..n].copy_from_slice(&config.id.as_bytes()[..n]);
        let mut cfg = [0u8; 16];
        cfg[..8].copy_from_slice(&capacity.to_le_bytes());
        cfg[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Self {
            name,
            path: path.clone(),
            file,
            read_only: config.read_only,
            capacity,
            id,
            acked: 0,
            config: cfg,
            scratch: Vec::new(),
            log: LogLimiter::default(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Logs a rejected request (rate-limited).
    fn reject(&mut self, why: &str) {
        self.log.warn(&self.name, &format!("request failed: {why}"));
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f =
            F_VERSION_1 | F_EVENT_IDX | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activate(&mut self, _ctx: QueueContext) -> Result<(), DeviceError> {
        Ok(())
    }

    /// Requests complete while the event loop processes the queue, so with the VM
    /// paused nothing is in flight: flush what was written and release the lock.
    fn release_host(&mut self) -> io::Result<()> {
        if !self.read_only {
            self.file.sync_data()?;
        }
        unlock(&self.file)
    }

    fn claim_host(&mut self) -> io::Result<()> {
        lock(&self.file, &self.path, self.read_only)
            .map_err(|e| io::Error::new(io::ErrorKind::WouldBlock, e.to_string()))
    }

    fn reset(&mut self) {
        self.acked = 0;
    }

    fn save(&self) -> DeviceState {
        DeviceState::Block(BlockState {
            acked_features: self.acked,
            capacity: self.capacity,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), PersistError> {
        let DeviceState::Block(s) = state else {
            return Err(PersistError::Kind {
                name: self.name.clone(),
                snapshot: state.kind(),
                device: "block",
            });
        };
        if s.capacity != self.capacity {
            return Err(PersistError::Capacity {
                name: self.name.clone(),
                snapshot: s.capacity,
                device: self.capacity,
            });
        }
        PersistError::check_features(
            &self.name,
            "acked features",
            s.acked_features,
            self.features(),
        )?;
        self.acked = s.acked_features;
        Ok(())
    }

    fn queue_event(&mut self, mut ctx: QueueContext, index: usize) -> Result<(), DeviceError> {
        if index != 0 || !ctx.queues[0].ready() {
            return Ok(());
        }
        let mem = ctx.mem;
        let mut used = false;
        loop {
            ctx.queues[0].disable_notification(mem)?;
            while let Some(chain) = ctx.queues[0].iter(mem)?.next() {
                let head = chain.head_index();
                let descs = chain::collect(chain)?;
                let len = self.process(mem, &descs)?;
                ctx.queues[0].add_used(mem, head, len)?;
                used = true;
            }
            if !ctx.queues[0].enable_notification(mem)? {
                break;
            }
        }
        if used {
            ctx.notify(0)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
