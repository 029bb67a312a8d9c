//! `wisp restore`: start a VM from a snapshot directory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use vmm::restore::RestoreOptions;
use vmm::vm::Vm;

use super::{bind_api, host_limits, open_checked_kvm, open_console, run_vm, SavedVmArgs};

#[derive(Args)]
#[command(after_long_help = "\
The snapshot's state file is checked (format version, checksum) and its memory file
(size, digest of the data pages) before anything starts; any mismatch is an error and
nothing runs. Guest memory maps the memory file copy-on-write (MAP_PRIVATE): pages load
when the guest touches them and the snapshot never changes, so it can be restored many
times, also side by side (give each copy its own --name).

The machine configuration (vCPUs, memory, disks, network cards, MACs) comes from the
snapshot. Disks reopen at their saved paths and network backends reattach (a new TAP
or passt); --disk and --net replace them, once per device in the original order.

EXAMPLES:
  wisp restore /var/tmp/vm1.snap
  wisp restore /var/tmp/vm1.snap --name vm1-copy --net tap=tap1
  wisp restore /var/tmp/vm1.snap --disk /var/tmp/copy-of-root.img")]
pub struct RestoreArgs {
    /// The snapshot directory (written by `wisp snapshot`).
    dir: PathBuf,
    #[command(flatten)]
    vm: SavedVmArgs,
}

pub fn restore(args: RestoreArgs, start: Instant) -> Result<u8> {
    // Everything is checked before anything is created: the state, the overrides, the
    // configuration (the same checks as `wisp run`'s: the file is untrusted), then the
    // memory file.
    args.vm.seccomp.configure()?;
    let mut state = vmm::snapshot::read_state(&args.dir)?;
    let config = &mut state.machine.config;
    config.apply_restore_options(args.vm.name.as_deref(), &args.vm.disk, &args.vm.net)?;
    let kvm = open_checked_kvm()?;
    config.validate(&host_limits(&kvm)).with_context(|| {
        format!(
            "the snapshot in {} cannot run on this host",
            args.dir.display()
        )
    })?;
    let name = config.name.clone();
    let (state, mem) = vmm::snapshot::open_memory(&args.dir, state)?.into_parts()?;
    vmm::signals::block().context("cannot block termination signals")?;
    let api = bind_api(args.vm.api.as_deref(), &name)?;
    let (console, output) = open_console(&args.vm.console)?;
    let vm = Vm::restore(
        kvm,
        state,
        mem,
        RestoreOptions {
            start,
            serial_output: output,
        },
    )?;
    log::debug!(
        "{name}: restored from {} in {:.1} ms",
        args.dir.display(),
        start.elapsed().as_secs_f64() * 1e3
    );
    run_vm(vm, console, api, &name, None)
}
