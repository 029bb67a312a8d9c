//! The subcommands of the `wisp` binary, one file each, and what they share.

pub mod bench;
pub mod control;
pub mod image;
pub mod migrate;
pub mod receive;
pub mod restore;
pub mod run;
pub mod snapshot;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use devices::legacy::serial::SerialOutput;
use vmm::config::{self, HostLimits};
use vmm::console::{Console, ConsoleSpec};
use vmm::host;
use vmm::outcome::Outcome;
use vmm::vm::{StartedHook, Vm};

/// What `wisp restore` and `wisp receive` take besides where the VM comes from: the
/// options that change a saved VM's configuration, and where it runs.
#[derive(clap::Args)]
pub struct SavedVmArgs {
    /// Name of the VM here (default: the saved one's). Two VMs cannot share a name.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// A new image path for each disk, in order (paths only; the guest keeps the disks'
    /// options).
    #[arg(long, value_name = "PATH")]
    pub disk: Vec<String>,
    /// A new backend for each network card, in order, as for `wisp run --net` (the MAC
    /// stays the one the guest knows). E.g. a new TAP, since the old one may be taken.
    #[arg(long, value_name = "user[,hostfwd=...]|tap=NAME|bridge=BR")]
    pub net: Vec<String>,
    /// Where the serial console goes, as for `wisp run`.
    #[arg(long, value_name = "stdio|file:PATH|none", default_value = "stdio")]
    pub console: ConsoleSpec,
    /// Control socket path, as for `wisp run`.
    #[arg(long, value_name = "PATH")]
    pub api: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub seccomp: SeccompArgs,
}

/// The seccomp options of every command that runs a VM.
#[derive(clap::Args)]
pub struct SeccompArgs {
    /// seccomp-BPF filters on wisp's threads (VMM, vCPUs, migration), each as small as
    /// the thread's needs. `off` is for debugging only: a guest that breaks out of a
    /// device model then has all of wisp's rights.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
    pub seccomp: String,
    /// Load the threads' filters from FILE instead of the built-in ones: seccompiler's
    /// JSON, one filter each for "vmm", "vcpu" and "migrate" (start from
    /// vmm/src/seccomp/x86_64.json in wisp's source).
    #[arg(long, value_name = "FILE", conflicts_with = "seccomp")]
    pub seccomp_filter: Option<std::path::PathBuf>,
}

impl SeccompArgs {
    /// Compiles the chosen filters and sets them for the threads to come: the first
    /// thing a VM command does, so a bad file is its one error line.
    pub fn configure(&self) -> Result<()> {
        use vmm::seccomp::{Filters, Policy};
        let policy = match (&self.seccomp_filter, self.seccomp.as_str()) {
            (Some(f), _) => Policy::File(f.clone()),
            (None, "off") => Policy::Off,
            _ => Policy::Default,
        };
        vmm::seccomp::configure(Filters::for_policy(&policy)?)?;
        Ok(())
    }
}

/// Set while the terminal is raw, so log lines end in "\r\n".
pub static RAW_TERMINAL: AtomicBool = AtomicBool::new(false);

/// A count on the command line (negative numbers reach here too, so the message can
/// say what is wrong with them).
pub fn whole_number(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| "expected a whole number such as 256".to_string())
}

/// The control socket: `--api PATH`, else VM `name`'s socket in wisp's runtime
/// directory.
pub fn bind_api(api: Option<&Path>, name: &str) -> Result<vmm::api::ApiServer> {
    Ok(match api {
        Some(path) => vmm::api::ApiServer::bind(path)?,
        None => vmm::api::ApiServer::bind_default(name)?,
    })
}

/// Opens the console and takes its output side for the guest's UART.
pub fn open_console(spec: &ConsoleSpec) -> Result<(Console, SerialOutput)> {
    let mut console = Console::open(spec)?;
    let output = console
        .output
        .take()
        .context("console output already taken")?;
    Ok((console, output))
}

/// Runs a built or restored VM on `console` until it ends; returns wisp's exit status.
/// `started` runs once the vCPUs do (see [`Vm::run_then`]).
pub fn run_vm(
    vm: Vm,
    mut console: Console,
    api: vmm::api::ApiServer,
    name: &str,
    started: Option<StartedHook>,
) -> Result<u8> {
    RAW_TERMINAL.store(console.is_raw(), Ordering::Relaxed);
    log::debug!("control socket {}", api.path().display());
    let outcome = vm.run_then(console.input.take(), Some(api), started);
    drop(console);
    RAW_TERMINAL.store(false, Ordering::Relaxed);
    let outcome = outcome?;
    match &outcome {
        Outcome::Crash(_) | Outcome::HandOverFailed(_) => bail!("{}", outcome.describe()),
        o => log::info!("{name}: {}", o.describe()),
    }
    Ok(u8::try_from(outcome.exit_code()).unwrap_or(1))
}

pub fn open_checked_kvm() -> Result<kvm_ioctls::Kvm> {
    let kvm = host::open_kvm()?;
    let missing = host::missing_caps(&kvm, host::REQUIRED_CAPS);
    if !missing.is_empty() {
        bail!(
            "this host's KVM lacks {} (see `wisp doctor`)",
            missing.join(", ")
        );
    }
    Ok(kvm)
}

/// What this host allows a VM.
pub fn host_limits(kvm: &kvm_ioctls::Kvm) -> HostLimits {
    HostLimits {
        max_vcpus: kvm.get_max_vcpus() as u64,
        ram_mib: config::host_ram_mib().unwrap_or(u64::MAX),
    }
}

/// The error and its causes on one line, skipping causes whose text the previous message
/// already includes.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.replace('\n', " ")
}
