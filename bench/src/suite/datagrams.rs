//! The UDP and QUIC subjects' scenarios, their figures and their sections of the report.
//!
//! UDP subjects (Steer's demo on a `udp://` listener, as many workers as the others):
//! `udp-kernel` (plain `SO_REUSEPORT`, no program: the kernel's floor), `udp-round-robin`
//! and `udp-hash` (Steer's program with its flow table), and `udp-one-socket` (one worker
//! on one socket, `--workers 1 --balance kernel`). Each runs:
//!
//! - [`DatagramScenario::Datagrams`]: closed-loop load ([`crate::datagram`]): datagrams
//!   answered per second, and the server's CPU (every process, the primary included) per
//!   datagram;
//! - [`DatagramScenario::FlowRoll`] (not the one-socket subject): flows sending at a
//!   steady rate through one rolling restart (`SIGUSR2`): the flows that moved other than
//!   forward to their slot's new generation, and the datagrams lost.
//!
//! QUIC subjects (the demo's HTTP/3 on a `quic://` listener): `quic-round-robin` (as many
//! workers as CPUs) and `quic-one-socket` (`--workers 1 --balance kernel`: one quinn process
//! on one socket, the same demo code, no program). Each runs
//! [`DatagramScenario::Handshakes`] (every handshake from a fresh client socket) and
//! [`DatagramScenario::Requests`] (`GET /` on established connections).
//!
//! The program's own cost per datagram comes from the kernel (`kernel.bpf_stats_enabled`,
//! turned on for the roll and the QUIC runs and restored after): `run_time_ns / run_cnt`
//! of the primary's `steer_select_udp` or `steer_select_quic` (whose tail-called flow half
//! is counted in its caller's runs). On loopback the program runs in the *sender's* system
//! call (the client's `sendmmsg` carries the server's receive path), so its cost is in the
//! client's CPU time, not the server's.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Sample;
use super::footprint;
use super::subject::{ONE_SOCKET_QUIC, ONE_SOCKET_UDP, Server, Subject};
use super::summary::{Stat, Target};
use crate::datagram::{self, FlowMoves, Pace, UdpReport, UdpSpec};
use crate::profile::BpfStats;
use crate::quic::{self, QuicMode, QuicReport, QuicSpec};

/// Client sockets of the throughput run ...
const FLOWS: usize = 64;
/// ... each with this many datagrams in flight.
const WINDOW: usize = 2;
/// Loopback source addresses the flows are spread over (so `hash` sees many clients).
const SOURCES: u8 = 64;
/// Flows through the roll ...
const ROLL_FLOWS: usize = 64;
/// ... each sending this many datagrams a second.
const ROLL_FLOW_RATE: f64 = 100.0;
/// Concurrent handshakes.
const HANDSHAKE_LANES: usize = 16;
/// Established QUIC connections ...
const CONNECTIONS: usize = 16;
/// ... with this many requests in flight on each.
const STREAMS: usize = 4;
/// Client threads.
const CLIENT_THREADS: usize = 2;

/// The UDP subject every other is compared with: plain `SO_REUSEPORT`.
pub const UDP_KERNEL: &str = "udp-kernel";

/// The UDP program's name, and the QUIC program's.
const UDP_PROGRAM: &str = "steer_select_udp";
const QUIC_PROGRAM: &str = "steer_select_quic";

/// The UDP and QUIC subjects, in round order.
pub fn subjects() -> Vec<Subject> {
    let udp = |policy: &str, single: bool| Subject::SteerUdp {
        policy: policy.into(),
        single,
    };
    vec![
        udp("kernel", false),
        udp("round-robin", false),
        udp("hash", false),
        udp("kernel", true),
        Subject::SteerQuic {
            policy: "round-robin".into(),
            single: false,
        },
        Subject::SteerQuic {
            policy: "kernel".into(),
            single: true,
        },
    ]
}

/// One UDP or QUIC scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatagramScenario {
    /// Closed-loop UDP load: datagrams per second.
    Datagrams,
    /// Flows at a steady rate through a rolling restart.
    FlowRoll,
    /// QUIC handshakes, each from a fresh socket.
    Handshakes,
    /// HTTP/3 requests on established connections.
    Requests,
}

/// The program's statistics over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ProgramCost {
    /// Runs of the program.
    pub runs: u64,
    /// Nanoseconds in them (statistics overhead included).
    pub ns: u64,
    /// `ns / runs`.
    pub ns_per_run: f64,
}

