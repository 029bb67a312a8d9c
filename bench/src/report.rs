//! The bench's result: per kind, each figure's min / median / max and its ratio to
//! wisp's median; printed as a table, or as JSON (schema [`SCHEMA`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::kinds::KindName;
use crate::measure::{DensitySample, Sample};
use crate::stats::Summary;

/// The JSON document's `schema`.
pub const SCHEMA: &str = "wisp-bench/1";

/// One figure: its JSON key, what it is, its unit, and which way is better.
#[derive(Clone, Copy, Debug)]
pub struct Figure {
    /// Key in `figures` and `ratios`.
    pub key: &'static str,
    /// What it measures.
    pub title: &'static str,
    /// Unit.
    pub unit: &'static str,
    /// Whether more is better (instances per second) rather than less.
    pub higher_is_better: bool,
}

/// Every figure, in report order.
pub const FIGURES: [Figure; 13] = [
    Figure {
        key: "start_ms",
        title: "start: process start to ready (wisp-restore: to its first HTTP answer)",
        unit: "ms",
        higher_is_better: false,
    },
    Figure {
        key: "cpu_ms",
        title: "CPU: user + system time of the instance's host processes until ready",
        unit: "ms",
        higher_is_better: false,
    },
    Figure {
        key: "memory_mib",
        title: "memory: PSS of the idle instance's host processes (guest RAM it touched included)",
        unit: "MiB",
        higher_is_better: false,
    },
    Figure {
        key: "vmm_own_mib",
        title: "memory: wisp's own share, without guest RAM",
        unit: "MiB",
        higher_is_better: false,
    },
    Figure {
        key: "vmm_start_ms",
        title: "VMM start: process start to the probe guest's first output (no kernel boot)",
        unit: "ms",
        higher_is_better: false,
    },
    Figure {
        key: "vmm_start_cpu_ms",
        title: "VMM start CPU: user + system time of its processes until that output",
        unit: "ms",
        higher_is_better: false,
    },
    Figure {
        key: "http_p50_ms",
        title: "response: HTTP GET latency, median of the run's requests",
        unit: "ms",
        higher_is_better: false,
    },
    Figure {
        key: "http_p99_ms",
        title: "response: HTTP GET latency, 99th percentile",
        unit: "ms",
        higher_is_better: false,
    },
    Figure {
        key: "density_per_s",
        title: "density: instances started back to back, per second until all were ready",
        unit: "/s",
        higher_is_better: true,
    },
    Figure {
        key: "image_first_output_ms",
        title: "image: process start to the command's first output",
        unit: "ms",
        higher_is_better: false,
    },
    Figure {
        key: "image_exit_ms",
        title: "image: process start to the command's exit",
        unit: "ms",
        higher_is_better: false,
    },
    Figure {
        key: "image_cpu_ms",
        title: "image: user + system time of all the processes until the exit",
        unit: "ms",
        higher_is_better: false,
    },
    Figure {
        key: "density_mib_per_instance",
        title: "density: PSS of all of them, idle, per instance",
        unit: "MiB",
        higher_is_better: false,
    },
];

/// The machine the bench ran on.
#[derive(Clone, Debug, Serialize)]
pub struct Host {
    /// CPU model.
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// Host kernel release.
    pub kernel: String,
    /// Guest kernel-mode speed in M instructions/s where it is emulated, else `None`.
    pub emulated_kernel_mode_mips: Option<f64>,
    /// What that means for the figures, when it applies.
    pub caveat: Option<String>,
}

/// How the bench ran.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// Measurements per kind.
    pub runs: usize,
    /// HTTP requests per measurement.
    pub requests: usize,
    /// Instances per density measurement (0: none).
    pub density: usize,
    /// vCPUs of each VM.
    pub vm_cpus: u32,
    /// RAM of each VM, MiB.
    pub vm_memory_mib: u64,
    /// `--image REF`: the image whose command was run, instead of the workload.
    pub image: Option<String>,
}

/// Whether a kind was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Every measurement worked.
    Ok,
    /// Not installed or not usable here; never started.
    Skipped,
    /// Started and failed; `note` says why.
    Failed,
}

/// One kind's results.
#[derive(Clone, Debug, Serialize)]
pub struct KindReport {
    /// The kind.
    pub kind: KindName,
    /// Measured, skipped or failed.
    pub status: Status,
    /// Why it was skipped or failed.
    pub note: Option<String>,
    /// What it ran (kernel and initramfs, or the host kernel and the runtime).
    pub runs: Option<String>,
    /// Each figure over the runs.
    pub figures: BTreeMap<&'static str, Summary>,
    /// Each figure's median divided by wisp's.
    pub ratios: BTreeMap<&'static str, f64>,
}

impl KindReport {
    /// A kind that was not measured.
    pub fn not_run(kind: KindName, status: Status, note: String, runs: Option<String>) -> Self {
        Self {
            kind,
            status,
            note: Some(note),
            runs,
            figures: BTreeMap::new(),
            ratios: BTreeMap::new(),
        }
    }

