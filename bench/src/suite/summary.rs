//! From rounds to figures: medians with min-max per subject, the targets, and the
//! markdown report.

use std::fmt::Write as _;

use serde::Serialize;

use super::scenario::{Measurement, STALL_EVERY, STALL_MS, Scenario};
use super::subject::EBPF_POLICIES;
use super::{Run, Sample, SuiteConfig};
use crate::load::Errors;

/// The machine and the settings, for the report's header.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// `quick` or `full`.
    pub mode: String,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Workers per subject.
    pub workers: usize,
    /// CPUs online.
    pub cpus: usize,
    /// CPU model (`/proc/cpuinfo`).
    pub cpu_model: String,
    /// Kernel release (`/proc/sys/kernel/osrelease`).
    pub kernel: String,
    /// Seconds of each keep-alive and connect run.
    pub throughput_s: f64,
    /// Seconds of the stalled-worker run.
    pub stall_s: f64,
    /// Seconds of the rolling-restart run.
    pub roll_s: f64,
    /// The subjects, in round order.
    pub subjects: Vec<String>,
}

impl Setup {
    /// Describes this machine and `config`.
    pub fn describe(config: &SuiteConfig, subjects: &[String]) -> Setup {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or_else(|| "unknown".into(), |m| m.trim().to_owned());
        Setup {
            mode: config.mode.clone(),
            rounds: config.rounds,
            workers: config.workers,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".into(), |k| k.trim().to_owned()),
            throughput_s: config.throughput_length.as_secs_f64(),
            stall_s: config.stall_length.as_secs_f64(),
            roll_s: config.roll_length.as_secs_f64(),
            subjects: subjects.to_vec(),
        }
    }
}

/// Median and range of one figure over the rounds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    /// Median (the lower middle for an even count).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Stat {
    /// Over `values`; `None` if there are none.
    pub fn of(mut values: Vec<f64>) -> Option<Stat> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        Some(Stat {
            median: values[(values.len() - 1) / 2],
            min: values[0],
            max: values[values.len() - 1],
        })
    }

    /// `median (min-max)` with `digits` decimals.
    fn show(&self, digits: usize) -> String {
        if self.min == self.max {
            format!("{:.digits$}", self.median)
        } else {
            format!(
                "{:.digits$} ({:.digits$}-{:.digits$})",
                self.median, self.min, self.max
            )
        }
    }
}

/// One subject's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SubjectSummary {
    /// The subject.
    pub name: String,
    /// Keep-alive requests per second.
    pub keepalive_rate: Option<Stat>,
    /// Keep-alive p99 latency, ms.
    pub keepalive_p99_ms: Option<Stat>,
    /// Keep-alive: busiest worker over idlest.
    pub keepalive_max_over_min: Option<Stat>,
    /// New connections per second.
    pub connect_rate: Option<Stat>,
    /// New-connection p50 latency (handshake included), ms.
    pub connect_p50_ms: Option<Stat>,
    /// New-connection p99 latency, ms.
    pub connect_p99_ms: Option<Stat>,
    /// New connections: busiest worker over idlest.
    pub connect_max_over_min: Option<Stat>,
    /// New connections: coefficient of variation of per-worker counts.
    pub connect_cv: Option<Stat>,
    /// The primary's CPU during the connect run, percent of one core.
    pub connect_primary_cpu_pct: Option<Stat>,
    /// The primary's CPU during the keep-alive run, percent of one core.
    pub keepalive_primary_cpu_pct: Option<Stat>,
    /// Stalled worker: p99 of the other traffic, ms.
    pub stall_p99_ms: Option<Stat>,
    /// Stalled worker: p99.9, ms.
    pub stall_p999_ms: Option<Stat>,
    /// Stalled worker: new connections per second.
    pub stall_rate: Option<Stat>,
    /// Median stalled p99 over median no-stall (connect) p99.
    pub stall_ratio: Option<f64>,
    /// Rolling restart: failed requests over all rounds, by kind.
    pub roll_errors: Option<Errors>,
    /// Rolling restart: requests answered over all rounds.
    pub roll_ok: Option<u64>,
    /// Rolling restart: rounds in which the roll did not finish within the run.
    pub roll_unfinished: Option<usize>,
    /// Rolling restart: seconds to replace every worker.
    pub roll_s: Option<Stat>,
}

