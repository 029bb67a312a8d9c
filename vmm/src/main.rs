//! The `wisp` command line: parses it and dispatches to the subcommand's file in
//! `cli/`.

mod cli;

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Instant;

use clap::{CommandFactory, Parser, Subcommand};
use cli::bench::BenchArgs;
use cli::control::{self, Target};
use cli::migrate::MigrateArgs;
use cli::receive::ReceiveArgs;
use cli::restore::RestoreArgs;
use cli::run::RunArgs;
use cli::snapshot::SnapshotArgs;
use cli::RAW_TERMINAL;

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
    /// Move a running VM to another wisp (`wisp receive`) while it keeps running.
    Migrate(MigrateArgs),
    /// Wait for one incoming migration (`wisp migrate`), then run the VM.
    Receive(ReceiveArgs),
    /// Measure microVMs next to containers and other VMMs on this machine, side by side:
    /// start time, CPU, memory, HTTP latency, density (needs root).
    Bench(BenchArgs),
    /// (internal) Apply the image layer on stdin onto ROOT, chrooted there.
    #[command(name = "__image-layer", hide = true)]
    ImageLayer {
        /// The staging root.
        root: std::path::PathBuf,
        /// Refuse the layer past this many uncompressed bytes.
        max_bytes: u64,
    },
    /// (internal) The passt supervisor of `--net user`, on descriptor 3.
    #[command(name = "__passt", hide = true)]
    Passt {
        /// The user-mode network's configuration (JSON).
        config: String,
    },
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
    if matches!(cli.command, Command::Passt { .. }) {
        // The supervisor logs beside wisp, which may have the terminal in raw mode;
        // "\r\n" looks the same on a cooked one.
        // SAFETY: isatty only inspects the descriptor.
        RAW_TERMINAL.store(unsafe { libc::isatty(2) } == 1, Ordering::Relaxed);
    }
    init_logging();
    let result = match cli.command {
        Command::Run(args) => cli::run::run(args, start),
        Command::Bench(args) => cli::bench::bench(args),
        Command::ImageLayer { root, max_bytes } => {
            wisp_image::convert::helper_main(&root, max_bytes)
                .map(|()| 0)
                .map_err(Into::into)
        }
        Command::Passt { config } => vmm::usernet::supervisor::helper_main(&config)
            .map(|()| 0)
            .map_err(Into::into),
        Command::Doctor => control::doctor(),
        Command::Ls => control::ls(),
        Command::Status(t) => control::control(&t, vmm::api::Request::Status),
        Command::Pause(t) => control::control(&t, vmm::api::Request::Pause),
        Command::Resume(t) => control::control(&t, vmm::api::Request::Resume),
        Command::Stop(t) => control::control(&t, vmm::api::Request::Stop),
        Command::Snapshot(args) => cli::snapshot::snapshot(args),
        Command::Restore(args) => cli::restore::restore(args, start),
        Command::Migrate(args) => cli::migrate::migrate(args),
        Command::Receive(args) => cli::receive::receive(args, start),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("wisp: error: {}", cli::one_line(&e));
            ExitCode::from(1)
        }
    }
}
