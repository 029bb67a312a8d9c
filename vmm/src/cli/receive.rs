//! `wisp receive`: wait for one incoming migration (`wisp migrate`), then run the VM.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use vmm::device_manager::DiskLocks;
use vmm::migration::receive::{Incoming, Listener};
use vmm::migration::Address;
use vmm::restore::RestoreOptions;
use vmm::signals::SignalFd;
use vmm::vm::Vm;

use super::{bind_api, host_limits, one_line, open_checked_kvm, open_console, run_vm, SavedVmArgs};

#[derive(Args)]
#[command(after_long_help = "\
Listens on ADDR for one migration from `wisp migrate NAME --to ADDR`, checks what the
source offers as `wisp restore` checks a snapshot (configuration, memory layout, CPU
features this host's KVM must offer, state format version), builds the machine while
memory arrives, loads the state, runs the VM, and tells the source, which then exits.
If anything is refused or fails, the source keeps its VM, and nothing is left here.

The overrides mean what they mean for `wisp restore`: disks are shared storage (the
same image, at the saved path or the one given), network cards get new backends (a
TAP or bridge on this host, or user-mode NAT with its own forwards: on one host, the
source's forwarded ports are still taken).

ADDR is tcp:PORT or tcp::PORT (127.0.0.1), tcp:HOST:PORT (tcp:0.0.0.0:PORT for every
interface), or unix:PATH. The stream is neither authenticated nor encrypted, as QEMU's
plain TCP migration: whoever reaches ADDR can send a VM (or read one, by connecting as
a destination). Listen only where you trust every host that can connect.

EXAMPLES:
  wisp receive tcp:4444
  wisp receive unix:/run/wisp-mig.sock --name vm1 --net bridge=br0
  wisp receive tcp:0.0.0.0:4444 --disk /shared/vm1.img --console file:/var/log/vm1")]
pub struct ReceiveArgs {
    /// Where to listen: tcp:PORT, tcp:HOST:PORT or unix:PATH.
    #[arg(value_name = "ADDR")]
    addr: Address,
    #[command(flatten)]
    vm: SavedVmArgs,
}

pub fn receive(args: ReceiveArgs, start: Instant) -> Result<u8> {
    args.vm.seccomp.configure()?;
    // Termination signals end the wait (through the signalfd) instead of the process.
    vmm::signals::block().context("cannot block termination signals")?;
    let signals = SignalFd::new().context("cannot watch termination signals")?;
    let kvm = open_checked_kvm()?;
    let limits = host_limits(&kvm);
    let listener = Listener::bind(&args.addr)?;
    log::info!("waiting for a migration on {}", args.addr);
    let mut incoming = listener.accept(&signals)?;
    let hello = match incoming.hello(&signals) {
        Ok(h) => h,
        Err(e) => {
            incoming.refuse(&e.to_string());
            return Err(e.into());
        }
    };
    // Everything that can refuse the offer, before ACCEPT.
    let prepared = (|| -> Result<_> {
        let mut config = hello.config.clone();
        config.apply_restore_options(args.vm.name.as_deref(), &args.vm.disk, &args.vm.net)?;
        config
            .validate(&limits)
            .context("the VM cannot run on this host")?;
        Incoming::check_offer(&hello, &config, &kvm)?;
        let api = bind_api(args.vm.api.as_deref(), &config.name)?;
        let (console, output) = open_console(&args.vm.console)?;
        let mem = vmm::memory::create(config.memory_mib << 20)?;
        let prepared = Vm::prepare(
            kvm,
            config,
            mem,
            RestoreOptions {
                start,
                serial_output: output,
            },
            DiskLocks::AtClaim,
        )?;
        Ok((prepared, api, console))
    })();
    let (prepared, api, console) = match prepared {
        Ok(p) => p,
        Err(e) => {
            incoming.refuse(&one_line(&e));
            return Err(e);
        }
    };
    incoming.accept()?;
    let name = prepared.config().name.clone();
    log::info!("{name}: receiving from the source");
    let vm = (|| -> Result<_> {
        let mut state = incoming.receive_memory(prepared.memory(), &signals)?;
        if state.config != hello.config {
            anyhow::bail!("the source's final state describes another machine than it offered");
        }
        state.config = prepared.config().clone();
        prepared.claim_host()?;
        Ok(prepared.load(&state)?)
    })();
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => {
            incoming.refuse(&one_line(&e));
            return Err(e);
        }
    };
    log::info!(
        "{name}: state loaded ({} pages received); running",
        incoming.pages()
    );
    drop(signals);
    drop(listener);
    run_vm(
        vm,
        console,
        api,
        &name,
        Some(Box::new(move || incoming.running())),
    )
}