/// One UDP or QUIC scenario's measurement.
#[derive(Debug, Clone, Serialize)]
pub struct DatagramMeasurement {
    /// Which scenario.
    pub scenario: DatagramScenario,
    /// The UDP load's report (`datagrams`, `flow-roll`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpReport>,
    /// The QUIC load's report (`handshakes`, `requests`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quic: Option<QuicReport>,
    /// CPU seconds of the whole server during the run.
    pub server_cpu_s: f64,
    /// Of which the primary's.
    pub primary_cpu_s: f64,
    /// Server CPU per datagram answered, handshake or request, microseconds.
    pub cpu_us_per_unit: f64,
    /// Roll: how the flows moved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_moves: Option<FlowMoves>,
    /// Roll: seconds from `SIGUSR2` until every slot ran a new process (`None`: not within
    /// the run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roll_s: Option<f64>,
    /// The program's statistics, where it was measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub program: Option<ProgramCost>,
}

impl DatagramMeasurement {
    /// What was counted: datagrams answered, handshakes or requests.
    pub fn units(&self) -> u64 {
        self.udp
            .as_ref()
            .map(|r| r.answered)
            .or(self.quic.as_ref().map(|r| r.ok))
            .unwrap_or(0)
    }

    /// Per second.
    pub fn rate(&self) -> f64 {
        self.udp
            .as_ref()
            .map(|r| r.rate)
            .or(self.quic.as_ref().map(|r| r.rate))
            .unwrap_or(0.0)
    }

    /// A few characters for the progress line.
    pub fn progress(&self) -> String {
        let name = match self.scenario {
            DatagramScenario::Datagrams => "dgram",
            DatagramScenario::FlowRoll => "roll",
            DatagramScenario::Handshakes => "hs",
            DatagramScenario::Requests => "req",
        };
        let mut text = format!("{name} {:.0}/s {:.1}us", self.rate(), self.cpu_us_per_unit);
        if let Some(moves) = self.flow_moves {
            text.push_str(&format!(
                " moved {} lost {}",
                moves.moved,
                self.udp.as_ref().map_or(0, |r| r.lost)
            ));
        }
        if let Some(p) = self.program {
            text.push_str(&format!(" prog {:.0}ns", p.ns_per_run));
        }
        text
    }
}

/// The lengths of the UDP and QUIC runs.
#[derive(Debug, Clone, Copy)]
pub struct DatagramLengths {
    /// Each throughput run (datagrams, handshakes, requests).
    pub throughput: Duration,
    /// The roll's run (the roll starts a quarter in).
    pub roll: Duration,
}

/// Runs `subject`'s scenarios against `server`.
pub fn run_subject(
    subject: &Subject,
    server: &Server,
    lengths: DatagramLengths,
) -> Result<Vec<DatagramMeasurement>, String> {
    let addr = server
        .datagram_addr
        .ok_or("the subject has no UDP or QUIC listener")?;
    let mut measurements = Vec::new();
    match subject {
        Subject::SteerUdp { single, .. } => {
            // A short warm-up, not recorded.
            let _ = datagram::run(&udp_spec(addr, Duration::from_millis(300)));
            measurements.push(datagrams(server, addr, lengths.throughput)?);
            if !single {
                measurements.push(flow_roll(server, addr, lengths.roll)?);
            }
        }
        Subject::SteerQuic { .. } => {
            let _stats = BpfStats::enable();
            let warm = QuicSpec::new(addr, QuicMode::Requests, 2, Duration::from_millis(300));
            let _ = quic::run(&warm);
            for mode in [QuicMode::Handshakes, QuicMode::Requests] {
                measurements.push(quic_run(server, addr, mode, lengths.throughput)?);
            }
        }
        _ => return Err(format!("{} is not a UDP or QUIC subject", subject.name())),
    }
    Ok(measurements)
}

fn udp_spec(addr: SocketAddr, length: Duration) -> UdpSpec {
    let mut spec = UdpSpec::new(addr, FLOWS, Pace::Window(WINDOW), length);
    spec.threads = CLIENT_THREADS;
    spec.sources = SOURCES;
    spec.timeout = Duration::from_millis(200);
    spec.linger = Duration::from_millis(500);
    spec
}

/// CPU seconds of the whole server and of its primary between two samples.
fn cpu_between(before: &footprint::TreeSample, after: &footprint::TreeSample) -> (f64, f64) {
    (
        after.cpu().saturating_sub(before.cpu()).as_secs_f64(),
        after
            .root_cpu()
            .saturating_sub(before.root_cpu())
            .as_secs_f64(),
    )
}

