//! From rounds to figures: medians with min-max per subject, the targets, and the
//! markdown report.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::scenario::{Measurement, STALL_EVERY, STALL_MS, Scenario};
use super::subject::{EBPF_POLICIES, PM2_VERSION, STEER_NODE};
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
    /// Seconds of each UDP and QUIC throughput run.
    pub datagram_s: f64,
    /// Seconds of the UDP flows' rolling-restart run.
    pub datagram_roll_s: f64,
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
            datagram_s: config.datagram_lengths().throughput.as_secs_f64(),
            datagram_roll_s: config.datagram_lengths().roll.as_secs_f64(),
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
        self.show_with(digits, "")
    }

    /// A ratio: `0.74x (0.70-0.81)`.
    fn show_x(&self, digits: usize) -> String {
        self.show_with(digits, "x")
    }

    /// A share, as a percentage: `48% (40-52)`.
    fn show_percent(&self) -> String {
        Stat {
            median: self.median * 100.0,
            min: self.min * 100.0,
            max: self.max * 100.0,
        }
        .show_with(0, "%")
    }

    fn show_with(&self, digits: usize, unit: &str) -> String {
        if self.min == self.max {
            format!("{:.digits$}{unit}", self.median)
        } else {
            format!(
                "{:.digits$}{unit} ({:.digits$}-{:.digits$})",
                self.median, self.min, self.max
            )
        }
    }
}

/// Latency percentiles of a run, ms, over the rounds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Tails {
    /// Median.
    pub p50_ms: Option<Stat>,
    /// 99th percentile.
    pub p99_ms: Option<Stat>,
    /// 99.9th percentile.
    pub p999_ms: Option<Stat>,
    /// Slowest request.
    pub max_ms: Option<Stat>,
}

/// The figures of a keep-alive or new-connection run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LoadFigures {
    /// Requests (new connections) per second.
    pub rate: Option<Stat>,
    /// Latency (a new connection's includes its handshake).
    pub tails: Tails,
    /// Busiest worker over idlest.
    pub max_over_min: Option<Stat>,
    /// Coefficient of variation of per-worker counts.
    pub cv: Option<Stat>,
    /// Server CPU (every process of it, the primary included) per request, microseconds.
    pub cpu_us: Option<Stat>,
    /// [`Self::cpu_us`] over userspace's in the same round.
    pub cpu_vs_userspace: Option<Stat>,
    /// [`Self::cpu_us`] over nginx's in the same round.
    pub cpu_vs_nginx: Option<Stat>,
    /// The primary's own CPU, percent of one core.
    pub primary_cpu_pct: Option<Stat>,
}

/// The stalled-worker run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StallFigures {
    /// Latency of the other traffic.
    pub tails: Tails,
    /// New connections per second.
    pub rate: Option<Stat>,
    /// Median stalled p99 over median no-stall (connect) p99.
    pub p99_ratio: Option<f64>,
    /// Median stalled p99.9 over median no-stall (connect) p99.9.
    pub p999_ratio: Option<f64>,
    /// Of the requests started during a stall, the share the stalled worker answered.
    pub share_on_stalled: Option<Stat>,
}

/// The rolling-restart runs, summed over the rounds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RollFigures {
    /// Failed requests by kind.
    pub errors: Errors,
    /// Requests answered.
    pub ok: u64,
    /// Rounds in which the roll did not finish within the run.
    pub unfinished: usize,
    /// Seconds to replace every worker.
    pub roll_s: Option<Stat>,
}

/// The reload runs of the Node comparison, summed over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadFigures {
    /// Reloads asked for.
    pub asked: usize,
    /// Reloads that did not finish.
    pub unfinished: usize,
    /// Seconds per reload.
    pub reload_s: Option<Stat>,
    /// New connections answered.
    pub ok: u64,
    /// Failed new connections by kind.
    pub errors: Errors,
    /// Keep-alive requests answered.
    pub keepalive_ok: u64,
    /// Failed keep-alive requests by kind.
    pub keepalive_errors: Errors,
}

impl ReloadFigures {
    /// Every failed request, both loads.
    pub fn failed(&self) -> u64 {
        self.errors.total() + self.keepalive_errors.total()
    }

    /// Connection resets, both loads.
    pub fn resets(&self) -> u64 {
        self.errors.reset + self.keepalive_errors.reset
    }
}

/// Resident memory after the new-connection run, MiB.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MemoryFigures {
    /// The primary (Steer's primary, Node's primary, nginx's master).
    pub primary_rss_mib: Option<Stat>,
    /// The largest worker.
    pub worker_rss_mib: Option<Stat>,
}

/// One subject's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SubjectSummary {
    /// The subject.
    pub name: String,
    /// Keep-alive throughput.
    pub keepalive: LoadFigures,
    /// New connections.
    pub connect: LoadFigures,
    /// Stalled worker (Steer only).
    pub stall: Option<StallFigures>,
    /// Rolling restart (Steer only).
    pub roll: Option<RollFigures>,
    /// Reloads under load (the Node comparison).
    pub reload: Option<ReloadFigures>,
    /// Memory.
    pub memory: MemoryFigures,
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
    /// The UDP and QUIC subjects' figures.
    pub datagrams: super::datagrams::DatagramSummary,
}

