//! `report.svg`: four panels of horizontal bars, one band per subject: throughput, server
//! CPU per request, new-connection latency tails, and the tails with a stalled worker
//! (plotters, SVG backend only); then a row for the Node comparison (`--peers`) and two
//! for UDP and QUIC, when they ran.
//!
//! Bars are horizontal so that every subject's name is written level beside its band, and
//! each bar carries its median as text, with a whisker for the min-max over the rounds.
//! Latency spans 1 ms to a 200 ms stall, so its panels are on a log scale.

use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::datagrams::{DatagramSummary, QuicFigures, UDP_KERNEL, UdpFigures};
use super::scenario::{STALL_EVERY, STALL_MS};
use super::subject::ONE_SOCKET_QUIC;
use super::summary::{NODE_SUBJECTS, ReloadFigures, Stat, SubjectSummary, Summary};

const WIDTH: u32 = 1500;
const HEIGHT: u32 = 1200;
const BLUE: RGBColor = RGBColor(52, 101, 164);
const ORANGE: RGBColor = RGBColor(230, 140, 40);
const GREEN: RGBColor = RGBColor(78, 154, 6);
const RED: RGBColor = RGBColor(204, 0, 0);
const PURPLE: RGBColor = RGBColor(117, 80, 123);
const FONT: &str = "sans-serif";

/// One bar series: a legend label, a colour, and per subject the figure (if measured).
struct Series<'a> {
    label: &'a str,
    color: RGBColor,
    values: Vec<Option<Stat>>,
}

/// One panel.
/// A target drawn across a panel: a vertical line at `value`, labelled.
struct Mark {
    label: String,
    value: f64,
    color: RGBColor,
}

struct Panel<'a> {
    title: String,
    /// The x axis' description, with its unit.
    unit: &'a str,
    /// Decimals of the value printed at a bar's end.
    digits: usize,
    log: bool,
    series: Vec<Series<'a>>,
    /// Targets to draw across the bars.
    marks: Vec<Mark>,
    /// The subjects' labels, when this panel says more than their names.
    names: Option<Vec<String>>,
}

