//! Node.js workers, with real `node`: every example in `examples/node/` (the Node cluster
//! guide's examples, moved to Steer) run under `steer run -- node ...`, each with the
//! assertion that shows it does what its header says.
//!
//! `cargo xtask setup` installs nodejs when it is missing; these tests fail, not skip,
//! without it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use steer_tests::{
    Cluster, KeepAlive, Load, Signal, SlotState, Value, http_get, http_get_from, must_get, status,
};

/// The examples this file runs; [`every_example_is_run_by_a_test`] keeps it complete.
const EXAMPLES: &[&str] = &[
    "broadcast.mjs",
    "graceful-shutdown.mjs",
    "health-check.mjs",
    "hello.mjs",
    "memory-threshold.mjs",
    "rate-limit.mjs",
    "sticky-sessions.mjs",
    "zero-downtime.mjs",
];

fn examples_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/node")
}

/// The path of an example, after checking that `node` runs.
fn example(name: &str) -> String {
    assert!(EXAMPLES.contains(&name), "{name} is not in EXAMPLES");
    let version = Command::new("node").arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "these tests need node on PATH (cargo xtask setup installs it): {version:?}"
    );
    examples_dir().join(name).display().to_string()
}

/// A cluster of `node` running an example, once every worker answers. Steer counts an
/// external worker ready when it runs, and node may still be starting then: on a loaded
/// machine a cold start can outlast a request's timeout, which is not what these tests
/// are about.
fn node_cluster(args: &[&str], example_name: &str) -> Cluster {
    let script = example(example_name);
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--", "node", &script]);
    let cluster = Cluster::start(&all);
    let workers = args
        .windows(2)
        .find(|pair| pair[0] == "--workers")
        .and_then(|pair| pair[1].parse().ok())
        .expect("node_cluster needs --workers N");
    every_slot_answers(&cluster, workers);
    cluster
}

#[test]
fn every_example_is_run_by_a_test() {
    let found: BTreeSet<String> = std::fs::read_dir(examples_dir())
        .expect("examples/node")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".mjs") || name.ends_with(".js"))
        .collect();
    let tested: BTreeSet<String> = EXAMPLES.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        found, tested,
        "every file in examples/node/ needs a test here (and EXAMPLES lists only files)"
    );
}

#[test]
fn hello_is_answered_by_every_worker() {
    let cluster = node_cluster(&["--workers", "2", "--balance", "round-robin"], "hello.mjs");
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let response = must_get(cluster.listen_addr(), "/");
        let slot = response.worker().expect("X-Steer-Worker");
        assert!(
            response
                .body
                .starts_with(&format!("Hello from worker {slot} (pid ")),
            "{}",
            response.body
        );
        seen.insert(slot);
    }
    assert_eq!(seen, BTreeSet::from([0, 1]));
    cluster.stop_cleanly(Duration::from_secs(10));
}

#[test]
fn node_workers_exchange_a_broadcast_through_process_send() {
    let cluster = node_cluster(
        &["--workers", "3", "--balance", "round-robin"],
        "broadcast.mjs",
    );
    // Ask until each slot has broadcast once.
    let mut greeted = BTreeSet::new();
    for _ in 0..60 {
        greeted.insert(
            must_get(cluster.listen_addr(), "/hello")
                .worker()
                .expect("slot"),
        );
        if greeted.len() == 3 {
            break;
        }
    }
    assert_eq!(
        greeted,
        BTreeSet::from([0, 1, 2]),
        "every slot sent a broadcast"
    );
    // Then until each slot's inbox shows both others' greetings, with `from` set, and not
    // its own.
    let mut complete: BTreeMap<usize, Vec<Value>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while complete.len() < 3 && Instant::now() < deadline {
        let response = must_get(cluster.listen_addr(), "/inbox");
        let slot = response.worker().expect("slot");
        let inbox: Vec<Value> = serde_json::from_str(&response.body).expect("json");
        let senders: BTreeSet<u64> = inbox.iter().filter_map(|m| m["from"].as_u64()).collect();
        for message in &inbox {
            let from = message["from"].as_u64().expect("from is set");
            assert_ne!(from, slot as u64, "a broadcast is not echoed to its sender");
            assert_eq!(
                message["data"]["greeting"],
                format!("hello from {from}").as_str(),
                "the data arrives as it was sent"
            );
        }
        if senders.len() == 2 {
            complete.insert(slot, inbox);
        }
    }
    assert_eq!(
        complete.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2],
        "every worker received every other worker's message: {complete:?}"
    );
    cluster.stop_cleanly(Duration::from_secs(10));
}