/// The subject CPU costs are compared with: the userspace balancer.
const USERSPACE: &str = "userspace";
/// The peer CPU costs are compared with.
const NGINX: &str = "nginx-reuseport";
/// The primary's RSS with the program loaded must stay under this, MiB.
const PRIMARY_RSS_MIB: f64 = 10.0;
/// A demo worker's RSS must stay under this, MiB.
const WORKER_RSS_MIB: f64 = 5.0;
/// `steer-node`'s busiest worker over its idlest, new connections, must stay under this.
const NODE_FAIRNESS: f64 = 1.10;
/// Under least-loaded a stalled Node worker must get less than this share of the new
/// connections started during its stall.
const NODE_STALLED_SHARE: f64 = 0.05;

impl Summary {
    /// Reduces `samples` (over `names`, with `workers` workers each).
    pub fn of(samples: &[Sample], names: &[String], workers: usize) -> Summary {
        let subjects: Vec<SubjectSummary> = names
            .iter()
            .map(|name| summarize(name, samples, workers))
            .collect();
        let targets = targets(&subjects, workers);
        Summary {
            subjects,
            targets,
            datagrams: super::datagrams::DatagramSummary::default(),
        }
    }

    /// The figures of `name`.
    pub fn subject(&self, name: &str) -> Option<&SubjectSummary> {
        self.subjects.iter().find(|s| s.name == name)
    }
}

/// `name`'s measurements of `scenario`, by round.
fn by_round<'a>(
    samples: &'a [Sample],
    name: &str,
    scenario: Scenario,
) -> BTreeMap<usize, &'a Measurement> {
    samples
        .iter()
        .filter(|s| s.subject == name)
        .flat_map(|s| {
            s.measurements
                .iter()
                .filter(move |m| m.scenario == scenario)
                .map(move |m| (s.round, m))
        })
        .collect()
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn tails(runs: &BTreeMap<usize, &Measurement>) -> Tails {
    let stat =
        |f: &dyn Fn(&Measurement) -> u64| Stat::of(runs.values().map(|m| ms(f(m))).collect());
    Tails {
        p50_ms: stat(&|m| m.load.latency.p50_us),
        p99_ms: stat(&|m| m.load.latency.p99_us),
        p999_ms: stat(&|m| m.load.latency.p999_us),
        max_ms: stat(&|m| m.load.latency.max_us),
    }
}

/// Per round, `name`'s CPU per request over `reference`'s; their median and range.
fn cpu_ratio(samples: &[Sample], name: &str, reference: &str, scenario: Scenario) -> Option<Stat> {
    let theirs = by_round(samples, reference, scenario);
    Stat::of(
        by_round(samples, name, scenario)
            .iter()
            .filter_map(|(round, m)| {
                let reference = theirs.get(round)?.cpu_us_per_request;
                (reference > 0.0).then(|| m.cpu_us_per_request / reference)
            })
            .collect(),
    )
}

fn load_figures(samples: &[Sample], name: &str, scenario: Scenario, workers: usize) -> LoadFigures {
    let runs = by_round(samples, name, scenario);
    let stat = |f: &dyn Fn(&Measurement) -> f64| Stat::of(runs.values().map(|m| f(m)).collect());
    LoadFigures {
        rate: stat(&|m| m.load.rate),
        tails: tails(&runs),
        max_over_min: stat(&|m| m.load.fairness(workers).max_over_min),
        cv: stat(&|m| m.load.fairness(workers).cv),
        cpu_us: stat(&|m| m.cpu_us_per_request),
        cpu_vs_userspace: cpu_ratio(samples, name, USERSPACE, scenario),
        cpu_vs_nginx: cpu_ratio(samples, name, NGINX, scenario),
        primary_cpu_pct: stat(&|m| m.primary_cpu_pct),
    }
}

