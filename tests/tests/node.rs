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

fn node_cluster(args: &[&str], example_name: &str) -> Cluster {
    let script = example(example_name);
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--", "node", &script]);
    Cluster::start(&all)
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

/// Sends `GET /block?ms=..&slot=..` on new connections until one is held by `slot`.
fn stall(addr: std::net::SocketAddr, slot: usize, ms: u64) -> (KeepAlive, Instant) {
    for _ in 0..100 {
        let mut conn = KeepAlive::connect(addr).expect("connect");
        let at = Instant::now();
        conn.send_only(&format!("/block?ms={ms}&slot={slot}"))
            .expect("send /block");
        if !conn
            .wait_readable(Duration::from_millis(300))
            .expect("poll")
        {
            return (conn, at);
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

    let (_held, blocked_at) = stall(cluster.listen_addr(), 1, 20_000);
    let replaced = cluster.wait_until(
        "slot 1 out of steering after its loop blocked",
        Duration::from_secs(10),
        |s| {
            let w = status::worker(s, 1);
            w.state == SlotState::Hung || w.pid.is_some_and(|pid| pid != before)
        },
    );
    let took = blocked_at.elapsed();
    // One status poll of slack on top of the bound the contract states.
    let bound = interval + timeout + steer_tests::STATUS_POLL_INTERVAL * 2;
    assert!(
        took <= bound,
        "replaced after {took:?}, more than interval + timeout ({bound:?}): {replaced:#}"
    );
    cluster.wait_for_log("hung", Duration::from_secs(1));
    cluster.wait_until("a ready replacement", Duration::from_secs(10), |s| {
        let w = status::worker(s, 1);
        w.state == SlotState::Ready && w.pid.is_some_and(|pid| pid != before)
    });
    for _ in 0..10 {
        must_get(cluster.listen_addr(), "/");
    }
    eprintln!("blocked loop out of steering after {took:?} (bound {bound:?})");
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
    three_rolls_lose_nothing(|addr| Load::keep_alive(addr, 4));
}

#[test]
fn a_node_worker_with_the_helper_loses_no_new_connection_request_across_three_rolls() {
    three_rolls_lose_nothing(|addr| Load::new_connections(addr, 4));
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