/// Measures `run` with the server's CPU around it.
fn measure(
    server: &Server,
    scenario: DatagramScenario,
    program: Option<&str>,
    run: impl FnOnce() -> Result<(Option<UdpReport>, Option<QuicReport>, Option<f64>), String>,
) -> Result<DatagramMeasurement, String> {
    let pid = server.primary_pid();
    let before = footprint::sample(pid).ok_or("the server's primary is gone")?;
    let program_before = program.and_then(|name| program_stats(pid, name));
    let (udp, quic, roll_s) = run()?;
    let after = footprint::sample(pid).ok_or("the server's primary exited during the run")?;
    let program_after = program.and_then(|name| program_stats(pid, name));
    let (server_cpu, primary_cpu) = cpu_between(&before, &after);
    let mut measurement = DatagramMeasurement {
        scenario,
        flow_moves: udp
            .as_ref()
            .filter(|_| scenario == DatagramScenario::FlowRoll)
            .map(|r| FlowMoves::of(&r.records)),
        udp,
        quic,
        server_cpu_s: server_cpu,
        primary_cpu_s: primary_cpu,
        cpu_us_per_unit: 0.0,
        roll_s,
        program: match (program_before, program_after) {
            (Some(b), Some(a)) if a.runs > b.runs => {
                let (runs, ns) = (a.runs - b.runs, a.ns.saturating_sub(b.ns));
                Some(ProgramCost {
                    runs,
                    ns,
                    ns_per_run: ns as f64 / runs as f64,
                })
            }
            _ => None,
        },
    };
    measurement.cpu_us_per_unit = 1e6 * server_cpu / measurement.units().max(1) as f64;
    Ok(measurement)
}

fn datagrams(
    server: &Server,
    addr: SocketAddr,
    length: Duration,
) -> Result<DatagramMeasurement, String> {
    measure(server, DatagramScenario::Datagrams, None, || {
        let report = datagram::run(&udp_spec(addr, length)).map_err(|e| format!("load: {e}"))?;
        Ok((Some(report), None, None))
    })
}

/// Flows at a steady rate; one `SIGUSR2` a quarter in; every answer recorded.
fn flow_roll(
    server: &Server,
    addr: SocketAddr,
    length: Duration,
) -> Result<DatagramMeasurement, String> {
    let _stats = BpfStats::enable();
    measure(
        server,
        DatagramScenario::FlowRoll,
        Some(UDP_PROGRAM),
        || {
            let before = server
                .steer_worker_pids()
                .ok_or("the cluster is not ready before the roll")?;
            let mut spec = UdpSpec::new(
                addr,
                ROLL_FLOWS,
                Pace::Rate(ROLL_FLOWS as f64 * ROLL_FLOW_RATE),
                length,
            );
            spec.threads = 1;
            spec.sources = SOURCES;
            spec.record = true;
            spec.linger = Duration::from_secs(1);
            let loader = std::thread::spawn(move || datagram::run(&spec));
            std::thread::sleep(length / 4);
            let signalled = Instant::now();
            server.signal(libc::SIGUSR2)?;
            let mut roll_s = None;
            while !loader.is_finished() {
                if roll_s.is_none()
                    && server
                        .steer_worker_pids()
                        .is_some_and(|pids| pids.iter().all(|p| !before.contains(p)))
                {
                    roll_s = Some(signalled.elapsed().as_secs_f64());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let report = loader
                .join()
                .map_err(|_| "the load thread panicked")?
                .map_err(|e| format!("load: {e}"))?;
            Ok((Some(report), None, roll_s))
        },
    )
}

fn quic_run(
    server: &Server,
    addr: SocketAddr,
    mode: QuicMode,
    length: Duration,
) -> Result<DatagramMeasurement, String> {
    let (scenario, lanes) = match mode {
        QuicMode::Handshakes => (DatagramScenario::Handshakes, HANDSHAKE_LANES),
        QuicMode::Requests => (DatagramScenario::Requests, CONNECTIONS),
    };
    measure(server, scenario, Some(QUIC_PROGRAM), || {
        let mut spec = QuicSpec::new(addr, mode, lanes, length);
        spec.streams = STREAMS;
        spec.threads = CLIENT_THREADS;
        let report = quic::run(&spec).map_err(|e| format!("load: {e}"))?;
        Ok((None, Some(report), None))
    })
}

/// The `run_cnt` and `run_time_ns` summed over the programs that `pid` holds open under
/// `name` (as the kernel keeps it: 15 characters, so `steer_select_quic` and its
/// tail-called `steer_select_quic_flow` both match, and the latter counts no runs of its
/// own).
fn program_stats(pid: u32, name: &str) -> Option<ProgramCost> {
    let short = &name.as_bytes()[..name.len().min(15)];
    let mut cost: Option<ProgramCost> = None;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let is_program = std::fs::read_link(fd.path())
            .is_ok_and(|target| target.to_string_lossy() == "anon_inode:bpf-prog");
        if !is_program {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        )) else {
            continue;
        };
        let field = |key: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(key))?
                .trim()
                .parse()
                .ok()
        };
        let Some(id) = field("prog_id:").and_then(|id| u32::try_from(id).ok()) else {
            continue;
        };
        if program_name(id).as_deref() != Some(short) {
            continue;
        }
        let sum = cost.get_or_insert_with(ProgramCost::default);
        sum.runs += field("run_cnt:").unwrap_or(0);
        sum.ns += field("run_time_ns:").unwrap_or(0);
    }
    cost
}