fn summarize(name: &str, samples: &[Sample], workers: usize) -> SubjectSummary {
    let keepalive = load_figures(samples, name, Scenario::KeepAlive, workers);
    let connect = load_figures(samples, name, Scenario::Connect, workers);
    let stalls = by_round(samples, name, Scenario::Stall);
    let stall = (!stalls.is_empty()).then(|| {
        let tails = tails(&stalls);
        StallFigures {
            tails,
            rate: Stat::of(stalls.values().map(|m| m.load.rate).collect()),
            p99_ratio: tails
                .p99_ms
                .zip(connect.tails.p99_ms)
                .map(|(stalled, calm)| stalled.median / calm.median.max(1e-9)),
            p999_ratio: tails
                .p999_ms
                .zip(connect.tails.p999_ms)
                .map(|(stalled, calm)| stalled.median / calm.median.max(1e-9)),
            share_on_stalled: Stat::of(stalls.values().filter_map(|m| m.stalled_share).collect()),
        }
    });
    let rolls = by_round(samples, name, Scenario::Roll);
    let roll = (!rolls.is_empty()).then(|| {
        let mut errors = Errors::default();
        for m in rolls.values() {
            let e = &m.load.errors;
            errors.refused += e.refused;
            errors.reset += e.reset;
            errors.timeout += e.timeout;
            errors.bad_status += e.bad_status;
            errors.other += e.other;
        }
        RollFigures {
            errors,
            ok: rolls.values().map(|m| m.load.ok).sum(),
            unfinished: rolls.values().filter(|m| m.roll_s.is_none()).count(),
            roll_s: Stat::of(rolls.values().filter_map(|m| m.roll_s).collect()),
        }
    });
    let reloads = by_round(samples, name, Scenario::Reload);
    let reload = (!reloads.is_empty()).then(|| {
        let mut errors = Errors::default();
        let mut keepalive_errors = Errors::default();
        for m in reloads.values() {
            add_errors(&mut errors, &m.load.errors);
            if let Some(side) = m.keepalive_side {
                add_errors(&mut keepalive_errors, &side.errors);
            }
        }
        let done = || {
            reloads
                .values()
                .filter_map(|m| m.reloads_s.as_ref())
                .flatten()
        };
        let unfinished: usize = reloads.values().filter_map(|m| m.reloads_unfinished).sum();
        ReloadFigures {
            asked: done().count() + unfinished,
            unfinished,
            reload_s: Stat::of(done().copied().collect()),
            ok: reloads.values().map(|m| m.load.ok).sum(),
            errors,
            keepalive_ok: reloads
                .values()
                .filter_map(|m| m.keepalive_side.map(|side| side.ok))
                .sum(),
            keepalive_errors,
        }
    });
    let connects = by_round(samples, name, Scenario::Connect);
    let memory = MemoryFigures {
        primary_rss_mib: Stat::of(
            connects
                .values()
                .map(|m| mib(m.primary_rss_bytes))
                .collect(),
        ),
        worker_rss_mib: Stat::of(
            connects
                .values()
                .filter_map(|m| m.worker_rss_bytes.iter().max().map(|&b| mib(b)))
                .collect(),
        ),
    };
    SubjectSummary {
        name: name.to_owned(),
        keepalive,
        connect,
        stall,
        roll,
        reload,
        memory,
    }
}

fn add_errors(sum: &mut Errors, e: &Errors) {
    sum.refused += e.refused;
    sum.reset += e.reset;
    sum.timeout += e.timeout;
    sum.bad_status += e.bad_status;
    sum.other += e.other;
}

/// A ratio of two medians, if both were measured.
fn ratio(a: Option<Stat>, b: Option<Stat>) -> Option<f64> {
    Some(a?.median / b?.median)
}