/// Draws the chart to `path`.
pub fn draw(summary: &Summary, path: &Path) -> Result<(), String> {
    // Each panel shows the subjects that ran its scenarios: a stall-only subject is left
    // out of the first three, a subject without a stall out of the fourth.
    let main: Vec<&SubjectSummary> = summary
        .subjects
        .iter()
        .filter(|s| s.keepalive.rate.is_some() || s.connect.rate.is_some())
        .collect();
    let stalled: Vec<&SubjectSummary> = summary
        .subjects
        .iter()
        .filter(|s| s.stall.is_some())
        .collect();
    let names: Vec<String> = main.iter().map(|s| s.name.clone()).collect();
    let of = |subjects: &[&SubjectSummary],
              f: &dyn Fn(&SubjectSummary) -> Option<Stat>,
              scale: f64|
     -> Vec<Option<Stat>> {
        subjects
            .iter()
            .map(|s| {
                f(s).map(|stat| Stat {
                    median: stat.median * scale,
                    min: stat.min * scale,
                    max: stat.max * scale,
                })
            })
            .collect()
    };
    let values = |f: &dyn Fn(&SubjectSummary) -> Option<Stat>, scale: f64| of(&main, f, scale);
    let stall_values = |f: &dyn Fn(&SubjectSummary) -> Option<Stat>| of(&stalled, f, 1.0);
    // The cost targets, against the references measured in the same run.
    let reference = |name: &str| {
        summary
            .subjects
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.connect.cpu_us)
            .map(|stat| stat.median)
    };
    let marks: Vec<Mark> = [
        ("userspace", 0.8, "target 0.8x userspace", RED),
        ("nginx-reuseport", 1.1, "target 1.1x nginx", PURPLE),
    ]
    .into_iter()
    .filter_map(|(name, factor, label, color)| {
        reference(name).map(|us| Mark {
            label: format!("{label}: {:.1} us", us * factor),
            value: us * factor,
            color,
        })
    })
    .collect();
    // Under the stall, each subject's label says how much the stalled worker still got.
    let stall_names = stalled
        .iter()
        .map(|s| {
            match s
                .stall
                .and_then(|stall| stall.share_on_stalled)
                .map(|share| share.median)
            {
                Some(share) => format!("{} ({:.0}% on stalled)", s.name, share * 100.0),
                None => s.name.clone(),
            }
        })
        .collect();
    let panels = [
        Panel {
            title: "Throughput".to_owned(),
            unit: "thousand per second (median, min-max)",
            digits: 1,
            log: false,
            series: vec![
                Series {
                    label: "keep-alive requests",
                    color: BLUE,
                    values: values(&|s| s.keepalive.rate, 1e-3),
                },
                Series {
                    label: "new connections",
                    color: ORANGE,
                    values: values(&|s| s.connect.rate, 1e-3),
                },
            ],
            marks: Vec::new(),
            names: None,
        },
        Panel {
            title: "Server CPU per request (primary + workers); targets per new connection"
                .to_owned(),
            unit: "microseconds of utime+stime (median, min-max)",
            digits: 1,
            log: false,
            series: vec![
                Series {
                    label: "per new connection",
                    color: ORANGE,
                    values: values(&|s| s.connect.cpu_us, 1.0),
                },
                Series {
                    label: "per keep-alive request",
                    color: BLUE,
                    values: values(&|s| s.keepalive.cpu_us, 1.0),
                },
            ],
            marks,
            names: None,
        },
        Panel {
            title: "New-connection latency".to_owned(),
            unit: "ms, log scale (median over rounds, min-max)",
            digits: 1,
            log: true,
            series: vec![
                Series {
                    label: "p99",
                    color: BLUE,
                    values: values(&|s| s.connect.tails.p99_ms, 1.0),
                },
                Series {
                    label: "p99.9",
                    color: ORANGE,
                    values: values(&|s| s.connect.tails.p999_ms, 1.0),
                },
                Series {
                    label: "max",
                    color: GREEN,
                    values: values(&|s| s.connect.tails.max_ms, 1.0),
                },
            ],
            marks: Vec::new(),
            names: None,
        },
        Panel {
            title: format!(
                "New-connection latency, one worker stalled {STALL_MS} ms every {} s",
                STALL_EVERY.as_secs_f64()
            ),
            unit: "ms, log scale (median over rounds, min-max)",
            digits: 1,
            log: true,
            series: vec![
                Series {
                    label: "p99",
                    color: BLUE,
                    values: stall_values(&|s| s.stall.and_then(|x| x.tails.p99_ms)),
                },
                Series {
                    label: "p99.9",
                    color: ORANGE,
                    values: stall_values(&|s| s.stall.and_then(|x| x.tails.p999_ms)),
                },
                Series {
                    label: "max",
                    color: GREEN,
                    values: stall_values(&|s| s.stall.and_then(|x| x.tails.max_ms)),
                },
            ],
            marks: Vec::new(),
            names: Some(stall_names),
        },
    ];
    // The TCP panels only where TCP subjects ran (not in a UDP-and-QUIC-only run).
    let mut panels = if main.is_empty() && stalled.is_empty() {
        Vec::new()
    } else {
        Vec::from(panels)
    };
    panels.extend(node_panels(summary));
    panels.extend(datagram_panels(&summary.datagrams));
    let rows = panels.len().div_ceil(2).max(1);
    let height = HEIGHT / 2 * u32::try_from(rows).unwrap_or(2);
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    for (area, panel) in root.split_evenly((rows, 2)).iter().zip(&panels) {
        draw_panel(area, panel, &names)?;
    }
    root.present()
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// The Node comparison's row: the same app's throughput under each system (labelled with
/// its fairness), and the failed requests across the reloads (labelled with the count).
/// Empty when none of its subjects ran.
fn node_panels(summary: &Summary) -> Vec<Panel<'static>> {
    let node: Vec<&SubjectSummary> = NODE_SUBJECTS
        .iter()
        .filter_map(|name| summary.subject(name))
        .collect();
    let throughput: Vec<&SubjectSummary> = node
        .iter()
        .copied()
        .filter(|s| s.connect.rate.is_some())
        .collect();
    let reloads: Vec<&SubjectSummary> = node
        .iter()
        .copied()
        .filter(|s| s.reload.is_some())
        .collect();
    if throughput.is_empty() && reloads.is_empty() {
        return Vec::new();
    }
    let thousands = |f: &dyn Fn(&SubjectSummary) -> Option<Stat>| -> Vec<Option<Stat>> {
        throughput
            .iter()
            .map(|s| {
                f(s).map(|v| Stat {
                    median: v.median / 1e3,
                    min: v.min / 1e3,
                    max: v.max / 1e3,
                })
            })
            .collect()
    };
    let failed = |f: &dyn Fn(&ReloadFigures) -> u64| -> Vec<Option<Stat>> {
        reloads
            .iter()
            .map(|s| {
                s.reload.as_ref().map(|r| {
                    let n = f(r) as f64;
                    Stat {
                        median: n,
                        min: n,
                        max: n,
                    }
                })
            })
            .collect()
    };
    let asked = reloads
        .iter()
        .filter_map(|s| s.reload.as_ref().map(|r| r.asked))
        .max()
        .unwrap_or(0);
    let mut panels = vec![
        Panel {
            title: "The same Node app: throughput (label: max/min per worker, new conn)".to_owned(),
            unit: "thousand per second (median, min-max)",
            digits: 1,
            log: false,
            series: vec![
                Series {
                    label: "keep-alive requests",
                    color: BLUE,
                    values: thousands(&|s| s.keepalive.rate),
                },
                Series {
                    label: "new connections",
                    color: ORANGE,
                    values: thousands(&|s| s.connect.rate),
                },
            ],
            marks: Vec::new(),
            names: Some(
                throughput
                    .iter()
                    .map(|s| match s.connect.max_over_min {
                        Some(f) => format!("{} ({:.2})", s.name, f.median),
                        None => s.name.clone(),
                    })
                    .collect(),
            ),
        },
        // Without --peers the cluster module runs no reloads: no empty panel for them.
        Panel {
            title: format!("The same Node app: failed requests across {asked} reloads under load"),
            unit: "failed requests, summed over the rounds (label: all failures)",
            digits: 0,
            log: false,
            series: vec![
                Series {
                    label: "new connections",
                    color: ORANGE,
                    values: failed(&|r| r.errors.total()),
                },
                Series {
                    label: "keep-alive requests",
                    color: BLUE,
                    values: failed(&|r| r.keepalive_errors.total()),
                },
            ],
            marks: Vec::new(),
            names: Some(
                reloads
                    .iter()
                    .map(|s| {
                        let failed = s.reload.as_ref().map_or(0, ReloadFigures::failed);
                        format!("{} ({failed} failed)", s.name)
                    })
                    .collect(),
            ),
        },
    ];
    if reloads.is_empty() {
        panels.pop();
    }
    panels
}

