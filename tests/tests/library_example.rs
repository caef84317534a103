//! The library example `runtime/examples/hyper_cluster.rs` (tokio + hyper workers under a
//! Steer primary) run as a real cluster: its workers serve, its primary hears from them,
//! and SIGTERM drains and stops everything.
//!
//! This test builds nothing: run `cargo build -p steer --examples` first, or point
//! `STEER_EXAMPLE_HYPER` at the executable.

use std::collections::BTreeMap;
use std::env;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use steer_tests::{Cluster, KeepAlive, Signal, http_get, pid_alive, status};

/// Overrides where the example executable is looked for.
const EXAMPLE_ENV: &str = "STEER_EXAMPLE_HYPER";
/// New connections tried before giving up on seeing both workers answer.
const MAX_CONNECTIONS: usize = 200;
/// How long the primary may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The `hyper_cluster` example executable: `$STEER_EXAMPLE_HYPER`, or
/// `target/<profile>/examples/hyper_cluster` next to this test's `target/<profile>/deps/`.
fn example_bin() -> PathBuf {
    example_named("hyper_cluster", env::var_os(EXAMPLE_ENV))
}

/// `target/<profile>/examples/<name>` (or `overridden`, if set).
fn example_named(name: &str, overridden: Option<std::ffi::OsString>) -> PathBuf {
    if let Some(path) = overridden {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{EXAMPLE_ENV}={} does not name a file",
            path.display()
        );
        return path;
    }
    let exe = env::current_exe().expect("locating the running test executable (current_exe)");
    let dir = exe.parent().unwrap_or(Path::new("."));
    let profile_dir = if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let bin = profile_dir.join("examples").join(name);
    assert!(
        bin.is_file(),
        "the {name} example is missing at {}: run `cargo build -p steer --examples` \
         first (with --release for a release test run), or set {EXAMPLE_ENV}",
        bin.display()
    );
    bin
}