fn targets(subjects: &[SubjectSummary], workers: usize) -> Vec<Target> {
    let get = |name: &str| subjects.iter().find(|s| s.name == name);
    let connect = |name: &str| get(name).and_then(|s| s.connect.rate);
    let keepalive = |name: &str| get(name).and_then(|s| s.keepalive.rate);
    let cpu = |name: &str| get(name).and_then(|s| s.connect.cpu_us);
    let mut targets = Vec::new();

    let rr = ratio(connect("round-robin"), connect("kernel"));
    targets.push(Target {
        goal: "round-robin new-connection rate >= 0.97x kernel".into(),
        measured: rr.map_or_else(|| "not measured".into(), |r| format!("{r:.3}x")),
        met: rr.map(|r| r >= 0.97),
    });

    let limited = format!("round-robin{}", super::subject::LIMITED);
    let limit_cost = ratio(cpu(&limited), cpu("round-robin"));
    targets.push(Target {
        goal: "server CPU per new connection with a per-client limit <= 1.05x without".into(),
        measured: limit_cost.map_or_else(|| "not measured".into(), |r| format!("{r:.3}x")),
        met: limit_cost.map(|r| r <= 1.05),
    });

    let userspace_cpu = get(USERSPACE)
        .and_then(|s| s.connect.primary_cpu_pct)
        .map_or(f64::NAN, |s| s.median);
    for policy in EBPF_POLICIES {
        let r = ratio(connect(policy), connect(USERSPACE));
        let primary = get(policy)
            .and_then(|s| s.connect.primary_cpu_pct)
            .map_or(f64::NAN, |s| s.median);
        targets.push(Target {
            goal: format!("{policy} new-connection rate >= 1.5x userspace, primary CPU near zero"),
            measured: r.map_or_else(
                || "not measured".into(),
                |r| format!("{r:.2}x; primary CPU {primary:.1}% vs userspace {userspace_cpu:.0}%"),
            ),
            met: r.map(|r| r >= 1.5 && primary < 2.0),
        });
    }

    for (reference, bound, missing) in [
        (USERSPACE, 0.8, "userspace not measured"),
        (
            NGINX,
            1.1,
            "nginx not installed (cargo xtask bench --peers)",
        ),
    ] {
        for policy in EBPF_POLICIES {
            let r = get(policy).and_then(|s| match reference {
                USERSPACE => s.connect.cpu_vs_userspace,
                _ => s.connect.cpu_vs_nginx,
            });
            targets.push(Target {
                goal: format!("{policy}: server CPU per new connection <= {bound}x {reference}"),
                measured: match (r, cpu(policy), cpu(reference)) {
                    (Some(r), Some(mine), Some(theirs)) => format!(
                        "{} ({:.1} vs {:.1} us)",
                        r.show_x(2),
                        mine.median,
                        theirs.median
                    ),
                    _ => missing.into(),
                },
                met: r.map(|r| r.median <= bound),
            });
        }
    }

    for (what, rate) in [
        ("keep-alive", &keepalive as &dyn Fn(&str) -> Option<Stat>),
        ("new-connection", &connect),
    ] {
        let r = ratio(rate("round-robin"), rate(NGINX));
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

    let ll = get("least-loaded").and_then(|s| s.stall?.p99_ratio);
    targets.push(Target {
        goal: "least-loaded stalled-worker p99 <= 2x its no-stall p99".into(),
        measured: ll.map_or_else(|| "not measured".into(), |r| format!("{r:.2}x")),
        met: ll.map(|r| r <= 2.0),
    });
    // Issue 25: every eBPF policy steers around a stalled worker.
    for policy in EBPF_POLICIES {
        let stall = get(policy).and_then(|s| s.stall);
        let share = stall.and_then(|s| s.share_on_stalled).map(|s| s.median);
        targets.push(Target {
            goal: format!("{policy}: the stalled worker's share of requests during a stall < 5%"),
            measured: share.map_or_else(|| "not measured".into(), |s| format!("{:.1}%", s * 100.0)),
            met: share.map(|s| s < 0.05),
        });
        let p999 = stall.and_then(|s| s.p999_ratio);
        targets.push(Target {
            goal: format!("{policy}: stalled-worker p99.9 <= 2x its no-stall p99.9"),
            measured: p999.map_or_else(|| "not measured".into(), |r| format!("{r:.2}x")),
            met: p999.map(|r| r <= 2.0),
        });
    }

    for policy in EBPF_POLICIES {
        let roll = get(policy).and_then(|s| s.roll);
        targets.push(Target {
            goal: format!("{policy}: zero failed requests across the rolling restarts"),
            measured: roll.map_or_else(
                || "not measured".into(),
                |r| {
                    let unfinished = if r.unfinished > 0 {
                        format!(", {} roll(s) unfinished", r.unfinished)
                    } else {
                        String::new()
                    };
                    format!("{} failed{unfinished}", r.errors.total())
                },
            ),
            met: roll.map(|r| r.errors.total() == 0),
        });
    }

    // The largest of the eBPF policies' medians: each loaded the program.
    let largest = |f: &dyn Fn(&SubjectSummary) -> Option<Stat>, names: &[&str]| {
        names
            .iter()
            .filter_map(|name| Some((name.to_string(), f(get(name)?)?.median)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    };
    let primary = largest(&|s| s.memory.primary_rss_mib, &EBPF_POLICIES);
    targets.push(Target {
        goal: format!(
            "primary RSS with the eBPF program loaded < {PRIMARY_RSS_MIB} MiB ({workers} workers)"
        ),
        measured: primary.as_ref().map_or_else(
            || "not measured".into(),
            |(name, m)| format!("{m:.1} MiB (largest: {name})"),
        ),
        met: primary.map(|(_, m)| m < PRIMARY_RSS_MIB),
    });
    let mut steer = vec!["kernel"];
    steer.extend(EBPF_POLICIES);
    let worker = largest(&|s| s.memory.worker_rss_mib, &steer);
    targets.push(Target {
        goal: format!("demo worker RSS < {WORKER_RSS_MIB} MiB"),
        measured: worker.as_ref().map_or_else(
            || "not measured".into(),
            |(name, m)| format!("{m:.1} MiB (largest: {name})"),
        ),
        met: worker.map(|(_, m)| m < WORKER_RSS_MIB),
    });
    targets.extend(node_targets(subjects));
    targets
}

/// The Node comparison's subjects, in the order of its tables.
pub const NODE_SUBJECTS: [&str; 5] = [
    STEER_NODE,
    "steer-node-least-loaded",
    "node-rr",
    "node-none",
    "pm2",
];

/// Where the targets of the Node comparison stand (`--peers`).
const NOT_RUN: &str = "not measured (cargo xtask bench --peers)";

/// The Node comparison's targets: Steer's new-connection rate against the cluster module
/// at a fair spread, no failed request across the reloads, and least-loaded keeping new
/// connections off a stalled Node worker.
fn node_targets(subjects: &[SubjectSummary]) -> Vec<Target> {
    let get = |name: &str| subjects.iter().find(|s| s.name == name);
    let connect = |name: &str| get(name).and_then(|s| s.connect.rate);
    let fairness = get(STEER_NODE)
        .and_then(|s| s.connect.max_over_min)
        .map(|s| s.median);
    let mut targets = Vec::new();
    for (peer, bound) in [("node-rr", 1.5), ("node-none", 1.0)] {
        let r = ratio(connect(STEER_NODE), connect(peer));
        targets.push(Target {
            goal: format!(
                "{STEER_NODE} new-connection rate >= {bound:.1}x {peer}, at max/min < {NODE_FAIRNESS:.2}"
            ),
            measured: match (r, fairness) {
                (Some(r), Some(f)) => format!("{r:.2}x at max/min {f:.2}"),
                _ => NOT_RUN.into(),
            },
            met: r.zip(fairness).map(|(r, f)| r >= bound && f < NODE_FAIRNESS),
        });
    }
    let reload = get(STEER_NODE).and_then(|s| s.reload.clone());
    targets.push(Target {
        goal: format!("{STEER_NODE}: 0 failed requests across the reloads (SIGUSR2)"),
        measured: reload.as_ref().map_or_else(
            || NOT_RUN.into(),
            |r| {
                format!(
                    "{} failed in {} requests, {} of {} reloads finished",
                    r.failed(),
                    r.ok + r.keepalive_ok + r.failed(),
                    r.asked - r.unfinished,
                    r.asked
                )
            },
        ),
        met: reload.map(|r| r.failed() == 0 && r.unfinished == 0),
    });
    let least_loaded = format!("{STEER_NODE}-least-loaded");
    let share = get(&least_loaded)
        .and_then(|s| s.stall)
        .and_then(|s| s.share_on_stalled);
    targets.push(Target {
        goal: format!(
            "{least_loaded}: a stalled Node worker gets < {:.0}% of new connections",
            NODE_STALLED_SHARE * 100.0
        ),
        measured: share.map_or_else(|| NOT_RUN.into(), |s| s.show_percent()),
        met: share.map(|s| s.median < NODE_STALLED_SHARE),
    });
    targets
}

fn show(stat: Option<Stat>, digits: usize) -> String {
    stat.map_or_else(|| "-".into(), |s| s.show(digits))
}

fn show_x(stat: Option<Stat>) -> String {
    stat.map_or_else(|| "-".into(), |s| s.show_x(2))
}

/// Appends a markdown table: a header row, then one row per item of `rows`.
pub(super) fn table(
    out: &mut String,
    header: &[&str],
    rows: impl IntoIterator<Item = Vec<String>>,
) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(header.len()));
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out.push('\n');
}

/// The markdown report.
pub fn markdown(run: &Run) -> String {
    let s = &run.setup;
    let subjects = &run.summary.subjects;
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
    table(
        &mut out,
        &[
            "subject",
            "keep-alive req/s",
            "new conn/s",
            "max/min (conn)",
            "CV (conn)",
            "max/min (keep-alive)",
            "primary CPU % (conn)",
        ],
        subjects.iter().map(|x| {
            vec![
                x.name.clone(),
                show(x.keepalive.rate, 0),
                show(x.connect.rate, 0),
                show(x.connect.max_over_min, 2),
                show(x.connect.cv, 3),
                show(x.keepalive.max_over_min, 2),
                show(x.connect.primary_cpu_pct, 1),
            ]
        }),
    );
    let _ = writeln!(
        out,
        "## Server CPU per request\n\nutime+stime of every process of the server (the primary, \
         the workers, and those that exited during the run), from `/proc`, sampled before and \
         after each run, over the requests answered. Ratios are taken round by round against \
         the reference measured in the same round. On loopback the client's system calls run \
         the server's side of the handshake (and the steering program) in softirq, so that \
         part is charged to the client, not here.\n"
    );
    table(
        &mut out,
        &[
            "subject",
            "us per new connection",
            "vs userspace",
            "vs nginx",
            "us per keep-alive request",
            "vs userspace",
            "vs nginx",
        ],
        subjects.iter().map(|x| {
            vec![
                x.name.clone(),
                show(x.connect.cpu_us, 1),
                show_x(x.connect.cpu_vs_userspace),
                show_x(x.connect.cpu_vs_nginx),
                show(x.keepalive.cpu_us, 2),
                show_x(x.keepalive.cpu_vs_userspace),
                show_x(x.keepalive.cpu_vs_nginx),
            ]
        }),
    );
    let _ = writeln!(
        out,
        "## Latency\n\nms; a new connection's includes its handshake.\n"
    );
    table(
        &mut out,
        &[
            "subject",
            "keep-alive p50",
            "p99",
            "p99.9",
            "max",
            "new conn p50",
            "p99",
            "p99.9",
            "max",
        ],
        subjects.iter().map(|x| {
            let (k, c) = (&x.keepalive.tails, &x.connect.tails);
            vec![
                x.name.clone(),
                show(k.p50_ms, 2),
                show(k.p99_ms, 2),
                show(k.p999_ms, 2),
                show(k.max_ms, 1),
                show(c.p50_ms, 2),
                show(c.p99_ms, 2),
                show(c.p999_ms, 2),
                show(c.max_ms, 1),
            ]
        }),
    );
    let _ = writeln!(
        out,
        "## Stalled worker\n\nOne worker blocks its event loop {STALL_MS} ms every {} s \
         (`/block?ms={STALL_MS}`); new-connection load as above. Latency (ms) of the load's \
         requests (the blocking requests are not counted). \"On stalled\": of the requests \
         that started while the worker was blocked, the share it answered.\n",
        STALL_EVERY.as_secs()
    );
    table(
        &mut out,
        &[
            "subject",
            "p99 no stall",
            "p99 stalled",
            "stalled / no stall",
            "p99.9 stalled",
            "max stalled",
            "on stalled",
            "new conn/s stalled",
        ],
        subjects.iter().filter_map(|x| {
            let st = x.stall?;
            Some(vec![
                x.name.clone(),
                show(x.connect.tails.p99_ms, 2),
                show(st.tails.p99_ms, 2),
                st.p99_ratio
                    .map_or_else(|| "-".into(), |r| format!("{r:.2}x")),
                show(st.tails.p999_ms, 1),
                show(st.tails.max_ms, 1),
                st.share_on_stalled
                    .map_or_else(|| "-".into(), |s| s.show_percent()),
                show(st.rate, 0),
            ])
        }),
    );
    let _ = writeln!(
        out,
        "## Rolling restart\n\nSIGUSR2 a quarter into a new-connection run; every request \
         counted, summed over the rounds.\n"
    );
    table(
        &mut out,
        &[
            "subject",
            "requests ok",
            "failed",
            "refused",
            "reset",
            "timeout",
            "bad status",
            "roll time s",
        ],
        subjects.iter().filter_map(|x| {
            let r = x.roll?;
            let e = r.errors;
            Some(vec![
                x.name.clone(),
                r.ok.to_string(),
                e.total().to_string(),
                e.refused.to_string(),
                e.reset.to_string(),
                e.timeout.to_string(),
                e.bad_status.to_string(),
                show(r.roll_s, 2),
            ])
        }),
    );
    let _ = writeln!(
        out,
        "## Memory\n\nResident set after the new-connection run, MiB (release build).\n"
    );
    table(
        &mut out,
        &["subject", "primary RSS", "largest worker RSS"],
        subjects.iter().map(|x| {
            vec![
                x.name.clone(),
                show(x.memory.primary_rss_mib, 1),
                show(x.memory.worker_rss_mib, 1),
            ]
        }),
    );
    node_section(&mut out, run);
    super::datagrams::markdown(
        &mut out,
        &run.summary.datagrams,
        s.workers,
        s.datagram_roll_s,
    );
    let _ = writeln!(out, "## Targets\n");
    table(
        &mut out,
        &["target", "measured", "met"],
        run.summary.targets.iter().map(|t| {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "n/a",
            };
            vec![t.goal.clone(), t.measured.clone(), met.into()]
        }),
    );
    out
}