/// A figure known exactly (a count), as a [`Stat`].
fn exact(n: f64) -> Stat {
    Stat {
        median: n,
        min: n,
        max: n,
    }
}

/// `stat` times `scale`.
fn scaled(stat: Option<Stat>, scale: f64) -> Option<Stat> {
    stat.map(|s| Stat {
        median: s.median * scale,
        min: s.min * scale,
        max: s.max * scale,
    })
}

/// The UDP and QUIC rows: datagrams per second and server CPU per datagram against plain
/// `SO_REUSEPORT` (the CPU target drawn across), flows moved and datagrams lost across a
/// roll, and QUIC handshakes and requests per second against one process (two panels: they
/// differ by two orders of magnitude). Empty when none
/// of their subjects ran.
fn datagram_panels(summary: &DatagramSummary) -> Vec<Panel<'static>> {
    let mut panels = Vec::new();
    let udp = &summary.udp;
    if !udp.is_empty() {
        let kernel_cpu = udp
            .iter()
            .find(|u| u.name == UDP_KERNEL)
            .and_then(|u| u.cpu_us)
            .map(|s| s.median);
        let label = |u: &UdpFigures, ratio: Option<Stat>| match ratio {
            Some(r) if u.name != UDP_KERNEL => format!("{} ({:.2}x)", u.name, r.median),
            _ => u.name.clone(),
        };
        panels.push(Panel {
            title: format!("UDP datagrams per second (label: vs {UDP_KERNEL})"),
            unit: "thousand answered per second (median, min-max)",
            digits: 1,
            log: false,
            series: vec![Series {
                label: "datagrams answered",
                color: BLUE,
                values: udp.iter().map(|u| scaled(u.rate, 1e-3)).collect(),
            }],
            marks: Vec::new(),
            names: Some(udp.iter().map(|u| label(u, u.rate_vs_kernel)).collect()),
        });
        panels.push(Panel {
            title: format!(
                "UDP server CPU per datagram (primary + workers; label: vs {UDP_KERNEL})"
            ),
            unit: "microseconds of utime+stime (median, min-max)",
            digits: 2,
            log: false,
            series: vec![Series {
                label: "per datagram",
                color: ORANGE,
                values: udp.iter().map(|u| u.cpu_us).collect(),
            }],
            marks: kernel_cpu
                .map(|us| Mark {
                    label: format!("target 1.05x {UDP_KERNEL}: {:.2} us", us * 1.05),
                    value: us * 1.05,
                    color: RED,
                })
                .into_iter()
                .collect(),
            names: Some(udp.iter().map(|u| label(u, u.cpu_vs_kernel)).collect()),
        });
        let rolled: Vec<&UdpFigures> = udp.iter().filter(|u| u.roll.is_some()).collect();
        if !rolled.is_empty() {
            panels.push(Panel {
                title: "UDP flows across a rolling restart (label: moved, lost)".to_owned(),
                unit: "count, summed over the rounds",
                digits: 0,
                log: false,
                series: vec![
                    Series {
                        label: "flows moved (not forward)",
                        color: RED,
                        values: rolled
                            .iter()
                            .map(|u| u.roll.map(|r| exact(r.moves.moved as f64)))
                            .collect(),
                    },
                    Series {
                        label: "datagrams lost",
                        color: PURPLE,
                        values: rolled
                            .iter()
                            .map(|u| u.roll.map(|r| exact(r.lost as f64)))
                            .collect(),
                    },
                ],
                marks: Vec::new(),
                names: Some(
                    rolled
                        .iter()
                        .map(|u| {
                            let r = u.roll.unwrap_or_default();
                            format!(
                                "{} ({} of {} moved, {} lost)",
                                u.name, r.moves.moved, r.moves.flows, r.lost
                            )
                        })
                        .collect(),
                ),
            });
        }
    }
    let quic = &summary.quic;
    if !quic.is_empty() {
        let label = |q: &QuicFigures, ratio: Option<Stat>| match ratio {
            Some(r) if q.name != ONE_SOCKET_QUIC => format!("{} ({:.2}x)", q.name, r.median),
            _ => q.name.clone(),
        };
        panels.push(Panel {
            title: format!(
                "QUIC handshakes per second, each from a fresh socket (label: vs {ONE_SOCKET_QUIC})"
            ),
            unit: "handshakes per second (median, min-max)",
            digits: 0,
            log: false,
            series: vec![Series {
                label: "full TLS 1.3 handshakes",
                color: ORANGE,
                values: quic.iter().map(|q| q.handshakes).collect(),
            }],
            marks: Vec::new(),
            names: Some(quic.iter().map(|q| label(q, q.handshakes_vs_one)).collect()),
        });
        panels.push(Panel {
            title: format!(
                "QUIC requests per second on established connections (label: vs {ONE_SOCKET_QUIC})"
            ),
            unit: "thousand HTTP/3 requests per second (median, min-max)",
            digits: 1,
            log: false,
            series: vec![Series {
                label: "GET / answered",
                color: BLUE,
                values: quic.iter().map(|q| scaled(q.requests, 1e-3)).collect(),
            }],
            marks: Vec::new(),
            names: Some(quic.iter().map(|q| label(q, q.requests_vs_one)).collect()),
        });
    }
    panels
}

