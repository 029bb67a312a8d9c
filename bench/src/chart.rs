//! The report as an SVG chart: one panel per figure, one bar per kind (its median) with
//! a line from its min to its max. Figures whose values span more than a decade get a
//! logarithmic axis.

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use thiserror::Error;

use crate::report::{num, Report, Status, FIGURES};

/// Drawing the chart failed.
#[derive(Debug, Error)]
#[error("cannot draw the chart: {0}")]
pub struct ChartError(String);

fn err<E: std::fmt::Display>(e: E) -> ChartError {
    ChartError(e.to_string())
}

const WIDTH: u32 = 1200;
const PANEL_HEIGHT: u32 = 230;
const HEADER: u32 = 80;

/// Colours for kinds, VMs blue-ish, containers orange-ish, in report order.
fn colour(kind: crate::kinds::KindName) -> RGBColor {
    use crate::kinds::KindName::*;
    match kind {
        Wisp => RGBColor(31, 119, 180),
        WispRestore => RGBColor(23, 190, 207),
        Runc => RGBColor(255, 127, 14),
        Crun => RGBColor(214, 39, 40),
        ContainerdRunc => RGBColor(188, 128, 34),
        ContainerdWisp => RGBColor(44, 160, 44),
        QemuMicrovm => RGBColor(148, 103, 189),
        Firecracker => RGBColor(140, 86, 75),
    }
}

/// The chart of `report` as an SVG document.
pub fn svg(report: &Report) -> Result<String, ChartError> {
    let figures: Vec<_> = FIGURES
        .iter()
        .filter(|f| {
            report
                .kinds
                .iter()
                .any(|k| k.status == Status::Ok && k.figures.contains_key(f.key))
        })
        .collect();
    let rows = figures.len().div_ceil(2).max(1) as u32;
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (WIDTH, HEADER + rows * PANEL_HEIGHT))
            .into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (header, body) = root.split_vertically(HEADER);
        let st = &report.settings;
        header
            .draw_text(
                &format!(
                    "wisp bench{}: {} run{} per kind, VMs {} vCPU / {} MiB, bars are medians, lines min..max",
                    st.image.as_deref().map(|i| format!(" --image {i}")).unwrap_or_default(),
                    st.runs,
                    if st.runs == 1 { "" } else { "s" },
                    st.vm_cpus,
                    st.vm_memory_mib
                ),
                &("sans-serif", 20).into_font().color(&BLACK),
                (12, 10),
            )
            .map_err(err)?;
        for (i, line) in wrap(&report.host_line(), 170).iter().enumerate() {
            header
                .draw_text(
                    line,
                    &("sans-serif", 13).into_font().color(&RGBColor(120, 40, 40)),
                    (12, 38 + 16 * i as i32),
                )
                .map_err(err)?;
        }
        let panels = body.split_evenly((rows as usize, 2));
        for (panel, f) in panels.iter().zip(&figures) {
            let data: Vec<_> = report
                .kinds
                .iter()
                .filter(|k| k.status == Status::Ok)
                .filter_map(|k| Some((k.kind, k.figures.get(f.key)?)))
                .collect();
            let lo = data
                .iter()
                .map(|(_, s)| s.min)
                .fold(f64::INFINITY, f64::min);
            let hi = data.iter().map(|(_, s)| s.max).fold(0.0, f64::max);
            let log = lo > 0.0 && hi / lo > 10.0;
            let tx = |v: f64| if log { v.max(1e-9).log10() } else { v };
            let (x0, x1) = if log {
                (lo.log10().floor(), hi.log10().ceil())
            } else {
                (0.0, if hi > 0.0 { hi * 1.1 } else { 1.0 })
            };
            let n = data.len();
            let names: Vec<&str> = data.iter().map(|(k, _)| k.as_str()).collect();
            let mut chart = ChartBuilder::on(panel)
                .caption(
                    format!("{} ({})", short_title(f.key), f.unit),
                    ("sans-serif", 15),
                )
                .margin(10)
                .margin_right(40)
                .x_label_area_size(24)
                .y_label_area_size(110)
                .build_cartesian_2d(x0..x1, (0..n.saturating_sub(1).max(1)).into_segmented())
                .map_err(err)?;
            chart
                .configure_mesh()
                .disable_y_mesh()
                .y_labels(n)
                .y_label_formatter(&|v| match v {
                    SegmentValue::CenterOf(i) => names.get(*i).copied().unwrap_or("").to_string(),
                    _ => String::new(),
                })
                .x_labels(6)
                .x_label_formatter(&|x| if log { num(10f64.powf(*x)) } else { num(*x) })
                .draw()
                .map_err(err)?;
            chart
                .draw_series(data.iter().enumerate().map(|(i, (k, s))| {
                    let mut r = Rectangle::new(
                        [
                            (x0, SegmentValue::Exact(i)),
                            (tx(s.median), SegmentValue::Exact(i + 1)),
                        ],
                        colour(*k).filled(),
                    );
                    r.set_margin(4, 4, 0, 0);
                    r
                }))
                .map_err(err)?;
            chart
                .draw_series(data.iter().enumerate().map(|(i, (_, s))| {
                    PathElement::new(
                        vec![
                            (tx(s.min), SegmentValue::CenterOf(i)),
                            (tx(s.max), SegmentValue::CenterOf(i)),
                        ],
                        BLACK.stroke_width(2),
                    )
                }))
                .map_err(err)?;
            chart
                .draw_series(data.iter().enumerate().map(|(i, (_, s))| {
                    Text::new(
                        num(s.median),
                        (tx(s.max), SegmentValue::CenterOf(i)),
                        ("sans-serif", 12).into_font(),
                    )
                }))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(buf)
}

