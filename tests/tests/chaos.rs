//! Chaos: faults injected into a serving cluster under continuous load, and what each
//! one costs.
//!
//! One cluster of 4 demo workers under `round-robin` carries new-connection and
//! keep-alive load (loopback only) while, one after another: nothing happens (the
//! baseline), a worker is frozen with SIGSTOP (hung) and thawed later, a random worker is
//! SIGKILLed every 300 ms for 10 s, a worker grows past `--max-memory`, a worker's IPC
//! carries garbage, and SIGUSR2 rolling restarts run back to back.
//!
//! For each fault the suite prints a table row: requests answered, failed requests split
//! into "accepted by the dying worker" (their connection died with the process:
//! unavoidable) and "queued or new" (must be zero), the time until the slot was `ready`
//! again, and the p99 latency. The faults run in sequence in one test so they do not
//! compete for the two CPUs with each other.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use nix::sys::signal::kill;
use nix::unistd::Pid;
use steer_tests::chaos::{
    ChaosLoad, ChaosReport, Xorshift, accepted_client_ports, send_on_worker_ipc,
};
use steer_tests::{Cluster, Signal, SlotState, http_get, status};

const HEALTH_INTERVAL: Duration = Duration::from_millis(200);
const HEALTH_TIMEOUT: Duration = Duration::from_millis(800);
const NEW_CONNECTION_THREADS: usize = 3;
const KEEP_ALIVE_THREADS: usize = 3;
/// How long the baseline and the hung-worker runs last.
const RUN: Duration = Duration::from_secs(8);
/// How long a hung worker stays frozen before it is thawed.
const FROZEN: Duration = Duration::from_secs(2);
/// SIGKILL chaos: how long, and how often.
const KILL_RUN: Duration = Duration::from_secs(10);
const KILL_EVERY: Duration = Duration::from_millis(300);
/// A worker ready this long has reset its slot's backoff (the primary's rule is 1 s).
const STABLE: Duration = Duration::from_millis(1_100);
/// Longest a killed slot may take to be ready again once its backoff was reset.
const KILL_RECOVERY: Duration = Duration::from_secs(1);

/// One row of the report.
#[derive(Debug)]
struct Row {
    fault: &'static str,
    ok: u64,
    unavoidable: usize,
    avoidable: usize,
    recovery: Vec<Duration>,
    p99_ms: f64,
}

impl Row {
    fn new(fault: &'static str, report: &ChaosReport, unavoidable: usize, avoidable: usize) -> Row {
        Row {
            fault,
            ok: report.ok(),
            unavoidable,
            avoidable,
            recovery: Vec::new(),
            p99_ms: report.quantile_ms(0.99),
        }
    }
}

/// The cluster, and everything the faults found wrong.
struct Suite {
    cluster: Cluster,
    violations: Vec<String>,
}

impl Suite {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.violations.push(what.into());
        }
    }

    fn load(&self) -> ChaosLoad {
        let load = ChaosLoad::start(
            self.cluster.listen_addr(),
            NEW_CONNECTION_THREADS,
            KEEP_ALIVE_THREADS,
        );
        load.wait_for_more(200, Duration::from_secs(10));
        load
    }

    fn pid_of(&self, slot: usize) -> u32 {
        status::worker(&self.cluster.status(), slot)
            .pid
            .unwrap_or_else(|| panic!("slot {slot} has no process"))
    }

    /// Polls `/status` until `slot` is ready with a process other than `old`; returns the
    /// time since `since`.
    fn wait_replaced(&self, slot: usize, old: u32, since: Instant, timeout: Duration) -> Duration {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(status) = self.cluster.try_status() {
                let w = status::worker(&status, slot);
                if w.state == SlotState::Ready && w.pid.is_some_and(|pid| pid != old) {
                    return since.elapsed();
                }
            }
            assert!(
                Instant::now() < deadline,
                "slot {slot} (pid {old}) not replaced within {timeout:?}\n{}",
                self.cluster.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn failures_must_be_zero(&mut self, fault: &str, report: &ChaosReport) -> Row {
        let row = Row::new("", report, 0, report.failures.len());
        self.check(
            report.failures.is_empty(),
            format!(
                "{fault}: {} failed requests: {:?}",
                report.failures.len(),
                first(report)
            ),
        );
        row
    }
}

fn first(report: &ChaosReport) -> Vec<String> {
    report
        .failures
        .iter()
        .take(5)
        .map(|f| f.error.clone())
        .collect()
}

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap_or_else(|e| panic!("kill -{sig} {pid}: {e}"));
}

