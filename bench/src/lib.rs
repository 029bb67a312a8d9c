//! `wisp bench`: microVMs next to containers and other VMMs, measured side by side on
//! this machine, with the same workload everywhere (see [`workload`]).
//!
//! Every kind runs the same busybox httpd; each measurement starts one instance in a
//! network namespace of its own, times it to ready, reads the CPU time and memory its
//! host processes hold, asks it for the page N times and takes it down. Runs go round
//! the kinds (in a rotating order), so drift in the machine hits every kind alike. The
//! report gives each figure's min / median / max per kind and the ratio of its median
//! to wisp's; timings are reported, never judged.

pub mod chart;
pub mod containerd;
pub mod http;
pub mod image_mode;
mod instance;
pub mod kinds;
mod measure;
mod netns;
mod procfs;
pub mod report;
pub mod stats;
pub mod workload;

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;

use kinds::{Env, Kind, KindName};
use measure::{DensitySample, Sample};
use netns::Slot;
use report::{Host, KindReport, Report, Settings, Status};

/// What to measure and with what.
#[derive(Clone, Debug)]
pub struct Options {
    /// Measurements per kind.
    pub runs: usize,
    /// The kinds to measure, in any order.
    pub kinds: Vec<KindName>,
    /// HTTP requests per measurement.
    pub requests: usize,
    /// Instances per density measurement; 0 skips density.
    pub density: usize,
    /// vCPUs of each VM.
    pub cpus: u32,
    /// RAM of each VM, MiB.
    pub memory_mib: u64,
    /// The wisp binary.
    pub wisp: PathBuf,
    /// The default guest's directory (vmlinux, and vmlinux-int3 when built).
    pub guest_dir: PathBuf,
    /// The busybox binary the workload is built from (the default guest's).
    pub busybox: PathBuf,
    /// Where the workload is cached and each bench run keeps its scratch files.
    pub work_dir: PathBuf,
    /// The kernel command line wisp uses on this host, for the other VMMs.
    pub base_cmdline: String,
    /// Guest kernel-mode speed (M instructions/s) where it is emulated.
    pub emulated_mips: Option<f64>,
    /// `scripts/build-guest.sh`, to build the kernel other VMMs need where kernel mode
    /// is emulated; `None` when it is not there.
    pub build_script: Option<PathBuf>,
    /// `--image`: run this image's command instead of the workload (see
    /// [`image_mode`]).
    pub image: Option<image_mode::ImageWorkload>,
}

