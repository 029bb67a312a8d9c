//! The `wisp` command line.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use devices::legacy::serial::SerialOutput;
use vmm::config::{self, HostLimits, VmConfig};
use vmm::console::{Console, ConsoleSpec};
use vmm::host::{self, measure_kernel_mode};
use vmm::outcome::Outcome;
use vmm::restore::RestoreOptions;
use vmm::vm::{BuildOptions, Vm};

/// Iterations of the timing guest `wisp run` uses to detect emulated kernel mode
/// (about 30 ms where it is emulated, microseconds on hardware).
const RUN_PROBE_ITERATIONS: u32 = 20_000;

/// Set while the terminal is raw, so log lines end in "\r\n".
static RAW_TERMINAL: AtomicBool = AtomicBool::new(false);

#[derive(Parser)]
#[command(
    name = "wisp",
    version,
    about = "wisp: a small, fast KVM virtual machine monitor",
    long_about = "wisp: a small, fast KVM virtual machine monitor.\n\n\
        It boots Linux (ELF vmlinux or bzImage) on KVM with a serial console.\n\
        Start with `wisp doctor` to check this host, then `wisp run` to boot the\n\
        default guest (built by scripts/build-guest.sh).\n\n\
        Logging goes to stderr; set WISP_LOG=debug (or trace) for more."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and attach its serial console to this terminal.
    Run(RunArgs),
    /// Check /dev/kvm, the capabilities wisp needs, and how fast guest kernel mode runs.
    Doctor,
    /// List running VMs (those whose control socket answers) with state, vCPUs, memory
    /// and uptime.
    Ls,
    /// Show one VM's state, vCPUs, memory, uptime and pid.
    Status(Target),
    /// Pause a VM: every vCPU stops at a consistent point and devices stop processing.
    Pause(Target),
    /// Resume a paused VM.
    Resume(Target),
    /// Stop a VM (wisp exits with status 0, as if the guest had powered off).
    Stop(Target),
    /// Write a snapshot of a running VM to a directory: pause, save, resume.
    Snapshot(SnapshotArgs),
    /// Start a VM from a snapshot directory, where it was when the snapshot was taken.
    Restore(RestoreArgs),
}

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
struct SnapshotArgs {
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
struct RestoreArgs {
    /// The snapshot directory (written by `wisp snapshot`).
    dir: PathBuf,
    /// Name of the restored VM (default: the snapshot's). Two VMs cannot share a name.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// A new image path for each disk, in order (paths only; the guest keeps the disks'
    /// options).
    #[arg(long, value_name = "PATH")]
    disk: Vec<String>,
    /// A new backend for each network card, in order, as for `wisp run --net` (the MAC
    /// stays the one the guest knows). E.g. a new TAP, since the old one may be taken.
    #[arg(long, value_name = "user[,hostfwd=...]|tap=NAME|bridge=BR")]
    net: Vec<String>,
    /// Where the serial console goes, as for `wisp run`.
    #[arg(long, value_name = "stdio|file:PATH|none", default_value = "stdio")]
    console: ConsoleSpec,
    /// Control socket path, as for `wisp run`.
    #[arg(long, value_name = "PATH")]
    api: Option<PathBuf>,
}

#[derive(Args)]
#[command(after_long_help = "\
A running VM is found by its control socket: $XDG_RUNTIME_DIR/wisp/NAME.sock, else
/run/wisp/NAME.sock for root, else /tmp/wisp-$UID/NAME.sock. The protocol is one line
of JSON each way, e.g. {\"op\":\"status\"}; see the Control socket section of the README.")]
struct Target {
    /// The VM's --name, or the path of its control socket (anything with a '/').
    name: String,
}

#[derive(Args)]
#[command(after_long_help = "\
CONSOLE:
  With --console stdio on a terminal, the terminal is switched to raw mode and every key
  goes to the guest. Press Ctrl-A then x to quit (the VM is stopped); Ctrl-A Ctrl-A sends
  a literal Ctrl-A. When stdin is a pipe or a file, every byte reaches the guest, paced by
  the UART so nothing is lost; end of input leaves the VM running.