/// SIGSTOP, then waits until the process is really stopped: the signal is acted on when
/// the process next runs, and until then it may still accept connections.
fn freeze(pid: u32) {
    signal(pid, Signal::SIGSTOP);
    steer_tests::wait_for(
        &format!("pid {pid} to stop"),
        Duration::from_secs(2),
        || matches!(steer_tests::process_state(pid), Some('T' | 't') | None),
    );
}

#[test]
fn chaos_loses_no_request_that_a_dying_worker_had_not_accepted() {
    let health_interval = format!("{}ms", HEALTH_INTERVAL.as_millis());
    let health_timeout = format!("{}ms", HEALTH_TIMEOUT.as_millis());
    let cluster = Cluster::start(&[
        "--workers",
        "4",
        "--balance",
        "round-robin",
        "--health-interval",
        &health_interval,
        "--health-timeout",
        &health_timeout,
        "--shutdown-timeout",
        "3s",
        "--max-restarts",
        "1000",
        "--max-memory",
        "64MiB",
        "--demo-faults",
    ]);
    let mut suite = Suite {
        cluster,
        violations: Vec::new(),
    };
    let mut rows = Vec::new();

    let baseline = {
        let load = suite.load();
        std::thread::sleep(RUN);
        let report = load.stop();
        let mut row = suite.failures_must_be_zero("baseline", &report);
        row.fault = "none (baseline)";
        rows.push(row);
        report.quantile_ms(0.99)
    };
    rows.push(hung_worker(&mut suite, baseline));
    rows.push(sigkill_every_300ms(&mut suite));
    rows.push(memory_limit(&mut suite));
    rows.push(garbage_on_ipc(&mut suite));
    rows.push(rolling_restarts(&mut suite));

    let mut table = String::from(
        "\n| fault | requests ok | failed: accepted by the dying worker | failed: queued or new | back to ready (max) | p99 |\n|---|---|---|---|---|---|\n",
    );
    for row in &rows {
        let recovery = row.recovery.iter().max().map_or("-".to_owned(), |d| {
            format!("{} ms ({} events)", d.as_millis(), row.recovery.len())
        });
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {:.1} ms |",
            row.fault, row.ok, row.unavoidable, row.avoidable, recovery, row.p99_ms
        );
    }
    eprintln!("{table}");
    suite.cluster.stop_cleanly(Duration::from_secs(15));
    assert!(
        suite.violations.is_empty(),
        "chaos violations:\n{}\n{table}",
        suite.violations.join("\n")
    );
}