/// Height of a panel's heading: its title, and under it the legend (a second row for the
/// targets).
const HEADING: u32 = 84;

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel<'_>,
    names: &[String],
) -> Result<(), String> {
    let (heading, plot) = area.split_vertically(HEADING);
    draw_heading(&heading, panel)?;
    let names = panel.names.as_deref().unwrap_or(names);
    let measured = || {
        panel
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten())
            .filter(|v| v.max > 0.0)
    };
    // Room on the right for the value printed past the longest bar and its whisker.
    let top = measured()
        .map(|v| v.max)
        .chain(panel.marks.iter().map(|m| m.value))
        .fold(0.0f64, f64::max)
        // Counts (no decimals) keep an axis of at least one even when all are zero.
        .max(if panel.digits == 0 { 1.0 } else { 1e-3 });
    let n = names.len().max(1) as f64;
    let mut builder = ChartBuilder::on(&plot);
    builder
        .margin(14)
        .margin_top(4)
        .margin_right(24)
        .x_label_area_size(48)
        // Room for the longest name (about 8 px a character at this size).
        .y_label_area_size(
            names
                .iter()
                .map(|name| 16 + 8 * u32::try_from(name.len()).unwrap_or(0))
                .max()
                .unwrap_or(0)
                .max(130),
        );
    if panel.log {
        let bottom = measured()
            .map(|v| v.min)
            .filter(|&v| v > 0.0)
            .fold(f64::INFINITY, f64::min);
        let bottom = if bottom.is_finite() { bottom } else { 0.1 };
        let low = 10f64.powf((bottom / 2.0).log10().floor());
        let high = 10f64.powf((top * 2.0).log10().ceil());
        let chart = builder
            .build_cartesian_2d((low..high).log_scale(), 0f64..n)
            .map_err(|e| e.to_string())?;
        draw_bars(chart, panel, names, low)
    } else {
        let chart = builder
            .build_cartesian_2d(0f64..top * 1.15, 0f64..n)
            .map_err(|e| e.to_string())?;
        draw_bars(chart, panel, names, 0.0)
    }
}