/// The Node comparison's section: the same app under Steer, the cluster module and PM2.
/// Nothing when none of its subjects ran.
fn node_section(out: &mut String, run: &Run) {
    let node: Vec<&SubjectSummary> = NODE_SUBJECTS
        .iter()
        .filter_map(|name| run.summary.subject(name))
        .collect();
    if node.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## Node comparison\n\nOne Node app (`bench/peers/app.js`: `/` and \
         `/block?ms=N`), {} workers each way: `{STEER_NODE}` is `steer run --balance \
         round-robin -- node app.js` on the Node helper (`steer-node-least-loaded`: the same \
         with `--balance least-loaded`, stalled-worker row only); `node-rr` and `node-none` \
         are Node's cluster module (`bench/peers/node_cluster.js`) in `SCHED_RR` and \
         `SCHED_NONE` mode; `pm2` is PM2 {PM2_VERSION} in cluster mode under `pm2-runtime` \
         (its daemon is the primary). Server CPU is every process of each, the primary (PM2's \
         daemon) included.\n",
        run.setup.workers
    );
    table(
        out,
        &[
            "subject",
            "keep-alive req/s",
            "new conn/s",
            "max/min (conn)",
            "us CPU per new conn",
            "us CPU per keep-alive req",
            "conn p50 ms",
            "p99",
            "p99.9",
            "primary CPU %",
            "RSS primary / worker MiB",
        ],
        node.iter().filter(|x| x.connect.rate.is_some()).map(|x| {
            let c = &x.connect.tails;
            vec![
                x.name.clone(),
                show(x.keepalive.rate, 0),
                show(x.connect.rate, 0),
                show(x.connect.max_over_min, 2),
                show(x.connect.cpu_us, 1),
                show(x.keepalive.cpu_us, 1),
                show(c.p50_ms, 2),
                show(c.p99_ms, 2),
                show(c.p999_ms, 2),
                show(x.connect.primary_cpu_pct, 1),
                format!(
                    "{} / {}",
                    show(x.memory.primary_rss_mib, 1),
                    show(x.memory.worker_rss_mib, 1)
                ),
            ]
        }),
    );
    let _ = writeln!(
        out,
        "A stalled worker: one worker blocks its event loop {STALL_MS} ms every {} s, under \
         new-connection load. \"On stalled\": of the new connections started during a \
         stall, the share the stalled worker took (and made wait).\n",
        STALL_EVERY.as_secs()
    );
    table(
        out,
        &[
            "subject",
            "on stalled",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "new conn/s",
        ],
        node.iter().filter_map(|x| {
            let st = x.stall?;
            Some(vec![
                x.name.clone(),
                st.share_on_stalled
                    .map_or_else(|| "-".into(), |s| s.show_percent()),
                show(st.tails.p99_ms, 2),
                show(st.tails.p999_ms, 1),
                show(st.tails.max_ms, 1),
                show(st.rate, 0),
            ])
        }),
    );
    let _ = writeln!(
        out,
        "Reloads under load: {} reloads a round by each system's own zero-downtime method \
         (Steer: `SIGUSR2`; PM2: `pm2 reload`, `wait_ready`; cluster: node_cluster.js on \
         `SIGUSR2` forks the new worker, waits for `listening`, disconnects the old one), \
         each once the previous one is over, while {CONNECT_LANES_TEXT} new-connection lanes \
         and 16 keep-alive connections run. Every request counted, summed over the rounds. \
         app.js, outside Steer, shuts down as Node's `server.close()` does: idle keep-alive \
         connections are closed at once.\n",
        run.samples
            .iter()
            .flat_map(|s| &s.measurements)
            .find_map(|m| {
                m.reloads_s
                    .as_ref()
                    .map(|d| d.len() + m.reloads_unfinished.unwrap_or(0))
            })
            .unwrap_or(0)
    );
    table(
        out,
        &[
            "subject",
            "reloads done",
            "s per reload",
            "new conn ok",
            "failed",
            "reset",
            "refused",
            "timeout",
            "keep-alive ok",
            "failed",
            "reset",
        ],
        node.iter().filter_map(|x| {
            let r = x.reload.as_ref()?;
            Some(vec![
                x.name.clone(),
                format!("{}/{}", r.asked - r.unfinished, r.asked),
                show(r.reload_s, 2),
                r.ok.to_string(),
                r.errors.total().to_string(),
                r.errors.reset.to_string(),
                r.errors.refused.to_string(),
                r.errors.timeout.to_string(),
                r.keepalive_ok.to_string(),
                r.keepalive_errors.total().to_string(),
                r.keepalive_errors.reset.to_string(),
            ])
        }),
    );
}

