//! Background request load for "no request fails while X happens" tests.
//!
//! ```no_run
//! # use steer_tests::{Cluster, Load, Signal};
//! # use std::time::Duration;
//! let cluster = Cluster::start(&["--workers", "4"]);
//! let load = Load::keep_alive(cluster.listen_addr(), 4);
//! load.wait_for_ok(100, Duration::from_secs(10));
//! cluster.signal(Signal::SIGUSR2);
//! // ... wait until every slot has a new generation ...
//! load.stop().assert_all_succeeded();
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::http::{KeepAlive, Response, http_get};
use crate::process::wait_for;

/// A [`Load`] stops by itself after this long, so a test that forgets to stop it (or hangs)
/// does not hammer the machine forever.
pub const LOAD_LIMIT: Duration = Duration::from_secs(120);

/// How many distinct error messages a [`LoadReport`] keeps.
const MAX_ERRORS: usize = 20;

/// The path every load request asks for.
const PATH: &str = "/";

/// Threads sending `GET /` in a loop until [`stop`](Load::stop)ped. A request succeeds when
/// a complete `200` response arrives; anything else (refused connect, reset, EOF or timeout
/// before a complete response, another status) is a failure.
#[derive(Debug)]
pub struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Tally>>,
}

/// What the load threads share while they run.
#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    deadline: Instant,
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Shared {
    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }
}

impl Load {
    /// `threads` threads, each sending [`http_get`] requests to `addr`: a new connection with
    /// `Connection: close` per request.
    pub fn new_connections(addr: SocketAddr, threads: usize) -> Load {
        Self::start(threads, move |shared| new_connections_loop(addr, shared))
    }

    /// `threads` threads, each sending requests to `addr` over one persistent connection.
    ///
    /// When a response announces `Connection: close`, the thread reconnects for the next
    /// request; that is not a failure. A connection that closes or resets before a response
    /// is complete is a failure, and the thread reconnects.
    pub fn keep_alive(addr: SocketAddr, threads: usize) -> Load {
        Self::start(threads, move |shared| keep_alive_loop(addr, shared))
    }

    fn start(threads: usize, run: impl Fn(&Shared) -> Tally + Send + Clone + 'static) -> Load {
        assert!(threads > 0, "a Load needs at least one thread");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            deadline: Instant::now() + LOAD_LIMIT,
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let threads = (0..threads)
            .map(|i| {
                let shared = Arc::clone(&shared);
                let run = run.clone();
                thread::Builder::new()
                    .name(format!("load-{i}"))
                    .spawn(move || run(&shared))
                    .expect("spawning a load thread")
            })
            .collect();
        Load { shared, threads }
    }

    /// Successful requests so far.
    pub fn ok(&self) -> u64 {
        self.shared.ok.load(Ordering::Relaxed)
    }

    /// Failed requests so far.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` requests succeeded in total: proof the load is flowing
    /// before the test disturbs the cluster.
    ///
    /// # Panics
    ///
    /// After `timeout`, with the success and failure counts.
    pub fn wait_for_ok(&self, n: u64, timeout: Duration) {
        wait_for(
            &format!(
                "{n} successful load requests (have {} ok, {} failed at the start)",
                self.ok(),
                self.failed()
            ),
            timeout,
            || self.ok() >= n,
        );
    }

    /// Stops the threads (each finishes its request in flight) and sums up what they saw.
    ///
    /// # Panics
    ///
    /// If a load thread panicked.
    pub fn stop(mut self) -> LoadReport {
        self.shared.stop.store(true, Ordering::Relaxed);
        let mut report = LoadReport::default();
        for thread in std::mem::take(&mut self.threads) {
            let tally = thread.join().expect("a load thread panicked");
            report.merge(tally);
        }
        report
    }
}

/// Stops and joins the threads if [`stop`](Load::stop) was not called (a failing test).
impl Drop for Load {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn new_connections_loop(addr: SocketAddr, shared: &Shared) -> Tally {
    let mut tally = Tally::default();
    while !shared.should_stop() {
        tally.record(http_get(addr, PATH), shared);
    }
    tally
}

fn keep_alive_loop(addr: SocketAddr, shared: &Shared) -> Tally {
    let mut tally = Tally::default();
    let mut connection: Option<KeepAlive> = None;
    while !shared.should_stop() {
        let client = match connection.take() {
            Some(client) if client.is_open() => client,
            _ => match KeepAlive::connect(addr) {
                Ok(client) => client,
                Err(e) => {
                    tally.record(Err(e), shared);
                    continue;
                }
            },
        };
        let client = connection.insert(client);
        let result = client.get(PATH);
        tally.record(result, shared);
    }
    tally
}

/// One thread's counts.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failed: u64,
    handshake_failures: u64,
    errors: Vec<String>,
    per_worker: BTreeMap<usize, u64>,
}

impl Tally {
    fn record(&mut self, result: io::Result<Response>, shared: &Shared) {
        let error = match result {
            Ok(response) if response.status == 200 => {
                self.ok += 1;
                shared.ok.fetch_add(1, Ordering::Relaxed);
                if let Some(worker) = response.worker() {
                    *self.per_worker.entry(worker).or_default() += 1;
                }
                return;
            }
            Ok(response) => format!(
                "HTTP {} from worker {:?}: {}",
                response.status,
                response.worker(),
                response.body.lines().next().unwrap_or_default()
            ),
            Err(e) => {
                if crate::http::failed_in_handshake(&e) {
                    self.handshake_failures += 1;
                }
                format!("{:?}: {e}", e.kind())
            }
        };
        self.failed += 1;
        shared.failed.fetch_add(1, Ordering::Relaxed);
        if self.errors.len() < MAX_ERRORS && !self.errors.contains(&error) {
            self.errors.push(error);
        }
        // A dead server fails every request at once; do not spin on it.
        thread::sleep(Duration::from_millis(5));
    }
}