/// The name the kernel keeps for program `id` (`bpf_prog_info.name`).
fn program_name(id: u32) -> Option<Vec<u8>> {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    /// `name` in `struct bpf_prog_info` (uapi, stable): 16 bytes at offset 64.
    const NAME: std::ops::Range<usize> = 64..80;
    let mut by_id = [0u32; 3];
    by_id[0] = id;
    // SAFETY: BPF_PROG_GET_FD_BY_ID reads `prog_id, next_id, open_flags` from the 12
    // bytes given; it returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            by_id.as_ptr(),
            size_of_val(&by_id),
        )
    };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    let mut info = [0u8; 256];
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let request = InfoByFd {
        bpf_fd: u32::try_from(fd).ok()?,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: the kernel writes at most `info_len` bytes into `info`, which lives
    // through the call; `request` is the command's attribute layout.
    let done = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw const request,
            size_of::<InfoByFd>(),
        )
    };
    // SAFETY: `fd` is the descriptor the kernel just gave us, closed once.
    unsafe { libc::close(fd) };
    if done != 0 {
        return None;
    }
    let name = &info[NAME];
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(name[..len].to_vec())
}

/// The UDP subjects' figures over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct UdpFigures {
    /// The subject.
    pub name: String,
    /// Workers.
    pub workers: usize,
    /// Datagrams answered per second.
    pub rate: Option<Stat>,
    /// [`Self::rate`] over `udp-kernel`'s, round by round.
    pub rate_vs_kernel: Option<Stat>,
    /// Server CPU per datagram, microseconds.
    pub cpu_us: Option<Stat>,
    /// [`Self::cpu_us`] over `udp-kernel`'s, round by round.
    pub cpu_vs_kernel: Option<Stat>,
    /// Round-trip p50 and p99, ms.
    pub p50_ms: Option<Stat>,
    /// p99.
    pub p99_ms: Option<Stat>,
    /// Busiest slot over idlest.
    pub max_over_min: Option<Stat>,
    /// Datagrams lost in the throughput runs (summed).
    pub lost: u64,
    /// Datagrams sent in them.
    pub sent: u64,
    /// The rolls, summed over the rounds.
    pub roll: Option<RollFigures>,
    /// The program's nanoseconds per run (the roll's runs).
    pub program_ns: Option<Stat>,
    /// Program runs per datagram sent (the roll's).
    pub runs_per_datagram: Option<Stat>,
}

/// Flows through the rolls, summed over the rounds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RollFigures {
    /// How the flows moved.
    pub moves: FlowMoves,
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams lost.
    pub lost: u64,
    /// Rounds in which the roll did not finish within the run.
    pub unfinished: usize,
    /// Seconds to replace every worker.
    pub roll_s: Option<Stat>,
}

/// The QUIC subjects' figures over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct QuicFigures {
    /// The subject.
    pub name: String,
    /// Workers.
    pub workers: usize,
    /// Handshakes per second.
    pub handshakes: Option<Stat>,
    /// Over the one-socket subject's, round by round.
    pub handshakes_vs_one: Option<Stat>,
    /// Server CPU per handshake, microseconds.
    pub handshake_cpu_us: Option<Stat>,
    /// Handshake p99, ms.
    pub handshake_p99_ms: Option<Stat>,
    /// Failed handshakes (summed).
    pub handshakes_failed: u64,
    /// Requests per second.
    pub requests: Option<Stat>,
    /// Over the one-socket subject's, round by round.
    pub requests_vs_one: Option<Stat>,
    /// Server CPU per request, microseconds.
    pub request_cpu_us: Option<Stat>,
    /// Request p99, ms.
    pub request_p99_ms: Option<Stat>,
    /// Failed requests (summed).
    pub requests_failed: u64,
    /// Busiest worker over idlest (requests).
    pub max_over_min: Option<Stat>,
    /// The program's nanoseconds per run (per datagram), over handshakes and requests.
    pub program_ns: Option<Stat>,
    /// Program runs per request.
    pub runs_per_request: Option<Stat>,
    /// Program runs per handshake.
    pub runs_per_handshake: Option<Stat>,
}