/// The new-connection lanes of the load, as the report writes them.
const CONNECT_LANES_TEXT: &str = "32";

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::load::{LoadReport, Mode};
    use crate::suite::subject::Programs;

    /// A measurement of `requests` answered (1 ms to `max_ms` ms), costing `cpu_us` each.
    fn measurement(scenario: Scenario, requests: u64, max_ms: u64, cpu_us: f64) -> Measurement {
        let mut load = LoadReport::empty(Mode::Connect, 1);
        for i in 0..requests {
            let worker = (i % 2).to_string();
            let latency = Duration::from_micros(1000 + i * max_ms * 1000 / requests);
            load.succeed_or_fail(200, Some(worker), latency, Some(1), true);
        }
        load.finish(Duration::from_secs(1));
        Measurement {
            scenario,
            server_cpu_s: cpu_us * requests as f64 / 1e6,
            cpu_us_per_request: cpu_us,
            primary_cpu_s: 0.0,
            primary_cpu_pct: 0.0,
            primary_rss_bytes: 7 << 20,
            worker_rss_bytes: vec![3 << 20, 4 << 20],
            load,
            stalls: (scenario == Scenario::Stall).then_some(2),
            stalled_share: (scenario == Scenario::Stall).then_some(0.5),
            roll_s: None,
            reloads_s: None,
            reloads_unfinished: None,
            keepalive_side: None,
        }
    }

    fn sample(round: usize, subject: &str, connect_cpu_us: f64) -> Sample {
        let mut measurements = vec![
            measurement(Scenario::KeepAlive, 2000, 20, connect_cpu_us / 4.0),
            measurement(Scenario::Connect, 1000, 30, connect_cpu_us),
        ];
        if subject != NGINX {
            measurements.push(measurement(Scenario::Stall, 1000, 200, connect_cpu_us));
        }
        Sample {
            round,
            subject: subject.into(),
            measurements,
            datagrams: Vec::new(),
        }
    }

    #[test]
    fn the_report_carries_cpu_per_request_tails_and_the_cost_targets() {
        // Round by round: round-robin costs 0.80x then 0.70x userspace, 0.89x then 1.05x
        // nginx; the median of two is the lower one.
        let samples = vec![
            sample(1, "round-robin", 40.0),
            sample(1, USERSPACE, 50.0),
            sample(1, NGINX, 45.0),
            sample(2, "round-robin", 42.0),
            sample(2, USERSPACE, 60.0),
            sample(2, NGINX, 40.0),
        ];
        let names: Vec<String> = ["round-robin", USERSPACE, NGINX].map(String::from).into();
        let summary = Summary::of(&samples, &names, 2);
        let rr = summary.subject("round-robin").expect("summarized");
        let vs_userspace = rr.connect.cpu_vs_userspace.expect("a ratio");
        assert!((vs_userspace.median - 0.7).abs() < 1e-9, "{vs_userspace:?}");
        assert!((vs_userspace.max - 0.8).abs() < 1e-9, "{vs_userspace:?}");
        let vs_nginx = rr.connect.cpu_vs_nginx.expect("a ratio");
        assert!((vs_nginx.median - 40.0 / 45.0).abs() < 1e-9, "{vs_nginx:?}");
        assert_eq!(rr.connect.cpu_us.map(|s| s.median), Some(40.0));
        let tails = rr.connect.tails;
        assert!(tails.max_ms.expect("max").median >= 30.0, "{tails:?}");
        assert!(tails.p999_ms.expect("p99.9").median > tails.p99_ms.expect("p99").median);
        let stall = rr.stall.expect("stalled run");
        assert_eq!(stall.share_on_stalled.map(|s| s.median), Some(0.5));
        assert!(stall.tails.max_ms.expect("max").median >= 200.0);

        let met = |goal: &str| {
            summary
                .targets
                .iter()
                .find(|t| t.goal == goal)
                .unwrap_or_else(|| panic!("target {goal:?} in {:#?}", summary.targets))
                .met
        };
        assert_eq!(
            met("round-robin: server CPU per new connection <= 0.8x userspace"),
            Some(true)
        );
        assert_eq!(
            met("round-robin: server CPU per new connection <= 1.1x nginx-reuseport"),
            Some(true)
        );
        assert_eq!(
            met("hash: server CPU per new connection <= 0.8x userspace"),
            None,
            "not measured is not met"
        );

        let programs = Programs {
            steer: "steer".into(),
            node: None,
            node_script: "node_cluster.js".into(),
            pm2: None,
            nginx: None,
            scratch: std::env::temp_dir(),
        };
        let config = SuiteConfig::new(programs, std::env::temp_dir(), true, false);
        let run = Run {
            setup: Setup::describe(&config, &names),
            samples,
            summary,
        };
        let text = markdown(&run);
        for column in [
            "| subject | us per new connection | vs userspace | vs nginx | us per keep-alive request |",
            "| keep-alive p50 | p99 | p99.9 | max | new conn p50 | p99 | p99.9 | max |",
            "| max stalled | on stalled |",
            "| round-robin | 40.0 (40.0-42.0) | 0.70x (0.70-0.80) | 0.89x (0.89-1.05) |",
            "| round-robin: server CPU per new connection <= 0.8x userspace | 0.70x (0.70-0.80) (40.0 vs 50.0 us) | yes |",
            "| 50% |",
        ] {
            assert!(text.contains(column), "{column:?} missing from\n{text}");
        }
        let json = serde_json::to_string(&run).expect("serializes");
        for key in [
            "\"cpu_us_per_request\"",
            "\"server_cpu_s\"",
            "\"cpu_vs_userspace\"",
            "\"cpu_vs_nginx\"",
            "\"p999_ms\"",
            "\"max_ms\"",
            "\"share_on_stalled\"",
            "\"stalled_share\"",
        ] {
            assert!(json.contains(key), "{key} missing from report.json");
        }
    }

    #[test]
    fn the_node_targets_hold_steer_to_the_cluster_module_its_reloads_and_the_stall() {
        let stat = |median: f64| {
            Some(Stat {
                median,
                min: median,
                max: median,
            })
        };
        let node = |name: &str, rate: f64, max_over_min: f64| SubjectSummary {
            name: name.into(),
            keepalive: LoadFigures::default(),
            connect: LoadFigures {
                rate: stat(rate),
                max_over_min: stat(max_over_min),
                ..LoadFigures::default()
            },
            stall: None,
            roll: None,
            reload: None,
            memory: MemoryFigures::default(),
        };
        let reload = |keepalive_resets: u64| ReloadFigures {
            asked: 5,
            unfinished: 0,
            reload_s: stat(0.5),
            ok: 1000,
            errors: Errors::default(),
            keepalive_ok: 1000,
            keepalive_errors: Errors {
                reset: keepalive_resets,
                ..Errors::default()
            },
        };
        let mut steer = node(STEER_NODE, 12_000.0, 1.05);
        steer.reload = Some(reload(0));
        let mut least_loaded = node("steer-node-least-loaded", 0.0, 0.0);
        least_loaded.stall = Some(StallFigures {
            tails: Tails::default(),
            rate: None,
            p99_ratio: None,
            p999_ratio: None,
            share_on_stalled: stat(0.52),
        });
        let mut pm2 = node("pm2", 3_000.0, 1.3);
        pm2.reload = Some(reload(124));
        let subjects = vec![
            steer,
            least_loaded,
            node("node-rr", 7_000.0, 1.0),
            node("node-none", 12_500.0, 1.6),
            pm2,
        ];
        let targets = node_targets(&subjects);
        let met: Vec<(String, Option<bool>)> =
            targets.iter().map(|t| (t.goal.clone(), t.met)).collect();
        assert_eq!(
            met,
            vec![
                (
                    "steer-node new-connection rate >= 1.5x node-rr, at max/min < 1.10".into(),
                    Some(true)
                ),
                (
                    "steer-node new-connection rate >= 1.0x node-none, at max/min < 1.10".into(),
                    Some(false)
                ),
                (
                    "steer-node: 0 failed requests across the reloads (SIGUSR2)".into(),
                    Some(true)
                ),
                (
                    "steer-node-least-loaded: a stalled Node worker gets < 5% of new connections"
                        .into(),
                    Some(false)
                ),
            ]
        );
        assert_eq!(targets[1].measured, "0.96x at max/min 1.05");
        assert_eq!(targets[3].measured, "52%");
        // PM2's failures are reported, not held to a target.
        assert!(targets.iter().all(|t| !t.goal.contains("pm2")));
        assert!(
            node_targets(&[]).iter().all(|t| t.met.is_none()),
            "without --peers nothing is met or missed"
        );
    }

    #[test]
    fn median_and_range() {
        let s = Stat::of(vec![3.0, 1.0, 2.0, 10.0, 4.0]).expect("values");
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 10.0));
        assert_eq!(Stat::of(vec![2.0, 1.0]).expect("values").median, 1.0);
        assert!(Stat::of(Vec::new()).is_none());
        assert_eq!(s.show(1), "3.0 (1.0-10.0)");
    }
}
