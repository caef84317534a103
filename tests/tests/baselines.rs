//! The userspace baselines that `cargo xtask bench` measures Steer against: `shared` (one
//! listening socket inherited by every worker) and `userspace` (the primary accepts and
//! hands each connection to a worker over IPC). They serve from every worker, keep their
//! single accept queue through rolling restarts and crashes, and stop cleanly.

use std::collections::BTreeMap;
use std::time::Duration;

use steer_tests::{Cluster, Load, Signal, Value, http_get, run_steer, status};

/// `(inode, is listening)` of every TCP socket bound to `port` (`/proc/net/tcp`).
fn sockets_on(port: u16) -> Vec<(u64, bool)> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            if !local.ends_with(&port) || fields.get(2)? != &"00000000:0000" {
                return None;
            }
            let listening = fields.get(3)? == &"0A";
            Some((fields.get(9)?.parse().ok()?, listening))
        })
        .collect()
}

/// The inode of the one socket listening on the cluster's port.
fn the_listening_socket(cluster: &Cluster) -> u64 {
    let listening: Vec<u64> = sockets_on(cluster.listen_addr().port())
        .into_iter()
        .filter_map(|(inode, listening)| listening.then_some(inode))
        .collect();
    assert_eq!(
        listening.len(),
        1,
        "a baseline has exactly one listening socket on the port: {listening:?}"
    );
    listening[0]
}

/// Whether process `pid` holds socket `inode` open.
fn holds_socket(pid: u32, inode: u64) -> bool {
    let target = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the fds")
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == &*target))
}

/// Sends `n` requests, one new connection each, and counts the answering slots.
fn answers_per_slot(cluster: &Cluster, n: usize) -> BTreeMap<usize, u64> {
    let mut per_slot = BTreeMap::new();
    for _ in 0..n {
        let response = http_get(cluster.listen_addr(), "/").expect("GET / on a new connection");
        assert_eq!(response.status, 200, "{}", response.body);
        *per_slot
            .entry(response.worker().expect("X-Steer-Worker"))
            .or_insert(0) += 1;
    }
    per_slot
}

/// SIGUSR2 under new-connection load; waits until every slot runs a new process, and
/// asserts that not one request failed. (Idle keep-alive connections are closed by a
/// draining worker, which races with a request sent on them at that moment: HTTP clients
/// retry those, and this test, like the other rolling-restart tests, does not count them.)
fn roll_under_load(cluster: &Cluster) {
    let before = cluster.worker_pid_list();
    let churn = Load::new_connections(cluster.listen_addr(), 4);
    churn.wait_for_ok(200, Duration::from_secs(10));
    cluster.signal(Signal::SIGUSR2);
    cluster.wait_until("every slot replaced", Duration::from_secs(30), |s| {
        s["primary"]["phase"] == "running"
            && status::all_ready(s)
            && status::worker_pids(s)
                .iter()
                .all(|(_, pid)| !before.contains(pid))
    });
    let settled = churn.ok();
    churn.wait_for_ok(settled + 100, Duration::from_secs(10));
    let churned = churn.stop();
    println!("rolling restart under load: {churned}");
    churned.assert_all_succeeded();
}

/// SIGKILLs slot 0's worker: once the primary has seen the exit, the others serve every
/// request while it restarts. (What the dead worker had accepted, or under `userspace` had
/// been handed and not yet read, dies with it, as with any crash.)
fn survive_a_crash(cluster: &Cluster) {
    let pid = cluster.kill_worker(0);
    cluster.wait_until("the crash is noticed", Duration::from_secs(10), |s| {
        status::worker(s, 0).pid != Some(pid)
    });
    let served = answers_per_slot(cluster, 20);
    assert_eq!(served.values().sum::<u64>(), 20);
    cluster.wait_until("slot 0 restarted", Duration::from_secs(10), |s| {
        let w = status::worker(s, 0);
        w.state == status::SlotState::Ready && w.pid.is_some_and(|p| p != pid) && w.restarts == 1
    });
    // A shared socket has no policy: which worker the kernel wakes is up to it, and on a
    // busy host one worker can take a few hundred in a row. The restarted one must take
    // some within a bounded number.
    let mut served = BTreeMap::new();
    for _ in 0..10 {
        for (slot, n) in answers_per_slot(cluster, 200) {
            *served.entry(slot).or_insert(0) += n;
        }
        if served.contains_key(&0) {
            break;
        }
    }
    assert!(
        served.contains_key(&0),
        "the restarted slot serves: {served:?}"
    );
}

#[test]
fn shared_baseline_serves_every_worker_from_one_inherited_socket() {
    let cluster = Cluster::start(&["--workers", "2", "--balance", "shared"]);
    let doc: Value = cluster.status();
    assert_eq!(doc["primary"]["balance"], "shared");
    assert!(doc["steering"].is_null(), "no program runs: {doc:#}");

    let socket = the_listening_socket(&cluster);
    for pid in cluster.worker_pid_list() {
        assert!(
            holds_socket(pid, socket),
            "worker {pid} accepts from the shared socket"
        );
    }
    assert!(holds_socket(cluster.pid(), socket), "the primary keeps it");

    let per_slot = answers_per_slot(&cluster, 400);
    assert_eq!(
        per_slot.keys().copied().collect::<Vec<_>>(),
        [0, 1],
        "both workers accept from the shared queue: {per_slot:?}"
    );

    roll_under_load(&cluster);
    assert_eq!(
        the_listening_socket(&cluster),
        socket,
        "new generations inherit the same socket"
    );
    survive_a_crash(&cluster);
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn userspace_baseline_hands_connections_round_robin_through_the_primary() {
    let cluster = Cluster::start(&["--workers", "2", "--balance", "userspace"]);
    assert_eq!(cluster.status()["primary"]["balance"], "userspace");

    let socket = the_listening_socket(&cluster);
    assert!(
        holds_socket(cluster.pid(), socket),
        "the primary owns the listener"
    );
    for pid in cluster.worker_pid_list() {
        assert!(!holds_socket(pid, socket), "worker {pid} has no listener");
    }

    // One connection at a time, so the rotation is exact.
    let per_slot = answers_per_slot(&cluster, 100);
    assert_eq!(per_slot, BTreeMap::from([(0, 50), (1, 50)]));
    // The workers count what they were handed (reported with their next heartbeat).
    cluster.wait_until(
        "the workers report the handed connections",
        Duration::from_secs(10),
        |s| status::workers(s).iter().all(|w| w.accepted >= 50),
    );

    roll_under_load(&cluster);
    survive_a_crash(&cluster);
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn shared_baseline_gives_an_external_command_the_shared_socket_as_fd3() {
    let script = format!("{}/fixtures/fd3_worker.py", env!("CARGO_MANIFEST_DIR"));
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "shared",
        "--",
        "python3",
        &script,
    ]);
    let socket = the_listening_socket(&cluster);
    for pid in cluster.worker_pid_list() {
        assert!(
            holds_socket(pid, socket),
            "worker {pid} got the shared socket"
        );
    }
    let per_slot = answers_per_slot(&cluster, 20);
    assert_eq!(per_slot.values().sum::<u64>(), 20);
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn userspace_baseline_refuses_workers_that_cannot_take_connections_over_ipc() {
    let out = run_steer(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--balance",
        "userspace",
        "--",
        "sleep",
        "60",
    ]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("--balance userspace") && out.stderr.contains("only the demo app"),
        "{}",
        out.stderr
    );
}
