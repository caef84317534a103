//! The UDP and QUIC part of `cargo xtask bench`, in a tiny configuration: every subject
//! (`udp-kernel`, `udp-round-robin`, `udp-hash`, `udp-one-socket`, `quic-round-robin`,
//! `quic-one-socket`) runs each of its scenarios for a fraction of a second (the roll for
//! 3 s), so that a broken subject, load generator or scenario fails here rather than in a
//! benchmark run. No performance figure is held to a target: those belong in the report.
//! What is held: every subject produced figures, Steer's program was measured, and under
//! Steer no flow moved other than forward and no datagram was lost across the roll.
//!
//! It needs root (the program, `kernel.bpf_stats_enabled`) and a `steer` built with the
//! `quic` feature (`cargo xtask test` builds it so).

use std::time::{Duration, Instant};

use steer_bench::suite::{self, SuiteConfig, subject};
use steer_tests::Value;

/// Every UDP subject, and whether it goes through the roll.
const UDP_SUBJECTS: [(&str, bool); 4] = [
    ("udp-kernel", true),
    ("udp-round-robin", true),
    ("udp-hash", true),
    ("udp-one-socket", false),
];

/// Every QUIC subject.
const QUIC_SUBJECTS: [&str; 2] = ["quic-round-robin", "quic-one-socket"];

/// A median of the summary, if there.
fn median(figure: &Value) -> Option<f64> {
    figure["median"].as_f64()
}

#[test]
fn every_udp_and_quic_subject_runs_and_steer_keeps_every_flow_across_a_roll() {
    let started = Instant::now();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::env::temp_dir().join(format!("steer-bench-datagrams-{}", std::process::id()));
    let programs = subject::Programs {
        steer: steer_tests::steer_bin(),
        node: None,
        node_script: root.join("bench/peers/node_cluster.js"),
        pm2: None,
        nginx: None,
        scratch: out.join("scratch"),
    };
    let mut config = SuiteConfig::new(programs, out.clone(), true, false);
    config.workers = 2;
    config.rounds = 1;
    config.throughput_length = Duration::from_millis(500);
    config.roll_length = Duration::from_secs(3);
    config.subjects.retain(subject::Subject::is_datagram);
    let names: Vec<String> = config.subjects.iter().map(subject::Subject::name).collect();
    let expected: Vec<String> = UDP_SUBJECTS
        .iter()
        .map(|(name, _)| (*name).to_owned())
        .chain(QUIC_SUBJECTS.map(String::from))
        .collect();
    assert_eq!(names, expected, "the UDP and QUIC subjects, in order");

    let report = suite::run(&config).expect("the suite runs");
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("report.json")).expect("report.json written"),
    )
    .expect("report.json parses");
    let markdown = std::fs::read_to_string(&report).expect("report.md written");
    let svg = std::fs::read_to_string(out.join("report.svg")).expect("report.svg written");
    let _ = std::fs::remove_dir_all(&out);

    let summary = &json["summary"]["datagrams"];
    let udp = summary["udp"].as_array().expect("UDP figures");
    for (name, rolls) in UDP_SUBJECTS {
        let u = udp
            .iter()
            .find(|u| u["name"] == name)
            .unwrap_or_else(|| panic!("{name} summarized in {summary}"));
        for figure in ["rate", "cpu_us", "p99_ms"] {
            assert!(
                median(&u[figure]).is_some_and(|v| v > 0.0),
                "{name}: {figure} measured: {u}"
            );
        }
        if !rolls {
            assert!(u["roll"].is_null(), "{name} does not roll: {u}");
            continue;
        }
        let roll = &u["roll"];
        assert_eq!(
            roll["moves"]["flows"], 64,
            "{name}: every flow followed: {u}"
        );
        assert!(
            roll["sent"].as_u64().is_some_and(|n| n > 1000),
            "{name}: the flows sent through the roll: {roll}"
        );
        assert_eq!(roll["unfinished"], 0, "{name}: the roll finished: {roll}");
        if name != "udp-kernel" {
            assert_eq!(
                (&roll["moves"]["moved"], &roll["lost"]),
                (&Value::from(0), &Value::from(0)),
                "{name}: no flow moved other than forward, no datagram lost: {roll}"
            );
            assert!(
                median(&u["program_ns"]).is_some_and(|ns| ns > 0.0),
                "{name}: the program's time per datagram, from the kernel: {u}"
            );
        }
    }
    let quic = summary["quic"].as_array().expect("QUIC figures");
    for name in QUIC_SUBJECTS {
        let q = quic
            .iter()
            .find(|q| q["name"] == name)
            .unwrap_or_else(|| panic!("{name} summarized in {summary}"));
        for figure in [
            "handshakes",
            "handshake_cpu_us",
            "requests",
            "request_cpu_us",
        ] {
            assert!(
                median(&q[figure]).is_some_and(|v| v > 0.0),
                "{name}: {figure} measured: {q}"
            );
        }
    }
    let rr = quic
        .iter()
        .find(|q| q["name"] == "quic-round-robin")
        .expect("quic-round-robin");
    assert!(
        median(&rr["program_ns"]).is_some_and(|ns| ns > 0.0),
        "the QUIC program's time per datagram, from the kernel: {rr}"
    );
    for section in ["## UDP", "## QUIC", "0.95x udp-kernel", "1.05x udp-kernel"] {
        assert!(
            markdown.contains(section),
            "{section} missing from\n{markdown}"
        );
    }
    for panel in [
        "UDP datagrams per second",
        "QUIC handshakes",
        "QUIC requests",
    ] {
        assert!(svg.contains(panel), "the chart's {panel} panel");
    }
    println!(
        "tiny UDP and QUIC bench in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