/// The panel's title, and under it one swatch and label per series, centred.
fn draw_heading<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel<'_>,
) -> Result<(), String> {
    let (width, _) = area.dim_in_pixel();
    let centre = i32::try_from(width / 2).unwrap_or(0);
    let title = TextStyle::from((FONT, 20).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    area.draw(&Text::new(panel.title.as_str(), (centre, 10), title))
        .map_err(|e| e.to_string())?;
    let label = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    // A swatch, its label (about 8 px a character at this size) and a gap.
    let entry = |series: &Series<'_>| 20 + 8 * i32::try_from(series.label.len()).unwrap_or(0) + 28;
    let total: i32 = panel.series.iter().map(entry).sum();
    let mut x = centre - total / 2;
    let y = 44;
    for series in &panel.series {
        area.draw(&Rectangle::new(
            [(x, y - 7), (x + 14, y + 7)],
            series.color.filled(),
        ))
        .map_err(|e| e.to_string())?;
        area.draw(&Text::new(series.label, (x + 20, y), label.clone()))
            .map_err(|e| e.to_string())?;
        x += entry(series);
    }
    // The targets: a line swatch each, as they are drawn across the bars.
    let mark_entry = |mark: &Mark| 20 + 8 * i32::try_from(mark.label.len()).unwrap_or(0) + 28;
    let total: i32 = panel.marks.iter().map(mark_entry).sum();
    let mut x = centre - total / 2;
    let y = 68;
    for mark in &panel.marks {
        area.draw(&PathElement::new(
            [(x, y), (x + 14, y)],
            mark.color.stroke_width(3),
        ))
        .map_err(|e| e.to_string())?;
        area.draw(&Text::new(mark.label.as_str(), (x + 20, y), label.clone()))
            .map_err(|e| e.to_string())?;
        x += mark_entry(mark);
    }
    Ok(())
}

/// Draws the mesh, the subjects' names, and the bars with their whiskers and values.
fn draw_bars<'a, DB, X>(
    mut chart: ChartContext<'a, DB, Cartesian2d<X, RangedCoordf64>>,
    panel: &Panel<'_>,
    names: &[String],
    base: f64,
) -> Result<(), String>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    X: AsRangedCoord<CoordDescType = X, Value = f64>,
{
    let n = names.len();
    // Subject i's band is [n-1-i, n-i): the first subject on top.
    let band = |i: usize| (n - 1 - i) as f64;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n * 2 + 1)
        .y_label_formatter(&|y| {
            let k = y.floor();
            if (y - k - 0.5).abs() < 0.01 && k >= 0.0 && (k as usize) < n {
                names[n - 1 - k as usize].clone()
            } else {
                String::new()
            }
        })
        .y_label_style((FONT, 15))
        .x_label_style((FONT, 13))
        .x_label_formatter(&|x| tick(*x))
        .x_max_light_lines(4)
        .x_desc(panel.unit)
        .axis_desc_style((FONT, 14))
        .draw()
        .map_err(|e| e.to_string())?;
    let count = panel.series.len() as f64;
    let height = 0.84 / count;
    for (k, series) in panel.series.iter().enumerate() {
        let color = series.color;
        let offset = |i: usize| band(i) + 0.92 - height * (k as f64 + 1.0);
        let bars = series.values.iter().enumerate().filter_map(|(i, v)| {
            let v = v.filter(|v| v.median > 0.0)?;
            let y = offset(i);
            Some(Rectangle::new(
                [(base, y), (v.median, y + height * 0.9)],
                color.filled(),
            ))
        });
        chart.draw_series(bars).map_err(|e| e.to_string())?;
        let whiskers = series.values.iter().enumerate().filter_map(|(i, v)| {
            let v = v.filter(|v| v.median > 0.0 && v.max > v.min)?;
            let y = offset(i) + height * 0.45;
            Some(PathElement::new(
                [(v.min.max(base), y), (v.max, y)],
                BLACK.stroke_width(1),
            ))
        });
        chart.draw_series(whiskers).map_err(|e| e.to_string())?;
        let digits = panel.digits;
        let labels = series.values.iter().enumerate().filter_map(|(i, v)| {
            let v = v.filter(|v| v.median > 0.0)?;
            let y = offset(i) + height * 0.45;
            // A few pixels right of the bar or its whisker, whichever ends later.
            Some(
                EmptyElement::at((v.max.max(v.median), y))
                    + Text::new(
                        format!("{:.digits$}", v.median),
                        (4, 0),
                        TextStyle::from((FONT, 12).into_font())
                            .pos(Pos::new(HPos::Left, VPos::Center)),
                    ),
            )
        });
        chart.draw_series(labels).map_err(|e| e.to_string())?;
    }
    // Targets: a line across every subject's band (named in the legend).
    for mark in &panel.marks {
        chart
            .draw_series(std::iter::once(PathElement::new(
                [(mark.value, 0.0), (mark.value, n as f64)],
                mark.color.stroke_width(2),
            )))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// An axis tick: no decimals where none are needed (`0`, `20`, `100`; `0.5`).
fn tick(value: f64) -> String {
    if value == value.round() {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.2}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::summary::{LoadFigures, MemoryFigures, StallFigures, Tails};

    fn stat(median: f64) -> Option<Stat> {
        Some(Stat {
            median,
            min: median * 0.9,
            max: median * 1.1,
        })
    }

    fn tails(p99: f64) -> Tails {
        Tails {
            p50_ms: stat(p99 / 4.0),
            p99_ms: stat(p99),
            p999_ms: stat(p99 * 3.0),
            max_ms: stat(p99 * 10.0),
        }
    }

    fn subject(name: &str, rate: f64) -> SubjectSummary {
        let figures = |rate: f64, cpu: f64| LoadFigures {
            rate: stat(rate),
            tails: tails(5.0),
            cpu_us: stat(cpu),
            ..LoadFigures::default()
        };
        SubjectSummary {
            name: name.into(),
            keepalive: figures(rate * 4.0, 12.5),
            connect: figures(rate, 48.5),
            stall: Some(StallFigures {
                tails: tails(9.0),
                rate: stat(rate),
                p99_ratio: Some(1.8),
                p999_ratio: Some(1.9),
                share_on_stalled: stat(0.4),
            }),
            roll: None,
            reload: None,
            memory: MemoryFigures::default(),
        }
    }

    #[test]
    fn chart_names_every_subject_series_and_unit() {
        let summary = Summary {
            subjects: vec![
                subject("kernel", 20_000.0),
                subject("nginx-reuseport", 9_000.0),
            ],
            targets: Vec::new(),
            datagrams: Default::default(),
        };
        let path =
            std::env::temp_dir().join(format!("steer-bench-chart-{}.svg", std::process::id()));
        draw(&summary, &path).expect("draws");
        let svg = std::fs::read_to_string(&path).expect("written");
        let _ = std::fs::remove_file(&path);
        // plotters writes each text element's content on a line of its own.
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        for text in [
            "kernel",
            "nginx-reuseport",
            "keep-alive requests",
            "per new connection",
            "p99.9",
            "max",
            "48.5",
            "80.0",
        ] {
            assert!(texts.contains(&text), "{text} missing");
        }
        for text in [
            "microseconds",
            "one worker stalled 200 ms every 1 s",
            "ms, log scale",
            // The cost target against the nginx measured in the same run (1.1 x 48.5 us).
            "target 1.1x nginx: 53.4 us",
            // The stalled worker's share beside each subject of the stall panel.
            "kernel (40% on stalled)",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        // 2 + 2 + 3 + 3 series over 2 subjects, plus the legends' swatches.
        assert!(svg.matches("<rect").count() >= 20, "every bar is drawn");
    }

    #[test]
    fn the_node_row_shows_the_same_apps_throughput_and_its_reload_failures() {
        use crate::load::Errors;
        let reload = |new_conn: u64, keepalive: u64| ReloadFigures {
            asked: 5,
            unfinished: 0,
            reload_s: stat(0.5),
            ok: 10_000,
            errors: Errors {
                timeout: new_conn,
                ..Errors::default()
            },
            keepalive_ok: 50_000,
            keepalive_errors: Errors {
                reset: keepalive,
                ..Errors::default()
            },
        };
        let mut steer = subject("steer-node", 11_000.0);
        steer.connect.max_over_min = Some(Stat {
            median: 1.01,
            min: 1.0,
            max: 1.02,
        });
        steer.reload = Some(reload(0, 0));
        // Stall only: in the stall panel, in none of the others.
        let mut least_loaded = subject("steer-node-least-loaded", 0.0);
        least_loaded.keepalive = LoadFigures::default();
        least_loaded.connect = LoadFigures::default();
        let mut pm2 = subject("pm2", 3_300.0);
        pm2.reload = Some(reload(2, 124));
        let summary = Summary {
            subjects: vec![subject("round-robin", 40_000.0), steer, least_loaded, pm2],
            targets: Vec::new(),
            datagrams: Default::default(),
        };
        let path =
            std::env::temp_dir().join(format!("steer-bench-chart-node-{}.svg", std::process::id()));
        draw(&summary, &path).expect("draws");
        let svg = std::fs::read_to_string(&path).expect("written");
        let _ = std::fs::remove_file(&path);
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        for text in [
            "The same Node app: throughput (label: max/min per worker, new conn)",
            "The same Node app: failed requests across 5 reloads under load",
            "steer-node (1.01)",
            "steer-node (0 failed)",
            "pm2 (126 failed)",
            "steer-node-least-loaded (40% on stalled)",
            "124",
        ] {
            assert!(texts.contains(&text), "{text} missing");
        }
        assert!(
            !texts.contains(&"steer-node-least-loaded"),
            "a stall-only subject has no band in the throughput panels"
        );
        assert!(svg.contains("height=\"1800\""), "a third row of panels");
    }
}