    /// A measured kind with figures measured elsewhere (the image bench).
    pub fn with_figures(
        kind: KindName,
        runs: String,
        figures: BTreeMap<&'static str, Summary>,
    ) -> Self {
        Self {
            kind,
            status: Status::Ok,
            note: None,
            runs: Some(runs),
            figures,
            ratios: BTreeMap::new(),
        }
    }

    /// A measured kind's figures from its samples.
    pub fn measured(
        kind: KindName,
        runs: String,
        samples: &[Sample],
        density: &[DensitySample],
    ) -> Self {
        let mut figures = BTreeMap::new();
        let mut put = |key: &'static str, v: Vec<f64>| {
            if v.len() == samples.len().max(1) || (key.starts_with("density") && !v.is_empty()) {
                if let Some(s) = Summary::of(&v) {
                    figures.insert(key, s);
                }
            }
        };
        put("start_ms", samples.iter().map(|s| s.start_ms).collect());
        put("cpu_ms", samples.iter().map(|s| s.cpu_ms).collect());
        put("memory_mib", samples.iter().map(|s| s.memory_mib).collect());
        put(
            "vmm_own_mib",
            samples.iter().filter_map(|s| s.vmm_own_mib).collect(),
        );
        put(
            "vmm_start_ms",
            samples.iter().filter_map(|s| s.vmm_start_ms).collect(),
        );
        put(
            "vmm_start_cpu_ms",
            samples.iter().filter_map(|s| s.vmm_start_cpu_ms).collect(),
        );
        put(
            "http_p50_ms",
            samples.iter().map(|s| s.http_p50_ms).collect(),
        );
        put(
            "http_p99_ms",
            samples.iter().map(|s| s.http_p99_ms).collect(),
        );
        put("density_per_s", density.iter().map(|d| d.per_s).collect());
        put(
            "density_mib_per_instance",
            density.iter().map(|d| d.mib_per_instance).collect(),
        );
        Self::with_figures(kind, runs, figures)
    }
}

/// Everything the bench found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// [`SCHEMA`].
    pub schema: &'static str,
    /// The machine.
    pub host: Host,
    /// How it ran.
    pub settings: Settings,
    /// One entry per kind asked for, in report order.
    pub kinds: Vec<KindReport>,
}

impl Report {
    /// A report; fills in every kind's ratios to wisp's medians.
    pub fn new(host: Host, settings: Settings, mut kinds: Vec<KindReport>) -> Self {
        kinds.sort_by_key(|k| k.kind);
        let base: BTreeMap<&'static str, f64> = kinds
            .iter()
            .find(|k| k.kind == KindName::Wisp && k.status == Status::Ok)
            .map(|w| w.figures.iter().map(|(k, s)| (*k, s.median)).collect())
            .unwrap_or_default();
        for k in &mut kinds {
            k.ratios = k
                .figures
                .iter()
                .filter_map(|(key, s)| {
                    let b = *base.get(key)?;
                    (b > 0.0).then(|| (*key, s.median / b))
                })
                .collect();
        }
        Self {
            schema: SCHEMA,
            host,
            settings,
            kinds,
        }
    }

    /// The report as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// One line saying where this ran, and the caveat if there is one.
    pub fn host_line(&self) -> String {
        let h = &self.host;
        let mut s = format!("{}, {} CPUs, Linux {}", h.cpu, h.cpus, h.kernel);
        if let Some(c) = &h.caveat {
            let _ = write!(s, ". {c}");
        }
        s
    }

    /// The report as a table for the terminal.
    pub fn to_table(&self) -> String {
        let st = &self.settings;
        let mut out = match &st.image {
            Some(image) => format!(
                "wisp bench --image {image}: {} run(s) per kind, interleaved; VMs with {} vCPU, {} MiB\nhost: {}\n",
                st.runs, st.vm_cpus, st.vm_memory_mib, self.host_line()
            ),
            None => format!(
                "wisp bench: {} run(s) per kind, interleaved; VMs with {} vCPU, {} MiB; {} HTTP requests per run; density {}\nhost: {}\n",
                st.runs, st.vm_cpus, st.vm_memory_mib, st.requests, st.density, self.host_line()
            ),
        };
        let ok: Vec<&KindReport> = self
            .kinds
            .iter()
            .filter(|k| k.status == Status::Ok)
            .collect();
        for f in FIGURES {
            let rows: Vec<(&KindReport, &Summary)> = ok
                .iter()
                .filter_map(|k| Some((*k, k.figures.get(f.key)?)))
                .collect();
            if rows.is_empty() {
                continue;
            }
            let better = if f.higher_is_better {
                "more is better"
            } else {
                "less is better"
            };
            let _ = write!(out, "\n{} [{}, {better}]\n", f.title, f.unit);
            let _ = writeln!(
                out,
                "  {:<15} {:>10} {:>10} {:>10} {:>8}",
                "kind", "min", "median", "max", "x wisp"
            );
            for (k, s) in rows {
                let ratio = k
                    .ratios
                    .get(f.key)
                    .map_or_else(|| "-".to_string(), |r| ratio(*r));
                let _ = writeln!(
                    out,
                    "  {:<15} {:>10} {:>10} {:>10} {:>8}",
                    k.kind.as_str(),
                    num(s.min),
                    num(s.median),
                    num(s.max),
                    ratio
                );
            }
        }
        let _ = writeln!(out, "\nwhat each kind ran:");
        for k in &self.kinds {
            let what = match (k.status, &k.note, &k.runs) {
                (Status::Ok, Some(n), Some(r)) => format!("{r}; {n}"),
                (Status::Ok, None, Some(r)) => r.clone(),
                (Status::Skipped, Some(n), _) => format!("skipped: {n}"),
                (Status::Failed, Some(n), _) => format!("FAILED: {n}"),
                _ => String::new(),
            };
            let _ = writeln!(out, "  {:<15} {what}", k.kind.as_str());
        }
        out
    }
}