/// The bench could not run at all (a kind that fails is reported, not an error).
#[derive(Debug, Error)]
pub enum BenchError {
    /// The image bench could not set up (mounting the image's disk).
    #[error("wisp bench --image: {0}")]
    Image(String),
    /// Namespaces, TAPs and containers need root.
    #[error("wisp bench needs root (it creates network namespaces, TAPs and containers): run it with sudo")]
    NotRoot,
    /// The default guest's kernel is missing.
    #[error("{0} is missing: build the default guest first (scripts/build-guest.sh)")]
    NoKernel(PathBuf),
    /// The workload could not be built.
    #[error(transparent)]
    Workload(#[from] workload::WorkloadError),
    /// The scratch directory could not be made.
    #[error("cannot create {path}: {source}")]
    Scratch {
        /// The directory.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A network namespace could not be set up.
    #[error(transparent)]
    Net(#[from] netns::NetError),
    /// Ctrl-C or SIGTERM.
    #[error("interrupted; every instance was taken down")]
    Interrupted,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether Ctrl-C (or SIGTERM) arrived during the bench.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Progress on stderr: a bar on a terminal, a line per step otherwise.
struct Progress {
    done: usize,
    total: usize,
    bar: bool,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.done += 1;
        let (done, total) = (self.done, self.total.max(1));
        if self.bar {
            let width = 24;
            let fill = done * width / total;
            eprint!(
                "\r\x1b[2K[{}{}] {done}/{total} {what}",
                "#".repeat(fill),
                "-".repeat(width - fill)
            );
        } else {
            eprintln!("bench: [{done}/{total}] {what}");
        }
        let _ = io::stderr().flush();
    }

    fn note(&self, what: &str) {
        if self.bar {
            eprint!("\r\x1b[2K");
        }
        eprintln!("bench: {what}");
    }

    fn finish(&self) {
        if self.bar {
            eprint!("\r\x1b[2K");
        }
    }
}

fn host(emulated_mips: Option<f64>) -> Host {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    Host {
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel,
        emulated_kernel_mode_mips: emulated_mips,
        caveat: emulated_mips.map(|m| {
            format!(
                "Guest kernel mode is emulated on this host ({m:.1} M instructions/s): VM boots \
                 and guest kernel work are far slower than on real hardware; compare ratios, \
                 not absolute numbers"
            )
        }),
    }
}

/// The kernel QEMU and Firecracker boot: the default one, or where kernel mode is
/// emulated the variant without the int3 self-test, built now if a peer VMM needs it.
fn peer_kernel(opts: &Options, wanted: bool, progress: &Progress) -> Option<PathBuf> {
    if opts.emulated_mips.is_none() {
        return Some(opts.guest_dir.join("vmlinux"));
    }
    let variant = opts.guest_dir.join("vmlinux-int3");
    let Some(script) = opts.build_script.as_ref().filter(|_| wanted) else {
        return variant.is_file().then_some(variant);
    };
    // The build script is cached: with the variant up to date it only checks (and
    // after a change to the kernel's inputs it rebuilds it, as for the default kernel).
    let log = opts.work_dir.join("build-kernel-int3.log");
    if variant.is_file() {
        progress.note(&format!(
            "checking {} (rebuilt if the kernel's inputs changed; log: {})",
            variant.display(),
            log.display()
        ));
    } else {
        progress.note(&format!(
            "building the kernel QEMU and Firecracker need here (no int3 self-test; once, several minutes; log: {})",
            log.display()
        ));
    }
    let out = std::fs::File::create(&log).ok()?;
    let err = out.try_clone().ok()?;
    let ok = Command::new(script)
        .env("WISP_GUEST_INT3_PATCH", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        progress.note(&format!(
            "building the kernel variant failed; see {}",
            log.display()
        ));
    }
    variant.is_file().then_some(variant)
}

/// Where a kind stands while the bench runs.
struct Entry {
    kind: Box<dyn Kind>,
    single: Option<Slot>,
    crowd: Vec<Slot>,
    samples: Vec<Sample>,
    density: Vec<DensitySample>,
    failed: Option<String>,
    /// Why its density measurement failed (the single measurements go on).
    density_failed: Option<String>,
}

/// Measures the kinds of `opts` and reports. Needs root.
pub fn run(opts: &Options) -> Result<Report, BenchError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(BenchError::NotRoot);
    }
    let kernel = opts.guest_dir.join("vmlinux");
    if !kernel.is_file() {
        return Err(BenchError::NoKernel(kernel));
    }
    catch_signals();
    netns::remove_stale();
    remove_stale_scratch(&opts.work_dir);
    if let Some(image) = &opts.image {
        return run_image(opts, image);
    }
    let workload = workload::prepare(&opts.busybox, &opts.work_dir)?;
    let scratch = opts.work_dir.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|source| BenchError::Scratch {
        path: scratch.clone(),
        source,
    })?;
    let result = run_in(opts, kernel, workload, scratch.clone());
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// The image bench: the image's command under each kind, in a scratch directory.
fn run_image(opts: &Options, image: &image_mode::ImageWorkload) -> Result<Report, BenchError> {
    let scratch = opts.work_dir.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|source| BenchError::Scratch {
        path: scratch.clone(),
        source,
    })?;
    let mut progress = Progress {
        done: 0,
        total: 0,
        bar: io::stderr().is_terminal(),
    };
    let result = image_mode::run(opts, image, &scratch, &mut progress);
    progress.finish();
    let _ = std::fs::remove_dir_all(&scratch);
    let settings = Settings {
        runs: opts.runs,
        requests: 0,
        density: 0,
        vm_cpus: opts.cpus,
        vm_memory_mib: opts.memory_mib,
        image: Some(image.reference.clone()),
    };
    Ok(Report::new(host(opts.emulated_mips), settings, result?))
}