GUEST DEVICES:
  COM1 (0x3f8, IRQ 4) is the console. The i8042 reset (Linux reboot=k) ends the VM with
  status 0. Writing a byte N to I/O port 0x500 ends the VM with status N (debug exit).
  Writing 0x7b to port 0x501 marks boot complete: wisp logs the time since it started.
  Disks and network cards are virtio-mmio devices (virtio 1.x), one 4 KiB window each
  from 0xd0000000 with GSIs from 5, described in the ACPI DSDT. With acpi=off in
  --cmdline, wisp announces them as virtio_mmio.device= words instead.

EXIT STATUS:
  0 when the guest powers off or reboots (or you quit with Ctrl-A x), N when it writes N to
  the debug-exit port, 1 on errors (bad input, host problems, guest crash: triple fault,
  KVM emulation failure), 128+signal when wisp is stopped by a signal.

EXAMPLES:
  wisp run                                  # the default guest from scripts/build-guest.sh
  wisp run --cpus 2 --memory 256            # ... with 2 vCPUs and 256 MiB
  wisp run --disk target/guest/rootfs.ext4 --cmdline 'root=/dev/vda rw'
  wisp run --net tap=tap0 --cmdline 'ip=192.168.100.2::192.168.100.1:255.255.255.0'
  wisp run --name vm1 --net bridge=wispbr0 --cmdline ip=dhcp
  wisp run --net user,hostfwd=tcp::2222-:22     # then: ssh -p 2222 root@127.0.0.1
  wisp run --kernel target/guest/probe --cmdline probe.cmd=hello")]
struct RunArgs {
    /// Kernel to boot: an x86_64 ELF vmlinux (PVH entry if it has the PVH note, else the
    /// 64-bit entry) or a bzImage. Default: the default guest's kernel
    /// (target/guest/vmlinux, built by scripts/build-guest.sh), with its initramfs
    /// unless --cmdline has root= (then the root file system comes from a --disk).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Initial ramdisk (initramfs) loaded at the top of low memory.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Extra kernel command line, appended to wisp's defaults
    /// ("console=ttyS0 reboot=k panic=-1"; on hosts where guest kernel mode is emulated,
    /// also "noxsave clearcpuid=... quiet" and friends, see `wisp doctor`). Later words
    /// override earlier ones, e.g. --cmdline loglevel=7 undoes quiet.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,

    /// Number of vCPUs (1 to the host's KVM limit, at most 254). The guest sees them
    /// through an MP table, as one socket with that many cores.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = whole_number, allow_negative_numbers = true)]
    cpus: u64,

    /// Guest RAM in MiB (at least 16, at most the host's RAM). Memory is allocated
    /// lazily: an idle guest costs only what it touches.
    #[arg(long, value_name = "MiB", default_value_t = 128, value_parser = whole_number, allow_negative_numbers = true)]
    memory: u64,

    /// Where the serial console goes: `stdio` (this terminal or pipes), `file:PATH`
    /// (output appended to PATH, no input), or `none`.
    #[arg(long, value_name = "stdio|file:PATH|none", default_value = "stdio")]
    console: ConsoleSpec,

    /// Name of the VM, shown in logs. Letters, digits, '-', '_' and '.'.
    /// Default: wisp-<pid>. Default MAC addresses are derived from it, so give a name
    /// to keep them stable across runs.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Add a virtio-blk disk backed by a raw image file (repeatable; the first is
    /// /dev/vda, the next /dev/vdb, ...). `ro` makes it read-only (writes fail with an
    /// I/O error in the guest); `id=NAME` sets the serial the guest reads
    /// (/sys/block/vda/serial; default: the file name). The image is locked, so two VMs
    /// cannot write the same image.
    #[arg(long, value_name = "PATH[,ro][,id=NAME]")]
    disk: Vec<String>,

