//! One measurement: start an instance, time it to ready, read what it cost, ask it for
//! the page N times, take it down. And the density measurement: K at once.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::http;
use crate::instance::Instance;
use crate::kinds::{Kind, Ready};
use crate::netns::{Slot, GUEST_IP};
use crate::procfs;

/// How long the bench waits for an instance to become ready.
const READY_LIMIT: Duration = Duration::from_secs(300);
/// How long the probe guest may take to its first output.
const PROBE_LIMIT: Duration = Duration::from_secs(30);
/// How long an instance idles after ready before its memory is read.
const SETTLE: Duration = Duration::from_millis(500);

/// What one instance cost.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Process start to ready, ms.
    pub start_ms: f64,
    /// CPU time of its processes until ready, ms.
    pub cpu_ms: f64,
    /// PSS of its processes when idle, MiB.
    pub memory_mib: f64,
    /// The VMM's share of that without guest RAM, MiB.
    pub vmm_own_mib: Option<f64>,
    /// HTTP latency, median and 99th percentile, ms.
    pub http_p50_ms: f64,
    /// See `http_p50_ms`.
    pub http_p99_ms: f64,
    /// The VMM's own start: process start to the probe guest's first output, ms.
    pub vmm_start_ms: Option<f64>,
    /// CPU time of its processes until then, ms.
    pub vmm_start_cpu_ms: Option<f64>,
}

/// K instances at once.
#[derive(Clone, Debug, Default)]
pub struct DensitySample {
    /// Instances started per second until the last was ready.
    pub per_s: f64,
    /// PSS of all of them, idle, divided by their number, MiB.
    pub mib_per_instance: f64,
}

fn addr() -> SocketAddr {
    let ip: Ipv4Addr = GUEST_IP.parse().unwrap_or(Ipv4Addr::new(10, 77, 0, 2));
    SocketAddr::V4(SocketAddrV4::new(ip, 80))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits until `inst` is ready, the way its kind shows it.
fn ready(kind: &dyn Kind, slot: &Slot, inst: &mut Instance) -> Result<Instant, String> {
    match kind.ready() {
        Ready::Marker => inst.wait_marker(READY_LIMIT),
        Ready::FirstAnswer => {
            let pid = inst.pid();
            let answered = slot
                .run_inside(|| http::first_answer(addr(), READY_LIMIT, &mut || procfs::alive(pid)))
                .map_err(|e| e.to_string())?;
            answered.map_err(|e| inst.why_not_ready(&e.to_string()))
        }
    }
}

fn memory_kib(inst: &Instance) -> u64 {
    procfs::tree(inst.pid())
        .into_iter()
        .map(procfs::pss_kib)
        .sum()
}

/// Measures one instance of `kind` in `slot`, and the kind's own start with `probe`
/// where it can boot it; `Err` says why it failed.
pub fn single(
    kind: &dyn Kind,
    slot: &Slot,
    id: &str,
    requests: usize,
    probe: Option<&Path>,
) -> Result<Sample, String> {
    slot.forget_neighbours();
    let mut inst = kind.start(slot, id).map_err(|e| e.to_string())?;
    let result = measure_running(kind, slot, &mut inst, requests);
    inst.stop();
    let mut sample = result?;
    if let Some((ms, cpu)) = vmm_start(kind, probe, id)? {
        sample.vmm_start_ms = Some(ms);
        sample.vmm_start_cpu_ms = Some(cpu);
    }
    Ok(sample)
}

/// `kind`'s own start with the probe guest: to its first output, and the CPU its
/// processes had spent when that was seen; `None` when it cannot boot the probe.
fn vmm_start(
    kind: &dyn Kind,
    probe: Option<&Path>,
    id: &str,
) -> Result<Option<(f64, f64)>, String> {
    let Some(started) = probe.and_then(|p| kind.start_probe(p, &format!("{id}-probe"))) else {
        return Ok(None);
    };
    let mut inst = started.map_err(|e| format!("probe guest: {e}"))?;
    let result = inst.wait_marker(PROBE_LIMIT).map(|at| {
        let cpu = procfs::cpu_ms(&procfs::tree(inst.pid())) + inst.launcher_cpu_ms();
        (ms(at.duration_since(inst.spawned)), cpu)
    });
    inst.stop();
    result
        .map(Some)
        .map_err(|why| format!("probe guest: {why}"))
}

fn measure_running(
    kind: &dyn Kind,
    slot: &Slot,
    inst: &mut Instance,
    requests: usize,
) -> Result<Sample, String> {
    let at = ready(kind, slot, inst)?;
    let cpu_ms = procfs::cpu_ms(&procfs::tree(inst.pid())) + inst.launcher_cpu_ms();
    let start_ms = ms(at.duration_since(inst.spawned));
    std::thread::sleep(SETTLE);
    let total = memory_kib(inst);
    let vmm_own_mib = kind.guest_ram().and_then(|(bytes, file)| {
        let guest = procfs::guest_ram_pss_kib(inst.pid(), bytes, file.as_deref());
        (guest > 0).then(|| total.saturating_sub(guest) as f64 / 1024.0)
    });
    let lat = slot
        .run_inside(|| http::latencies(addr(), requests.max(1)))
        .map_err(|e| e.to_string())?
        .map_err(|e| inst.why_not_ready(&e.to_string()))?;
    Ok(Sample {
        start_ms,
        cpu_ms,
        memory_mib: total as f64 / 1024.0,
        vmm_own_mib,
        http_p50_ms: crate::stats::percentile(&lat, 50.0).unwrap_or(0.0),
        http_p99_ms: crate::stats::percentile(&lat, 99.0).unwrap_or(0.0),
        vmm_start_ms: None,
        vmm_start_cpu_ms: None,
    })
}

/// Starts one instance of `kind` in each of `slots` back to back, waits until all are
/// ready (each is checked), and measures the rate and the memory per instance.
pub fn density(kind: &dyn Kind, slots: &[Slot], id: &str) -> Result<DensitySample, String> {
    for s in slots {
        s.forget_neighbours();
    }
    let t0 = Instant::now();
    let mut insts = Vec::new();
    let mut failure = None;
    for (i, slot) in slots.iter().enumerate() {
        match kind.start(slot, &format!("{id}-{i}")) {
            Ok(inst) => insts.push(inst),
            Err(e) => {
                failure = Some(e.to_string());
                break;
            }
        }
    }
    let mut last = t0;
    if failure.is_none() {
        // Marker times are taken where the output is read, so waiting for them one
        // after the other loses nothing; first answers are polled concurrently.
        let results: Vec<Result<Instant, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = insts
                .iter_mut()
                .zip(slots)
                .map(|(inst, slot)| s.spawn(move || ready(kind, slot, inst)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
                .collect()
        });
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(at) => last = last.max(at),
                Err(why) => {
                    failure.get_or_insert(format!("instance {} of {}: {why}", i + 1, slots.len()));
                }
            }
        }
    }
    let result = match failure {
        Some(why) => Err(why),
        None => {
            std::thread::sleep(SETTLE);
            let total: u64 = insts.iter().map(memory_kib).sum();
            let n = insts.len().max(1) as f64;
            Ok(DensitySample {
                per_s: n / last.duration_since(t0).as_secs_f64().max(1e-6),
                mib_per_instance: total as f64 / 1024.0 / n,
            })
        }
    };
    for inst in insts {
        inst.stop();
    }
    result
}
