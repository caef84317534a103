//! The scenarios, each a load run against a started server, with what happens around it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::footprint::{self, TreeSample};
use super::subject::Server;
use crate::load::{self, Errors, LoadReport, LoadSpec, Mode, Stop};

/// Keep-alive connections in the throughput scenario.
const KEEPALIVE_CONNECTIONS: usize = 64;
/// Concurrent new-connection lanes.
const CONNECT_LANES: usize = 32;
/// Client threads (the client shares the machine with the server; two keep it from being
/// the bottleneck on a small machine without taking it over).
const CLIENT_THREADS: usize = 2;
/// Loopback source addresses, so `hash` sees many clients.
const SOURCES: u8 = 64;
/// Keep-alive connections beside the new-connection lanes during the reloads: where
/// closing a worker's idle connections shows, as resets.
const RELOAD_KEEPALIVE_CONNECTIONS: usize = 16;
/// The reload run ends this long after its last reload at the latest (a safety bound; it
/// is cancelled once the reloads are over).
const RELOAD_RUN_BOUND: Duration = Duration::from_secs(300);

/// The stalled worker blocks its loop this long ...
pub const STALL_MS: u64 = 200;
/// ... this often.
pub const STALL_EVERY: Duration = Duration::from_secs(1);

/// One scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Keep-alive request throughput.
    KeepAlive,
    /// New-connection rate (one request per connection).
    Connect,
    /// New connections while one worker blocks its loop 200 ms every second.
    Stall,
    /// New connections while the primary rolls every worker (SIGUSR2).
    Roll,
    /// The Node comparison: new connections and keep-alive requests while the subject
    /// reloads its workers several times by its own zero-downtime method (Steer's
    /// `SIGUSR2`, `pm2 reload`, node_cluster.js' rolling restart).
    Reload,
}

impl Scenario {
    /// Every scenario, in the order they run against a server.
    pub const ALL: [Scenario; 5] = [
        Scenario::KeepAlive,
        Scenario::Connect,
        Scenario::Stall,
        Scenario::Roll,
        Scenario::Reload,
    ];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::KeepAlive => "keep-alive",
            Scenario::Connect => "connect",
            Scenario::Stall => "stall",
            Scenario::Roll => "roll",
            Scenario::Reload => "reload",
        }
    }
}

/// One scenario's measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// Which scenario.
    pub scenario: Scenario,
    /// The load's report.
    pub load: LoadReport,
    /// CPU seconds of the whole server during the run: the primary, every worker, and the
    /// processes that exited during it (see [`footprint`]).
    pub server_cpu_s: f64,
    /// [`Self::server_cpu_s`] per request answered, microseconds.
    pub cpu_us_per_request: f64,
    /// CPU seconds the primary alone used during the run.
    pub primary_cpu_s: f64,
    /// The primary's CPU as a share of one core over the run, percent.
    pub primary_cpu_pct: f64,
    /// The primary's RSS after the run, bytes.
    pub primary_rss_bytes: u64,
    /// The RSS of every other process of the server after the run, bytes.
    pub worker_rss_bytes: Vec<u64>,
    /// Stall: `/block` requests the blocked worker answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalls: Option<u64>,
    /// Stall: of the requests that started while a worker was stalled, the share that the
    /// stalled worker answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalled_share: Option<f64>,
    /// Roll: seconds from SIGUSR2 until every slot ran a new process (`None`: not within
    /// the run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roll_s: Option<f64>,
    /// Reload: seconds from each reload's start until every worker was a new process,
    /// for the reloads that finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reloads_s: Option<Vec<f64>>,
    /// Reload: reloads asked for that did not finish within
    /// [`RELOAD_TIMEOUT`](super::subject::RELOAD_TIMEOUT) (the run stops at the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reloads_unfinished: Option<usize>,
    /// Reload: the keep-alive connections beside the new-connection load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive_side: Option<SideLoad>,
}

/// What a second load, run beside the main one, saw.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SideLoad {
    /// Requests answered 200.
    pub ok: u64,
    /// Failed requests by kind.
    pub errors: Errors,
}

/// How many reloads the reload scenario asks for, and the pause before the first and
/// after each.
#[derive(Debug, Clone, Copy)]
pub struct Reloads {
    /// Reloads.
    pub count: usize,
    /// Pause before the first and after each.
    pub pause: Duration,
}