    /// Add a virtio-net card (repeatable).
    /// `user` is user-mode NAT through passt (no root needed): the guest gets
    /// 10.0.2.15/24 by DHCP, gateway 10.0.2.2 (which reaches the host), DNS 10.0.2.3;
    /// `hostfwd=PROTO:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT` (repeatable, QEMU
    /// syntax, HOSTADDR defaults to 127.0.0.1) forwards a host port into the guest, e.g.
    /// `user,hostfwd=tcp::2222-:22`; `net=ADDR/PREFIX`, `host=`, `dns=`, `guest=` change
    /// the address plan. `tap=NAME` uses an existing TAP (create one with `ip tuntap add
    /// NAME mode tap user $USER`). `bridge=BR` creates a TAP, attaches it to host bridge
    /// BR and removes it on exit (needs CAP_NET_ADMIN; see scripts/net-bridge-up.sh).
    /// `mac=` sets the guest's MAC (default: 52:54:00:... derived from --name and the
    /// card's index).
    #[arg(long, value_name = "user[,hostfwd=...]|tap=NAME|bridge=BR[,mac=MAC]")]
    net: Vec<String>,

    /// Control socket path (mode 0600), for `wisp status/pause/resume/stop` and the JSON
    /// API (README, "Control socket"). Default: $XDG_RUNTIME_DIR/wisp/NAME.sock, else
    /// /run/wisp/NAME.sock for root, else /tmp/wisp-$UID/NAME.sock.
    #[arg(long, value_name = "PATH")]
    api: Option<PathBuf>,
}

/// A count on the command line (negative numbers reach here too, so the message can
/// say what is wrong with them).
fn whole_number(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| "expected a whole number such as 256".to_string())
}

/// A command-line error from clap as wisp's one line: clap's message with its listed
/// items and tips, and where to read more (its usage block is left out).
fn clap_one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let mut lines = text.lines();
    let mut out = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .trim_end_matches(':')
        .to_string();
    let mut items = Vec::new();
    for line in lines.take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more")) {
        match line.trim() {
            "" => {}
            l if l.starts_with("tip:") => out.push_str(&format!("; {l}")),
            l => items.push(l.to_string()),
        }
    }
    if !items.is_empty() {
        out.push_str(&format!(": {}", items.join(", ")));
    }
    let sub = std::env::args().nth(1).filter(|a| {
        Cli::command()
            .get_subcommands()
            .any(|c| c.get_name() == a.as_str())
    });
    match sub {
        Some(c) => format!("{out}; see `wisp {c} --help`"),
        None => format!("{out}; see `wisp --help`"),
    }
}

fn init_logging() {
    let env = env_logger::Env::new()
        .filter_or("WISP_LOG", "info")
        .write_style("WISP_LOG_STYLE");
    env_logger::Builder::from_env(env)
        .format(|buf, record| {
            let eol = if RAW_TERMINAL.load(Ordering::Relaxed) {
                "\r\n"
            } else {
                "\n"
            };
            let level = record.level().to_string().to_lowercase();
            write!(buf, "[wisp {level}] {}{eol}", record.args())
        })
        .init();
}

/// Where the default guest lives: $WISP_GUEST_DIR, else target/guest next to the
/// directory holding this binary (target/release/wisp -> target/guest).
fn default_guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WISP_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|t| t.join("guest")))
        .unwrap_or_else(|| PathBuf::from("target/guest"))
}

fn resolve_kernel(args: &RunArgs) -> Result<(PathBuf, Option<PathBuf>)> {
    if let Some(kernel) = &args.kernel {
        return Ok((kernel.clone(), args.initrd.clone()));
    }
    let dir = default_guest_dir();
    let kernel = dir.join("vmlinux");
    if !kernel.is_file() {
        bail!(
            "no --kernel given and the default guest is not built ({} is missing): run scripts/build-guest.sh, or pass --kernel",
            kernel.display()
        );
    }
    // With root= the user boots from a disk: the default initramfs would take over.
    let wants_root = args
        .cmdline
        .split_whitespace()
        .any(|w| w.starts_with("root="));
    let initrd = args
        .initrd
        .clone()
        .or_else(|| Some(dir.join("initramfs.cpio.gz")).filter(|p| !wants_root && p.is_file()));
    Ok((kernel, initrd))
}

