//! The config file from an operator's side: `steer check` before a deploy, and flags that
//! keep winning over the file across SIGHUP reloads.

use std::time::Duration;

use steer_tests::{Cluster, Signal, TempFile, block_slot, run_steer, status};

#[test]
fn steer_check_accepts_a_good_file_and_prints_the_effective_settings() {
    let file = TempFile::new(
        "toml",
        "listen = \"127.0.0.1:9\"\nworkers = 3\nstatus = \"8001\"\nuser = \"nobody\"\nworker-memory-limit = \"512MiB\"\n",
    );
    let out = run_steer(&["check", "-c", file.as_arg(), "--shutdown-timeout", "5s"]);
    assert_eq!(out.code(), Some(0), "{out}");
    for line in [
        "ok",
        "workers = 3",
        "status = \"127.0.0.1:8001\"",
        "shutdown-timeout = \"5s\"",
        "health-timeout = \"3s\"",
        "user = \"nobody\"  # uid 65534",
        "worker-memory-limit = \"512MiB\"",
    ] {
        assert!(out.stdout.contains(line), "missing {line:?}\n{out}");
    }
    // It started nothing: port 9 was never bound, and it returned at once.
    assert!(out.stderr.is_empty(), "{out}");
}

#[test]
fn steer_check_refuses_bad_files_naming_the_key_the_line_and_what_is_allowed() {
    for (text, needles) in [
        (
            "workers = 2\nworkers-count = 3\n",
            &["`workers-count` at line 2", "unknown field"][..],
        ),
        (
            "\n\nmax-restarts = \"many\"\n",
            &["`max-restarts` at line 3", "whole number from 0"],
        ),
        (
            "health-interval = \"2s\"\nhealth-timeout = \"1s\"\n",
            &[
                "`health-timeout` at line 2",
                "at least twice health-interval (2s)",
            ],
        ),
        (
            "user = \"no-such-user-steer\"\n",
            &["`user` at line 1", "no such user"],
        ),
        (
            "worker-nofile = 99999999\n",
            &["`worker-nofile` at line 1", "from 16 to 1048576"],
        ),
        (
            "balance = \"fastest\"\n",
            &["`balance` at line 1", "\"fastest\"", "round-robin"],
        ),
    ] {
        let file = TempFile::new("toml", text);
        let out = run_steer(&["check", "--config", file.as_arg()]);
        assert_eq!(out.code(), Some(2), "{text:?}\n{out}");
        assert!(out.stderr.contains(file.as_arg()), "names the file\n{out}");
        for needle in needles {
            assert!(out.stderr.contains(needle), "{text:?}: {needle:?}\n{out}");
        }
    }
}

/// The bug this guards against: SIGHUP rebuilt the configuration from the file alone, so
/// `--shutdown-timeout 1s` on the command line silently became the file's 30s.
#[test]
fn command_line_flags_keep_winning_over_the_file_after_sighup() {
    let file = TempFile::new(
        "toml",
        "shutdown-timeout = \"30s\"\nmax-restarts = 7\nbalance = \"kernel\"\ndemo-faults = true\n",
    );
    let cluster = Cluster::start(&[
        "--config",
        file.as_arg(),
        "--workers",
        "1",
        "--shutdown-timeout",
        "1s",
    ]);
    let before = cluster.worker_pid_list();
    cluster.signal(Signal::SIGHUP);
    cluster.wait_for_log("SIGHUP: reloaded", Duration::from_secs(10));
    cluster.wait_until("the reload's roll", Duration::from_secs(20), |s| {
        status::all_ready(s)
            && status::worker_pids(s)
                .iter()
                .all(|(_, pid)| !before.contains(pid))
    });
    // A worker stuck in a request outlives the drain; the kill comes after the flag's
    // timeout, and the log names it.
    let _stuck = block_slot(cluster.listen_addr(), 0, 60_000);
    cluster.signal(Signal::SIGTERM);
    let log = cluster.wait_for_log("shutdown timeout", Duration::from_secs(20));
    assert!(
        log.contains("draining every worker (SIGKILL after 1s)")
            && log.contains("shutdown timeout (1s) reached"),
        "the flag's 1s must survive the reload\n{log}"
    );
    assert_eq!(cluster.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

/// The settings shipped in `deploy/kubernetes/steer.yaml` (the ConfigMap's `steer.toml`).
fn kubernetes_config() -> String {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/steer.yaml");
    let yaml = std::fs::read_to_string(&path).expect("deploy/kubernetes/steer.yaml");
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "steer.toml: |");
    let header = lines.next().expect("the ConfigMap has a steer.toml block");
    let indent = header.len() - header.trim_start().len() + 2;
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_kubernetes_config_map_passes_steer_check() {
    let text = kubernetes_config();
    assert!(text.contains("listen = "), "{text}");
    let file = TempFile::new("toml", &text);
    let out = run_steer(&["check", "-c", file.as_arg()]);
    assert_eq!(out.code(), Some(0), "{text}\n{out}");
    assert!(out.stdout.contains("status = \"0.0.0.0:8001\""), "{out}");
    assert!(out.stdout.contains("tcp-migrate-req = false"), "{out}");
}