/// A target of the issue, as measured.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What was aimed at.
    pub goal: String,
    /// What was measured.
    pub measured: String,
    /// Met or not (`None`: could not be measured here, e.g. a peer is missing).
    pub met: Option<bool>,
}

/// Everything the tables show.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Per subject, in round order.
    pub subjects: Vec<SubjectSummary>,
    /// The targets.
    pub targets: Vec<Target>,
}

impl Summary {
    /// Reduces `samples` (over `names`, with `workers` workers each).
    pub fn of(samples: &[Sample], names: &[String], workers: usize) -> Summary {
        let subjects: Vec<SubjectSummary> = names
            .iter()
            .map(|name| summarize(name, samples, workers))
            .collect();
        let targets = targets(&subjects);
        Summary { subjects, targets }
    }

    /// The figures of `name`.
    pub fn subject(&self, name: &str) -> Option<&SubjectSummary> {
        self.subjects.iter().find(|s| s.name == name)
    }
}

fn summarize(name: &str, samples: &[Sample], workers: usize) -> SubjectSummary {
    let of = |scenario: Scenario| -> Vec<&Measurement> {
        samples
            .iter()
            .filter(|s| s.subject == name)
            .flat_map(|s| s.measurements.iter())
            .filter(|m| m.scenario == scenario)
            .collect()
    };
    let stat = |scenario: Scenario, f: &dyn Fn(&Measurement) -> f64| {
        Stat::of(of(scenario).into_iter().map(f).collect())
    };
    let ms = |us: u64| us as f64 / 1000.0;
    let connect_p99 = stat(Scenario::Connect, &|m| ms(m.load.latency.p99_us));
    let stall_p99 = stat(Scenario::Stall, &|m| ms(m.load.latency.p99_us));
    let rolls = of(Scenario::Roll);
    let roll_errors = (!rolls.is_empty()).then(|| {
        let mut total = Errors::default();
        for m in &rolls {
            let e = &m.load.errors;
            total.refused += e.refused;
            total.reset += e.reset;
            total.timeout += e.timeout;
            total.bad_status += e.bad_status;
            total.other += e.other;
        }
        total
    });
    SubjectSummary {
        name: name.to_owned(),
        keepalive_rate: stat(Scenario::KeepAlive, &|m| m.load.rate),
        keepalive_p99_ms: stat(Scenario::KeepAlive, &|m| ms(m.load.latency.p99_us)),
        keepalive_max_over_min: stat(Scenario::KeepAlive, &|m| {
            m.load.fairness(workers).max_over_min
        }),
        connect_rate: stat(Scenario::Connect, &|m| m.load.rate),
        connect_p50_ms: stat(Scenario::Connect, &|m| ms(m.load.latency.p50_us)),
        connect_p99_ms: connect_p99,
        connect_max_over_min: stat(Scenario::Connect, &|m| {
            m.load.fairness(workers).max_over_min
        }),
        connect_cv: stat(Scenario::Connect, &|m| m.load.fairness(workers).cv),
        connect_primary_cpu_pct: stat(Scenario::Connect, &|m| m.primary_cpu_pct),
        keepalive_primary_cpu_pct: stat(Scenario::KeepAlive, &|m| m.primary_cpu_pct),
        stall_p99_ms: stall_p99,
        stall_p999_ms: stat(Scenario::Stall, &|m| ms(m.load.latency.p999_us)),
        stall_rate: stat(Scenario::Stall, &|m| m.load.rate),
        stall_ratio: stall_p99
            .zip(connect_p99)
            .map(|(stalled, calm)| stalled.median / calm.median.max(1e-9)),
        roll_errors,
        roll_ok: (!rolls.is_empty()).then(|| rolls.iter().map(|m| m.load.ok).sum()),
        roll_unfinished: (!rolls.is_empty())
            .then(|| rolls.iter().filter(|m| m.roll_s.is_none()).count()),
        roll_s: Stat::of(rolls.iter().filter_map(|m| m.roll_s).collect()),
    }
}