/// What a [`Load`] saw from start to [`stop`](Load::stop).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Requests answered with a complete `200`.
    pub ok: u64,
    /// Requests that failed in any way.
    pub failed: u64,
    /// Of `failed`, those whose connection failed before the request was sent (refused or
    /// reset during the TCP handshake): no server ever saw them.
    pub handshake_failures: u64,
    /// The first distinct failure messages (at most 20).
    pub errors: Vec<String>,
    /// Successful requests per slot, from the `X-Steer-Worker` header.
    pub per_worker: BTreeMap<usize, u64>,
}

impl LoadReport {
    fn merge(&mut self, tally: Tally) {
        self.ok += tally.ok;
        self.failed += tally.failed;
        self.handshake_failures += tally.handshake_failures;
        for error in tally.errors {
            if self.errors.len() < MAX_ERRORS && !self.errors.contains(&error) {
                self.errors.push(error);
            }
        }
        for (worker, count) in tally.per_worker {
            *self.per_worker.entry(worker).or_default() += count;
        }
    }

    /// Requests sent in all.
    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }

    /// Asserts that requests flowed and that none failed after its connection was
    /// established: no request a worker could have seen was lost. Connections reset during
    /// the handshake are allowed up to `max_handshake_failures`.
    ///
    /// # Panics
    ///
    /// If a request failed after its handshake, too many failed in it, or none succeeded.
    pub fn assert_nothing_accepted_was_lost(&self, max_handshake_failures: u64) {
        assert!(
            self.ok > 0
                && self.failed == self.handshake_failures
                && self.handshake_failures <= max_handshake_failures,
            "expected no request lost after its handshake, and at most {max_handshake_failures} \
             handshake failures: {self}"
        );
    }

    /// Asserts that requests flowed and none failed.
    ///
    /// # Panics
    ///
    /// If any request failed or none succeeded, showing the report.
    pub fn assert_all_succeeded(&self) {
        assert!(
            self.failed == 0 && self.ok > 0,
            "expected every load request to succeed: {self}"
        );
    }
}

/// One line of counts, then the per-slot split and the distinct errors.
impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ok, {} failed ({} in the handshake); per worker {:?}",
            self.ok, self.failed, self.handshake_failures, self.per_worker
        )?;
        for error in &self.errors {
            write!(f, "\n  error: {error}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::test_server::{Behaviour, TestServer};

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn new_connections_load_counts_successes_per_worker() {
        let server = TestServer::start(Behaviour::Serve {
            per_connection: None,
        });
        let load = Load::new_connections(server.addr(), 2);
        load.wait_for_ok(50, 10 * SECOND);
        let report = load.stop();
        report.assert_all_succeeded();
        assert_eq!(report.per_worker.get(&TestServer::WORKER), Some(&report.ok));
    }

    #[test]
    fn an_announced_close_between_requests_is_not_a_failure() {
        let server = TestServer::start(Behaviour::Serve {
            per_connection: Some(3),
        });
        let load = Load::keep_alive(server.addr(), 2);
        load.wait_for_ok(60, 10 * SECOND);
        load.stop().assert_all_succeeded();
    }

    #[test]
    fn an_unannounced_close_on_a_kept_alive_connection_is_a_failure() {
        let server = TestServer::start(Behaviour::CloseUnannounced { after: 2 });
        let load = Load::keep_alive(server.addr(), 1);
        wait_for("a failed request", 10 * SECOND, || load.failed() > 0);
        let report = load.stop();
        assert!(report.ok >= 2, "{report}");
        assert!(report.failed > 0, "{report}");
        assert!(!report.errors.is_empty(), "{report}");
    }

    #[test]
    fn a_reset_mid_request_is_a_failure() {
        let server = TestServer::start(Behaviour::Reset);
        let load = Load::new_connections(server.addr(), 1);
        wait_for("failed requests", 10 * SECOND, || load.failed() >= 3);
        let report = load.stop();
        assert_eq!(report.ok, 0, "{report}");
        let panic = std::panic::catch_unwind(|| report.assert_all_succeeded());
        assert!(panic.is_err(), "a failing load must not pass");
    }

    #[test]
    fn refused_connections_keep_distinct_errors_only() {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, crate::free_port()));
        let load = Load::keep_alive(addr, 3);
        wait_for("failed requests", 10 * SECOND, || load.failed() >= 10);
        let report = load.stop();
        assert_eq!(report.errors.len(), 1, "{report}");
        assert!(report.errors[0].contains("ConnectionRefused"), "{report}");
        assert_eq!(report.total(), report.failed);
    }

    #[test]
    fn dropping_a_load_stops_its_threads() {
        let server = TestServer::start(Behaviour::Serve {
            per_connection: None,
        });
        let load = Load::new_connections(server.addr(), 1);
        let shared = Arc::clone(&load.shared);
        drop(load);
        let settled = shared.ok.load(Ordering::Relaxed);
        assert_eq!(Arc::strong_count(&shared), 1, "threads were joined");
        assert_eq!(shared.ok.load(Ordering::Relaxed), settled);
    }
}