/// The UDP and QUIC part of the summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DatagramSummary {
    /// UDP subjects, in round order.
    pub udp: Vec<UdpFigures>,
    /// QUIC subjects, in round order.
    pub quic: Vec<QuicFigures>,
}

/// Per round, `name`'s `scenario` measurement.
fn by_round<'a>(
    samples: &'a [Sample],
    name: &str,
    scenario: DatagramScenario,
) -> std::collections::BTreeMap<usize, &'a DatagramMeasurement> {
    samples
        .iter()
        .filter(|s| s.subject == name)
        .flat_map(|s| {
            s.datagrams
                .iter()
                .filter(move |m| m.scenario == scenario)
                .map(move |m| (s.round, m))
        })
        .collect()
}

/// Per round, `f` of `name` over `f` of `reference`; median and range.
fn ratio(
    samples: &[Sample],
    name: &str,
    reference: &str,
    scenario: DatagramScenario,
    f: impl Fn(&DatagramMeasurement) -> f64,
) -> Option<Stat> {
    let theirs = by_round(samples, reference, scenario);
    Stat::of(
        by_round(samples, name, scenario)
            .iter()
            .filter_map(|(round, m)| {
                let r = f(theirs.get(round)?);
                (r > 0.0).then(|| f(m) / r)
            })
            .collect(),
    )
}

fn stat_of<'a>(
    runs: impl Iterator<Item = &'a DatagramMeasurement>,
    f: impl Fn(&DatagramMeasurement) -> Option<f64>,
) -> Option<Stat> {
    Stat::of(runs.filter_map(f).collect())
}

impl DatagramSummary {
    /// Reduces the UDP and QUIC measurements of `samples` over `subjects`.
    pub fn of(samples: &[Sample], subjects: &[Subject], workers: usize) -> DatagramSummary {
        let mut summary = DatagramSummary::default();
        for subject in subjects {
            let name = subject.name();
            let n = subject.workers(workers);
            match subject {
                Subject::SteerUdp { .. } => summary.udp.push(udp_figures(samples, &name, n)),
                Subject::SteerQuic { .. } => summary.quic.push(quic_figures(samples, &name, n)),
                _ => {}
            }
        }
        summary
    }

    /// The targets: Steer's program against plain `SO_REUSEPORT`, and its flows across a
    /// roll.
    pub fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        let kernel = self.udp.iter().find(|u| u.name == UDP_KERNEL);
        for name in ["udp-round-robin", "udp-hash"] {
            let steer = self.udp.iter().find(|u| u.name == name);
            let rate = steer.and_then(|s| s.rate_vs_kernel);
            targets.push(Target {
                goal: format!("{name}: datagrams per second >= 0.95x {UDP_KERNEL}"),
                measured: rate.map_or_else(|| "not measured".into(), show_x),
                met: rate.zip(kernel).map(|(r, _)| r.median >= 0.95),
            });
            let cpu = steer.and_then(|s| s.cpu_vs_kernel);
            targets.push(Target {
                goal: format!("{name}: server CPU per datagram <= 1.05x {UDP_KERNEL}"),
                measured: cpu.map_or_else(|| "not measured".into(), show_x),
                met: cpu.zip(kernel).map(|(r, _)| r.median <= 1.05),
            });
            let roll = steer.and_then(|s| s.roll);
            targets.push(Target {
                goal: format!(
                    "{name}: across a roll, 0 flows moved other than forward, 0 datagrams lost"
                ),
                measured: roll.map_or_else(
                    || "not measured".into(),
                    |r| {
                        format!(
                            "{} moved, {} lost of {} ({} of {} flows forward)",
                            r.moves.moved, r.lost, r.sent, r.moves.forward, r.moves.flows
                        )
                    },
                ),
                met: roll.map(|r| r.moves.moved == 0 && r.lost == 0 && r.moves.flows > 0),
            });
        }
        targets
    }
}

fn show_x(s: Stat) -> String {
    if s.min == s.max {
        format!("{:.2}x", s.median)
    } else {
        format!("{:.2}x ({:.2}-{:.2})", s.median, s.min, s.max)
    }
}

