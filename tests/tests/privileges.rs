//! Workers give up what they do not need: `--user`/`--group` after the socket is bound and
//! registered, `PR_SET_NO_NEW_PRIVS` always, rlimits and CPU pinning on request. Read back
//! from `/proc/<pid>/status` and `/proc/<pid>/limits` of the running workers; the primary
//! keeps its own credentials (it runs the eBPF program). Needs root, like the suite.

use std::time::Duration;

use steer_tests::{Cluster, must_get, status};

/// `nobody` / `nogroup` on Debian.
const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

fn proc_field(pid: u32, file: &str, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/{file}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/{file}:\n{text}"))
        .trim_start_matches(':')
        .trim()
        .to_owned()
}

/// The four ids of a `Uid:`/`Gid:` line: real, effective, saved, filesystem.
fn ids(pid: u32, field: &str) -> Vec<u32> {
    proc_field(pid, "status", field)
        .split_whitespace()
        .map(|id| id.parse().expect("numeric id"))
        .collect()
}

/// `(soft, hard)` of a `/proc/<pid>/limits` row such as `Max open files`.
fn limit(pid: u32, row: &str) -> (String, String) {
    let text = proc_field(pid, "limits", row);
    let mut words = text.split_whitespace();
    let soft = words.next().expect("soft").to_owned();
    let hard = words.next().expect("hard").to_owned();
    (soft, hard)
}

fn assert_unprivileged(pid: u32, what: &str) {
    assert_eq!(
        ids(pid, "Uid:"),
        [NOBODY; 4],
        "{what} {pid}: every uid is nobody's"
    );
    assert_eq!(
        ids(pid, "Gid:"),
        [NOGROUP; 4],
        "{what} {pid}: every gid is nogroup's"
    );
    assert_eq!(
        proc_field(pid, "status", "Groups:"),
        NOGROUP.to_string(),
        "{what} {pid}: no supplementary group of the primary's"
    );
    assert_eq!(
        proc_field(pid, "status", "NoNewPrivs:"),
        "1",
        "{what} {pid}"
    );
    assert_eq!(
        proc_field(pid, "status", "CapEff:"),
        "0000000000000000",
        "{what} {pid}: no capability left"
    );
}

#[test]
fn demo_workers_drop_to_the_user_after_binding_with_limits_and_pinning() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "kernel",
        "--user",
        "nobody",
        "--group",
        "nogroup",
        "--worker-nofile",
        "4096",
        "--worker-memory-limit",
        "1GiB",
        "--cpu-affinity",
    ]);
    for worker in cluster.workers() {
        let pid = worker.pid.expect("ready worker has a pid");
        assert_unprivileged(pid, "demo worker");
        assert_eq!(limit(pid, "Max open files"), ("4096".into(), "4096".into()));
        let bytes = (1u64 << 30).to_string();
        assert_eq!(limit(pid, "Max address space"), (bytes.clone(), bytes));
        assert_eq!(
            proc_field(pid, "status", "Cpus_allowed_list"),
            (worker.slot % cpus).to_string(),
            "slot {} pinned to CPU {}",
            worker.slot,
            worker.slot % cpus
        );
    }
    // The workers serve as nobody, and the primary is still root (it runs the eBPF maps,
    // signals workers and reads their /proc entries).
    for _ in 0..4 {
        must_get(cluster.listen_addr(), "/");
    }
    assert_eq!(
        ids(cluster.pid(), "Uid:"),
        [0; 4],
        "the primary keeps its user"
    );
    assert_eq!(proc_field(cluster.pid(), "status", "NoNewPrivs:"), "0");
    // Dropped workers are still replaced and stopped by the primary.
    let before = cluster.worker_pid_list();
    cluster.signal(steer_tests::Signal::SIGUSR2);
    let rolled = cluster.wait_until("every worker replaced", Duration::from_secs(30), |s| {
        status::all_ready(s)
            && status::worker_pids(s)
                .iter()
                .all(|(_, pid)| !before.contains(pid))
    });
    for (_, pid) in status::worker_pids(&rolled) {
        assert_unprivileged(pid, "replacement worker");
    }
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn external_workers_switch_user_before_exec_and_keep_their_fd3_socket() {
    // `sleep` serves nothing, but its socket (fd 3) is listening already, so it is ready
    // as soon as it runs; what matters is who it runs as.
    let cluster = Cluster::start(&[
        "--workers",
        "1",
        "--balance",
        "kernel",
        "--user",
        "nobody",
        "--worker-nofile",
        "64",
        "--",
        "sleep",
        "600",
    ]);
    let pid = cluster.worker_pid_list()[0];
    assert_unprivileged(pid, "external worker");
    assert_eq!(limit(pid, "Max open files"), ("64".into(), "64".into()));
    let fd3 = std::fs::read_link(format!("/proc/{pid}/fd/3")).expect("fd 3 of the worker");
    assert!(
        fd3.to_string_lossy().starts_with("socket:"),
        "fd 3 is its socket: {fd3:?}"
    );
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn workers_without_user_still_get_no_new_privs() {
    let cluster = Cluster::start(&["--workers", "1", "--balance", "kernel"]);
    let pid = cluster.worker_pid_list()[0];
    assert_eq!(proc_field(pid, "status", "NoNewPrivs:"), "1");
    assert_eq!(ids(pid, "Uid:"), [0; 4], "no --user: the primary's user");
    cluster.stop_cleanly(Duration::from_secs(15));
}