/// SIGSTOP one worker: within health-interval + health-timeout it must be out of
/// steering (no new connection reaches it), a replacement ready, no request lost, and
/// p99 over the run under twice the baseline's.
fn hung_worker(suite: &mut Suite, baseline_p99_ms: f64) -> Row {
    let slot = 1;
    let load = suite.load();
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let victim = suite.pid_of(slot);
    freeze(victim);
    let frozen_at = Instant::now();
    let accepted = accepted_client_ports(victim);
    // Out of steering: the slot is `hung` or already has its replacement.
    let left_after = loop {
        if let Ok(status) = suite.cluster.try_status() {
            let w = status::worker(&status, slot);
            if w.state != SlotState::Ready || w.pid != Some(victim) {
                break frozen_at.elapsed();
            }
        }
        assert!(
            frozen_at.elapsed() < Duration::from_secs(5),
            "never declared hung"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let left_at = frozen_at + left_after;
    let recovery = suite.wait_replaced(slot, victim, frozen_at, Duration::from_secs(5));
    std::thread::sleep(FROZEN.saturating_sub(frozen_at.elapsed()));
    signal(victim, Signal::SIGCONT);
    std::thread::sleep(RUN.saturating_sub(started.elapsed()));
    let report = load.stop();

    let budget = HEALTH_INTERVAL + HEALTH_TIMEOUT;
    suite.check(
        left_after <= budget + Duration::from_millis(150),
        format!("hung: out of steering after {left_after:?}, budget {budget:?}"),
    );
    let late = report
        .answers
        .iter()
        .filter(|a| a.new_connection && a.pid == victim && a.opened_at > left_at)
        .count();
    suite.check(
        late == 0,
        format!("hung: {late} new connections opened after it left steering reached it"),
    );
    let (unavoidable, avoidable) = report.split_failures(&[(frozen_at, accepted)]);
    suite.check(
        avoidable.is_empty(),
        format!(
            "hung: {} queued or new requests failed: {avoidable:?}",
            avoidable.len()
        ),
    );
    let p99 = report.quantile_ms(0.99);
    suite.check(
        p99 <= 2.0 * baseline_p99_ms.max(1.0),
        format!("hung: p99 {p99:.1} ms over twice the baseline's {baseline_p99_ms:.1} ms"),
    );
    eprintln!(
        "hung worker: out of steering after {} ms, replacement ready after {} ms",
        left_after.as_millis(),
        recovery.as_millis()
    );
    let mut row = Row::new(
        "SIGSTOP (hung) 2 s, then SIGCONT",
        &report,
        unavoidable.len(),
        avoidable.len(),
    );
    row.recovery.push(recovery);
    row
}

/// Every 300 ms for 10 s, SIGKILL a random worker that has served for over a second
/// (so its slot's backoff is reset). Each slot must be ready again within 1 s, and only
/// requests on connections the victim had accepted may fail.
fn sigkill_every_300ms(suite: &mut Suite) -> Row {
    let seed = u64::from(std::process::id()) ^ 0x5eed;
    eprintln!("SIGKILL chaos seed: {seed}");
    let mut random = Xorshift::new(seed);
    let load = suite.load();
    let started = Instant::now();
    let mut ready_since: BTreeMap<u32, Instant> = BTreeMap::new();
    let mut deaths: Vec<(Instant, BTreeSet<u16>)> = Vec::new();
    // (slot, pid, killed at) until the slot is ready with another pid.
    let mut waiting: Vec<(usize, u32, Instant)> = Vec::new();
    let mut recovery = Vec::new();
    let mut next_kill = started;
    while started.elapsed() < KILL_RUN || !waiting.is_empty() {
        let now = Instant::now();
        let Ok(status) = suite.cluster.try_status() else {
            continue;
        };
        let workers = status::workers(&status);
        for w in &workers {
            if let (SlotState::Ready, Some(pid)) = (&w.state, w.pid) {
                ready_since.entry(pid).or_insert(now);
            }
        }
        waiting.retain(|&(slot, pid, at)| {
            let w = &workers[slot];
            let back = w.state == SlotState::Ready && w.pid.is_some_and(|p| p != pid);
            if back {
                recovery.push(now.duration_since(at));
            }
            !back
        });
        if started.elapsed() < KILL_RUN && now >= next_kill {
            next_kill += KILL_EVERY;
            let stable: Vec<(usize, u32)> = workers
                .iter()
                .filter(|w| w.state == SlotState::Ready)
                .filter_map(|w| Some((w.slot, w.pid?)))
                .filter(|(_, pid)| {
                    ready_since
                        .get(pid)
                        .is_some_and(|t| now.duration_since(*t) >= STABLE)
                })
                .collect();
            if !stable.is_empty() {
                let (slot, pid) = stable[random.below(stable.len())];
                freeze(pid);
                let ports = accepted_client_ports(pid);
                signal(pid, Signal::SIGKILL);
                let at = Instant::now();
                deaths.push((at, ports));
                waiting.push((slot, pid, at));
                ready_since.remove(&pid);
            }
        }
        assert!(
            started.elapsed() < KILL_RUN + Duration::from_secs(10),
            "slots never came back: {waiting:?}\n{}",
            suite.cluster.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    eprintln!(
        "SIGKILL: steering counters after the run: {}",
        suite.cluster.status()["steering"]
    );
    let (unavoidable, avoidable) = report.split_failures(&deaths);
    suite.check(
        deaths.len() >= 10,
        format!("SIGKILL: only {} kills in {KILL_RUN:?}", deaths.len()),
    );
    suite.check(
        avoidable.is_empty(),
        format!(
            "SIGKILL: {} queued or new requests failed: {avoidable:?}",
            avoidable.len()
        ),
    );
    let slowest = recovery.iter().max().copied().unwrap_or_default();
    suite.check(
        slowest <= KILL_RECOVERY,
        format!("SIGKILL: a slot took {slowest:?} to be ready again (limit {KILL_RECOVERY:?})"),
    );
    let mut row = Row::new(
        "SIGKILL a random worker every 300 ms, 10 s",
        &report,
        unavoidable.len(),
        avoidable.len(),
    );
    row.recovery = recovery;
    row
}

/// `/alloc?mb=100` on one worker with `--max-memory 64MiB`: it is replaced gracefully.
fn memory_limit(suite: &mut Suite) -> Row {
    let load = suite.load();
    let before: BTreeMap<usize, u32> = suite.cluster.worker_pids().into_iter().collect();
    let grown_at = Instant::now();
    let response = http_get(suite.cluster.listen_addr(), "/alloc?mb=100").expect("GET /alloc");
    assert_eq!(response.status, 200, "{}", response.body);
    let slot = response.worker().expect("X-Steer-Worker");
    let recovery = suite.wait_replaced(slot, before[&slot], grown_at, Duration::from_secs(5));
    load.wait_for_more(500, Duration::from_secs(10));
    let report = load.stop();
    let mut row = suite.failures_must_be_zero("max-memory", &report);
    row.fault = "RSS past --max-memory (/alloc?mb=100)";
    row.recovery.push(recovery);
    row
}

/// Garbage on a worker's IPC socket: the primary replaces it gracefully.
fn garbage_on_ipc(suite: &mut Suite) -> Row {
    let slot = 2;
    let load = suite.load();
    let victim = suite.pid_of(slot);
    let sent_at = Instant::now();
    // fd 3 is a demo worker's end of its IPC socket.
    send_on_worker_ipc(victim, 3, b"\x00this is not json\xff");
    let recovery = suite.wait_replaced(slot, victim, sent_at, Duration::from_secs(5));
    load.wait_for_more(500, Duration::from_secs(10));
    let report = load.stop();
    suite
        .cluster
        .wait_for_log("protocol violation", Duration::from_secs(1));
    let mut row = suite.failures_must_be_zero("garbage on IPC", &report);
    row.fault = "garbage on a worker's IPC socket";
    row.recovery.push(recovery);
    row
}

/// Three SIGUSR2 rolling restarts, each sent as soon as the previous one completed.
fn rolling_restarts(suite: &mut Suite) -> Row {
    let load = suite.load();
    let mut recovery = Vec::new();
    for _ in 0..3 {
        recovery.push(suite.cluster.rolling_restart(Duration::from_secs(20)));
    }
    let report = load.stop();
    let mut row = suite.failures_must_be_zero("rolling restarts", &report);
    row.fault = "3 SIGUSR2 rolling restarts back to back";
    row.recovery = recovery;
    row
}
