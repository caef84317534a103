//! The load generator: closed-loop HTTP/1.1 `GET` over many connections, from a few `mio`
//! threads, with every latency in an HDR histogram.
//!
//! Two modes:
//!
//! - [`Mode::KeepAlive`]: `connections` persistent connections, each sending its next request
//!   as soon as the previous response is complete (a response with `Connection: close` makes
//!   it reconnect, which is not an error). Measures request throughput.
//! - [`Mode::Connect`]: each of `connections` lanes opens a new connection per request
//!   (`Connection: close`), waits for the response and the server's close, and starts over.
//!   Measures the accept path; the latency includes the handshake.
//!
//! The run stops after a duration or a request count, whichever [`Stop`] says, and never
//! later than [`MAX_DURATION`]. Requests still in flight at a duration's end are not
//! counted. Each connection can come from its own loopback source address (127.0.0.x), so
//! the `hash` policy sees many clients. A [`LoadSpec::phase`] counter, moved by another
//! thread (for example while it stalls a worker), splits the per-worker counts by the phase
//! each request started in.

mod lane;
mod report;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use report::{ErrorKind, Errors, Fairness, Latency, LoadReport, fairness_of, per_second};

/// No run lasts longer than this, whatever it was asked.
pub const MAX_DURATION: Duration = Duration::from_secs(600);

/// No run opens more concurrent connections than this.
pub const MAX_CONNECTIONS: usize = 10_000;

/// How connections are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Persistent connections, one request after another.
    KeepAlive,
    /// A new connection for every request.
    Connect,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "keepalive" | "keep-alive" => Ok(Mode::KeepAlive),
            "connect" => Ok(Mode::Connect),
            _ => Err(format!("mode {s:?}: expected keepalive or connect")),
        }
    }
}

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this long (requests still in flight then are not counted).
    After(Duration),
    /// Once this many requests have completed, successfully or not.
    Requests(u64),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The server.
    pub target: SocketAddr,
    /// The request target, e.g. `/`.
    pub path: String,
    /// How connections are used.
    pub mode: Mode,
    /// Concurrent connections (keep-alive) or lanes (connect).
    pub connections: usize,
    /// Client threads, each driving its share of the connections with one `mio` poll.
    pub threads: usize,
    /// When to stop.
    pub stop: Stop,
    /// A request that has no complete response after this long fails as a timeout.
    pub timeout: Duration,
    /// How many loopback source addresses to spread connections over (127.0.0.1 up to
    /// 127.0.0.N); 1 uses the kernel's choice. Only for loopback targets.
    pub sources: u8,
    /// A counter another thread moves through the phases of the run (for example odd while
    /// a worker is stalled): successful requests are also counted per worker under the
    /// value it had when they started, in [`LoadReport::per_phase`].
    pub phase: Option<Arc<AtomicU64>>,
    /// Set by another thread to end a duration-bound run early, as if its duration were
    /// over then (requests still in flight are not counted).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl LoadSpec {
    /// A spec with the defaults: `/`, 2 threads, 5 s timeout, one source address.
    pub fn new(target: SocketAddr, mode: Mode, connections: usize, stop: Stop) -> LoadSpec {
        LoadSpec {
            target,
            path: "/".into(),
            mode,
            connections,
            threads: 2,
            stop,
            timeout: Duration::from_secs(5),
            sources: 1,
            phase: None,
            cancel: None,
        }
    }

    /// The source addresses connections are bound to, in rotation (empty: unbound).
    fn source_ips(&self) -> Vec<IpAddr> {
        if self.sources <= 1 || !self.target.ip().is_loopback() || !self.target.is_ipv4() {
            return Vec::new();
        }
        (1..=self.sources)
            .map(|last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
            .collect()
    }

    /// The request bytes.
    fn request(&self) -> Vec<u8> {
        let connection = match self.mode {
            Mode::KeepAlive => "keep-alive",
            Mode::Connect => "close",
        };
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: steer-bench\r\nConnection: {connection}\r\n\r\n",
            self.path, self.target
        )
        .into_bytes()
    }
}

/// What every client thread shares.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Requests started (for [`Stop::Requests`]).
    started: AtomicU64,
    /// Set when the run must end.
    stop: AtomicBool,
}

impl Shared {
    /// Claims the right to start one more request.
    fn claim(&self, limit: Option<u64>) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        match limit {
            Some(limit) => self.started.fetch_add(1, Ordering::Relaxed) < limit,
            None => true,
        }
    }
}

/// Runs the load and returns what it saw. Blocks for the run's length.
///
/// Fails only if a client thread cannot be started or its poll cannot be created
/// (`epoll_create1`); connection failures are counted in the report, never returned.
pub fn run(spec: &LoadSpec) -> std::io::Result<LoadReport> {
    let connections = spec.connections.clamp(1, MAX_CONNECTIONS);
    let threads = spec.threads.clamp(1, connections);
    let shared = Arc::new(Shared {
        started: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let deadline = match spec.stop {
        Stop::After(duration) => duration.min(MAX_DURATION),
        Stop::Requests(_) => MAX_DURATION,
    };
    let limit = match spec.stop {
        Stop::Requests(n) => Some(n),
        Stop::After(_) => None,
    };
    let sources = spec.source_ips();
    let request: Arc<[u8]> = spec.request().into();
    let started = Instant::now();
    let handles = (0..threads)
        .map(|t| {
            let lanes = connections / threads + usize::from(t < connections % threads);
            let driver = lane::Driver {
                target: spec.target,
                mode: spec.mode,
                request: Arc::clone(&request),
                timeout: spec.timeout,
                sources: sources.clone(),
                first_source: t,
                lanes,
                end: started + deadline,
                limit,
                shared: Arc::clone(&shared),
                phase: spec.phase.clone(),
                cancel: spec.cancel.clone(),
            };
            std::thread::Builder::new()
                .name(format!("load-{t}"))
                .spawn(move || driver.run())
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut report = LoadReport::empty(spec.mode, connections);
    let mut failure = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(part)) => report.merge(part),
            Ok(Err(err)) => failure = Some(err),
            Err(_) => failure = Some(std::io::Error::other("a load thread panicked")),
        }
    }
    if let Some(err) = failure {
        return Err(err);
    }
    report.finish(started.elapsed());
    Ok(report)
}
