//! Python workers on the helper module `contrib/python/steer.py`, over the stream IPC
//! channel: messages between workers, and a drain that loses no keep-alive request.
//! (`external.rs` has the heartbeat one: a stalled loop is replaced.)

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use steer_tests::{Cluster, Load, Value, must_get, status};

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
