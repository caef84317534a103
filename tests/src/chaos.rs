//! Tools for fault-injection tests: a load that records every failure with the client
//! port it happened on, and a way to learn which client connections a worker had
//! accepted at the moment it died.
//!
//! A failed request is unavoidable only if the worker that had *accepted* its connection
//! died: that connection's state died with the process. Everything else (connections
//! still queued, new connections, requests on other workers) must succeed. To tell the
//! two apart, a test freezes the victim (SIGSTOP), lists the TCP connections in its fd
//! table ([`accepted_client_ports`]), then kills it; a failure counts as unavoidable when
//! its connection was opened before the kill and its client port is in that list.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::http::{KeepAlive, Response};

/// A chaos load stops by itself after this long.
const CHAOS_LOAD_LIMIT: Duration = Duration::from_secs(120);

/// Read and write timeout of the chaos load's requests: longer than any stall a test
/// injects, so a slow answer is a latency, not a failure.
pub const CHAOS_TIMEOUT: Duration = Duration::from_secs(10);

/// One failed request.
#[derive(Debug, Clone)]
pub struct Failure {
    /// When the connection it used was opened.
    pub opened_at: Instant,
    /// When it failed.
    pub at: Instant,
    /// The client port of its connection (0 if the connection never opened).
    pub client_port: u16,
    /// Whether it was on a persistent connection (else a new connection per request).
    pub keep_alive: bool,
    /// What went wrong.
    pub error: String,
}

/// One answered request: when it started, and which worker process answered.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// When the request's connection was opened.
    pub opened_at: Instant,
    /// The answering worker's pid (from the demo's body).
    pub pid: u32,
    /// Whether it came over a new connection.
    pub new_connection: bool,
}

/// Threads sending `GET /` continuously: some over a new connection per request, some
/// over persistent connections, until [`stop`](ChaosLoad::stop)ped.
#[derive(Debug)]
pub struct ChaosLoad {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<ThreadLog>>,
}

#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    deadline: Instant,
    ok: AtomicU64,
}

/// What one load thread saw.
#[derive(Debug)]
struct ThreadLog {
    latency_us: Histogram<u64>,
    failures: Vec<Failure>,
    answers: Vec<Answer>,
}

