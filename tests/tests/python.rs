//! Python workers on the helper module `contrib/python/steer.py`, over the stream IPC
//! channel: messages between workers, and a drain that loses no keep-alive request.
//! (`external.rs` has the heartbeat one: a stalled loop is replaced.)

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use steer_tests::{Cluster, KeepAlive, Load, Value, must_get, status};

fn python_app() -> String {
    format!("{}/fixtures/python_app.py", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn python_workers_on_the_helper_exchange_messages_and_answer_pings() {
    let script = python_app();
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--health-interval",
        "200ms",
        "--health-timeout",
        "2s",
        "--",
        "python3",
        &script,
    ]);
    let mut greeted = BTreeSet::new();
    for _ in 0..40 {
        greeted.insert(
            must_get(cluster.listen_addr(), "/hello")
                .worker()
                .expect("slot"),
        );
        if greeted.len() == 2 {
            break;
        }
    }
    assert_eq!(greeted, BTreeSet::from([0, 1]));
    let mut heard: BTreeMap<usize, Vec<Value>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while heard.len() < 2 && Instant::now() < deadline {
        // Greet again each round: the primary relays only to workers that have spoken on
        // their channel, and an external worker counts as started (and takes
        // connections) before its helper's `ready`, so a first greeting can find its
        // neighbour not yet listening to the channel.
        must_get(cluster.listen_addr(), "/hello");
        let response = must_get(cluster.listen_addr(), "/inbox");
        let slot = response.worker().expect("slot");
        let inbox: Vec<Value> = serde_json::from_str(&response.body).expect("json");
        let other = 1 - slot as u64;
        if inbox.iter().any(|m| {
            m["from"] == other && m["data"]["greeting"] == format!("hello from {other}").as_str()
        }) {
            heard.insert(slot, inbox);
        }
    }
    assert_eq!(heard.len(), 2, "each worker heard the other: {heard:?}");
    // The pongs carry the helper's counters.
    let doc = cluster.wait_for_reported_requests(4, Duration::from_secs(10));
    for w in status::workers(&doc) {
        assert!(
            w.raw["health_ms"].as_u64().is_some_and(|ms| ms < 2000),
            "{doc:#}"
        );
    }
    cluster.stop_cleanly(Duration::from_secs(10));
}

#[test]
fn a_python_worker_on_the_helper_loses_no_keep_alive_request_across_a_roll() {
    let script = python_app();
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "kernel",
        "--",
        "python3",
        &script,
    ]);
    // An external worker counts as ready when it runs; start the load once both answer.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = BTreeSet::new();
    while seen.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "only slots {seen:?} answered in 30 s"
        );
        if let Ok(response) = steer_tests::http_get(cluster.listen_addr(), "/") {
            seen.extend(response.worker());
        }
    }
    // Two clients: Python serves with one GIL, and this test is about drain, not load.
    let load = Load::keep_alive(cluster.listen_addr(), 2);
    load.wait_for_ok(200, Duration::from_secs(20));
    cluster.rolling_restart(Duration::from_secs(30));
    cluster.wait_until("the old generation gone", Duration::from_secs(15), |s| {
        status::workers(s).iter().all(|w| w.raw["draining"] == 0)
    });
    load.wait_for_ok(load.ok() + 100, Duration::from_secs(20));
    let report = load.stop();
    eprintln!("python, keep-alive, one roll: {report}");
    report.assert_all_succeeded();
    cluster.stop_cleanly(Duration::from_secs(15));
}

/// The helper refuses a message over the IPC limit (`send` returns False, as its docs
/// say) and writes nothing: the worker is not replaced, and the next message goes through.
#[test]
fn the_python_helper_refuses_a_message_over_the_limit_and_the_worker_lives_on() {
    let script = python_app();
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--health-interval",
        "200ms",
        "--",
        "python3",
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
            let tags: Vec<&Value> = inbox.iter().map(|m| &m["data"]["tag"]).collect();
            assert!(!tags.contains(&&Value::from("big")), "{tags:?}");
            if tags.contains(&&Value::from("after")) {
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

/// With one connection, keep-alive must not be slower than a new connection per request
/// (it was 40 ms a request: Nagle's algorithm holding the body until the client's delayed
/// ACK of the headers). Both are measured side by side, in alternating rounds, so the
/// machine's load weighs on both alike; the test compares rates, not times.
#[test]
fn the_python_helpers_keep_alive_is_at_least_half_as_fast_as_connection_close() {
    const ROUNDS: usize = 4;
    const PER_ROUND: usize = 25;
    let script = python_app();
    let cluster = Cluster::start(&["--workers", "1", "--", "python3", &script]);
    every_slot_answers(&cluster, 1);
    let addr = cluster.listen_addr();
    // Each kind's fastest round: a round that the machine's load stalled (other test
    // binaries run beside this one) says nothing about the helper.
    let mut keep_alive = Duration::MAX;
    let mut close = Duration::MAX;
    let mut conn = KeepAlive::connect(addr).expect("connect");
    for _ in 0..ROUNDS {
        let at = Instant::now();
        for _ in 0..PER_ROUND {
            let response = conn.get("/").expect("keep-alive GET /");
            assert_eq!(response.status, 200);
        }
        keep_alive = keep_alive.min(at.elapsed());
        let at = Instant::now();
        for _ in 0..PER_ROUND {
            assert_eq!(must_get(addr, "/").status, 200);
        }
        close = close.min(at.elapsed());
    }
    let requests = PER_ROUND as f64;
    let keep_alive_rate = requests / keep_alive.as_secs_f64();
    let close_rate = requests / close.as_secs_f64();
    eprintln!(
        "python helper, one connection, best of {ROUNDS} rounds: keep-alive \
         {keep_alive_rate:.0} req/s, Connection: close {close_rate:.0} req/s"
    );
    assert!(
        keep_alive_rate >= close_rate / 2.0,
        "keep-alive {keep_alive_rate:.0} req/s against {close_rate:.0} req/s with Connection: close"
    );
    cluster.stop_cleanly(Duration::from_secs(10));
}

fn every_slot_answers(cluster: &Cluster, slots: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = BTreeSet::new();
    while seen.len() < slots {
        assert!(
            Instant::now() < deadline,
            "only slots {seen:?} answered in 30 s"
        );
        if let Ok(response) = steer_tests::http_get(cluster.listen_addr(), "/") {
            seen.extend(response.worker());
        }
    }
}