#[test]
fn hyper_library_workers_serve_and_drain_on_sigterm() {
    let started = Instant::now();
    let cluster = Cluster::start_program(&example_bin(), &["--workers", "2"]);
    let ready = cluster.status();
    let pids: BTreeMap<usize, u32> = status::worker_pids(&ready).into_iter().collect();
    assert_eq!(
        pids.keys().copied().collect::<Vec<_>>(),
        [0, 1],
        "{ready:#}"
    );

    // Both workers answer, each with its slot and its own pid.
    let mut answered: BTreeMap<usize, u64> = BTreeMap::new();
    for _ in 0..MAX_CONNECTIONS {
        let response = http_get(cluster.listen_addr(), "/").expect("GET / on a new connection");
        let slot = response.worker().expect("a numeric X-Steer-Worker header");
        let expected = format!("hello from hyper worker {slot} (pid {})\n", pids[&slot]);
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, expected.as_str())
        );
        *answered.entry(slot).or_default() += 1;
        if answered.len() == 2 {
            break;
        }
    }
    assert_eq!(
        answered.len(),
        2,
        "only slots {answered:?} answered over {MAX_CONNECTIONS} new connections"
    );

    // The workers' WorkerStats reach the primary with the next heartbeats.
    cluster.wait_until(
        "/status counts the connections each worker accepted",
        Duration::from_secs(10),
        |s| {
            answered
                .iter()
                .all(|(&slot, &count)| status::worker(s, slot).accepted >= count)
        },
    );

    // Each worker's `send` reached the primary's on_message hook.
    for slot in 0..2 {
        cluster.wait_for_log(
            &format!(r#"primary received {{"hello":{slot}}} from worker {slot}"#),
            Duration::from_secs(10),
        );
    }

    // An idle keep-alive connection must not hold up the drain: hyper's graceful shutdown
    // closes it.
    let mut keep_alive = KeepAlive::connect(cluster.listen_addr()).expect("keep-alive connect");
    let first = keep_alive.get("/").expect("keep-alive GET /");
    assert_eq!(first.status, 200, "{first}");
    assert!(
        keep_alive.is_open(),
        "hyper closed a keep-alive connection: {first}"
    );

    let stopping = Instant::now();
    cluster.signal(Signal::SIGTERM);
    let exit = cluster.wait_exit(STOP_TIMEOUT);
    let stop_took = stopping.elapsed();
    assert_eq!(
        exit.code(),
        Some(0),
        "hyper_cluster stopped with {exit}\n{}",
        cluster.log()
    );
    let alive: Vec<u32> = pids.values().copied().filter(|&p| pid_alive(p)).collect();
    assert!(
        alive.is_empty(),
        "workers {alive:?} outlived their primary ({pids:?})"
    );
    assert!(
        keep_alive.get("/").is_err(),
        "the keep-alive connection still answered after the cluster stopped"
    );
    eprintln!(
        "answers per slot {answered:?}; stop took {stop_took:?}; test took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_library_worker_whose_loop_stalls_is_declared_hung_and_replaced() {
    let bin = example_named("blocking_cluster", None);
    let cluster = Cluster::start_program(
        &bin,
        &[
            "--workers",
            "2",
            "--balance",
            "round-robin",
            "--health-interval",
            "100ms",
            "--health-timeout",
            "500ms",
        ],
    );
    for _ in 0..10 {
        http_get(cluster.listen_addr(), "/").expect("hello");
    }
    // Heartbeats come back with the counters the worker keeps.
    cluster.wait_for_reported_requests(10, Duration::from_secs(5));
    let before: BTreeMap<usize, u32> = cluster.worker_pids().into_iter().collect();
    let addr = cluster.listen_addr();
    let stalled = std::thread::spawn(move || {
        steer_tests::http_get_timeout(addr, "/block?ms=4000", Duration::from_secs(10))
    });
    let after = cluster.wait_until(
        "one slot replaced after its loop stalled",
        Duration::from_secs(3),
        |s| {
            let now: BTreeMap<usize, u32> = status::worker_pids(s).into_iter().collect();
            status::all_ready(s)
                && now
                    .iter()
                    .filter(|(slot, pid)| before[slot] != **pid)
                    .count()
                    == 1
        },
    );
    cluster.wait_for_log("hung", Duration::from_secs(1));
    // The stalled worker still answers the request it was stuck in, once it wakes.
    let answer = stalled.join().expect("stalled request thread");
    assert_eq!(answer.expect("the stalled request is answered").status, 200);
    assert_eq!(status::workers(&after).len(), 2);
    for _ in 0..10 {
        http_get(cluster.listen_addr(), "/").expect("served after the replacement");
    }
    cluster.stop_cleanly(STOP_TIMEOUT);
}

/// The README's hook, `control.broadcast(data)`, with one worker that floods it: what
/// reaches the hook is paid from the flooding worker's relay budget, so the fan-out stays
/// bounded, the drops are counted against its slot, and every worker keeps answering its
/// heartbeats (nobody is declared hung or replaced).
#[test]
fn a_hook_that_broadcasts_a_flood_is_budgeted_and_every_worker_stays_healthy() {
    let bin = example_named("relay_cluster", None);
    let interval = Duration::from_secs(1);
    let cluster = Cluster::start_program(
        &bin,
        &[
            "--workers",
            "3",
            "--balance",
            "kernel",
            "--health-interval",
            "1s",
            "--health-timeout",
            "3s",
            "--flood-slot",
            "0",
        ],
    );
    let flood = Duration::from_secs(4);
    let end = Instant::now() + flood;
    let mut worst = [0u64; 3];
    let mut requests = 0u64;
    while Instant::now() < end {
        let response = http_get(cluster.listen_addr(), "/").expect("GET / during the flood");
        assert_eq!(response.status, 200, "{response}");
        requests += 1;
        let doc = cluster.status();
        for (slot, worst) in worst.iter_mut().enumerate() {
            if let Some(ms) = status::worker(&doc, slot).raw["health_ms"].as_u64() {
                *worst = (*worst).max(ms);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let doc = cluster.status();
    eprintln!(
        "worst heartbeat owed during a 4 s flood through the hook: {worst:?} ms; {requests} \
         requests; slot 0 dropped {}",
        doc["workers"][0]["messages_dropped"]
    );
    for (slot, worst) in worst.iter().enumerate().skip(1) {
        assert!(
            u128::from(*worst) < interval.as_millis(),
            "slot {slot} owed a ping for {worst} ms during the flood"
        );
    }
    for slot in 0..3 {
        let worker = status::worker(&doc, slot);
        assert_eq!(
            (worker.generation, worker.restarts),
            (1, 0),
            "slot {slot} was never replaced\n{doc:#}"
        );
    }
    assert!(
        doc["workers"][0]["messages_dropped"].as_u64() > Some(0),
        "the flood's drops are counted against its slot\n{doc:#}"
    );
    assert!(!cluster.log().contains("hung"), "{}", cluster.log());
    cluster.stop_cleanly(STOP_TIMEOUT);
}