/// What may come on top of interval + timeout: the primary's lateness up to a quarter
/// interval is not excused, at each of the two steps that lead to a verdict (sending the
/// ping, judging it), and the two log lines are written a scheduling delay after the facts
/// they record. One interval (1 s in these tests) covers that on a machine at a load
/// average of 17 (measured: 4.73 s there, 3.0 to 4.0 s when it is quieter).
const VERDICT_SLACK: Duration = Duration::from_secs(1);

/// From the worker's log line containing `worker_says` to the primary's `hung` verdict on
/// slot 1, both read from the cluster's log, which both processes write with the same
/// clock: `2026-12-01T20:58:38.729932Z` (the primary) and an ISO time (node's
/// `toISOString()`) first on each line.
fn verdict_delay(cluster: &Cluster, worker_says: &str) -> Duration {
    let log = cluster.wait_for_log("hung", Duration::from_secs(1));
    let time_of = |needle: &dyn Fn(&str) -> bool| {
        log.lines()
            .find(|line| needle(line))
            .and_then(seconds_of_day)
            .unwrap_or_else(|| panic!("no timed log line for the verdict:\n{log}"))
    };
    let stuck = time_of(&|line: &str| line.contains(worker_says));
    let hung = time_of(&|line: &str| line.contains("hung;") && line.contains("slot=1"));
    // The same day unless midnight passed in between.
    let delta = (hung - stuck).rem_euclid(86_400.0);
    Duration::from_secs_f64(delta)
}

/// Waits until slot 1 (whose process was `pid`) is out of steering, and asserts that the
/// primary declared it hung within `bound` + [`VERDICT_SLACK`] of the worker's log line
/// containing `worker_says`. Returns that delay.
fn assert_slot_1_hung_within(
    cluster: &Cluster,
    pid: u32,
    worker_says: &str,
    bound: Duration,
) -> Duration {
    cluster.wait_until("slot 1 out of steering", Duration::from_secs(15), |s| {
        let w = status::worker(s, 1);
        w.state == SlotState::Hung || w.pid.is_some_and(|now| now != pid)
    });
    // Timed from the two processes' own log lines (one clock), not from this test's view,
    // which a loaded machine delays.
    let took = verdict_delay(cluster, worker_says);
    let bound = bound + VERDICT_SLACK;
    assert!(
        took <= bound,
        "hung {took:?} after \"{worker_says}\", more than interval + timeout ({bound:?})"
    );
    took
}

