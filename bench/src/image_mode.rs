//! `wisp bench --image REF`: one image's command, run to its end as a wisp microVM
//! (`wisp run --image`) and as a container (runc, crun) whose root is the same converted
//! disk, loop-mounted read-only under a tmpfs overlay as in the VM. Per run, in turn:
//! process start to the command's first output, to its exit, and the CPU time of all
//! the processes until then.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::kinds::{self, KindName};
use crate::report::{KindReport, Status};
use crate::stats::Summary;
use crate::Progress;

/// How long one run of the command may take.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// The image to run, prepared by the caller (converted, its process resolved).
#[derive(Clone, Debug)]
pub struct ImageWorkload {
    /// REF, for `wisp run --image`.
    pub reference: String,
    /// The command after `--`, if one was given (replaces the image's Cmd).
    pub command: Vec<String>,
    /// The converted ext4 disk (the containers' root).
    pub disk: PathBuf,
    /// The process, as the VM's init runs it.
    pub process: wisp_image::process::Process,
}

/// One run: first output, exit, CPU (ms) and the exit status.
struct RunSample {
    first_output_ms: f64,
    exit_ms: f64,
    cpu_ms: f64,
    status: i32,
}

/// Spawns `cmd`, times its first stdout byte and its exit, and takes the CPU time of it
/// and the children it waited for.
fn timed(mut cmd: Command) -> Result<RunSample, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut err = child.stderr.take().ok_or("no stderr")?;
    let reader = std::thread::spawn(move || {
        let mut first = None;
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
        }
        first
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    let pid = child.id() as libc::pid_t;
    let deadline = t0 + RUN_LIMIT;
    let (status, usage) = loop {
        let mut status = 0;
        // SAFETY: all-zero is a valid rusage, which wait4 fills in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child without blocking; the pointers are to live
        // locals.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break (status, usage);
        }
        if r < 0 || Instant::now() >= deadline || crate::interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "it did not finish within {} s",
                RUN_LIMIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let exited = Instant::now();
    let first = reader.join().ok().flatten();
    let stderr = errors.join().unwrap_or_default();
    let Some(first) = first else {
        let tail: String = stderr.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        return Err(format!(
            "it printed nothing (wait status {status:#x}): {tail}"
        ));
    };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    Ok(RunSample {
        first_output_ms: first.duration_since(t0).as_secs_f64() * 1000.0,
        exit_ms: exited.duration_since(t0).as_secs_f64() * 1000.0,
        cpu_ms: ms(usage.ru_utime) + ms(usage.ru_stime),
        status: code,
    })
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The image's disk, loop-mounted read-only at `dir/lower` for the bench's containers.
struct LowerMount(PathBuf);

impl LowerMount {
    fn new(disk: &Path, dir: &Path) -> Result<Self, String> {
        let lower = dir.join("lower");
        std::fs::create_dir_all(&lower).map_err(|e| e.to_string())?;
        let (d, l) = (disk.to_string_lossy(), lower.to_string_lossy());
        sh(&["mount", "-o", "loop,ro", "-t", "ext4", &d, &l])?;
        Ok(Self(lower))
    }
}

impl Drop for LowerMount {
    fn drop(&mut self) {
        let _ = sh(&["umount", &self.0.to_string_lossy()]);
    }
}

/// A container's root for one run: an overlay of the image with a tmpfs for writes.
struct Rootfs {
    tmp: PathBuf,
    merged: PathBuf,
}

impl Rootfs {
    fn new(lower: &Path, dir: &Path) -> Result<Self, String> {
        let tmp = dir.join("rw");
        let merged = dir.join("rootfs");
        for d in [&tmp, &merged] {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
        }
        let t = tmp.to_string_lossy().into_owned();
        sh(&["mount", "-t", "tmpfs", "tmpfs", &t])?;
        let r = Self { tmp, merged };
        for d in ["upper", "work"] {
            std::fs::create_dir_all(r.tmp.join(d)).map_err(|e| e.to_string())?;
        }
        let opts = format!(
            "lowerdir={},upperdir={}/upper,workdir={}/work",
            lower.display(),
            t,
            t
        );
        sh(&[
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            &opts,
            &r.merged.to_string_lossy(),
        ])?;
        Ok(r)
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let _ = sh(&["umount", &self.merged.to_string_lossy()]);
        let _ = sh(&["umount", &self.tmp.to_string_lossy()]);
    }
}

/// One kind of the image bench.
enum Runner {
    Wisp,
    Oci(&'static str),
}

/// Measures the image under each of `kinds` (wisp, runc, crun; others are noted as not
/// taking part), `runs` times, interleaved.
pub(crate) fn run(
    opts: &crate::Options,
    image: &ImageWorkload,
    scratch: &Path,
    progress: &mut Progress,
) -> Result<Vec<KindReport>, crate::BenchError> {
    let mut reports = Vec::new();
    let mut runners = Vec::new();
    for k in &opts.kinds {
        match k {
            KindName::Wisp => runners.push((Runner::Wisp, *k)),
            KindName::Runc | KindName::Crun => {
                let program = if *k == KindName::Runc { "runc" } else { "crun" };
                match kinds::runs_ok(program, "--version") {
                    Ok(()) => runners.push((Runner::Oci(program), *k)),
                    Err(note) => reports.push(KindReport::not_run(*k, Status::Skipped, note, None)),
                }
            }
            other => reports.push(KindReport::not_run(
                *other,
                Status::Skipped,
                "not part of `wisp bench --image` (wisp, runc and crun are)".into(),
                None,
            )),
        }
    }
    let lower = if runners.iter().any(|(r, _)| matches!(r, Runner::Oci(_))) {
        Some(LowerMount::new(&image.disk, scratch).map_err(crate::BenchError::Image)?)
    } else {
        None
    };
    progress.total = runners.len() * opts.runs;
    let mut samples: Vec<Vec<RunSample>> = runners.iter().map(|_| Vec::new()).collect();
    let mut failed: Vec<Option<String>> = runners.iter().map(|_| None).collect();
    for run in 0..opts.runs {
        let n = runners.len().max(1);
        for i in 0..runners.len() {
            if crate::interrupted() {
                return Err(crate::BenchError::Interrupted);
            }
            let j = (i + run) % n;
            let (runner, name) = &runners[j];
            progress.step(&format!(
                "run {}/{}: {}: running the image",
                run + 1,
                opts.runs,
                name.as_str()
            ));
            if failed[j].is_some() {
                continue;
            }
            let result = match runner {
                Runner::Wisp => {
                    let mut cmd = Command::new(&opts.wisp);
                    cmd.args(["run", "--image", &image.reference])
                        .args(["--cpus", &opts.cpus.to_string()])
                        .args(["--memory", &opts.memory_mib.to_string()])
                        .args(["--name", &format!("bench-image-{run}")]);
                    if !image.command.is_empty() {
                        cmd.arg("--").args(&image.command);
                    }
                    timed(cmd)
                }
                Runner::Oci(program) => {
                    let dir = scratch.join(format!("{program}-{run}"));
                    let lower_dir = lower.as_ref().map(|l| l.0.clone()).unwrap_or_default();
                    Rootfs::new(&lower_dir, &dir).and_then(|root| {
                        let bundle = dir.join("bundle");
                        std::fs::create_dir_all(&bundle).map_err(|e| e.to_string())?;
                        let config =
                            kinds::oci::bundle_config(&image.process, &root.merged, false, None);
                        std::fs::write(bundle.join("config.json"), config.to_string())
                            .map_err(|e| e.to_string())?;
                        let mut cmd = kinds::oci::runtime_command(program);
                        let id = format!("wisp-bench-image-{}-{run}", std::process::id());
                        cmd.args(["run", "--bundle"]).arg(&bundle).arg(&id);
                        let r = timed(cmd);
                        let _ = kinds::oci::runtime_command(program)
                            .args(["delete", "--force", &id])
                            .output();
                        r
                    })
                }
            };
            match result {
                Ok(s) => samples[j].push(s),
                Err(why) => {
                    progress.note(&format!("{} failed: {why}", name.as_str()));
                    failed[j] = Some(why);
                }
            }
        }
    }
    drop(lower);
    for (j, (runner, name)) in runners.iter().enumerate() {
        let runs = match runner {
            Runner::Wisp => format!("wisp run --image {}", image.reference),
            Runner::Oci(p) => {
                format!("the host kernel; {p}, root: the image's converted disk under an overlay")
            }
        };
        reports.push(match failed[j].take() {
            Some(why) => KindReport::not_run(*name, Status::Failed, why, Some(runs)),
            None => {
                let s = &samples[j];
                let mut figures = BTreeMap::new();
                let mut put = |key: &'static str, v: Vec<f64>| {
                    if let Some(x) = Summary::of(&v) {
                        figures.insert(key, x);
                    }
                };
                put(
                    "image_first_output_ms",
                    s.iter().map(|x| x.first_output_ms).collect(),
                );
                put("image_exit_ms", s.iter().map(|x| x.exit_ms).collect());
                put("image_cpu_ms", s.iter().map(|x| x.cpu_ms).collect());
                let statuses: Vec<String> = s.iter().map(|x| x.status.to_string()).collect();
                let mut k = KindReport::with_figures(*name, runs, figures);
                k.note = Some(format!("exit status {}", statuses.join(", ")));
                k
            }
        });
    }
    Ok(reports)
}
