//! The scenarios, each a load run against a started server, with what happens around it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::subject::{Server, cpu_time};
use crate::load::{self, LoadReport, LoadSpec, Mode, Stop};

/// Keep-alive connections in the throughput scenario.
const KEEPALIVE_CONNECTIONS: usize = 64;
/// Concurrent new-connection lanes.
const CONNECT_LANES: usize = 32;
/// Client threads (the client shares the machine with the server; two keep it from being
/// the bottleneck on a small machine without taking it over).
const CLIENT_THREADS: usize = 2;
/// Loopback source addresses, so `hash` sees many clients.
const SOURCES: u8 = 64;

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
}

impl Scenario {
    /// Every scenario, in the order they run against a server.
    pub const ALL: [Scenario; 4] = [
        Scenario::KeepAlive,
        Scenario::Connect,
        Scenario::Stall,
        Scenario::Roll,
    ];

    /// Whether it applies to peers (the last two need Steer's demo and signals).
    pub fn for_peers(self) -> bool {
        matches!(self, Scenario::KeepAlive | Scenario::Connect)
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::KeepAlive => "keep-alive",
            Scenario::Connect => "connect",
            Scenario::Stall => "stall",
            Scenario::Roll => "roll",
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
    /// CPU seconds the primary used during the run.
    pub primary_cpu_s: f64,
    /// The primary's CPU as a share of one core over the run, percent.
    pub primary_cpu_pct: f64,
    /// Stall: `/block` requests the blocked worker answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalls: Option<u64>,
    /// Roll: seconds from SIGUSR2 until every slot ran a new process (`None`: not within
    /// the run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roll_s: Option<f64>,
}

/// Runs `scenario` against `server` for `length`.
pub fn run(scenario: Scenario, server: &Server, length: Duration) -> Result<Measurement, String> {
    let spec = |mode: Mode, connections: usize| {
        let mut spec = LoadSpec::new(server.addr, mode, connections, Stop::After(length));
        spec.threads = CLIENT_THREADS;
        spec.sources = SOURCES;
        spec
    };
    let pid = server.primary_pid();
    let cpu_before = cpu_time(pid).unwrap_or_default();
    let mut stalls = None;
    let mut roll_s = None;
    let load = match scenario {
        Scenario::KeepAlive => run_load(&spec(Mode::KeepAlive, KEEPALIVE_CONNECTIONS))?,
        Scenario::Connect => run_load(&spec(Mode::Connect, CONNECT_LANES))?,
        Scenario::Stall => {
            let stop = Arc::new(AtomicBool::new(false));
            let blocker = {
                let stop = Arc::clone(&stop);
                let addr = server.addr;
                std::thread::spawn(move || block_one_worker(addr, &stop))
            };
            let report = run_load(&spec(Mode::Connect, CONNECT_LANES));
            stop.store(true, Ordering::Relaxed);
            stalls = Some(blocker.join().map_err(|_| "the blocker thread panicked")?);
            report?
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
    };
    let cpu = cpu_time(pid)
        .unwrap_or_default()
        .saturating_sub(cpu_before)
        .as_secs_f64();
    Ok(Measurement {
        scenario,
        primary_cpu_pct: 100.0 * cpu / load.elapsed_s.max(1e-9),
        primary_cpu_s: cpu,
        load,
        stalls,
        roll_s,
    })
}

fn run_load(spec: &LoadSpec) -> Result<LoadReport, String> {
    load::run(spec).map_err(|e| format!("load: {e}"))
}

/// Keeps one connection to whichever worker accepts it and asks that worker to block its
/// event loop for [`STALL_MS`] every [`STALL_EVERY`], until `stop`. Returns the stalls done.
fn block_one_worker(addr: SocketAddr, stop: &AtomicBool) -> u64 {
    let mut stalls = 0;
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
        if let Some(stream) = stall_once(stream) {
            stalls += 1;
            connection = Some(stream);
        }
    }
    stalls
}

/// One `/block` request on a kept-alive connection; the connection back if it stays usable.
fn stall_once(mut stream: TcpStream) -> Option<TcpStream> {
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
            let length: usize = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                .unwrap_or(0);
            if buf.len() >= head + length {
                return (response.code == Some(200)).then_some(stream);
            }
        }
    }
}
