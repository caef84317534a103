//! The eBPF program's cost on the accept path: new-connection rate under `round-robin`
//! against `kernel` (no program), measured side by side in interleaved rounds, medians
//! reported. Needs root (CAP_BPF) and a built `steer` binary:
//!
//! ```sh
//! cargo build --release -p steer && STEER_BIN=target/release/steer \
//!     cargo run --release -p steer-tests --example steering_overhead -- [ROUNDS] [SECONDS]
//! ```
//!
//! Absolute rates on a shared machine are noise; the ratio within one run is the figure.

use std::time::{Duration, Instant};

use steer_tests::{Cluster, Load};

const POLICIES: [&str; 2] = ["kernel", "round-robin"];

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .to_string();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); POLICIES.len()];
    for round in 1..=rounds {
        for (i, policy) in POLICIES.iter().enumerate() {
            let cluster = Cluster::start(&["--workers", &workers, "--balance", policy, "-q"]);
            let load = Load::new_connections(cluster.listen_addr(), 4);
            load.wait_for_ok(100, Duration::from_secs(10));
            let (start_ok, start) = (load.ok(), Instant::now());
            std::thread::sleep(Duration::from_secs(seconds));
            let rate = (load.ok() - start_ok) as f64 / start.elapsed().as_secs_f64();
            let report = load.stop();
            assert_eq!(report.failed, 0, "{policy}: {report}");
            println!("round {round} {policy:>12}: {rate:8.0} new connections/s");
            rates[i].push(rate);
        }
    }
    let medians: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
    for (policy, (median, all)) in POLICIES.iter().zip(medians.iter().zip(&rates)) {
        let (min, max) = (all[0], all[all.len() - 1]);
        println!("{policy:>12}: median {median:.0}/s (min {min:.0}, max {max:.0})");
    }
    println!(
        "round-robin / kernel = {:.3} (median of {rounds} interleaved rounds of {seconds} s)",
        medians[1] / medians[0]
    );
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