/// Seconds since midnight of a line that starts with an RFC 3339 UTC time (after the
/// primary's tag, for a worker's line).
fn seconds_of_day(line: &str) -> Option<f64> {
    // A worker's line reaches the log behind the primary's tag: `[slot 1 pid 4242] 2026-...`.
    let line = match line.strip_prefix("[slot ") {
        Some(tagged) => tagged.split_once("] ")?.1,
        None => line,
    };
    let time = line.split_whitespace().next()?.split('T').nth(1)?;
    let time = time.trim_end_matches('Z');
    let mut parts = time.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

/// Sends `GET /block?ms=..&slot=..` on new connections until one is held by `slot`.
fn stall(addr: std::net::SocketAddr, slot: usize, ms: u64) -> KeepAlive {
    for _ in 0..100 {
        let mut conn = KeepAlive::connect(addr).expect("connect");
        conn.send_only(&format!("/block?ms={ms}&slot={slot}"))
            .expect("send /block");
        if !conn
            .wait_readable(Duration::from_millis(300))
            .expect("poll")
        {
            return conn;
        }
    }
    panic!("no /block request reached slot {slot}");
}

#[test]
fn a_node_worker_whose_event_loop_blocks_is_replaced_within_interval_plus_timeout() {
    // The defaults: with shorter ones a loaded CI machine can starve a healthy worker
    // for a timeout, which the primary rightly reads as a hang.
    let (interval, timeout) = (Duration::from_secs(1), Duration::from_secs(3));
    let cluster = node_cluster(
        &[
            "--workers",
            "2",
            "--balance",
            "round-robin",
            "--health-interval",
            "1s",
            "--health-timeout",
            "3s",
            "--shutdown-timeout",
            "2s",
        ],
        "health-check.mjs",
    );
    for _ in 0..10 {
        must_get(cluster.listen_addr(), "/");
    }
    // The helper's pongs carry its counters: it answers heartbeats.
    let answered = cluster.wait_for_reported_requests(10, Duration::from_secs(10));
    let before = status::worker(&answered, 1).pid.expect("slot 1 pid");

    let _held = stall(cluster.listen_addr(), 1, 20_000);
    let took = assert_slot_1_hung_within(
        &cluster,
        before,
        "blocking the event loop",
        interval + timeout,
    );
    let bound = interval + timeout + VERDICT_SLACK;
    cluster.wait_until("a ready replacement", Duration::from_secs(10), |s| {
        let w = status::worker(s, 1);
        w.state == SlotState::Ready && w.pid.is_some_and(|pid| pid != before)
    });
    for _ in 0..10 {
        must_get(cluster.listen_addr(), "/");
    }
    eprintln!("blocked loop declared hung {took:?} after it blocked (bound {bound:?})");
}

#[test]
fn a_node_worker_stuck_before_its_first_pong_is_replaced_within_interval_plus_timeout() {
    let (interval, timeout) = (Duration::from_secs(1), Duration::from_secs(3));
    let script = format!(
        "{}/fixtures/node_stuck_after_ready.mjs",
        env!("CARGO_MANIFEST_DIR")
    );
    example("hello.mjs"); // checks that node runs
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--health-interval",
        "1s",
        "--health-timeout",
        "3s",
        "--shutdown-timeout",
        "1s",
        "--",
        "node",
        &script,
    ]);
    let first = status::worker(&cluster.status(), 1)
        .pid
        .expect("slot 1 pid");
    let took = assert_slot_1_hung_within(
        &cluster,
        first,
        "stuck right after ready",
        interval + timeout,
    );
    let bound = interval + timeout + VERDICT_SLACK;
    eprintln!("worker stuck before its first pong declared hung {took:?} after (bound {bound:?})");
}

/// Waits until each of `slots` slots has answered `GET /`, retrying errors while node
/// starts. Clients come from 127.0.1.x, so that `--balance hash` reaches every slot too,
/// and no test's own clients (127.0.0.x) are seen before the test.
fn every_slot_answers(cluster: &Cluster, slots: usize) {
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for client in (1..=250u8).cycle() {
        if seen.len() >= slots {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only slots {seen:?} answered in 30 s"
        );
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 1, client));
        if let Ok(response) = http_get_from(ip, cluster.listen_addr(), "/") {
            seen.extend(response.worker());
        }
    }
}

fn three_rolls_lose_nothing(load: impl Fn(std::net::SocketAddr) -> Load) {
    let cluster = node_cluster(
        &[
            "--workers",
            "3",
            "--balance",
            "kernel",
            "--shutdown-timeout",
            "10s",
        ],
        "zero-downtime.mjs",
    );
    let load = load(cluster.listen_addr());
    load.wait_for_ok(200, Duration::from_secs(20));
    for roll in 1..=3 {
        let took = cluster.rolling_restart(Duration::from_secs(30));
        eprintln!("roll {roll} took {took:?}");
        // Each roll's old generation has drained (and exited) before the next starts.
        cluster.wait_until("the old generation gone", Duration::from_secs(15), |s| {
            status::workers(s).iter().all(|w| w.raw["draining"] == 0)
        });
        load.wait_for_ok(load.ok() + 100, Duration::from_secs(20));
    }
    let report = load.stop();
    eprintln!("across 3 rolling restarts: {report}");
    report.assert_all_succeeded();
    cluster.stop_cleanly(Duration::from_secs(20));
}

#[test]
fn a_node_worker_with_the_helper_loses_no_keep_alive_request_across_three_rolls() {
    three_rolls_lose_nothing(|addr| Load::keep_alive(addr, 2));
}

#[test]
fn a_node_worker_with_the_helper_loses_no_new_connection_request_across_three_rolls() {
    three_rolls_lose_nothing(|addr| Load::new_connections(addr, 2));
}

