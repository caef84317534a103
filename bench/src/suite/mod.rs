//! The benchmark suite behind `cargo xtask bench`.
//!
//! Every subject (Steer under each of `kernel`, `round-robin`, `hash`, `least-loaded`,
//! `cpu`, `shared`, `userspace`; then Node's cluster module with `SCHED_RR` and
//! `SCHED_NONE` and nginx with `reuseport` when installed) runs through the scenarios of
//! [`scenario`] in interleaved rounds: round 1 runs A, B, C, ..., round 2 runs them again,
//! so slow drift on a shared machine hits every subject alike. Each subject is started
//! fresh for each round with as many workers as CPUs. Around each run [`footprint`] reads
//! the CPU time and memory of every process of the server. [`summary`] reduces the rounds
//! to medians with min-max (ratios round by round) and checks the targets; the report lands
//! in `report.md`, `report.json` and `report.svg`.
//!
//! With `--peers` the suite also runs the Node comparison: one Node app
//! (`bench/peers/app.js`) under Steer (`steer-node`, round-robin; and
//! `steer-node-least-loaded` for the stalled-worker row), under the cluster module
//! (`node-rr`, `node-none`) and under PM2 (`pm2`), with the same worker count, through the
//! throughput, stalled-worker and reload scenarios.
//!
//! Then the UDP and QUIC subjects ([`datagrams`]), in the same rounds: Steer's demo on a
//! `udp://` listener under `kernel` (plain `SO_REUSEPORT`), `round-robin` and `hash`, and
//! on one socket in one process; datagrams per second, server CPU per datagram, and flows
//! across a roll; on a `quic://` listener, handshakes and requests per second under
//! round-robin against one quinn process on one socket.

mod chart;
pub mod datagrams;
pub mod footprint;
pub mod scenario;
pub mod subject;
pub mod summary;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use scenario::{Measurement, Reloads, Scenario};
use subject::{Programs, STEER_POLICIES, Server, Subject};

/// How the suite runs.
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    /// Where the programs are.
    pub programs: Programs,
    /// Where the reports go (`target/bench`).
    pub out_dir: PathBuf,
    /// Workers per subject.
    pub workers: usize,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Length of the keep-alive and connect runs.
    pub throughput_length: Duration,
    /// Length of the stalled-worker run.
    pub stall_length: Duration,
    /// Length of the rolling-restart run (the roll starts a quarter in).
    pub roll_length: Duration,
    /// The reloads of the Node comparison.
    pub reloads: Reloads,
    /// Whether the Node comparison runs (`--peers`).
    pub node_comparison: bool,
    /// `quick` or `full`, for the report.
    pub mode: String,
    /// Whether the UDP and QUIC subjects run ([`datagrams`]).
    pub datagrams: bool,
    /// The subjects, in the order each round runs them ([`Self::default_subjects`]).
    pub subjects: Vec<Subject>,
}

impl SuiteConfig {
    /// The settings of `--quick` (under two minutes on two cores without `--peers`) or the
    /// full run; `peers` adds the Node comparison.
    pub fn new(programs: Programs, out_dir: PathBuf, quick: bool, peers: bool) -> SuiteConfig {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (rounds, throughput, stall, roll) = if quick {
            (1, 1.5, 2.0, 3.0)
        } else {
            (5, 3.0, 4.0, 5.0)
        };
        let mut config = SuiteConfig {
            programs,
            out_dir,
            workers,
            rounds,
            throughput_length: Duration::from_secs_f64(throughput),
            stall_length: Duration::from_secs_f64(stall),
            roll_length: Duration::from_secs_f64(roll),
            reloads: Reloads {
                count: 5,
                pause: Duration::from_millis(if quick { 300 } else { 500 }),
            },
            node_comparison: peers,
            mode: if quick { "quick" } else { "full" }.into(),
            datagrams: true,
            subjects: Vec::new(),
        };
        config.subjects = config.default_subjects();
        config
    }