/// `text` in lines of at most about `width` characters, broken at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split(' ') {
        let line = lines.last_mut().expect("lines is never empty");
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(word.to_string());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

/// A panel title short enough for half the width.
fn short_title(key: &str) -> &'static str {
    match key {
        "start_ms" => "start to ready",
        "cpu_ms" => "CPU until ready",
        "memory_mib" => "memory, idle (PSS)",
        "vmm_own_mib" => "VMM's own memory",
        "vmm_start_ms" => "VMM start, probe guest",
        "image_first_output_ms" => "image: first output",
        "image_exit_ms" => "image: start to exit",
        "image_cpu_ms" => "image: CPU until exit",
        "vmm_start_cpu_ms" => "VMM start CPU, probe guest",
        "http_p50_ms" => "HTTP latency p50",
        "http_p99_ms" => "HTTP latency p99",
        "density_per_s" => "density: starts per second",
        "density_mib_per_instance" => "density: memory per instance",
        _ => "figure",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::KindName;
    use crate::measure::{DensitySample, Sample};
    use crate::report::{Host, KindReport, Settings};

    #[test]
    fn long_lines_wrap_at_spaces() {
        assert_eq!(wrap("aa bb cc", 5), ["aa bb", "cc"]);
        assert_eq!(wrap("short", 80), ["short"]);
    }

    #[test]
    fn draws_one_panel_per_figure_with_every_kind() {
        let s = |start: f64| Sample {
            start_ms: start,
            cpu_ms: 10.0,
            memory_mib: 5.0,
            vmm_own_mib: Some(2.0),
            http_p50_ms: 1.0,
            http_p99_ms: 3.0,
            vmm_start_ms: Some(20.0),
            vmm_start_cpu_ms: Some(9.0),
        };
        let d = [DensitySample {
            per_s: 1.5,
            mib_per_instance: 4.0,
        }];
        let report = Report::new(
            Host {
                cpu: "CPU".into(),
                cpus: 2,
                kernel: "6.1".into(),
                emulated_kernel_mode_mips: None,
                caveat: None,
            },
            Settings {
                runs: 2,
                requests: 5,
                density: 2,
                vm_cpus: 1,
                vm_memory_mib: 256,
                image: None,
            },
            vec![
                KindReport::measured(KindName::Wisp, "k".into(), &[s(5000.0), s(7000.0)], &d),
                KindReport::measured(KindName::Runc, "h".into(), &[s(40.0), s(50.0)], &d),
            ],
        );
        let svg = svg(&report).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for text in [
            "start to ready",
            "density: memory per instance",
            "VMM start, probe guest",
            "wisp",
            "runc",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
    }
}
