//! Snapshots: a paused VM written to a directory, and read back for a restore.
//!
//! A snapshot directory holds two files:
//! - `state`: the header of [`crate::state::format`] and a [`SnapshotState`] (machine configuration,
//!   vCPU, VM and device state, and the memory file's layout and digest);
//! - `memory`: guest RAM, sparse (see [`memory_file`]).
//!
//! Writing goes to `DIR.partial-PID` first and is renamed into place only when both
//! files are complete, so a failed snapshot leaves nothing behind and an existing
//! directory is replaced (with `--force`) only by a whole snapshot.

pub mod memory_file;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::memory::GuestMemory;
use crate::state::format::{self, FormatError};
use crate::state::{InconsistentState, MachineState};
use memory_file::{MemoryFileError, MemoryInfo};

/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Errors taking or loading a snapshot. Each names the file and the problem.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The target exists and `--force` was not given.
    #[error("{0} already exists; choose another directory or pass --force to replace it")]
    Exists(PathBuf),
    /// The target exists and is not a snapshot, so `--force` does not replace it.
    #[error("{} exists and is not a wisp snapshot ({why}); --force replaces only a snapshot directory wisp wrote: choose another directory", path.display())]
    NotASnapshot {
        /// The target.
        path: PathBuf,
        /// What it is instead.
        why: String,
    },
    /// The target's parent directory is missing.
    #[error("cannot create {path}: {source}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A snapshot file is missing or unreadable.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The state file is bad.
    #[error("snapshot state {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: FormatError,
    },
    /// The memory file is bad.
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    /// The state contradicts itself (only a buggy writer gets past the checksum).
    #[error("snapshot {0}")]
    Inconsistent(#[from] InconsistentState),
    /// Writing or renaming failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// The body of the state file: the machine's state, and the memory file's layout and
/// digest (the keys of both side by side).
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// vCPUs, VM, devices, configuration.
    #[serde(flatten)]
    pub machine: MachineState,
    /// The memory file's layout and digest.
    pub memory: MemoryInfo,
}

impl SnapshotState {
    /// Checks that the parts agree with the configuration and the memory layout.
    pub fn check(&self) -> Result<(), SnapshotError> {
        self.machine.check()?;
        let ranges = self.machine.ram_layout()?;
        let layout: Vec<(u64, u64)> = self
            .memory
            .regions
            .iter()
            .map(|r| (r.guest_addr, r.len))
            .collect();
        if layout != ranges {
            return Err(SnapshotError::Inconsistent(InconsistentState(format!(
                "memory regions {layout:x?} do not match {} MiB of RAM",
                self.machine.config.memory_mib
            ))));
        }
        Ok(())
    }
}

/// What a finished snapshot reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotSummary {
    /// The snapshot directory.
    pub path: PathBuf,
    /// Bytes the two files occupy on disk.
    pub disk_bytes: u64,
    /// The memory file's apparent size (guest RAM).
    pub memory_bytes: u64,
    /// Seconds spent saving the state and writing the files (the VM is paused).
    pub took_s: f64,
}

/// Refuses a target that exists, unless `force` is given and it is a snapshot wisp
/// wrote (checked again before it is replaced). Runs before the VM is paused.
pub fn check_target(dir: &Path, force: bool) -> Result<(), SnapshotError> {
    if dir.symlink_metadata().is_err() {
        return Ok(());
    }
    if !force {
        return Err(SnapshotError::Exists(dir.to_path_buf()));
    }
    is_snapshot_dir(dir).map_err(|why| SnapshotError::NotASnapshot {
        path: dir.to_path_buf(),
        why,
    })
}

/// Whether `dir` is what [`Machine::snapshot`] writes: a directory (not a link) that
/// holds nothing but a `state` file with the snapshot magic and a `memory` file.
fn is_snapshot_dir(dir: &Path) -> Result<(), String> {
    use std::io::Read;
    let m = dir.symlink_metadata().map_err(|e| e.to_string())?;
    if !m.file_type().is_dir() {
        return Err(if m.file_type().is_symlink() {
            "a symbolic link".into()
        } else {
            "not a directory".into()
        });
    }
    let entries = std::fs::read_dir(dir).map_err(|e| e.to_string())?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name();
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        match name.to_str() {
            Some(n @ (STATE_FILE | MEMORY_FILE)) if regular => found.push(n.to_string()),
            _ => return Err(format!("it holds {:?}", name)),
        }
    }
    if found.len() != 2 {
        return Err(format!("it lacks a {STATE_FILE} or {MEMORY_FILE} file"));
    }
    let mut magic = [0u8; 8];
    devices::host_file::open_regular(&dir.join(STATE_FILE))
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| format!("its {STATE_FILE} file: {e}"))?;
    if magic != format::MAGIC {
        return Err(format!("its {STATE_FILE} file is not a snapshot state"));
    }
    Ok(())
}