    /// The lengths of the UDP and QUIC runs: each throughput run as long as the TCP
    /// ones, the roll's run long enough for the replaced workers' hold of their flows to
    /// end within it.
    pub fn datagram_lengths(&self) -> datagrams::DatagramLengths {
        datagrams::DatagramLengths {
            throughput: self.throughput_length,
            roll: self.roll_length.max(Duration::from_secs(3)),
        }
    }

    fn length(&self, scenario: Scenario) -> Duration {
        match scenario {
            Scenario::KeepAlive | Scenario::Connect => self.throughput_length,
            Scenario::Stall => self.stall_length,
            Scenario::Roll => self.roll_length,
            Scenario::Reload => self.reloads.pause,
        }
    }

    /// Every subject this machine can run, in round order: Steer's policies, the per-client
    /// limit, the Node comparison (with `--peers`) or the plain cluster-module peers, nginx.
    pub fn default_subjects(&self) -> Vec<Subject> {
        let mut subjects: Vec<Subject> = STEER_POLICIES
            .iter()
            .map(|policy| Subject::Steer {
                policy: (*policy).into(),
                client_limit: false,
            })
            .collect();
        // What a per-client limit costs: round-robin again, with one no client reaches.
        subjects.push(Subject::Steer {
            policy: "round-robin".into(),
            client_limit: true,
        });
        if self.programs.node.is_some() {
            if self.node_comparison {
                subjects.push(Subject::SteerNode {
                    policy: "round-robin".into(),
                });
                subjects.push(Subject::SteerNode {
                    policy: "least-loaded".into(),
                });
            }
            subjects.push(Subject::Node { sched: "rr".into() });
            subjects.push(Subject::Node {
                sched: "none".into(),
            });
            if self.node_comparison && self.programs.pm2.is_some() {
                subjects.push(Subject::Pm2);
            }
        }
        if self.programs.nginx.is_some() {
            subjects.push(Subject::Nginx);
        }
        if self.datagrams {
            subjects.extend(datagrams::subjects());
        }
        subjects
    }
}

/// One subject in one round: its measurements.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Which round (from 1).
    pub round: usize,
    /// What ran.
    pub subject: String,
    /// One per scenario that applies to it.
    pub measurements: Vec<Measurement>,
    /// The UDP and QUIC subjects' measurements.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub datagrams: Vec<datagrams::DatagramMeasurement>,
}

/// Everything the run produced; `report.json` is this.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// The machine and settings.
    pub setup: summary::Setup,
    /// Every sample, in the order taken.
    pub samples: Vec<Sample>,
    /// Medians, ranges and targets.
    pub summary: summary::Summary,
}

/// Runs the suite, printing progress, and writes the reports. Returns the report's path.
pub fn run(config: &SuiteConfig) -> Result<PathBuf, String> {
    std::fs::create_dir_all(&config.out_dir)
        .map_err(|e| format!("creating {}: {e}", config.out_dir.display()))?;
    std::fs::create_dir_all(&config.programs.scratch)
        .map_err(|e| format!("creating {}: {e}", config.programs.scratch.display()))?;
    let subjects = &config.subjects;
    let names: Vec<String> = subjects.iter().map(Subject::name).collect();
    eprintln!(
        "bench: {} mode, {} rounds, {} workers, subjects: {}",
        config.mode,
        config.rounds,
        config.workers,
        names.join(", ")
    );
    let started = Instant::now();
    let mut samples = Vec::new();
    for round in 1..=config.rounds {
        for subject in subjects {
            eprint!(
                "[{:>4.0}s] round {round}/{} {:<16}",
                started.elapsed().as_secs_f64(),
                config.rounds,
                subject.name()
            );
            let sample = run_subject(config, subject, round)?;
            samples.push(sample);
        }
    }
    let setup = summary::Setup::describe(config, &names);
    let tcp: Vec<String> = subjects
        .iter()
        .filter(|s| !s.is_datagram())
        .map(Subject::name)
        .collect();
    let mut summary = summary::Summary::of(&samples, &tcp, config.workers);
    summary.datagrams = datagrams::DatagramSummary::of(&samples, subjects, config.workers);
    if subjects.iter().any(Subject::is_datagram) {
        summary.targets.extend(summary.datagrams.targets());
    }
    let run = Run {
        setup,
        samples,
        summary,
    };
    let json = config.out_dir.join("report.json");
    let text = serde_json::to_string_pretty(&run).map_err(|e| e.to_string())?;
    std::fs::write(&json, text).map_err(|e| format!("writing {}: {e}", json.display()))?;
    let markdown = config.out_dir.join("report.md");
    std::fs::write(&markdown, summary::markdown(&run))
        .map_err(|e| format!("writing {}: {e}", markdown.display()))?;
    let svg = config.out_dir.join("report.svg");
    chart::draw(&run.summary, &svg)?;
    eprintln!(
        "bench: done in {:.0}s: {}, report.json, report.svg",
        started.elapsed().as_secs_f64(),
        markdown.display()
    );
    Ok(markdown)
}