fn udp_figures(samples: &[Sample], name: &str, workers: usize) -> UdpFigures {
    let runs = by_round(samples, name, DatagramScenario::Datagrams);
    let rolls = by_round(samples, name, DatagramScenario::FlowRoll);
    let udp = |m: &DatagramMeasurement| m.udp.clone();
    let roll = (!rolls.is_empty()).then(|| {
        let mut figures = RollFigures::default();
        for m in rolls.values() {
            if let Some(moves) = m.flow_moves {
                figures.moves.flows += moves.flows;
                figures.moves.kept += moves.kept;
                figures.moves.forward += moves.forward;
                figures.moves.moved += moves.moved;
            }
            if let Some(r) = &m.udp {
                figures.sent += r.sent;
                figures.lost += r.lost;
            }
        }
        figures.unfinished = rolls.values().filter(|m| m.roll_s.is_none()).count();
        figures.roll_s = stat_of(rolls.values().copied(), |m| m.roll_s);
        figures
    });
    UdpFigures {
        name: name.to_owned(),
        workers,
        rate: stat_of(runs.values().copied(), |m| Some(m.rate())),
        rate_vs_kernel: ratio(
            samples,
            name,
            UDP_KERNEL,
            DatagramScenario::Datagrams,
            |m| m.rate(),
        ),
        cpu_us: stat_of(runs.values().copied(), |m| Some(m.cpu_us_per_unit)),
        cpu_vs_kernel: ratio(
            samples,
            name,
            UDP_KERNEL,
            DatagramScenario::Datagrams,
            |m| m.cpu_us_per_unit,
        ),
        p50_ms: stat_of(runs.values().copied(), |m| {
            udp(m).map(|r| r.latency.p50_us as f64 / 1000.0)
        }),
        p99_ms: stat_of(runs.values().copied(), |m| {
            udp(m).map(|r| r.latency.p99_us as f64 / 1000.0)
        }),
        max_over_min: stat_of(runs.values().copied(), |m| {
            m.udp.as_ref().map(|r| r.max_over_min(workers))
        }),
        lost: runs
            .values()
            .filter_map(|m| m.udp.as_ref())
            .map(|r| r.lost)
            .sum(),
        sent: runs
            .values()
            .filter_map(|m| m.udp.as_ref())
            .map(|r| r.sent)
            .sum(),
        roll,
        program_ns: stat_of(rolls.values().copied(), |m| m.program.map(|p| p.ns_per_run)),
        runs_per_datagram: stat_of(rolls.values().copied(), |m| {
            let sent = m.udp.as_ref()?.sent;
            m.program
                .filter(|_| sent > 0)
                .map(|p| p.runs as f64 / sent as f64)
        }),
    }
}

fn quic_figures(samples: &[Sample], name: &str, workers: usize) -> QuicFigures {
    let handshakes = by_round(samples, name, DatagramScenario::Handshakes);
    let requests = by_round(samples, name, DatagramScenario::Requests);
    let failed = |runs: &std::collections::BTreeMap<usize, &DatagramMeasurement>| -> u64 {
        runs.values()
            .filter_map(|m| m.quic.as_ref())
            .map(|r| r.failed)
            .sum()
    };
    let p99 = |m: &DatagramMeasurement| m.quic.as_ref().map(|r| r.latency.p99_us as f64 / 1e3);
    let per_unit = |m: &DatagramMeasurement| {
        let units = m.units();
        m.program
            .filter(|_| units > 0)
            .map(|p| p.runs as f64 / units as f64)
    };
    QuicFigures {
        name: name.to_owned(),
        workers,
        handshakes: stat_of(handshakes.values().copied(), |m| Some(m.rate())),
        handshakes_vs_one: ratio(
            samples,
            name,
            ONE_SOCKET_QUIC,
            DatagramScenario::Handshakes,
            DatagramMeasurement::rate,
        ),
        handshake_cpu_us: stat_of(handshakes.values().copied(), |m| Some(m.cpu_us_per_unit)),
        handshake_p99_ms: stat_of(handshakes.values().copied(), p99),
        handshakes_failed: failed(&handshakes),
        requests: stat_of(requests.values().copied(), |m| Some(m.rate())),
        requests_vs_one: ratio(
            samples,
            name,
            ONE_SOCKET_QUIC,
            DatagramScenario::Requests,
            DatagramMeasurement::rate,
        ),
        request_cpu_us: stat_of(requests.values().copied(), |m| Some(m.cpu_us_per_unit)),
        request_p99_ms: stat_of(requests.values().copied(), p99),
        requests_failed: failed(&requests),
        max_over_min: stat_of(requests.values().copied(), |m| {
            let r = m.quic.as_ref()?;
            let mut counts: Vec<f64> = r.per_worker.values().map(|&c| c as f64).collect();
            counts.resize(counts.len().max(workers), 0.0);
            Some(crate::load::fairness_of(&counts).max_over_min)
        }),
        program_ns: stat_of(handshakes.values().chain(requests.values()).copied(), |m| {
            m.program.map(|p| p.ns_per_run)
        }),
        runs_per_request: stat_of(requests.values().copied(), per_unit),
        runs_per_handshake: stat_of(handshakes.values().copied(), per_unit),
    }
}