/// Runs `scenario` against `server` for `length` (the reload scenario: for as long as
/// `reloads` take).
pub fn run(
    scenario: Scenario,
    server: &Server,
    length: Duration,
    reloads: Reloads,
) -> Result<Measurement, String> {
    let spec = |mode: Mode, connections: usize| {
        let mut spec = LoadSpec::new(server.addr, mode, connections, Stop::After(length));
        spec.threads = CLIENT_THREADS;
        spec.sources = SOURCES;
        spec
    };
    let pid = server.primary_pid();
    let before = footprint::sample(pid).ok_or("the server's primary is gone")?;
    let mut stalls = None;
    let mut stalled_share = None;
    let mut roll_s = None;
    let mut reloads_s = None;
    let mut reloads_unfinished = None;
    let mut keepalive_side = None;
    let load = match scenario {
        Scenario::KeepAlive => run_load(&spec(Mode::KeepAlive, KEEPALIVE_CONNECTIONS))?,
        Scenario::Connect => run_load(&spec(Mode::Connect, CONNECT_LANES))?,
        Scenario::Stall => {
            let stop = Arc::new(AtomicBool::new(false));
            let phase = Arc::new(AtomicU64::new(0));
            let blocker = {
                let stop = Arc::clone(&stop);
                let phase = Arc::clone(&phase);
                let addr = server.addr;
                std::thread::spawn(move || block_one_worker(addr, &stop, &phase))
            };
            let mut load_spec = spec(Mode::Connect, CONNECT_LANES);
            load_spec.phase = Some(phase);
            let report = run_load(&load_spec);
            stop.store(true, Ordering::Relaxed);
            let stalled = blocker.join().map_err(|_| "the blocker thread panicked")?;
            let report = report?;
            stalls = Some(stalled.len() as u64);
            stalled_share = share_on_stalled(&report, &stalled);
            report
        }
        Scenario::Roll => {
            let before = server
                .steer_worker_pids()
                .ok_or("the cluster is not ready before the roll")?;
            let load_spec = spec(Mode::Connect, CONNECT_LANES);
            let loader = std::thread::spawn(move || load::run(&load_spec));
            std::thread::sleep(length / 4);
            let signalled = Instant::now();
            server.signal(libc::SIGUSR2)?;
            while !loader.is_finished() {
                if roll_s.is_none()
                    && server
                        .steer_worker_pids()
                        .is_some_and(|pids| pids.iter().all(|p| !before.contains(p)))
                {
                    roll_s = Some(signalled.elapsed().as_secs_f64());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            loader
                .join()
                .map_err(|_| "the load thread panicked")?
                .map_err(|e| format!("load: {e}"))?
        }
        Scenario::Reload => {
            let cancel = Arc::new(AtomicBool::new(false));
            let mut connect = LoadSpec::new(
                server.addr,
                Mode::Connect,
                CONNECT_LANES,
                Stop::After(RELOAD_RUN_BOUND),
            );
            connect.threads = CLIENT_THREADS;
            connect.sources = SOURCES;
            connect.cancel = Some(Arc::clone(&cancel));
            let mut keepalive = connect.clone();
            keepalive.mode = Mode::KeepAlive;
            keepalive.connections = RELOAD_KEEPALIVE_CONNECTIONS;
            keepalive.threads = 1;
            let connect = std::thread::spawn(move || load::run(&connect));
            let keepalive = std::thread::spawn(move || load::run(&keepalive));
            let outcome = reload_repeatedly(server, reloads);
            cancel.store(true, Ordering::Relaxed);
            let connect = connect.join().map_err(|_| "the load thread panicked")?;
            let keepalive = keepalive.join().map_err(|_| "the load thread panicked")?;
            let (done, unfinished) = outcome?;
            let keepalive = keepalive.map_err(|e| format!("load: {e}"))?;
            reloads_s = Some(done);
            reloads_unfinished = Some(unfinished);
            keepalive_side = Some(SideLoad {
                ok: keepalive.ok,
                errors: keepalive.errors,
            });
            connect.map_err(|e| format!("load: {e}"))?
        }
    };
    let after = footprint::sample(pid).ok_or("the server's primary exited during the run")?;
    let (server_cpu, primary_cpu) = cpu_between(&before, &after);
    let answered = load.ok + keepalive_side.map_or(0, |side| side.ok);
    Ok(Measurement {
        scenario,
        server_cpu_s: server_cpu,
        cpu_us_per_request: 1e6 * server_cpu / (answered.max(1) as f64),
        primary_cpu_pct: 100.0 * primary_cpu / load.elapsed_s.max(1e-9),
        primary_cpu_s: primary_cpu,
        primary_rss_bytes: after.root_rss(),
        worker_rss_bytes: after.descendant_rss(),
        load,
        stalls,
        stalled_share,
        roll_s,
        reloads_s,
        reloads_unfinished,
        keepalive_side,
    })
}

/// Asks `server` for `reloads.count` reloads, one after the other, with a pause before the
/// first and after each: each starts once every worker is up, and is over once every
/// worker is a process that was not there before it. Returns each finished reload's
/// seconds and how many did not finish (the first that does not ends the run).
fn reload_repeatedly(server: &Server, reloads: Reloads) -> Result<(Vec<f64>, usize), String> {
    let mut done = Vec::new();
    std::thread::sleep(reloads.pause);
    for asked in 0..reloads.count {
        let before = wait_for(|| server.worker_pids())
            .ok_or("the workers are not all up before a reload")?;
        let started = Instant::now();
        server.reload()?;
        let replaced = wait_for(|| {
            server
                .worker_pids()
                .filter(|pids| pids.iter().all(|pid| !before.contains(pid)))
        });
        if replaced.is_none() {
            return Ok((done, reloads.count - asked));
        }
        done.push(started.elapsed().as_secs_f64());
        std::thread::sleep(reloads.pause);
    }
    Ok((done, 0))
}

/// Polls `check` every 20 ms until it gives something, for [`RELOAD_TIMEOUT`] at most.
///
/// [`RELOAD_TIMEOUT`]: super::subject::RELOAD_TIMEOUT
fn wait_for<T>(check: impl Fn() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + super::subject::RELOAD_TIMEOUT;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU seconds of the whole server and of its primary between two samples.
fn cpu_between(before: &TreeSample, after: &TreeSample) -> (f64, f64) {
    (
        after.cpu().saturating_sub(before.cpu()).as_secs_f64(),
        after
            .root_cpu()
            .saturating_sub(before.root_cpu())
            .as_secs_f64(),
    )
}

/// Of the requests that started during a stall (odd phases), the share answered by the
/// worker stalled in that phase; `None` if none started during one.
fn share_on_stalled(report: &LoadReport, stalled: &[Stalled]) -> Option<f64> {
    let (mut on_stalled, mut during) = (0u64, 0u64);
    for stall in stalled {
        if let Some(workers) = report.per_phase.get(&stall.phase) {
            during += workers.values().sum::<u64>();
            on_stalled += workers.get(&stall.worker).copied().unwrap_or(0);
        }
    }
    (during > 0).then(|| on_stalled as f64 / during as f64)
}

fn run_load(spec: &LoadSpec) -> Result<LoadReport, String> {
    load::run(spec).map_err(|e| format!("load: {e}"))
}

/// One stall: the phase of the run it was, and the worker it blocked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stalled {
    phase: u64,
    worker: String,
}

/// Keeps one connection to whichever worker accepts it and asks that worker to block its
/// event loop for [`STALL_MS`] every [`STALL_EVERY`], until `stop`. `phase` is odd while a
/// stall is asked for and answered (the load counts requests by it). Returns the stalls.
fn block_one_worker(addr: SocketAddr, stop: &AtomicBool, phase: &AtomicU64) -> Vec<Stalled> {
    let mut stalls = Vec::new();
    let mut connection: Option<TcpStream> = None;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(20)));
            continue;
        }
        next += STALL_EVERY;
        let stream = match connection.take() {
            Some(stream) => stream,
            None => match TcpStream::connect(addr) {
                Ok(stream) => stream,
                Err(_) => continue,
            },
        };
        let during = phase.fetch_add(1, Ordering::Relaxed) + 1;
        let answered = stall_once(stream);
        phase.fetch_add(1, Ordering::Relaxed);
        if let Some((stream, worker)) = answered {
            stalls.push(Stalled {
                phase: during,
                worker,
            });
            connection = Some(stream);
        }
    }
    stalls
}

