//! The Node comparison of `cargo xtask bench --peers`, in a tiny configuration: every
//! subject (the Node app under Steer, under the cluster module in both modes, under PM2)
//! runs every scenario of its own for a fraction of a second, so that a broken subject or
//! scenario fails here rather than in a benchmark run. No performance figure is held to a
//! target: those belong in the report. What is held: every subject produced figures, and
//! Steer failed no request across its reloads.
//!
//! It needs `node` and `npm` (`cargo xtask setup` installs them) and installs PM2 (pinned)
//! from npm into `target/bench/pm2` once, as the benchmark does.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use steer_bench::suite::{self, SuiteConfig, subject};
use steer_tests::Value;

/// Every subject of the comparison, and whether it runs the throughput and reload
/// scenarios (the least-loaded one runs only the stall).
const SUBJECTS: [(&str, bool); 5] = [
    ("steer-node", true),
    ("steer-node-least-loaded", false),
    ("node-rr", true),
    ("node-none", true),
    ("pm2", true),
];

/// A median of the summary, if there.
fn median(figure: &Value) -> Option<f64> {
    figure["median"].as_f64()
}

#[test]
fn every_node_subject_runs_every_scenario_and_steer_fails_no_request_across_reloads() {
    let started = Instant::now();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let node = subject::find_program("node").expect("node is installed (cargo xtask setup)");
    let pm2 = subject::install_pm2(&root.join("target/bench/pm2")).expect("pm2 installs");
    let out = std::env::temp_dir().join(format!("steer-bench-node-{}", std::process::id()));
    let programs = subject::Programs {
        steer: steer_tests::steer_bin(),
        node: Some(node),
        node_script: root.join("bench/peers/node_cluster.js"),
        pm2: Some(pm2),
        nginx: None,
        scratch: out.join("scratch"),
    };
    let mut config = SuiteConfig::new(programs, out.clone(), true, true);
    config.workers = 2;
    config.rounds = 1;
    config.throughput_length = Duration::from_millis(500);
    // The blocker stalls a worker at once, then every second: one stall at least.
    config.stall_length = Duration::from_millis(1200);
    config.reloads.count = 2;
    config.reloads.pause = Duration::from_millis(200);
    config.subjects.retain(subject::Subject::is_node_app);
    let names: Vec<String> = config.subjects.iter().map(subject::Subject::name).collect();
    assert_eq!(
        names,
        SUBJECTS.map(|(name, _)| name.to_owned()),
        "the comparison's subjects, in order"
    );

    let report = suite::run(&config).expect("the suite runs");
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("report.json")).expect("report.json written"),
    )
    .expect("report.json parses");
    let markdown = std::fs::read_to_string(&report).expect("report.md written");
    let svg = std::fs::read_to_string(out.join("report.svg")).expect("report.svg written");
    let _ = std::fs::remove_dir_all(&out);

    let subjects = json["summary"]["subjects"]
        .as_array()
        .expect("summarized subjects");
    for (name, full) in SUBJECTS {
        let s = subjects
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{name} summarized in {json}"));
        let stall = &s["stall"];
        assert!(
            stall["share_on_stalled"]["median"].is_f64()
                && median(&stall["tails"]["p999_ms"]).is_some(),
            "{name}: a stalled-worker share and p99.9: {stall}"
        );
        if !full {
            assert!(s["reload"].is_null(), "{name} runs only the stall: {s}");
            continue;
        }
        for scenario in ["keepalive", "connect"] {
            let figures = &s[scenario];
            for figure in ["rate", "cpu_us", "max_over_min"] {
                assert!(
                    median(&figures[figure]).is_some_and(|v| v > 0.0),
                    "{name} {scenario}: {figure} measured: {figures}"
                );
            }
            for tail in ["p50_ms", "p99_ms", "p999_ms"] {
                assert!(
                    median(&figures["tails"][tail]).is_some(),
                    "{name} {scenario}: {tail}: {figures}"
                );
            }
        }
        let reload = &s["reload"];
        assert_eq!(reload["asked"], 2, "{name}: two reloads asked: {reload}");
        assert_eq!(
            reload["unfinished"], 0,
            "{name}: every reload finished: {reload}"
        );
        assert!(
            reload["ok"].as_u64().is_some_and(|n| n > 0)
                && reload["keepalive_ok"].as_u64().is_some_and(|n| n > 0),
            "{name}: both loads answered during the reloads: {reload}"
        );
        if name == "steer-node" {
            for errors in ["errors", "keepalive_errors"] {
                let failed: u64 = reload[errors]
                    .as_object()
                    .expect("errors by kind")
                    .values()
                    .filter_map(Value::as_u64)
                    .sum();
                assert_eq!(
                    failed, 0,
                    "Steer failed no request across its reloads: {reload}"
                );
            }
        }
    }
    assert!(markdown.contains("## Node comparison"), "{markdown}");
    assert!(
        markdown.contains("steer-node: 0 failed requests across the reloads"),
        "the target is stated: {markdown}"
    );
    assert!(svg.contains("The same Node app"), "the chart's Node row");
    println!(
        "tiny Node comparison in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
