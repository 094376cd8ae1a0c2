//! SVG plots from sweep results (`ferry-bench sweep` JSON): throughput and same-run ratio
//! against piece size for each transport, and CPU seconds per GB moved.

use crate::report::{Report, Row};
use anyhow::Context;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One line on a chart: a transport at one (pieces in flight, queue pairs) setting.
struct Series {
    transport: String,
    label: String,
    /// (piece MiB, Gbit/s, ratio to the same-run tool, CPU s/GB)
    points: Vec<(f64, f64, Option<f64>, Option<f64>)>,
    /// The tool's figure for the same number in flight, Gbit/s.
    baseline: Option<(String, f64)>,
}

fn series_of(reports: &[Report]) -> Vec<Series> {
    let mut grouped: BTreeMap<(String, u64, u64), Series> = BTreeMap::new();
    for report in reports {
        let baselines: BTreeMap<&str, &Row> =
            report.rows.iter().map(|r| (r.id.as_str(), r)).collect();
        for row in report.rows.iter().filter(|r| r.tool == "ferry") {
            let p = &row.parameters;
            let (Some(piece), Some(in_flight)) =
                (p["piece_length"].as_u64(), p["in_flight"].as_u64())
            else {
                continue;
            };
            let qps = p["queue_pairs"].as_u64().unwrap_or(1);
            let label = if row.transport == "rdma" {
                format!("rdma {in_flight} in flight x {qps} qp")
            } else {
                format!("tcp {in_flight} streams")
            };
            let series = grouped
                .entry((row.transport.clone(), qps, in_flight))
                .or_insert_with(|| Series {
                    transport: row.transport.clone(),
                    label,
                    points: Vec::new(),
                    baseline: row
                        .baseline
                        .as_deref()
                        .and_then(|id| baselines.get(id))
                        .map(|b| (b.label.clone(), b.bits_per_second / 1e9)),
                });
            series.points.push((
                piece as f64 / (1024.0 * 1024.0),
                row.bits_per_second / 1e9,
                row.ratio,
                row.cpu_seconds_per_gb,
            ));
        }
    }
    let mut all: Vec<Series> = grouped.into_values().collect();
    for s in &mut all {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    all
}

type Pick = fn(&(f64, f64, Option<f64>, Option<f64>)) -> Option<f64>;

/// One panel: `pick` gives the y value of a point; baselines drawn dashed when `baselines`.
fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    series: &[&Series],
    pick: Pick,
    baselines: bool,
    reference: Option<(f64, &str)>,
) -> anyhow::Result<()> {
    let (mut x_min, mut x_max, mut y_max) = (f64::MAX, 0f64, 0f64);
    for s in series {
        for p in &s.points {
            x_min = x_min.min(p.0);
            x_max = x_max.max(p.0);
            if let Some(y) = pick(p) {
                y_max = y_max.max(y);
            }
        }
        if baselines {
            if let Some((_, b)) = &s.baseline {
                y_max = y_max.max(*b);
            }
        }
    }
    if let Some((r, _)) = reference {
        y_max = y_max.max(r);
    }
    if series.is_empty() || x_max == 0.0 {
        area.titled(&format!("{title}: no data"), ("sans-serif", 18))?;
        return Ok(());
    }
    // Piece sizes are powers of two: the x axis is log2(MiB), labelled in MiB.
    let (x_min, x_max) = (x_min.log2(), x_max.log2());
    let (left, right) = (x_min - 0.3, x_max + 0.3);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(left..right, 0f64..(y_max * 1.15).max(1e-9))?;
    chart
        .configure_mesh()
        .x_desc("piece size (MiB)")
        .y_desc(y_desc)
        .x_labels(((x_max - x_min) * 2.0) as usize + 3)
        .x_label_formatter(&|v| {
            if (v - v.round()).abs() < 1e-6 {
                format!("{}", 2f64.powf(v.round()) as u64)
            } else {
                String::new()
            }
        })
        .light_line_style(WHITE)
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter_map(|p| pick(p).map(|y| (p.0.log2(), y)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        if baselines {
            if let Some((label, b)) = &s.baseline {
                chart
                    .draw_series(DashedLineSeries::new(
                        vec![(left, *b), (right, *b)],
                        6,
                        4,
                        color.stroke_width(1),
                    ))?
                    .label(label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            }
        }
    }
    if let Some((r, label)) = reference {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(left, r), (right, r)],
                3,
                3,
                BLACK.stroke_width(1),
            ))?
            .label(label.to_owned())
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()?;
    Ok(())
}

pub fn plot(inputs: &[PathBuf], out_dir: &Path) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for input in inputs {
        let text = std::fs::read_to_string(input)
            .with_context(|| format!("reading {}", input.display()))?;
        let report: Report = serde_json::from_str(&text)
            .with_context(|| format!("{} is not ferry-bench JSON", input.display()))?;
        reports.push(report);
    }
    let all = series_of(&reports);
    anyhow::ensure!(!all.is_empty(), "no sweep points in the inputs");
    std::fs::create_dir_all(out_dir)?;
    let of = |transport: &str| -> Vec<&Series> {
        all.iter().filter(|s| s.transport == transport).collect()
    };
    let (tcp, rdma) = (of("tcp"), of("rdma"));

    let throughput = out_dir.join("throughput-vs-piece-size.svg");
    figure(
        &throughput,
        [&tcp, &rdma],
        [
            Spec::throughput("TCP on loopback (dashed: iperf3, same streams)"),
            Spec::throughput("RDMA (dashed: ib_write_bw, same queue pairs)"),
        ],
    )?;
    let ratio = out_dir.join("ratio-vs-piece-size.svg");
    figure(
        &ratio,
        [&tcp, &rdma],
        [
            Spec::ratio("TCP: Ferry / iperf3 (same run, same streams)", 0.9),
            Spec::ratio("RDMA: Ferry / ib_write_bw (same run)", 0.95),
        ],
    )?;
    let cpu = out_dir.join("cpu-per-gb.svg");
    figure(
        &cpu,
        [&tcp, &rdma],
        [
            Spec::cpu("TCP: CPU seconds per GB (both ends)"),
            Spec::cpu("RDMA: CPU seconds per GB (both ends)"),
        ],
    )?;
    for path in [throughput, ratio, cpu] {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// What one panel shows.
struct Spec {
    title: &'static str,
    y_desc: &'static str,
    pick: Pick,
    baselines: bool,
    reference: Option<(f64, String)>,
}

impl Spec {
    fn throughput(title: &'static str) -> Spec {
        Spec {
            title,
            y_desc: "Gbit/s",
            pick: |p| Some(p.1),
            baselines: true,
            reference: None,
        }
    }

    fn ratio(title: &'static str, target: f64) -> Spec {
        Spec {
            title,
            y_desc: "ratio",
            pick: |p| p.2,
            baselines: false,
            reference: Some((target, format!("target {target}x"))),
        }
    }

    fn cpu(title: &'static str) -> Spec {
        Spec {
            title,
            y_desc: "CPU s/GB",
            pick: |p| p.3,
            baselines: false,
            reference: None,
        }
    }
}

/// One SVG, two panels side by side (TCP, RDMA).
fn figure(path: &Path, series: [&[&Series]; 2], specs: [Spec; 2]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let halves = root.split_evenly((1, 2));
    for ((area, series), spec) in halves.iter().zip(series).zip(specs) {
        panel(
            area,
            spec.title,
            spec.y_desc,
            series,
            spec.pick,
            spec.baselines,
            spec.reference
                .as_ref()
                .map(|(r, label)| (*r, label.as_str())),
        )?;
    }
    root.present()?;
    Ok(())
}
