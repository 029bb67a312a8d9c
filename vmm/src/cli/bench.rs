//! `wisp bench`: microVMs next to containers and other VMMs (the `wisp-bench` crate).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use vmm::host::kernel_mode_speed;
use wisp_bench::kinds::KindName;
use wisp_bench::report::Status;

use super::open_checked_kvm;
use super::run::{default_guest_dir, RUN_PROBE_ITERATIONS};

/// The busybox the default guest is built from (scripts/build-guest.sh copies it).
const BUSYBOX: &str = "/bin/busybox";

fn kind_name(s: &str) -> Result<KindName, String> {
    KindName::parse(s).ok_or_else(|| {
        let all: Vec<_> = KindName::ALL.iter().map(|k| k.as_str()).collect();
        format!("unknown kind (known: {})", all.join(", "))
    })
}

fn count(lo: u64, hi: u64) -> impl Fn(&str) -> Result<u64, String> + Clone {
    move |s| match s.parse::<u64>() {
        Ok(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from {lo} to {hi}")),
    }
}

#[derive(Args)]
#[command(after_long_help = "\
WORKLOAD:
  Every kind runs the same thing: the default guest's busybox with a tiny init that
  starts busybox httpd and prints WISP-BENCH-READY. VMs boot it as an initramfs with the
  default guest's kernel; containers run it as an OCI bundle (read-only root), and
  containerd as an image of the same root. It is built once and cached in
  target/bench/.

KINDS (each skipped with a note when it is not installed or cannot run here):
  wisp          wisp run, a cold boot
  wisp-restore  wisp restore of a snapshot taken at the ready point (timed to its first
                HTTP answer)
  runc, crun    the OCI runtimes (scripts/install-deps.sh installs them), run -d
  containerd-runc
                containerd (Debian's `containerd`: containerd, ctr, runc), a private
                daemon of the bench's own with the workload as an image, `ctr run
                --rm` with its default runtime, io.containerd.runc.v2
  containerd-wisp
                the same with --runtime io.containerd.wisp.v2: containerd starts
                containerd-shim-wisp-v2 (built next to wisp: cargo build --release
                -p wisp-shim) and the container is a wisp microVM
                (containerd kinds: CPU is the shim's tree's, ctr's and containerd's
                meanwhile; memory the shim's tree's: the container or the VM)
  qemu-microvm  qemu-system-x86_64 -M microvm, same kernel, initramfs and cmdline
  firecracker   when `firecracker` is on PATH (seccomp off, as wisp has none yet)
  Where guest kernel mode is emulated, QEMU and Firecracker cannot boot the default
  kernel (they do not deliver the #BP of its int3 self-test; wisp does), so they boot
  target/guest/vmlinux-int3, which the bench builds the first time (several minutes).

FIGURES (min / median / max over the runs, and the median's ratio to wisp's):
  start         process start to the ready marker
  CPU           user + system time of all the instance's host processes until ready
  memory        PSS of those processes when idle (guest RAM the VM touched included);
                for wisp also its own share without guest RAM
  response      HTTP GET latency (p50, p99) over a TAP or veth
  density       --density instances started back to back: per second, memory each
  VMM start     wisp and firecracker only: process start to the first output of wisp's
                probe guest (target/guest/probe, no kernel boot), and the CPU until
                then: what the VMM itself costs before the guest runs
  Each instance gets a network namespace of its own (10.77.0.1 <-> 10.77.0.2); runs
  go round the kinds so drift hits all alike. Timings are reported, never judged.

NEEDS:
  root, the default guest (scripts/build-guest.sh). On a host where guest kernel mode
  is emulated (see `wisp doctor`) VM figures say nothing absolute: compare ratios.

AN IMAGE:
  --image REF runs that image's command to its end instead of the workload: as a wisp
  microVM (wisp run --image) and as runc and crun containers whose root is the image's
  converted disk, loop-mounted read-only under a tmpfs overlay, as in the VM. Figures:
  start to the command's first output, to its exit, and the CPU of all the processes.

EXAMPLES:
  sudo wisp bench --runs 3
  sudo wisp bench --only wisp,wisp-restore,runc --svg bench.svg
  sudo wisp bench --runs 1 --density 0 --json > bench.json
  sudo wisp bench --image oci:busybox-oci:1.36 -- echo hello")]
pub struct BenchArgs {
    /// Measurements per kind (interleaved across kinds).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = count(1, 100))]
    runs: u64,

    /// Print the report as JSON (schema wisp-bench/1) on stdout; the table goes to
    /// stderr.
    #[arg(long)]
    json: bool,

    /// Also draw the report as an SVG chart, one panel per figure, to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,

    /// Only these kinds (comma-separated): wisp, wisp-restore, runc, crun,
    /// containerd-runc, containerd-wisp, qemu-microvm, firecracker. Default: all.
    #[arg(long, value_name = "KIND,...", value_delimiter = ',', value_parser = kind_name)]
    only: Vec<KindName>,

    /// HTTP requests per measurement, for the latency figures.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = count(1, 100_000))]
    requests: u64,

    /// Instances per density measurement (started back to back, all running at once);
    /// 0 leaves density out.
    #[arg(long, value_name = "K", default_value_t = 4, value_parser = count(0, 64))]
    density: u64,

    /// vCPUs of every VM.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = count(1, 64))]
    cpus: u64,

    /// RAM of every VM, MiB.
    #[arg(long, value_name = "MiB", default_value_t = 256, value_parser = count(64, 65_536))]
    memory: u64,

    /// Instead of the workload: run this image's command to its end (`oci:DIR[:TAG]` or
    /// `docker-archive:FILE`, as for `wisp run --image`) as a wisp microVM and as runc
    /// and crun containers whose root is the same converted disk; times its first
    /// output, its exit and the CPU until then.
    #[arg(long, value_name = "REF")]
    image: Option<String>,

    /// With --image: the command instead of the image's Cmd (after `--`).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Converts the image (or finds it converted) and resolves its process, for the
/// containers of the image bench.
fn prepare_image(
    reference: &str,
    command: &[String],
) -> Result<wisp_bench::image_mode::ImageWorkload> {
    use wisp_image::process::Overrides;
    let r = wisp_image::ImageRef::parse(reference)?;
    if matches!(
        r,
        wisp_image::ImageRef::Dir(_) | wisp_image::ImageRef::Bundle(_)
    ) {
        bail!("wisp bench --image takes oci:DIR[:TAG] or docker-archive:FILE (a dir: root or a bundle: has no image config and no cache)");
    }
    let over = Overrides {
        cmd: command.to_vec(),
        env: Vec::new(),
        hostname: "wisp-bench".into(),
    };
    let (done, process) = super::image::convert_image(&r, &over, &mut |l| eprintln!("bench: {l}"))?;
    Ok(wisp_bench::image_mode::ImageWorkload {
        reference: reference.to_string(),
        command: command.to_vec(),
        disk: done.entry.disk(),
        process,
    })
}

/// Refuses an --svg path that cannot be written, before any slow work.
fn check_svg_path(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "--svg {}: directory {} does not exist",
            path.display(),
            parent.display()
        );
    }
    if path.is_dir() {
        bail!("--svg {}: is a directory; name a file", path.display());
    }
    Ok(())
}

pub fn bench(args: BenchArgs) -> Result<u8> {
    if let Some(svg) = &args.svg {
        check_svg_path(svg)?;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("wisp bench needs root (it creates network namespaces, TAPs and containers): run it with sudo");
    }
    let guest_dir = default_guest_dir();
    if !guest_dir.join("vmlinux").is_file() {
        bail!(
            "the default guest is not built ({} is missing): run scripts/build-guest.sh",
            guest_dir.join("vmlinux").display()
        );
    }
    if args.image.is_none() && !args.command.is_empty() {
        bail!("a command after -- is for --image: name the image with --image REF");
    }
    let image = match &args.image {
        Some(r) => Some(prepare_image(r, &args.command)?),
        None => None,
    };
    let kvm = open_checked_kvm()?;
    let cache = vmm::api::runtime_dir().ok();
    let (speed, _) = kernel_mode_speed(&kvm, RUN_PROBE_ITERATIONS, cache.as_deref())?;
    drop(kvm);
    let mut base_cmdline = vmm::cmdline::BASE.to_string();
    if speed.emulated() {
        base_cmdline = format!("{base_cmdline} {}", vmm::cmdline::EMULATED_KERNEL_MODE);
    }
    let target = guest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"));
    let build_script = target
        .parent()
        .map(|root| root.join("scripts/build-guest.sh"))
        .filter(|p| p.is_file());
    let opts = wisp_bench::Options {
        runs: args.runs as usize,
        kinds: if args.only.is_empty() && args.image.is_some() {
            vec![KindName::Wisp, KindName::Runc, KindName::Crun]
        } else if args.only.is_empty() {
            KindName::ALL.to_vec()
        } else {
            args.only.clone()
        },
        requests: args.requests as usize,
        density: args.density as usize,
        cpus: args.cpus as u32,
        memory_mib: args.memory,
        wisp: std::env::current_exe().context("cannot find the wisp binary")?,
        guest_dir,
        busybox: PathBuf::from(BUSYBOX),
        work_dir: target.join("bench"),
        base_cmdline,
        emulated_mips: speed.emulated().then_some(speed.instructions_per_sec / 1e6),
        build_script,
        image,
    };
    let report = wisp_bench::run(&opts)?;
    if args.json {
        // The table still reaches the terminal, beside the progress.
        eprint!("{}", report.to_table());
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    if let Some(path) = &args.svg {
        let svg = wisp_bench::chart::svg(&report)?;
        std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("bench: chart written to {}", path.display());
    }
    if !report.kinds.iter().any(|k| k.status == Status::Ok) {
        eprintln!("wisp bench: no kind could be measured (the notes above say why)");
        return Ok(1);
    }
    Ok(0)
}