/// Removes the scratch directories of bench processes that no longer exist.
fn remove_stale_scratch(work_dir: &Path) {
    let Ok(dir) = std::fs::read_dir(work_dir) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.strip_prefix("run-").is_some_and(procfs::gone) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn run_in(
    opts: &Options,
    kernel: PathBuf,
    workload: workload::Workload,
    scratch: PathBuf,
) -> Result<Report, BenchError> {
    let mut kinds_wanted = opts.kinds.clone();
    kinds_wanted.sort();
    kinds_wanted.dedup();
    let mut progress = Progress {
        done: 0,
        total: 0,
        bar: io::stderr().is_terminal(),
    };
    let peers_wanted = kinds_wanted.iter().any(|k| {
        (*k == KindName::QemuMicrovm && kinds::runs_ok("qemu-system-x86_64", "--version").is_ok())
            || (*k == KindName::Firecracker && kinds::runs_ok("firecracker", "--version").is_ok())
    });
    let env = Env {
        wisp: opts.wisp.clone(),
        kernel,
        peer_kernel: peer_kernel(opts, peers_wanted, &progress),
        workload,
        base_cmdline: opts.base_cmdline.clone(),
        emulated: opts.emulated_mips.is_some(),
        cpus: opts.cpus,
        memory_mib: opts.memory_mib,
        scratch,
        probe: Some(opts.guest_dir.join("probe")).filter(|p| p.is_file()),
    };
    let mut reports = Vec::new();
    let mut entries = Vec::new();
    for name in kinds_wanted {
        match kinds::detect(name, &env) {
            Ok(kind) => entries.push(Entry {
                kind,
                single: None,
                crowd: Vec::new(),
                samples: Vec::new(),
                density: Vec::new(),
                failed: None,
                density_failed: None,
            }),
            Err(note) => reports.push(KindReport::not_run(name, Status::Skipped, note, None)),
        }
    }
    let per_run = 1 + usize::from(opts.density > 0);
    progress.total = entries.len() * (1 + opts.runs * per_run);
    let mut next_slot = 0;
    let mut slot = |link| {
        next_slot += 1;
        Slot::create(next_slot, link)
    };
    for e in &mut entries {
        let name = e.kind.name().as_str();
        progress.step(&format!("{name}: preparing"));
        let s = slot(e.kind.link())?;
        if let Err(why) = e.kind.prepare(&s) {
            e.failed = Some(why.to_string());
        }
        e.single = Some(s);
        if opts.density > 0 {
            for _ in 0..opts.density {
                e.crowd.push(slot(e.kind.link())?);
            }
        }
    }
    for run in 0..opts.runs {
        let n = entries.len().max(1);
        for phase in 0..per_run {
            for i in 0..entries.len() {
                if interrupted() {
                    progress.finish();
                    return Err(BenchError::Interrupted);
                }
                let e = &mut entries[(i + run) % n];
                let name = e.kind.name().as_str();
                let what = if phase == 0 { "measuring" } else { "density" };
                progress.step(&format!("run {}/{}: {name}: {what}", run + 1, opts.runs));
                if e.failed.is_some() || (phase == 1 && e.density_failed.is_some()) {
                    continue;
                }
                let id = format!("{name}-{run}");
                let result = if phase == 0 {
                    let Some(s) = e.single.as_ref() else { continue };
                    measure::single(e.kind.as_ref(), s, &id, opts.requests, env.probe.as_deref())
                        .map(|s| e.samples.push(s))
                } else {
                    match measure::density(e.kind.as_ref(), &e.crowd, &format!("{id}-d")) {
                        Ok(d) => {
                            e.density.push(d);
                            Ok(())
                        }
                        Err(why) if !interrupted() => {
                            progress.note(&format!("{name}: density failed: {why}"));
                            e.density.clear();
                            e.density_failed = Some(format!("density failed: {why}"));
                            Ok(())
                        }
                        Err(why) => Err(why),
                    }
                };
                if let Err(why) = result {
                    if interrupted() {
                        progress.finish();
                        return Err(BenchError::Interrupted);
                    }
                    progress.note(&format!("{name} failed: {why}"));
                    e.failed = Some(why);
                }
            }
        }
    }
    progress.finish();
    for e in entries {
        let name = e.kind.name();
        reports.push(match e.failed {
            Some(why) => KindReport::not_run(name, Status::Failed, why, Some(e.kind.runs())),
            None => {
                let mut k = KindReport::measured(name, e.kind.runs(), &e.samples, &e.density);
                k.note = e.density_failed;
                k
            }
        });
    }
    let settings = Settings {
        runs: opts.runs,
        requests: opts.requests,
        density: opts.density,
        vm_cpus: opts.cpus,
        vm_memory_mib: opts.memory_mib,
        image: None,
    };
    Ok(Report::new(host(opts.emulated_mips), settings, reports))
}