/// A ratio: two decimals, or two significant digits below 0.1.
pub fn ratio(r: f64) -> String {
    if r >= 0.1 || r <= 0.0 {
        format!("{r:.2}")
    } else {
        let digits = (-r.log10().floor()) as usize + 1;
        format!("{r:.digits$}")
    }
}

/// A number with as many decimals as its size deserves.
pub fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(start: f64, mem: f64) -> Sample {
        Sample {
            start_ms: start,
            cpu_ms: start / 2.0,
            memory_mib: mem,
            vmm_own_mib: None,
            http_p50_ms: 1.0,
            http_p99_ms: 2.0,
            vmm_start_ms: None,
            vmm_start_cpu_ms: None,
        }
    }

    fn report() -> Report {
        let host = Host {
            cpu: "Test CPU".into(),
            cpus: 2,
            kernel: "6.1".into(),
            emulated_kernel_mode_mips: Some(1.0),
            caveat: Some("guest kernel mode is emulated here".into()),
        };
        let settings = Settings {
            runs: 3,
            requests: 10,
            density: 2,
            vm_cpus: 1,
            vm_memory_mib: 256,
            image: None,
        };
        let d = [DensitySample {
            per_s: 2.0,
            mib_per_instance: 20.0,
        }];
        Report::new(
            host,
            settings,
            vec![
                KindReport::measured(
                    KindName::Runc,
                    "host kernel".into(),
                    &[sample(40.0, 2.0), sample(50.0, 2.0), sample(60.0, 2.0)],
                    &d,
                ),
                KindReport::not_run(
                    KindName::Crun,
                    Status::Failed,
                    "cgroups in hybrid mode not supported".into(),
                    None,
                ),
                KindReport::measured(
                    KindName::Wisp,
                    "vmlinux".into(),
                    &[
                        sample(400.0, 20.0),
                        sample(500.0, 20.0),
                        sample(600.0, 20.0),
                    ],
                    &d,
                ),
            ],
        )
    }

    #[test]
    fn ratios_are_against_wisp_medians() {
        let r = report();
        assert_eq!(r.kinds[0].kind, KindName::Wisp, "sorted into report order");
        let runc = r.kinds.iter().find(|k| k.kind == KindName::Runc).unwrap();
        assert!((runc.ratios["start_ms"] - 0.1).abs() < 1e-9);
        assert!((runc.ratios["memory_mib"] - 0.1).abs() < 1e-9);
        assert!(
            !runc.figures.contains_key("vmm_own_mib"),
            "no samples, no figure"
        );
    }

    #[test]
    fn json_has_the_schema_and_every_kind() {
        let v: serde_json::Value = serde_json::from_str(&report().to_json()).unwrap();
        assert_eq!(v["schema"], SCHEMA);
        assert_eq!(v["kinds"].as_array().unwrap().len(), 3);
        assert_eq!(v["kinds"][0]["kind"], "wisp");
        assert_eq!(v["kinds"][0]["figures"]["start_ms"]["median"], 500.0);
        assert_eq!(v["kinds"][2]["status"], "failed");
        assert_eq!(v["host"]["emulated_kernel_mode_mips"], 1.0);
    }

    #[test]
    fn table_shows_figures_ratios_and_notes() {
        let t = report().to_table();
        assert!(t.contains("guest kernel mode is emulated here"), "{t}");
        assert!(t.contains("start: process start to ready"), "{t}");
        assert!(
            t.contains("FAILED: cgroups in hybrid mode not supported"),
            "{t}"
        );
        let line = t
            .lines()
            .find(|l| l.trim_start().starts_with("runc"))
            .unwrap();
        assert!(line.contains("50.0") && line.contains("0.10"), "{line}");
    }

    #[test]
    fn small_ratios_keep_two_significant_digits() {
        assert_eq!(ratio(1.0), "1.00");
        assert_eq!(ratio(0.0271), "0.027");
        assert_eq!(ratio(0.00271), "0.0027");
        assert_eq!(ratio(126.1), "126.10");
    }
}
