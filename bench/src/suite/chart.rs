//! `report.svg`: throughput and p99 latency per subject, as grouped bars (plotters, SVG
//! backend only).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::summary::{Stat, Summary};

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 520;
const BLUE: RGBColor = RGBColor(52, 101, 164);
const ORANGE: RGBColor = RGBColor(230, 140, 40);

/// One panel: two bar series over the subjects.
struct Panel<'a> {
    title: &'a str,
    unit: &'a str,
    series: [(&'a str, RGBColor, Vec<f64>); 2],
}

/// Draws the chart to `path`.
pub fn draw(summary: &Summary, path: &Path) -> Result<(), String> {
    let names: Vec<String> = summary.subjects.iter().map(|s| s.name.clone()).collect();
    let values = |f: &dyn Fn(&super::summary::SubjectSummary) -> Option<Stat>, scale: f64| {
        summary
            .subjects
            .iter()
            .map(|s| f(s).map_or(0.0, |stat| stat.median * scale))
            .collect::<Vec<f64>>()
    };
    let throughput = Panel {
        title: "Throughput (median)",
        unit: "thousand per second",
        series: [
            (
                "keep-alive requests",
                BLUE,
                values(&|s| s.keepalive_rate, 1e-3),
            ),
            ("new connections", ORANGE, values(&|s| s.connect_rate, 1e-3)),
        ],
    };
    let latency = Panel {
        title: "p99 latency of new connections (median)",
        unit: "ms",
        series: [
            ("no stall", BLUE, values(&|s| s.connect_p99_ms, 1.0)),
            (
                "one worker stalled",
                ORANGE,
                values(&|s| s.stall_p99_ms, 1.0),
            ),
        ],
    };
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(WIDTH / 2);
    draw_panel(&left, &throughput, &names)?;
    draw_panel(&right, &latency, &names)?;
    root.present()
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel<'_>,
    names: &[String],
) -> Result<(), String> {
    let top = panel
        .series
        .iter()
        .flat_map(|(_, _, v)| v.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.15;
    let n = names.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(90)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            // One label per bar group, at its centre.
            if (x - x.floor() - 0.5).abs() < 0.01 && i < names.len() {
                names[i].clone()
            } else {
                String::new()
            }
        })
        .x_label_style(
            TextStyle::from(
                ("sans-serif", 13)
                    .into_font()
                    .transform(FontTransform::Rotate90),
            )
            .pos(Pos::new(HPos::Left, VPos::Center)),
        )
        .y_desc(panel.unit)
        .draw()
        .map_err(|e| e.to_string())?;
    for (k, (label, color, values)) in panel.series.iter().enumerate() {
        let offset = 0.1 + 0.4 * k as f64;
        let color = *color;
        chart
            .draw_series(values.iter().enumerate().map(|(i, &v)| {
                let x = i as f64 + offset;
                Rectangle::new([(x, 0.0), (x + 0.38, v)], color.filled())
            }))
            .map_err(|e| e.to_string())?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::summary::SubjectSummary;

    fn stat(median: f64) -> Option<Stat> {
        Some(Stat {
            median,
            min: median,
            max: median,
        })
    }

    fn subject(name: &str, rate: f64) -> SubjectSummary {
        SubjectSummary {
            name: name.into(),
            keepalive_rate: stat(rate * 4.0),
            keepalive_p99_ms: stat(2.0),
            keepalive_max_over_min: stat(1.1),
            connect_rate: stat(rate),
            connect_p50_ms: stat(1.0),
            connect_p99_ms: stat(5.0),
            connect_max_over_min: stat(1.0),
            connect_cv: stat(0.01),
            connect_primary_cpu_pct: stat(0.0),
            keepalive_primary_cpu_pct: stat(0.0),
            stall_p99_ms: stat(9.0),
            stall_p999_ms: stat(200.0),
            stall_rate: stat(rate),
            stall_ratio: Some(1.8),
            roll_errors: None,
            roll_ok: None,
            roll_unfinished: None,
            roll_s: None,
        }
    }

    #[test]
    fn chart_names_every_subject_and_series() {
        let summary = Summary {
            subjects: vec![subject("kernel", 20_000.0), subject("userspace", 9_000.0)],
            targets: Vec::new(),
        };
        let path =
            std::env::temp_dir().join(format!("steer-bench-chart-{}.svg", std::process::id()));
        draw(&summary, &path).expect("draws");
        let svg = std::fs::read_to_string(&path).expect("written");
        let _ = std::fs::remove_file(&path);
        for text in [
            "kernel",
            "userspace",
            "keep-alive requests",
            "one worker stalled",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(svg.matches("<rect").count() >= 8, "four bars per panel");
    }
}
