//! Soak: continuous load and a rolling restart every 5 s; nothing fails and the primary
//! leaks nothing.
//!
//! `cargo xtask soak --seconds N` runs this test for N seconds (default 60, which is 12
//! rolling restarts). `STEER_SOAK_SECONDS` sets the length when it is run directly.
//!
//! The primary's open fds and resident memory are read from `/proc` after a warm-up roll
//! and again at the end, once every old generation has exited: the fd count must be the
//! same, and the memory may not have grown by more than [`RSS_SLACK`] (the allocator keeps
//! some freed pages; a leak of one buffer per restart, 12 times over, would show).

use std::time::{Duration, Instant};

use steer_tests::chaos::ChaosLoad;
use steer_tests::{Cluster, status};

const ROLL_EVERY: Duration = Duration::from_secs(5);
const DEFAULT_SECONDS: u64 = 60;
/// Growth of the primary's RSS that is not called a leak.
const RSS_SLACK: u64 = 512 * 1024;

fn primary_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("listing /proc/{pid}/fd: {e}"))
        .count()
}

/// The primary's fd count once it holds still: the same in three readings 100 ms apart
/// (bounded to 5 s; the last reading then). The status thread closes a client's socket a
/// moment after the client has its answer, so one reading can count a connection that is
/// on its way out, which is not a leak.
fn steady_fds(pid: u32) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut readings = vec![primary_fds(pid)];
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        readings.push(primary_fds(pid));
        if let [.., a, b, c] = readings[..]
            && a == b
            && b == c
        {
            break;
        }
    }
    *readings.last().expect("one reading at least")
}

/// Waits until no slot has an old generation still draining. (Its status requests may
/// leave a socket on the status thread for a moment: see [`steady_fds`].)
fn settle(cluster: &Cluster) {
    cluster.wait_until("old generations to exit", Duration::from_secs(20), |s| {
        status::workers(s)
            .iter()
            .all(|w| w.raw["draining"].as_u64() == Some(0))
    });
}

#[test]
fn soak_with_a_rolling_restart_every_5s_loses_no_request_and_leaks_nothing() {
    let seconds: u64 = std::env::var("STEER_SOAK_SECONDS")
        .ok()
        .map(|s| {
            s.parse()
                .expect("STEER_SOAK_SECONDS is a number of seconds")
        })
        .unwrap_or(DEFAULT_SECONDS);
    let cluster = Cluster::start(&["--workers", "4", "--balance", "round-robin"]);
    let primary = cluster.pid();
    let load = ChaosLoad::start(cluster.listen_addr(), 2, 2);
    load.wait_for_more(200, Duration::from_secs(10));

    // Warm-up: the first roll allocates what every later one reuses.
    cluster.rolling_restart(Duration::from_secs(20));
    settle(&cluster);
    let (fds_start, rss_start) = (steady_fds(primary), steer_tests::rss_bytes(primary));

    let started = Instant::now();
    let mut rolls = Vec::new();
    while started.elapsed() + ROLL_EVERY <= Duration::from_secs(seconds) + ROLL_EVERY / 2 {
        let next = started + ROLL_EVERY * (rolls.len() as u32 + 1);
        rolls.push(cluster.rolling_restart(Duration::from_secs(20)));
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        eprintln!(
            "soak: {:>3} s, {} rolls, primary {} fds, RSS {} KiB, {} requests answered",
            started.elapsed().as_secs(),
            rolls.len(),
            primary_fds(primary),
            steer_tests::rss_bytes(primary) / 1024,
            load.ok()
        );
    }
    let report = load.stop();
    settle(&cluster);
    // A worker that has just exited may still be on its way out of the primary's tables;
    // wait (bounded) for the count to come back, and fail below if it never does.
    let fds_settled = Instant::now() + Duration::from_secs(5);
    while primary_fds(primary) != fds_start && Instant::now() < fds_settled {
        std::thread::sleep(steer_tests::STATUS_POLL_INTERVAL);
    }
    let (fds_end, rss_end) = (steady_fds(primary), steer_tests::rss_bytes(primary));
    eprintln!(
        "soak: {} s, {} rolling restarts (slowest {} ms), {} requests answered, {} failed; \
         primary fds {fds_start} -> {fds_end}, RSS {} -> {} KiB, p99 {:.1} ms",
        started.elapsed().as_secs(),
        rolls.len(),
        rolls.iter().max().map_or(0, Duration::as_millis),
        report.ok(),
        report.failures.len(),
        rss_start / 1024,
        rss_end / 1024,
        report.quantile_ms(0.99),
    );
    assert!(
        rolls.len() as u64 >= seconds / ROLL_EVERY.as_secs(),
        "{} rolls in {seconds} s",
        rolls.len()
    );
    assert!(
        report.failures.is_empty(),
        "{} requests failed: {:?}",
        report.failures.len(),
        report.failures.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(fds_end, fds_start, "the primary's fd count changed");
    assert!(
        rss_end <= rss_start + RSS_SLACK,
        "the primary's RSS grew from {rss_start} to {rss_end} bytes"
    );
    cluster.stop_cleanly(Duration::from_secs(15));
}