impl ThreadLog {
    fn new() -> ThreadLog {
        ThreadLog {
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)
                .unwrap_or_else(|e| panic!("histogram bounds: {e}")),
            failures: Vec::new(),
            answers: Vec::new(),
        }
    }

    fn record(
        &mut self,
        shared: &Shared,
        started: Instant,
        opened_at: Instant,
        client_port: u16,
        keep_alive: bool,
        result: io::Result<Response>,
    ) {
        let now = Instant::now();
        match result {
            Ok(response) if response.status == 200 => {
                let micros = u64::try_from(now.duration_since(started).as_micros()).unwrap_or(0);
                let _saturated = self.latency_us.record(micros.max(1));
                shared.ok.fetch_add(1, Ordering::Relaxed);
                if let Some(pid) = pid_in_body(&response.body) {
                    self.answers.push(Answer {
                        opened_at,
                        pid,
                        new_connection: !keep_alive,
                    });
                }
            }
            other => {
                let error = match other {
                    Ok(response) => format!("HTTP {}", response.status),
                    Err(e) => format!("{:?}: {e}", e.kind()),
                };
                self.failures.push(Failure {
                    opened_at,
                    at: now,
                    client_port,
                    keep_alive,
                    error,
                });
                // A dead server fails every request at once; do not spin on it.
                thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// The pid in the demo's `hello from worker <slot> (pid <pid>)`.
fn pid_in_body(body: &str) -> Option<u32> {
    let (_, rest) = body.split_once("(pid ")?;
    rest.split(')').next()?.parse().ok()
}

impl ChaosLoad {
    /// Starts `new_connection_threads` threads that open a connection per request and
    /// `keep_alive_threads` threads on persistent connections, all against `addr`.
    pub fn start(
        addr: SocketAddr,
        new_connection_threads: usize,
        keep_alive_threads: usize,
    ) -> Self {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            deadline: Instant::now() + CHAOS_LOAD_LIMIT,
            ok: AtomicU64::new(0),
        });
        let mut threads = Vec::new();
        for i in 0..new_connection_threads + keep_alive_threads {
            let shared = Arc::clone(&shared);
            let keep_alive = i >= new_connection_threads;
            threads.push(
                thread::Builder::new()
                    .name(format!("chaos-load-{i}"))
                    .spawn(move || load_loop(addr, &shared, keep_alive))
                    .unwrap_or_else(|e| panic!("spawning a load thread: {e}")),
            );
        }
        ChaosLoad { shared, threads }
    }

    /// Requests answered so far.
    pub fn ok(&self) -> u64 {
        self.shared.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests than now have been answered (at most `timeout`).
    ///
    /// # Panics
    ///
    /// If they are not answered in time.
    pub fn wait_for_more(&self, n: u64, timeout: Duration) {
        let target = self.ok() + n;
        crate::process::wait_for(&format!("{n} more answered requests"), timeout, || {
            self.ok() >= target
        });
    }

    /// Stops the threads and gathers what they saw.
    pub fn stop(self) -> ChaosReport {
        self.shared.stop.store(true, Ordering::Relaxed);
        let mut report = ChaosReport {
            latency_us: ThreadLog::new().latency_us,
            failures: Vec::new(),
            answers: Vec::new(),
        };
        for thread in self.threads {
            let log = thread
                .join()
                .unwrap_or_else(|_| panic!("a chaos load thread panicked"));
            report
                .latency_us
                .add(&log.latency_us)
                .unwrap_or_else(|e| panic!("merging histograms: {e}"));
            report.failures.extend(log.failures);
            report.answers.extend(log.answers);
        }
        report.failures.sort_by_key(|f| f.at);
        report
    }
}

fn load_loop(addr: SocketAddr, shared: &Shared, keep_alive: bool) -> ThreadLog {
    let mut log = ThreadLog::new();
    let mut connection: Option<(KeepAlive, Instant, u16)> = None;
    while !shared.stop.load(Ordering::Relaxed) && Instant::now() < shared.deadline {
        let started = Instant::now();
        let (mut client, opened_at, port) = match connection.take() {
            Some(open) if keep_alive && open.0.is_open() => open,
            _ => match KeepAlive::connect_with_timeout(addr, CHAOS_TIMEOUT) {
                Ok(client) => {
                    let port = client.local_addr().map_or(0, |a| a.port());
                    (client, started, port)
                }
                Err(e) => {
                    log.record(shared, started, started, 0, keep_alive, Err(e));
                    continue;
                }
            },
        };
        let result = client.get("/");
        log.record(shared, started, opened_at, port, keep_alive, result);
        if keep_alive {
            connection = Some((client, opened_at, port));
        }
    }
    log
}

/// Everything a [`ChaosLoad`] saw.
#[derive(Debug)]
pub struct ChaosReport {
    /// Latency of every answered request, in microseconds.
    pub latency_us: Histogram<u64>,
    /// Every failed request, oldest first.
    pub failures: Vec<Failure>,
    /// Every answered request.
    pub answers: Vec<Answer>,
}

impl ChaosReport {
    /// Requests answered.
    pub fn ok(&self) -> u64 {
        self.latency_us.len()
    }

    /// A latency quantile in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    /// Splits the failures into (unavoidable, avoidable) given what each killed worker had
    /// accepted: `(kill time, client ports)` per kill.
    pub fn split_failures(
        &self,
        deaths: &[(Instant, BTreeSet<u16>)],
    ) -> (Vec<&Failure>, Vec<&Failure>) {
        self.failures.iter().partition(|f| {
            f.client_port != 0
                && deaths
                    .iter()
                    .any(|(at, ports)| f.opened_at < *at && ports.contains(&f.client_port))
        })
    }
}

/// Client ports of the TCP connections `pid` holds in its fd table (accepted ones, for a
/// server). Each socket fd is copied with `pidfd_getfd(2)` and asked for its peer
/// (`getpeername(2)`): quick even when the host has many thousands of connections in
/// `TIME_WAIT`. Freeze the process first (SIGSTOP) for an exact answer.
///
/// # Panics
///
/// If the process cannot be inspected.
pub fn accepted_client_ports(pid: u32) -> BTreeSet<u16> {
    let pidfd = pidfd_open(pid).unwrap_or_else(|e| panic!("pidfd_open({pid}): {e}"));
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("listing /proc/{pid}/fd: {e}"));
    let mut ports = BTreeSet::new();
    for entry in dir.flatten() {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|link| link.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        if !is_socket {
            continue;
        }
        let Ok(socket) = pidfd_getfd(&pidfd, fd) else {
            continue;
        };
        if let Ok(peer) = socket2::SockRef::from(&socket).peer_addr()
            && let Some(peer) = peer.as_socket()
        {
            ports.insert(peer.port());
        }
    }
    ports
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    syscall_fd(|| {
        // SAFETY: plain syscall on integers.
        unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) }
    })
}

fn pidfd_getfd(pidfd: &OwnedFd, fd: RawFd) -> io::Result<OwnedFd> {
    syscall_fd(|| {
        // SAFETY: plain syscall on integers.
        unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) }
    })
}

/// Sends `bytes` to the primary as if worker `pid` had sent them on its IPC socket `fd`
/// (a copy of the worker's end taken with `pidfd_getfd(2)`; needs ptrace rights over it,
/// which root has).
///
/// # Panics
///
/// If the fd cannot be taken or the send fails.
pub fn send_on_worker_ipc(pid: u32, fd: RawFd, bytes: &[u8]) {
    let pidfd = pidfd_open(pid).unwrap_or_else(|e| panic!("pidfd_open({pid}): {e}"));
    let socket =
        pidfd_getfd(&pidfd, fd).unwrap_or_else(|e| panic!("pidfd_getfd({pid}, {fd}): {e}"));
    // SAFETY: a valid socket fd and a valid buffer for the duration of the call.
    let sent = unsafe { libc::send(socket.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    assert!(
        sent >= 0,
        "sending on worker {pid}'s IPC socket: {}",
        io::Error::last_os_error()
    );
}

fn syscall_fd(call: impl FnOnce() -> libc::c_long) -> io::Result<OwnedFd> {
    let fd = call();
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just installed this fd for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A small deterministic random sequence (xorshift64*), so a failing chaos run can be
/// replayed from the seed it prints.
#[derive(Debug, Clone)]
pub struct Xorshift(u64);

impl Xorshift {
    /// A sequence from `seed` (0 is replaced by a fixed odd constant).
    pub fn new(seed: u64) -> Xorshift {
        Xorshift(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x % n as u64) as usize
    }
}

/// Counts of answers per pid, for reports.
pub fn answers_per_pid(answers: &[Answer]) -> BTreeMap<u32, u64> {
    let mut counts = BTreeMap::new();
    for answer in answers {
        *counts.entry(answer.pid).or_default() += 1;
    }
    counts
}