#[test]
fn graceful_shutdown_finishes_the_requests_in_flight() {
    let cluster = node_cluster(
        &["--workers", "2", "--balance", "round-robin"],
        "graceful-shutdown.mjs",
    );
    // Keep-alive connections with a slow request in flight on each.
    let mut in_flight = Vec::new();
    for _ in 0..4 {
        let mut conn = KeepAlive::connect(cluster.listen_addr()).expect("connect");
        conn.get("/").expect("a first request");
        conn.send_only("/slow?ms=1500").expect("send");
        in_flight.push(conn);
    }
    std::thread::sleep(Duration::from_millis(300));
    let stopped_at = Instant::now();
    cluster.signal(Signal::SIGTERM);
    for conn in &mut in_flight {
        let response = conn
            .read_response()
            .expect("the request in flight is answered");
        assert_eq!(response.status, 200);
        assert!(
            response.body.starts_with("done after 1500 ms"),
            "{}",
            response.body
        );
        assert!(
            response.closes_connection(),
            "a draining worker tells keep-alive clients to close"
        );
    }
    let status = cluster.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", cluster.log());
    let log = cluster.log();
    assert!(
        log.contains("draining (SIGTERM)") || log.contains("draining (drain message)"),
        "{log}"
    );
    assert!(
        !log.contains("killing it"),
        "no worker needed SIGKILL: {log}"
    );
    eprintln!("stopped {:?} after SIGTERM", stopped_at.elapsed());
}

/// For each of `clients` sources, `requests` requests on new connections: how many got
/// 200, and the workers that answered.
fn rate_limited_run(cluster: &Cluster, clients: u8, requests: u32) -> Vec<(u32, BTreeSet<usize>)> {
    (0..clients)
        .map(|c| {
            // Not 127.0.1.x: `every_slot_answers` asked from there.
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 2, 10 + c));
            let mut ok = 0;
            let mut workers = BTreeSet::new();
            for _ in 0..requests {
                let response = http_get_from(ip, cluster.listen_addr(), "/").expect("GET");
                assert!(
                    matches!(response.status, 200 | 429),
                    "{ip}: {}",
                    response.status
                );
                ok += u32::from(response.status == 200);
                workers.insert(response.worker().expect("slot"));
            }
            (ok, workers)
        })
        .collect()
}

/// The guide's Redis rate limiter, in one worker's memory: under `--balance hash` every
/// connection of a client reaches one worker, so each of 16 clients making 25 requests
/// (a new connection each) gets exactly the limit of 10. Under round-robin the same
/// limiter lets a client through up to once per worker per limit: that is what the hash
/// buys.
#[test]
fn an_in_memory_rate_limit_is_exact_per_client_under_hash() {
    const LIMIT: u32 = 10;
    for (balance, exact) in [("hash", true), ("round-robin", false)] {
        let cluster = node_cluster(&["--workers", "4", "--balance", balance], "rate-limit.mjs");
        let runs = rate_limited_run(&cluster, 16, 25);
        eprintln!("{balance}: (200s, workers) per client: {runs:?}");
        if exact {
            for (client, (ok, workers)) in runs.iter().enumerate() {
                assert_eq!(*ok, LIMIT, "client {client} under hash: {runs:?}");
                assert_eq!(workers.len(), 1, "client {client} moved: {runs:?}");
            }
        } else {
            assert!(
                runs.iter().all(|(ok, _)| *ok > LIMIT),
                "under round-robin each worker counts a share: {runs:?}"
            );
        }
        cluster.stop_cleanly(Duration::from_secs(10));
    }
}

#[test]
fn hash_balancing_keeps_each_client_on_its_worker_and_its_session() {
    let cluster = node_cluster(
        &["--workers", "4", "--balance", "hash"],
        "sticky-sessions.mjs",
    );
    let mut slots_used = BTreeSet::new();
    for client in 2..=17u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, client));
        let mut worker = None;
        for visit in 1..=5u64 {
            let response = http_get_from(ip, cluster.listen_addr(), "/visit").expect("GET");
            let body: Value = serde_json::from_str(&response.body).expect("json");
            let slot = response.worker().expect("slot");
            assert_eq!(*worker.get_or_insert(slot), slot, "client {ip} moved");
            assert_eq!(
                body["visits"], visit,
                "client {ip}'s session is kept: {body}"
            );
            slots_used.insert(slot);
        }
    }
    assert!(
        slots_used.len() >= 2,
        "16 clients all hashed to one worker: {slots_used:?}"
    );
    cluster.stop_cleanly(Duration::from_secs(10));
}