/// A ratio of two medians, if both were measured.
fn ratio(a: Option<Stat>, b: Option<Stat>) -> Option<f64> {
    Some(a?.median / b?.median)
}

fn targets(subjects: &[SubjectSummary]) -> Vec<Target> {
    let get = |name: &str| subjects.iter().find(|s| s.name == name);
    let connect = |name: &str| get(name).and_then(|s| s.connect_rate);
    let keepalive = |name: &str| get(name).and_then(|s| s.keepalive_rate);
    let mut targets = Vec::new();

    let rr = ratio(connect("round-robin"), connect("kernel"));
    targets.push(Target {
        goal: "round-robin new-connection rate >= 0.97x kernel".into(),
        measured: rr.map_or_else(|| "not measured".into(), |r| format!("{r:.3}x")),
        met: rr.map(|r| r >= 0.97),
    });

    let userspace_cpu = get("userspace")
        .and_then(|s| s.connect_primary_cpu_pct)
        .map_or(f64::NAN, |s| s.median);
    for policy in EBPF_POLICIES {
        let r = ratio(connect(policy), connect("userspace"));
        let cpu = get(policy)
            .and_then(|s| s.connect_primary_cpu_pct)
            .map_or(f64::NAN, |s| s.median);
        targets.push(Target {
            goal: format!("{policy} new-connection rate >= 1.5x userspace, primary CPU near zero"),
            measured: r.map_or_else(
                || "not measured".into(),
                |r| format!("{r:.2}x; primary CPU {cpu:.1}% vs userspace {userspace_cpu:.0}%"),
            ),
            met: r.map(|r| r >= 1.5 && cpu < 2.0),
        });
    }

    let nginx = "nginx-reuseport";
    for (what, rate) in [
        ("keep-alive", &keepalive as &dyn Fn(&str) -> Option<Stat>),
        ("new-connection", &connect),
    ] {
        let r = ratio(rate("round-robin"), rate(nginx));
        targets.push(Target {
            goal: format!("demo workers (round-robin) on par with nginx reuseport, {what} rate"),
            measured: r.map_or_else(
                || "nginx not installed (cargo xtask bench --peers)".into(),
                |r| format!("{r:.2}x nginx"),
            ),
            // "On par": within the run-to-run noise of a shared machine.
            met: r.map(|r| r >= 0.95),
        });
        let best_node = [rate("node-rr"), rate("node-none")]
            .into_iter()
            .flatten()
            .max_by(|a, b| a.median.total_cmp(&b.median));
        let r = ratio(rate("round-robin"), best_node);
        targets.push(Target {
            goal: format!(
                "demo workers (round-robin) >= 2x Node cluster (its better mode), {what} rate"
            ),
            measured: r.map_or_else(|| "node not installed".into(), |r| format!("{r:.2}x")),
            met: r.map(|r| r >= 2.0),
        });
    }

    let ll = get("least-loaded").and_then(|s| s.stall_ratio);
    targets.push(Target {
        goal: "least-loaded stalled-worker p99 <= 2x its no-stall p99".into(),
        measured: ll.map_or_else(|| "not measured".into(), |r| format!("{r:.2}x")),
        met: ll.map(|r| r <= 2.0),
    });

    for policy in EBPF_POLICIES {
        let failed = get(policy).and_then(|s| s.roll_errors).map(|e| e.total());
        let unfinished = get(policy).and_then(|s| s.roll_unfinished).unwrap_or(0);
        targets.push(Target {
            goal: format!("{policy}: zero failed requests across the rolling restarts"),
            measured: failed.map_or_else(
                || "not measured".into(),
                |f| {
                    format!(
                        "{f} failed{}",
                        if unfinished > 0 {
                            format!(", {unfinished} roll(s) unfinished")
                        } else {
                            String::new()
                        }
                    )
                },
            ),
            met: failed.map(|f| f == 0),
        });
    }
    targets
}