fn check_readable(what: &str, path: &Path) -> Result<()> {
    devices::host_file::open_regular(path)
        .map(drop)
        .with_context(|| format!("cannot read {what} {}", path.display()))
}

fn run(args: RunArgs, start: Instant) -> Result<u8> {
    // Everything that can be checked is checked first, before anything is created.
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("wisp-{}", std::process::id()));
    config::check_name(&name)?;
    let (kernel, initrd) = resolve_kernel(&args)?;
    check_readable("kernel", &kernel)?;
    if let Some(i) = &initrd {
        check_readable("initrd", i)?;
    }
    let kvm = open_checked_kvm()?;
    let limits = host_limits(&kvm);
    let disks = args
        .disk
        .iter()
        .map(|d| config::parse_disk(d))
        .collect::<Result<Vec<_>, _>>()?;
    let nets = args
        .net
        .iter()
        .map(|n| config::parse_net(n))
        .collect::<Result<Vec<_>, _>>()?;
    let mut config = VmConfig {
        name,
        kernel,
        initrd,
        cmdline: args.cmdline.clone(),
        cpus: config::check_cpus(args.cpus, &limits)?,
        memory_mib: config::check_memory(args.memory, &limits)?,
        disks,
        nets,
    };
    config.resolve_macs();
    config.validate(&limits)?;

    // Before any thread exists: INT/TERM/HUP must reach the event loop's signalfd, so
    // wisp always stops the VM, reaps passt and restores the terminal.
    vmm::signals::block().context("cannot block termination signals")?;
    let api = bind_api(args.api.as_deref(), &config.name)?;
    let speed = measure_kernel_mode(&kvm, RUN_PROBE_ITERATIONS)?;
    if speed.emulated() {
        log::info!(
            "guest kernel mode is emulated on this host ({:.1} M instructions/s): adding an emulation-friendly kernel cmdline (see `wisp doctor`)",
            speed.instructions_per_sec / 1e6
        );
    }
    let (console, output) = open_console(&args.console)?;
    let vm = Vm::build(
        kvm,
        &config,
        BuildOptions {
            emulated_kernel_mode: speed.emulated(),
            start,
            serial_output: output,
        },
    )?;
    log::debug!(
        "{}: {} vCPU(s), {} MiB, kernel {} ({:?})",
        config.name,
        config.cpus,
        config.memory_mib,
        config.kernel.display(),
        vm.entry()
    );
    run_vm(vm, console, api, &config.name)
}

/// The control socket: `--api PATH`, else VM `name`'s socket in wisp's runtime
/// directory.
fn bind_api(api: Option<&Path>, name: &str) -> Result<vmm::api::ApiServer> {
    Ok(match api {
        Some(path) => vmm::api::ApiServer::bind(path)?,
        None => vmm::api::ApiServer::bind_default(name)?,
    })
}

/// Opens the console and takes its output side for the guest's UART.
fn open_console(spec: &ConsoleSpec) -> Result<(Console, SerialOutput)> {
    let mut console = Console::open(spec)?;
    let output = console
        .output
        .take()
        .context("console output already taken")?;
    Ok((console, output))
}

/// Runs a built or restored VM on `console` until it ends; returns wisp's exit status.
fn run_vm(vm: Vm, mut console: Console, api: vmm::api::ApiServer, name: &str) -> Result<u8> {
    RAW_TERMINAL.store(console.is_raw(), Ordering::Relaxed);
    log::debug!("control socket {}", api.path().display());
    let outcome = vm.run(console.input.take(), Some(api));
    drop(console);
    RAW_TERMINAL.store(false, Ordering::Relaxed);
    let outcome = outcome?;
    match &outcome {
        Outcome::Crash(_) => bail!("{}", outcome.describe()),
        o => log::info!("{name}: {}", o.describe()),
    }
    Ok(u8::try_from(outcome.exit_code()).unwrap_or(1))
}