/// `median (min-max)`, or `-`.
fn show(stat: Option<Stat>, digits: usize) -> String {
    match stat {
        Some(s) if s.min == s.max => format!("{:.digits$}", s.median),
        Some(s) => format!(
            "{:.digits$} ({:.digits$}-{:.digits$})",
            s.median, s.min, s.max
        ),
        None => "-".into(),
    }
}

fn show_ratio(stat: Option<Stat>) -> String {
    stat.map_or_else(|| "-".into(), show_x)
}

/// The UDP and QUIC sections of report.md; nothing when none of their subjects ran.
pub fn markdown(out: &mut String, summary: &DatagramSummary, workers: usize, roll_s: f64) {
    use std::fmt::Write as _;
    if !summary.udp.is_empty() {
        let _ = writeln!(
            out,
            "## UDP\n\nSteer's demo on a `udp://` listener, {} workers: `{UDP_KERNEL}` is \
             plain `SO_REUSEPORT` without a program (the kernel's floor), `udp-round-robin` \
             and `udp-hash` run Steer's program with its flow table, `{ONE_SOCKET_UDP}` is \
             one worker on one socket (`--workers 1 --balance kernel`). The load is \
             `steer-bench`'s own ({FLOWS} client sockets over {SOURCES} loopback addresses, \
             {WINDOW} datagrams in flight each, `recvmmsg`/`sendmmsg`, {} threads). Server \
             CPU is every process's utime+stime, the primary included. On loopback the \
             program runs in the client's send, so its cost is not in the server's CPU: its \
             own time per datagram is the kernel's count (`bpf_stats_enabled`, during the \
             roll).\n",
            workers, CLIENT_THREADS
        );
        super::summary::table(
            out,
            &[
                "subject",
                "datagrams/s",
                "vs kernel",
                "us CPU per datagram",
                "vs kernel",
                "p50 ms",
                "p99 ms",
                "max/min",
                "lost",
                "program ns per datagram",
            ],
            summary.udp.iter().map(|u| {
                vec![
                    u.name.clone(),
                    show(u.rate, 0),
                    show_ratio(u.rate_vs_kernel),
                    show(u.cpu_us, 2),
                    show_ratio(u.cpu_vs_kernel),
                    show(u.p50_ms, 2),
                    show(u.p99_ms, 2),
                    show(u.max_over_min, 2),
                    format!("{} of {}", u.lost, u.sent),
                    match (u.program_ns, u.runs_per_datagram) {
                        (Some(ns), Some(runs)) => {
                            format!("{} ({:.2} runs each)", show(Some(ns), 0), runs.median)
                        }
                        _ => "-".into(),
                    },
                ]
            }),
        );
        let _ = writeln!(
            out,
            "Flows across a roll: {ROLL_FLOWS} flows, {ROLL_FLOW_RATE:.0} datagrams a second \
             each, one `SIGUSR2` a quarter into a {:.1} s run (`--shutdown-timeout 2s`: a \
             replaced worker keeps its busy flows 1.6 s). \"Forward\": the flow moved only to \
             its slot's new generation; \"moved\": to another slot or back. Summed over the \
             rounds.\n",
            roll_s
        );
        super::summary::table(
            out,
            &[
                "subject",
                "flows",
                "kept",
                "forward",
                "moved",
                "datagrams sent",
                "lost",
                "s to roll",
            ],
            summary.udp.iter().filter_map(|u| {
                let r = u.roll?;
                Some(vec![
                    u.name.clone(),
                    r.moves.flows.to_string(),
                    r.moves.kept.to_string(),
                    r.moves.forward.to_string(),
                    r.moves.moved.to_string(),
                    r.sent.to_string(),
                    r.lost.to_string(),
                    if r.unfinished > 0 {
                        format!("{} ({} unfinished)", show(r.roll_s, 2), r.unfinished)
                    } else {
                        show(r.roll_s, 2)
                    },
                ])
            }),
        );
    }
    if !summary.quic.is_empty() {
        let _ = writeln!(
            out,
            "## QUIC\n\nThe demo's HTTP/3 on a `quic://` listener: `quic-round-robin` is {} \
             workers under Steer's program, `{ONE_SOCKET_QUIC}` one quinn process on one \
             socket (`--workers 1 --balance kernel`: the same demo code, no program). \
             Handshakes: {HANDSHAKE_LANES} at a time, each from a fresh client socket (a new \
             client), a full TLS 1.3 handshake (no resumption), then a close. Requests: `GET \
             /` on {CONNECTIONS} established connections, {STREAMS} in flight on each. The \
             client checks no certificate signature. Program: the kernel's count over both \
             runs (`bpf_stats_enabled`).\n",
            workers
        );
        super::summary::table(
            out,
            &[
                "subject",
                "handshakes/s",
                "vs one socket",
                "us CPU per handshake",
                "p99 ms",
                "failed",
                "requests/s",
                "vs one socket",
                "us CPU per request",
                "p99 ms",
                "failed",
                "max/min",
                "program ns per datagram",
            ],
            summary.quic.iter().map(|q| {
                vec![
                    q.name.clone(),
                    show(q.handshakes, 0),
                    show_ratio(q.handshakes_vs_one),
                    show(q.handshake_cpu_us, 0),
                    show(q.handshake_p99_ms, 2),
                    q.handshakes_failed.to_string(),
                    show(q.requests, 0),
                    show_ratio(q.requests_vs_one),
                    show(q.request_cpu_us, 1),
                    show(q.request_p99_ms, 2),
                    q.requests_failed.to_string(),
                    show(q.max_over_min, 2),
                    match (q.program_ns, q.runs_per_request, q.runs_per_handshake) {
                        (Some(ns), Some(req), Some(hs)) => format!(
                            "{} ({:.1} runs per request, {:.1} per handshake)",
                            show(Some(ns), 0),
                            req.median,
                            hs.median
                        ),
                        (Some(ns), _, _) => show(Some(ns), 0),
                        _ => "-".into(),
                    },
                ]
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(median: f64) -> Option<Stat> {
        Some(Stat {
            median,
            min: median,
            max: median,
        })
    }

    fn udp(name: &str, rate_vs_kernel: f64, cpu_vs_kernel: f64, moved: usize) -> UdpFigures {
        UdpFigures {
            name: name.into(),
            workers: 2,
            rate: stat(100_000.0 * rate_vs_kernel),
            rate_vs_kernel: stat(rate_vs_kernel),
            cpu_us: stat(4.0 * cpu_vs_kernel),
            cpu_vs_kernel: stat(cpu_vs_kernel),
            p50_ms: None,
            p99_ms: None,
            max_over_min: None,
            lost: 0,
            sent: 1000,
            roll: Some(RollFigures {
                moves: FlowMoves {
                    flows: 64,
                    kept: 0,
                    forward: 64 - moved,
                    moved,
                },
                sent: 1000,
                lost: 0,
                unfinished: 0,
                roll_s: stat(0.5),
            }),
            program_ns: None,
            runs_per_datagram: None,
        }
    }

    #[test]
    fn the_udp_targets_hold_the_program_to_plain_reuseport_and_its_flows_to_their_slots() {
        let summary = DatagramSummary {
            udp: vec![
                udp(UDP_KERNEL, 1.0, 1.0, 9),
                udp("udp-round-robin", 0.96, 1.06, 0),
                udp("udp-hash", 0.94, 1.0, 1),
            ],
            quic: Vec::new(),
        };
        let measured: Vec<(String, Option<bool>)> = summary
            .targets()
            .into_iter()
            .map(|t| (t.goal, t.met))
            .collect();
        let expect = |goal: &str, met: bool| {
            assert!(
                met_of(&measured, goal) == Some(met),
                "{goal}: expected met={met} in {measured:?}"
            );
        };
        expect(
            "udp-round-robin: datagrams per second >= 0.95x udp-kernel",
            true,
        );
        expect(
            "udp-round-robin: server CPU per datagram <= 1.05x udp-kernel",
            false,
        );
        expect(
            "udp-round-robin: across a roll, 0 flows moved other than forward, 0 datagrams lost",
            true,
        );
        expect("udp-hash: datagrams per second >= 0.95x udp-kernel", false);
        expect(
            "udp-hash: server CPU per datagram <= 1.05x udp-kernel",
            true,
        );
        expect(
            "udp-hash: across a roll, 0 flows moved other than forward, 0 datagrams lost",
            false,
        );
        let nothing = DatagramSummary::default().targets();
        assert!(nothing.iter().all(|t| t.met.is_none()), "{nothing:?}");
    }

    fn met_of(met: &[(String, Option<bool>)], goal: &str) -> Option<bool> {
        met.iter().find(|(g, _)| g == goal).and_then(|(_, m)| *m)
    }

    #[test]
    fn the_program_names_are_as_the_kernel_keeps_them() {
        // The kernel keeps 15 characters: the flow half of QUIC shares the caller's.
        assert_eq!(&UDP_PROGRAM[..15], "steer_select_ud");
        assert_eq!(&QUIC_PROGRAM[..15], "steer_select_qu");
        assert!(program_stats(std::process::id(), UDP_PROGRAM).is_none());
    }
}