/// Removes a snapshot directory wisp wrote (its two files, then the directory; whatever
/// else appeared in it meanwhile stays, and so does the directory then).
fn remove_snapshot_dir(dir: &Path) -> std::io::Result<()> {
    for f in [STATE_FILE, MEMORY_FILE] {
        match std::fs::remove_file(dir.join(f)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::remove_dir(dir)
}

/// rename(2) that never replaces `to` (RENAME_NOREPLACE; on file systems without it,
/// a check and a plain rename).
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    if to.symlink_metadata().is_ok() {
        return Err(std::io::ErrorKind::AlreadyExists.into());
    }
    std::fs::rename(from, to)
}

fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Writes a snapshot of a paused VM, `machine` and its memory `mem`, to `dir` (the
/// caller has checked it with [`check_target`] before pausing). `started` is when the
/// capture began, for the summary.
pub fn write(
    dir: &Path,
    machine: MachineState,
    mem: &GuestMemory,
    force: bool,
    started: Instant,
) -> Result<SnapshotSummary, SnapshotError> {
    let partial = sibling(dir, "partial");
    create_private_dir(&partial)?;
    let result = write_files(&partial, machine, mem);
    let result = result.and_then(|len| replace_dir(&partial, dir, force).map(|()| len));
    if result.is_err() {
        let _ = remove_snapshot_dir(&partial);
    }
    let memory_bytes = result?;
    Ok(SnapshotSummary {
        path: dir.to_path_buf(),
        disk_bytes: disk_usage(&dir.join(STATE_FILE)) + disk_usage(&dir.join(MEMORY_FILE)),
        memory_bytes,
        took_s: started.elapsed().as_secs_f64(),
    })
}

/// Writes the memory file and the state file into `dir`; returns the memory file's
/// length (guest RAM).
fn write_files(dir: &Path, machine: MachineState, mem: &GuestMemory) -> Result<u64, SnapshotError> {
    let memory = memory_file::write(mem, &dir.join(MEMORY_FILE))?;
    let memory_len = memory.file_len();
    let state = SnapshotState { machine, memory };
    let path = dir.join(STATE_FILE);
    let bytes = format::encode(&state).map_err(|source| SnapshotError::State {
        path: path.clone(),
        source,
    })?;
    write_private(&path, &bytes)?;
    Ok(memory_len)
}

/// `DIR.TAG-PID`, beside `dir`.
fn sibling(dir: &Path, tag: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{tag}-{}", std::process::id()));
    dir.with_file_name(name)
}

fn create_private_dir(path: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|source| SnapshotError::Create {
            path: path.to_path_buf(),
            source,
        })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let werr = |source| SnapshotError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(werr)?;
    f.write_all(bytes).map_err(werr)?;
    f.sync_all().map_err(werr)
}

/// Renames `partial` to `dir`, never over anything. With `force`, an existing `dir`
/// that is a snapshot is moved aside first (and put back if the rename fails), then
/// removed.
fn replace_dir(partial: &Path, dir: &Path, force: bool) -> Result<(), SnapshotError> {
    let werr = |source| SnapshotError::Write {
        path: dir.to_path_buf(),
        source,
    };
    let old = if force && dir.symlink_metadata().is_ok() {
        check_target(dir, force)?;
        let old = sibling(dir, "old");
        rename_noreplace(dir, &old).map_err(werr)?;
        Some(old)
    } else {
        None
    };
    if let Err(e) = rename_noreplace(partial, dir) {
        if let Some(old) = &old {
            let _ = rename_noreplace(old, dir);
        }
        return Err(match e.kind() {
            std::io::ErrorKind::AlreadyExists => SnapshotError::Exists(dir.to_path_buf()),
            _ => werr(e),
        });
    }
    if let Some(old) = old {
        if let Err(e) = remove_snapshot_dir(&old) {
            log::warn!("cannot remove the replaced snapshot {}: {e}", old.display());
        }
    }
    Ok(())
}

/// A snapshot read back and checked: its state, and its memory file (size and digest
/// verified) ready to map.
pub struct Loaded {
    /// The state.
    pub state: SnapshotState,
    /// The memory file, open read-only.
    pub memory: File,
    /// Its path, for messages.
    pub memory_path: PathBuf,
}

/// Reads the state file of the snapshot in `dir` (format, checksum) and checks that
/// its parts agree. The caller then applies its overrides, validates the
/// configuration, and calls [`open_memory`]; nothing is started before that.
pub fn read_state(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    use std::io::Read;
    let path = dir.join(STATE_FILE);
    let read_err = |source| SnapshotError::Read {
        path: path.clone(),
        source,
    };
    let file = devices::host_file::open_regular(&path).map_err(read_err)?;
    let mut bytes = Vec::new();
    // One byte more than a valid state can have: decode reports what follows.
    file.take(format::MAX_STATE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let state: SnapshotState = format::decode(&bytes).map_err(|source| SnapshotError::State {
        path: path.clone(),
        source,
    })?;
    state.check()?;
    Ok(state)
}

impl Loaded {
    /// The machine's state, and guest memory mapped copy-on-write from the memory file.
    pub fn into_parts(self) -> Result<(MachineState, GuestMemory), SnapshotError> {
        let mem = memory_file::map_private(self.memory, &self.memory_path, &self.state.memory)?;
        Ok((self.state.machine, mem))
    }
}

/// Opens the memory file of the snapshot in `dir` and checks its size and digest
/// against `state`.
pub fn open_memory(dir: &Path, state: SnapshotState) -> Result<Loaded, SnapshotError> {
    let memory_path = dir.join(MEMORY_FILE);
    let memory = memory_file::open_and_verify(&memory_path, &state.memory)?;
    Ok(Loaded {
        state,
        memory,
        memory_path,
    })
}
