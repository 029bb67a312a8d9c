//! `wisp snapshot`: write a snapshot of a running VM.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args)]
#[command(after_long_help = "\
The VM is paused (all vCPUs at a consistent point, device queues held), its state and
memory are written, and it resumes; with --stop it exits instead, and a VM that was
already paused stays paused. DIR receives two files: `state` (CPU, device and machine
state, checksummed) and `memory` (guest RAM, sparse: zero pages take no disk space).
Both are mode 0600: the memory file holds everything the guest had in RAM.
The snapshot is written to DIR.partial-PID and renamed to DIR when complete; a failed
snapshot leaves nothing behind and the VM running. See the README, Snapshots.

EXAMPLES:
  wisp snapshot vm1 --to /var/tmp/vm1.snap
  wisp snapshot vm1 --to /var/tmp/vm1.snap --force --stop")]
pub struct SnapshotArgs {
    /// The VM's --name, or the path of its control socket.
    name: String,
    /// The snapshot directory to create.
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// Replace DIR if it exists (only once the new snapshot is complete).
    #[arg(long)]
    force: bool,
    /// Stop the VM once the snapshot is written.
    #[arg(long)]
    stop: bool,
}

pub fn snapshot(args: SnapshotArgs) -> Result<u8> {
    // The VM checks the target (before it pauses); it needs an absolute path, since
    // its working directory is not ours.
    let to = std::path::absolute(&args.to)
        .with_context(|| format!("bad snapshot path {}", args.to.display()))?;
    let req = vmm::api::Request::Snapshot {
        to,
        force: args.force,
        stop: args.stop,
    };
    let r = vmm::api::call(&args.name, &req)?;
    let (Some(st), Some(snap)) = (r.status, r.snapshot) else {
        bail!("the VM answered without a snapshot report");
    };
    println!(
        "{}: snapshot written to {} ({:.1} MiB on disk for {} MiB of RAM, {:.0} ms); VM {}",
        st.name,
        snap.path.display(),
        snap.disk_bytes as f64 / f64::from(1 << 20),
        snap.memory_bytes >> 20,
        snap.took_s * 1e3,
        if args.stop { "stopping" } else { &st.state }
    );
    Ok(0)
}
