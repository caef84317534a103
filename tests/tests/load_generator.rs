//! The benchmark's load generator (`steer-bench`) against the demo cluster: what it counts
//! per worker is what the workers themselves count.

use std::time::Duration;

use steer_bench::load::{self, LoadReport, LoadSpec, Mode, Stop};
use steer_tests::{Cluster, Value, status};

/// The generator's count for `slot`.
fn counted(report: &LoadReport, slot: usize) -> u64 {
    report
        .per_worker
        .get(&slot.to_string())
        .copied()
        .unwrap_or(0)
}

/// Runs `spec` and checks it succeeded completely, from every worker.
fn run_cleanly(spec: &LoadSpec, workers: usize) -> LoadReport {
    let report = load::run(spec).expect("the load generator runs");
    println!("{:?}: {report}", spec.mode);
    assert_eq!(report.errors.total(), 0, "{report}");
    assert_eq!(report.per_worker.len(), workers, "{report}");
    assert!(report.latency.p50_us > 0 && report.latency.max_us >= report.latency.p99_us);
    report
}

/// Waits until every slot's `field` in `/status` (reported with the worker's heartbeat),
/// less its value in `before`, equals what the generator counted for it.
fn wait_for_matching_counts(
    cluster: &Cluster,
    before: &Value,
    report: &LoadReport,
    field: &str,
) -> Value {
    let base: Vec<u64> = status::workers(before)
        .iter()
        .map(|w| w.raw[field].as_u64().expect("a counter"))
        .collect();
    cluster.wait_until(
        &format!("per-slot `{field}` grown by the generator's per-worker counts {report}"),
        Duration::from_secs(10),
        |s| {
            status::workers(s).iter().all(|w| {
                w.raw[field].as_u64().map(|now| now - base[w.slot]) == Some(counted(report, w.slot))
            })
        },
    )
}

#[test]
fn load_generator_counts_per_worker_what_the_workers_count() {
    let workers = 2;
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "kernel",
        "--health-interval",
        "100ms",
    ]);
    let addr = cluster.listen_addr();

    // Keep-alive: every request is one the workers answered.
    let mut keep_alive = LoadSpec::new(addr, Mode::KeepAlive, 8, Stop::Requests(20_000));
    keep_alive.threads = 2;
    let before = cluster.status();
    let report = run_cleanly(&keep_alive, workers);
    assert_eq!(report.ok, 20_000);
    let before = wait_for_matching_counts(&cluster, &before, &report, "requests");

    // New connections from many source addresses: every request is one accepted connection.
    let mut connect = LoadSpec::new(addr, Mode::Connect, 8, Stop::Requests(3_000));
    connect.sources = 16;
    let report = run_cleanly(&connect, workers);
    assert_eq!(report.ok, 3_000);
    let after = wait_for_matching_counts(&cluster, &before, &report, "accepted");
    assert_eq!(
        status::total(&after, "accepted") - status::total(&before, "accepted"),
        3_000
    );

    cluster.stop_cleanly(Duration::from_secs(10));
}

#[test]
fn load_generator_reports_refused_connections_and_stops_on_time() {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], steer_tests::free_port()));
    let spec = LoadSpec::new(
        addr,
        Mode::Connect,
        2,
        Stop::After(Duration::from_millis(300)),
    );
    let started = std::time::Instant::now();
    let report = load::run(&spec).expect("the load generator runs");
    assert!(started.elapsed() < Duration::from_secs(3), "bounded run");
    assert_eq!(report.ok, 0);
    assert!(report.errors.refused > 0, "{report}");
    assert_eq!(report.errors.total(), report.errors.refused, "{report}");
}

#[test]
fn load_generator_splits_its_counts_by_the_phase_each_request_started_in() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    let cluster = Cluster::start(&["--workers", "2", "--balance", "kernel"]);
    let phase = Arc::new(AtomicU64::new(0));
    let mut spec = LoadSpec::new(
        cluster.listen_addr(),
        Mode::Connect,
        4,
        Stop::After(Duration::from_millis(1500)),
    );
    spec.phase = Some(Arc::clone(&phase));
    let mover = {
        let phase = Arc::clone(&phase);
        std::thread::spawn(move || {
            for _ in 0..5 {
                std::thread::sleep(Duration::from_millis(150));
                phase.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let report = load::run(&spec).expect("the load generator runs");
    mover.join().expect("the phase thread");
    println!("{report}; per phase {:?}", report.per_phase);
    assert_eq!(report.errors.total(), 0, "{report}");
    let phases: Vec<u64> = report.per_phase.keys().copied().collect();
    assert_eq!(
        phases,
        (0..=5).collect::<Vec<_>>(),
        "every phase saw requests"
    );
    for (worker, count) in &report.per_worker {
        let split: u64 = report
            .per_phase
            .values()
            .filter_map(|workers| workers.get(worker))
            .sum();
        assert_eq!(split, *count, "worker {worker}: the phases add up");
    }
    cluster.stop_cleanly(Duration::from_secs(10));
}