fn show(stat: Option<Stat>, digits: usize) -> String {
    stat.map_or_else(|| "-".into(), |s| s.show(digits))
}

/// The markdown report.
pub fn markdown(run: &Run) -> String {
    let s = &run.setup;
    let mut out = String::new();
    let _ = writeln!(out, "# Steer benchmark ({} run)\n", s.mode);
    let _ = writeln!(
        out,
        "Machine: {} CPUs ({}), Linux {}. {} workers per subject; {} interleaved round(s); \
         keep-alive and connect runs {:.1} s, stalled-worker {:.1} s, rolling restart {:.1} s. \
         Figures are medians over the rounds, with (min-max). Load: steer-bench, 2 client \
         threads on the same machine, 64 keep-alive connections or 32 new-connection lanes, \
         64 source addresses.\n",
        s.cpus, s.cpu_model, s.kernel, s.workers, s.rounds, s.throughput_s, s.stall_s, s.roll_s
    );
    let _ = writeln!(out, "## Throughput and fairness\n");
    let _ = writeln!(
        out,
        "| subject | keep-alive req/s | new conn/s | conn p50 ms | conn p99 ms | max/min (conn) | CV (conn) | max/min (keep-alive) | primary CPU % (conn) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for x in &run.summary.subjects {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x.name,
            show(x.keepalive_rate, 0),
            show(x.connect_rate, 0),
            show(x.connect_p50_ms, 2),
            show(x.connect_p99_ms, 2),
            show(x.connect_max_over_min, 2),
            show(x.connect_cv, 3),
            show(x.keepalive_max_over_min, 2),
            show(x.connect_primary_cpu_pct, 1),
        );
    }
    let _ = writeln!(
        out,
        "\n## Stalled worker\n\nOne worker blocks its event loop {STALL_MS} ms every {} s \
         (`/block?ms={STALL_MS}`); new-connection load as above. Latency of the load's \
         requests (the blocking requests are not counted).\n",
        STALL_EVERY.as_secs()
    );
    let _ = writeln!(
        out,
        "| subject | p99 no stall ms | p99 stalled ms | stalled / no stall | p99.9 stalled ms | new conn/s stalled |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for x in run
        .summary
        .subjects
        .iter()
        .filter(|x| x.stall_p99_ms.is_some())
    {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            x.name,
            show(x.connect_p99_ms, 2),
            show(x.stall_p99_ms, 2),
            x.stall_ratio
                .map_or_else(|| "-".into(), |r| format!("{r:.2}x")),
            show(x.stall_p999_ms, 2),
            show(x.stall_rate, 0),
        );
    }
    let _ = writeln!(
        out,
        "\n## Rolling restart\n\nSIGUSR2 a quarter into a new-connection run; every request \
         counted, summed over the rounds.\n"
    );
    let _ = writeln!(
        out,
        "| subject | requests ok | failed | refused | reset | timeout | bad status | roll time s |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for x in run
        .summary
        .subjects
        .iter()
        .filter(|x| x.roll_errors.is_some())
    {
        let e = x.roll_errors.unwrap_or_default();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            x.name,
            x.roll_ok.unwrap_or(0),
            e.total(),
            e.refused,
            e.reset,
            e.timeout,
            e.bad_status,
            show(x.roll_s, 2),
        );
    }
    let _ = writeln!(
        out,
        "\n## Targets\n\n| target | measured | met |\n|---|---|---|"
    );
    for t in &run.summary.targets {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        let _ = writeln!(out, "| {} | {} | {met} |", t.goal, t.measured);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        let s = Stat::of(vec![3.0, 1.0, 2.0, 10.0, 4.0]).expect("values");
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 10.0));
        assert_eq!(Stat::of(vec![2.0, 1.0]).expect("values").median, 1.0);
        assert!(Stat::of(Vec::new()).is_none());
        assert_eq!(s.show(1), "3.0 (1.0-10.0)");
    }
}