#[test]
fn a_node_worker_over_the_memory_threshold_is_replaced_gracefully() {
    let cluster = node_cluster(
        &[
            "--workers",
            "2",
            "--balance",
            "round-robin",
            "--max-memory",
            "160MiB",
            "--health-interval",
            "200ms",
            "--health-timeout",
            "2s",
        ],
        "memory-threshold.mjs",
    );
    let mut conn = KeepAlive::connect(cluster.listen_addr()).expect("connect");
    let slot = conn.get("/").expect("GET").worker().expect("slot");
    let before = status::worker(&cluster.status(), slot);
    let other = 1 - slot;
    let other_pid = status::worker(&cluster.status(), other).pid;
    let load = Load::new_connections(cluster.listen_addr(), 2);
    for _ in 0..2 {
        conn.get("/grow?mib=64").expect("grow");
    }
    let after = cluster.wait_until("the grown worker replaced", Duration::from_secs(15), |s| {
        let w = status::worker(s, slot);
        w.generation > before.generation && w.state == SlotState::Ready
    });
    let report = load.stop();
    report.assert_all_succeeded();
    let replaced = status::worker(&after, slot);
    assert_eq!(
        replaced.restarts, 0,
        "a replacement, not a crash: {after:#}"
    );
    assert_eq!(
        status::worker(&after, other).pid,
        other_pid,
        "the other worker is left alone"
    );
    cluster.wait_for_log("memory", Duration::from_secs(1));
    // The old process drained and exited.
    let old = before.pid.expect("pid");
    steer_tests::wait_for("the grown worker exits", Duration::from_secs(10), || {
        !steer_tests::pid_alive(old)
    });
    assert!(http_get(cluster.listen_addr(), "/").is_ok());
    cluster.stop_cleanly(Duration::from_secs(10));
}

/// A worker on the helper sends a message over the IPC limit (200 KiB): the helper
/// refuses it (`send` returns false, as its docs say) and writes nothing, so the primary
/// sees no protocol violation and the worker is not replaced. The next message goes
/// through, which shows the primary read on past where the big one would have been.
#[test]
fn the_node_helper_refuses_a_message_over_the_limit_and_the_worker_lives_on() {
    let version = Command::new("node").arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "this test needs node on PATH (cargo xtask setup installs it): {version:?}"
    );
    let script = format!("{}/fixtures/node_messages.mjs", env!("CARGO_MANIFEST_DIR"));
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--health-interval",
        "200ms",
        "--",
        "node",
        &script,
    ]);
    every_slot_answers(&cluster, 2);
    let before = cluster.worker_pids();
    let mut conn = KeepAlive::connect(cluster.listen_addr()).expect("connect");
    let big = conn
        .get("/send?bytes=204800&tag=big")
        .expect("GET /send, 200 KiB");
    assert_eq!(big.body.trim(), "false", "an over-limit send is refused");
    let small = conn
        .get("/send?bytes=16&tag=after")
        .expect("GET /send, 16 bytes");
    assert_eq!(small.body.trim(), "true");
    let sender = small.worker().expect("X-Steer-Worker");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = must_get(cluster.listen_addr(), "/inbox");
        if response.worker() != Some(sender) {
            let inbox: Vec<Value> = serde_json::from_str(&response.body).expect("json");
            assert!(
                inbox.iter().all(|m| m["tag"] != "big"),
                "the big one never went: {inbox:?}"
            );
            if inbox.iter().any(|m| m["tag"] == "after") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the message after the refused one did not arrive in 20 s\n{}",
            cluster.log()
        );
    }
    let doc = cluster.status();
    assert_eq!(status::total(&doc, "restarts"), 0, "{doc:#}");
    assert_eq!(status::worker_pids(&doc), before, "the same workers");
    cluster.stop_cleanly(Duration::from_secs(10));
}