/// Starts `subject`, runs its scenarios, stops it. Prints one line of progress.
fn run_subject(config: &SuiteConfig, subject: &Subject, round: usize) -> Result<Sample, String> {
    let server = Server::start(subject, config.workers, &config.programs)?;
    if subject.is_datagram() {
        let measurements = datagrams::run_subject(subject, &server, config.datagram_lengths())
            .map_err(|e| format!("{}: {e}", subject.name()))?;
        for m in &measurements {
            eprint!(" {}", m.progress());
        }
        eprintln!();
        server.stop();
        return Ok(Sample {
            round,
            subject: subject.name(),
            measurements: Vec::new(),
            datagrams: measurements,
        });
    }
    // A short warm-up, not recorded: page faults, first connections, CPU frequency.
    let mut warm = crate::load::LoadSpec::new(
        server.addr,
        crate::load::Mode::KeepAlive,
        8,
        crate::load::Stop::After(Duration::from_millis(300)),
    );
    warm.threads = 1;
    let _ = crate::load::run(&warm);
    let mut measurements = Vec::new();
    for scenario in subject.scenarios(config.node_comparison) {
        let measurement = scenario::run(scenario, &server, config.length(scenario), config.reloads)
            .map_err(|e| format!("{} {}: {e}", subject.name(), scenario.name()))?;
        eprint!(" {}", progress(&measurement));
        measurements.push(measurement);
    }
    eprintln!();
    server.stop();
    Ok(Sample {
        round,
        subject: subject.name(),
        measurements,
        datagrams: Vec::new(),
    })
}

/// A few characters for the progress line.
fn progress(m: &Measurement) -> String {
    let l = &m.load;
    match m.scenario {
        Scenario::KeepAlive => format!("ka {:.0}/s {:.1}us", l.rate, m.cpu_us_per_request),
        Scenario::Connect => format!(
            "conn {:.0}/s {:.1}us p99 {:.1}ms primary {:.0}%",
            l.rate,
            m.cpu_us_per_request,
            l.latency.p99_us as f64 / 1000.0,
            m.primary_cpu_pct
        ),
        Scenario::Stall => format!(
            "stall p99 {:.1}ms on stalled {}",
            l.latency.p99_us as f64 / 1000.0,
            m.stalled_share
                .map_or_else(|| "-".into(), |s| format!("{:.0}%", 100.0 * s))
        ),
        Scenario::Roll => format!(
            "roll failed {} ({})",
            l.errors.total(),
            m.roll_s
                .map_or_else(|| "did not finish".into(), |s| format!("{s:.1}s"))
        ),
        Scenario::Reload => format!(
            "reloads {}/{} failed {}+{}",
            m.reloads_s.as_ref().map_or(0, Vec::len),
            m.reloads_s.as_ref().map_or(0, Vec::len) + m.reloads_unfinished.unwrap_or(0),
            l.errors.total(),
            m.keepalive_side.map_or(0, |side| side.errors.total())
        ),
    }
}