/// One `/block` request on a kept-alive connection; the connection back if it stays
/// usable, with the `X-Steer-Worker` of the worker that blocked.
fn stall_once(mut stream: TcpStream) -> Option<(TcpStream, String)> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /block?ms={STALL_MS} HTTP/1.1\r\nHost: bench\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = response.parse(&buf) {
            let header = |name: &str| {
                response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(str::trim)
            };
            let length: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let worker = header("x-steer-worker").unwrap_or("?").to_owned();
            if buf.len() >= head + length {
                return (response.code == Some(200)).then_some((stream, worker));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stalled_share_counts_only_requests_started_during_a_stall() {
        let mut report = LoadReport::empty(Mode::Connect, 1);
        let mut answer = |worker: &str, phase: u64, n: usize| {
            for _ in 0..n {
                report.succeed_or_fail(
                    200,
                    Some(worker.into()),
                    Duration::from_millis(1),
                    Some(phase),
                    true,
                );
            }
        };
        // Phase 0 and 2: no stall. Phase 1: worker 0 stalled; phase 3: worker 1 stalled.
        answer("0", 0, 500);
        answer("1", 0, 500);
        answer("0", 1, 30);
        answer("1", 1, 10);
        answer("0", 2, 100);
        answer("0", 3, 5);
        answer("1", 3, 15);
        let stalled = [
            Stalled {
                phase: 1,
                worker: "0".into(),
            },
            Stalled {
                phase: 3,
                worker: "1".into(),
            },
        ];
        let share = share_on_stalled(&report, &stalled).expect("requests during stalls");
        assert!((share - 45.0 / 60.0).abs() < 1e-9, "{share}");
        assert_eq!(share_on_stalled(&report, &[]), None);
    }
}