fn open_checked_kvm() -> Result<kvm_ioctls::Kvm> {
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

fn restore(args: RestoreArgs, start: Instant) -> Result<u8> {
    // Everything is checked before anything is created: the state, the overrides, the
    // configuration (the same checks as `wisp run`'s: the file is untrusted), then the
    // memory file.
    let mut state = vmm::snapshot::read_state(&args.dir)?;
    let config = &mut state.machine.config;
    config.apply_restore_options(args.name.as_deref(), &args.disk, &args.net)?;
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
    let api = bind_api(args.api.as_deref(), &name)?;
    let (console, output) = open_console(&args.console)?;
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
    run_vm(vm, console, api, &name)
}

/// What this host allows a VM.
fn host_limits(kvm: &kvm_ioctls::Kvm) -> HostLimits {
    HostLimits {
        max_vcpus: kvm.get_max_vcpus() as u64,
        ram_mib: config::host_ram_mib().unwrap_or(u64::MAX),
    }
}

fn snapshot(args: SnapshotArgs) -> Result<u8> {
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

fn control(target: &Target, req: vmm::api::Request) -> Result<u8> {
    let s = vmm::api::call(&target.name, &req)?
        .status
        .context("the VM answered without a status")?;
    match req {
        vmm::api::Request::Status => print_status(&[s]),
        _ => println!(
            "{}: {}",
            s.name,
            if req == vmm::api::Request::Stop {
                "stopping"
            } else {
                &s.state
            }
        ),
    }
    Ok(0)
}

fn print_status(list: &[vmm::api::Status]) {
    println!(
        "{:<20} {:<8} {:>5} {:>10} {:>10} {:>8}",
        "NAME", "STATE", "CPUS", "MEMORY", "UPTIME", "PID"
    );
    for s in list {
        let up = s.uptime_s as u64;
        println!(
            "{:<20} {:<8} {:>5} {:>7} MiB {:>10} {:>8}",
            s.name,
            s.state,
            s.cpus,
            s.memory_mib,
            format!("{}:{:02}:{:02}", up / 3600, up / 60 % 60, up % 60),
            s.pid
        );
    }
}

fn ls() -> Result<u8> {
    let listing = vmm::api::list();
    let running: Vec<_> = listing.running.into_iter().map(|(_, s)| s).collect();
    print_status(&running);
    for path in &listing.removed {
        eprintln!(
            "wisp: removed stale control socket {} (the wisp that made it is gone)",
            path.display()
        );
    }
    for (path, e) in &listing.failed {
        eprintln!("wisp: {}: {e}", path.display());
    }
    Ok(0)
}

fn doctor() -> Result<u8> {
    let kvm = host::open_kvm()?;
    let report = vmm::doctor::run(&kvm, vmm::doctor::DOCTOR_ITERATIONS);
    print!("{}", report.text);
    Ok(if report.ok { 0 } else { 1 })
}

/// The error and its causes on one line, skipping causes whose text the previous message
/// already includes.
fn one_line(e: &anyhow::Error) -> String {
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

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            eprintln!("wisp: error: {}", clap_one_line(&e));
            return ExitCode::from(1);
        }
    };
    init_logging();
    let result = match cli.command {
        Command::Run(args) => run(args, start),
        Command::Doctor => doctor(),
        Command::Ls => ls(),
        Command::Status(t) => control(&t, vmm::api::Request::Status),
        Command::Pause(t) => control(&t, vmm::api::Request::Pause),
        Command::Resume(t) => control(&t, vmm::api::Request::Resume),
        Command::Stop(t) => control(&t, vmm::api::Request::Stop),
        Command::Snapshot(args) => snapshot(args),
        Command::Restore(args) => restore(args, start),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("wisp: error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}
