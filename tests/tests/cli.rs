//! Bad input gets a clear error: exit 2 naming the flag or key and the value, exit 1 for
//! runtime failures with what to do.

use std::net::TcpListener;

use steer_tests::{Cluster, TempFile, run_steer};

fn assert_usage_error(args: &[&str], needles: &[&str]) {
    let out = run_steer(args);
    assert_eq!(out.code(), Some(2), "{args:?} must exit 2\n{out}");
    for needle in needles {
        assert!(
            out.stderr.contains(needle),
            "{args:?}: stderr must name {needle:?}\n{out}"
        );
    }
}

#[test]
fn bad_flags_exit_2_naming_the_flag_and_the_value() {
    assert_usage_error(&["run", "--workers", "0"], &["--workers", "0"]);
    assert_usage_error(&["run", "--workers", "x"], &["--workers", "x"]);
    assert_usage_error(&["run", "--listen", "nope"], &["--listen", "nope"]);
    assert_usage_error(
        &["run", "--balance", "foo"],
        &["--balance", "foo", "round-robin"],
    );
    assert_usage_error(
        &["run", "--shutdown-timeout", "soon"],
        &["--shutdown-timeout", "soon"],
    );
    assert_usage_error(&["run", "--no-such-flag"], &["--no-such-flag"]);
}

#[test]
fn bad_config_files_exit_2_naming_the_key_and_the_line() {
    let unknown = TempFile::new("toml", "workers = 2\nwrokers = 3\n");
    assert_usage_error(
        &["run", "--config", unknown.as_arg()],
        &["wrokers", "line 2", unknown.as_arg()],
    );
    let bad_value = TempFile::new("toml", "balance = \"foo\"\n");
    assert_usage_error(&["run", "-c", bad_value.as_arg()], &["balance", "foo"]);
    let zero = TempFile::new("toml", "workers = 0\n");
    assert_usage_error(
        &["run", "-c", zero.as_arg()],
        &["workers", "line 1", "invalid value 0"],
    );
    assert_usage_error(
        &["run", "-c", "/nonexistent/steer.toml"],
        &["/nonexistent/steer.toml"],
    );
}

#[test]
fn a_port_held_without_so_reuseport_exits_1_saying_so() {
    let squatter = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = squatter.local_addr().expect("addr").to_string();
    let out = run_steer(&[
        "run",
        "--workers",
        "1",
        "--balance",
        "kernel",
        "--listen",
        &addr,
    ]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("without SO_REUSEPORT"), "{out}");
    assert!(out.stderr.contains(&addr), "{out}");
}

#[test]
fn flags_override_the_config_file_and_the_pid_file_is_written_and_removed() {
    let pid_file = std::env::temp_dir().join(format!("steer-test-{}.pid", std::process::id()));
    let config = TempFile::new(
        "toml",
        format!(
            "workers = 3\nbalance = \"kernel\"\npid-file = \"{}\"\nshutdown-timeout = \"5s\"\n",
            pid_file.display()
        ),
    );
    let cluster = Cluster::start(&["--config", config.as_arg(), "--workers", "2"]);
    assert_eq!(cluster.workers().len(), 2, "--workers overrides the file");
    let written = std::fs::read_to_string(&pid_file).expect("pid file written");
    assert_eq!(written.trim(), cluster.pid().to_string());
    assert_eq!(
        cluster.stop(std::time::Duration::from_secs(10)).code(),
        Some(0)
    );
    assert!(!pid_file.exists(), "pid file removed at exit");
}

#[test]
fn json_logs_are_one_object_per_line_with_lifecycle_events() {
    let cluster = Cluster::start(&[
        "--workers",
        "1",
        "--balance",
        "kernel",
        "--log-format",
        "json",
    ]);
    assert_eq!(
        cluster.stop(std::time::Duration::from_secs(10)).code(),
        Some(0)
    );
    let log = cluster.log();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for message in [
        "primary started",
        "worker spawned",
        "worker registered its socket",
        "worker ready",
        "primary stopped",
    ] {
        assert!(
            events.iter().any(|e| e["message"] == message),
            "no {message:?} event in\n{log}"
        );
    }
}

#[test]
fn steer_status_prints_a_table_and_raw_json() {
    let cluster = Cluster::start(&["--workers", "2", "--balance", "kernel"]);
    let addr = cluster.status_addr().to_string();
    let table = run_steer(&["status", "--status", &addr]);
    assert_eq!(table.code(), Some(0), "{table}");
    assert!(
        table.stdout.contains("SLOT") && table.stdout.contains("2 workers, 2 ready"),
        "{table}"
    );
    let json = run_steer(&["status", "--status", &addr, "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&json.stdout).expect("raw JSON document");
    assert_eq!(doc["totals"]["workers"], 2);
    for field in ["pid", "uptime_s", "balance", "listen"] {
        assert!(!doc["primary"][field].is_null(), "primary.{field} missing");
    }
    for field in [
        "slot",
        "pid",
        "generation",
        "state",
        "uptime_s",
        "restarts",
        "accepted",
        "rss_bytes",
    ] {
        assert!(
            !doc["workers"][0][field].is_null(),
            "workers[].{field} missing"
        );
    }
    drop(cluster);
    let gone = run_steer(&["status", "--status", &addr]);
    assert_eq!(gone.code(), Some(1), "{gone}");
    assert!(gone.stderr.contains("cannot read the status"), "{gone}");
}
