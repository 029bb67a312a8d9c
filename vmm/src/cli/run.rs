//! `wisp run`: boot a VM from a kernel.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use devices::virtio::block::BlockConfig;
use vmm::config::{self, VmConfig};
use vmm::console::ConsoleSpec;
use vmm::host::kernel_mode_speed;
use vmm::vm::{BuildOptions, Vm};

use super::{bind_api, host_limits, open_checked_kvm, open_console, run_vm, whole_number};

/// Iterations of the timing guest `wisp run` uses to detect emulated kernel mode
/// (about 30 ms where it is emulated, microseconds on hardware).
pub const RUN_PROBE_ITERATIONS: u32 = 20_000;

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
pub struct RunArgs {
    /// Kernel to boot: an x86_64 ELF vmlinux (PVH entry if it has the PVH note, else the
    /// 64-bit entry) or a bzImage. Default: the default guest's kernel
    /// (target/guest/vmlinux, built by scripts/build-guest.sh), with its initramfs
    /// unless --cmdline has root= (then the root file system comes from a --disk). With
    /// its own initramfs the default guest also gets its SSH server's disk
    /// (target/guest/ssh.ext4, read-only, serial wisp-ssh) after any --disk; name an
    /// --initrd to leave it out.
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

    #[command(flatten)]
    seccomp: super::SeccompArgs,

    #[command(flatten)]
    image: super::image::ImageArgs,
}

/// Where the default guest lives: $WISP_GUEST_DIR, else target/guest next to the
/// directory holding this binary (target/release/wisp -> target/guest).
pub fn default_guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WISP_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|t| t.join("guest")))
        .unwrap_or_else(|| PathBuf::from("target/guest"))
}

/// The serial (`id=`) of the default guest's SSH disk; the guest's rcS looks for it.
const SSH_DISK_ID: &str = "wisp-ssh";

/// What to boot: the kernel, its initramfs, and the default guest's read-only SSH disk
/// when the default guest is booted with its initramfs.
struct Boot {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    ssh_disk: Option<PathBuf>,
}

fn resolve_kernel(args: &RunArgs) -> Result<Boot> {
    if let Some(kernel) = &args.kernel {
        return Ok(Boot {
            kernel: kernel.clone(),
            initrd: args.initrd.clone(),
            ssh_disk: None,
        });
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
    if args.initrd.is_some() || args.image.image.is_some() {
        // An --image run gets its initramfs later (wisp's image init).
        return Ok(Boot {
            kernel,
            initrd: args.initrd.clone(),
            ssh_disk: None,
        });
    }
    let initrd = Some(dir.join("initramfs.cpio.gz")).filter(|p| !wants_root && p.is_file());
    // The SSH server lives on a disk of its own, off the boot path (its 4 MiB in the
    // initramfs cost seconds of boot where guest kernel mode is emulated).
    let ssh_disk = Some(dir.join("ssh.ext4")).filter(|p| initrd.is_some() && p.is_file());
    Ok(Boot {
        kernel,
        initrd,
        ssh_disk,
    })
}

fn check_readable(what: &str, path: &Path) -> Result<()> {
    devices::host_file::open_regular(path)
        .map(drop)
        .with_context(|| format!("cannot read {what} {}", path.display()))
}

pub fn run(args: RunArgs, start: Instant) -> Result<u8> {
    // Everything that can be checked is checked first, before anything is created.
    args.seccomp.configure()?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("wisp-{}", std::process::id()));
    config::check_name(&name)?;
    let Boot {
        kernel,
        initrd,
        ssh_disk,
    } = resolve_kernel(&args)?;
    vmm::loader::check_kernel(&kernel)?;
    if let Some(i) = &initrd {
        check_readable("initrd", i)?;
    }
    let kvm = open_checked_kvm()?;
    let limits = host_limits(&kvm);
    let mut disks = args
        .disk
        .iter()
        .map(|d| config::parse_disk(d))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(path) = ssh_disk {
        log::debug!(
            "default guest: its SSH server disk {} goes last, read-only",
            path.display()
        );
        disks.push(BlockConfig {
            path,
            read_only: true,
            id: SSH_DISK_ID.to_string(),
        });
    }
    let image_ref = args.image.image.clone();
    if let Some(r) = &image_ref {
        wisp_image::ImageRef::parse(r)?;
    } else if !args.image.command.is_empty() {
        bail!("a command after -- is for --image: name the image with --image REF");
    }
    let net_args = super::image::nets_with_publish(&args.net, &args.image.publish);
    let nets = net_args
        .iter()
        .map(|n| config::parse_net(n))
        .collect::<Result<Vec<_>, _>>()?;
    let user_net = nets
        .iter()
        .any(|n| matches!(n.backend, config::NetBackend::User(_)));
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
    vmm::device_manager::check_backends(&config)?;
    // Everything else is checked: now the image (its conversion may take a while).
    let image_boot = match &image_ref {
        Some(r) => {
            let work = vmm::api::runtime_dir()?;
            let boot = super::image::prepare(
                &args.image,
                r,
                &default_guest_dir(),
                &work,
                &config.name,
                user_net,
            )?;
            config.initrd = Some(boot.initrd.clone());
            config.disks.insert(0, boot.disk.clone());
            config.cmdline = format!("{} {}", boot.cmdline, config.cmdline);
            config.validate(&limits)?;
            Some(boot)
        }
        None => None,
    };

    // Before any thread exists: INT/TERM/HUP must reach the event loop's signalfd, so
    // wisp always stops the VM, reaps passt and restores the terminal.
    vmm::signals::block().context("cannot block termination signals")?;
    let api = bind_api(args.api.as_deref(), &config.name)?;
    let cache = vmm::api::runtime_dir()
        .inspect_err(|e| log::debug!("no runtime directory for the speed cache: {e}"))
        .ok();
    // The console is the last thing that can fail on bad input: before any log line.
    let (console, output) = open_console(&args.console)?;
    super::RAW_TERMINAL.store(console.is_raw(), std::sync::atomic::Ordering::Relaxed);
    let (speed, _) = kernel_mode_speed(&kvm, RUN_PROBE_ITERATIONS, cache.as_deref())?;
    if speed.emulated() {
        log::info!(
            "guest kernel mode is emulated on this host ({:.1} M instructions/s): adding an emulation-friendly kernel cmdline (see `wisp doctor`)",
            speed.instructions_per_sec / 1e6
        );
    }
    let vm = Vm::build(
        kvm,
        &config,
        BuildOptions {
            emulated_kernel_mode: speed.emulated(),
            start,
            serial_output: output,
        },
    );
    // The run's initramfs is in guest memory now (or the build failed).
    let scratch = image_boot.map(|b| {
        let _ = std::fs::remove_file(&b.initrd);
        b.scratch_disk
    });
    let vm = vm?;
    log::debug!(
        "{}: {} vCPU(s), {} MiB, kernel {} ({:?})",
        config.name,
        config.cpus,
        config.memory_mib,
        config.kernel.display(),
        vm.entry()
    );
    let outcome = run_vm(vm, console, api, &config.name, None);
    if let Some(Some(disk)) = scratch {
        let _ = std::fs::remove_file(disk);
    }
    outcome
}
