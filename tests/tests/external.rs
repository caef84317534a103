//! External COMMAND workers: a program that knows only the systemd socket-activation
//! contract (fd 3, LISTEN_FDS, LISTEN_PID) is supervised like a built-in worker.

use std::collections::BTreeSet;
use std::time::Duration;

use steer_tests::{Cluster, Value, http_get, must_get, status};

fn fd3_worker() -> String {
    format!("{}/fixtures/fd3_worker.py", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn external_command_gets_its_own_socket_as_fd3_and_is_supervised() {
    let script = fd3_worker();
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "kernel",
        "--",
        "python3",
        &script,
    ]);

    let mut seen = BTreeSet::new();
    for _ in 0..100 {
        seen.insert(
            must_get(cluster.listen_addr(), "/")
                .worker()
                .expect("X-Steer-Worker"),
        );
    }
    assert_eq!(seen, BTreeSet::from([0, 1]));

    // Ask until each slot has described itself.
    let mut described = BTreeSet::new();
    for _ in 0..200 {
        let response = must_get(cluster.listen_addr(), "/whoami");
        let me: Value = serde_json::from_str(&response.body).expect("json");
        let env = &me["env"];
        assert_eq!(env["LISTEN_FDS"], "1");
        assert_eq!(
            env["LISTEN_FDNAMES"],
            format!("tcp-{}", cluster.listen_addr().port()).as_str()
        );
        assert_eq!(
            env["LISTEN_PID"],
            me["pid"].to_string().as_str(),
            "LISTEN_PID is the worker's own pid"
        );
        assert_eq!(env["STEER_IPC_FD"], "4");
        assert!(
            env["STEER_WORKER_ID"]
                .as_str()
                .is_some_and(|id| id.parse::<u64>().is_ok())
        );
        let fds: Vec<u64> = me["fds"]
            .as_array()
            .expect("fds")
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        assert_eq!(
            fds,
            [0, 1, 2, 3, 4],
            "only stdio, the listener and the IPC socket are inherited"
        );
        described.insert(env["STEER_WORKER_SLOT"].as_str().expect("slot").to_owned());
        if described.len() == 2 {
            break;
        }
    }
    assert_eq!(described.len(), 2, "both slots answered /whoami");

    let slot = 0;
    let pid = cluster.kill_worker(slot);
    cluster.wait_until(
        "the external worker is restarted",
        Duration::from_secs(10),
        |s| {
            let w = status::worker(s, slot);
            w.state == status::SlotState::Ready
                && w.pid.is_some_and(|p| p != pid)
                && w.restarts == 1
        },
    );
    must_get(cluster.listen_addr(), "/");

    // SIGTERM reaches external workers as the systemd-style stop request.
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn a_crash_loop_ends_with_the_slot_failed_while_the_others_serve() {
    let script = fd3_worker();
    let cluster = Cluster::spawn(&[
        "--workers",
        "3",
        "--balance",
        "kernel",
        "--max-restarts",
        "3",
        "--restart-window",
        "60s",
        "--",
        "python3",
        &script,
        "--crash-slot",
        "1",
    ]);
    let doc = cluster.wait_until("slot 1 is failed", Duration::from_secs(30), |s| {
        status::worker(s, 1).state == status::SlotState::Failed
    });
    assert_eq!(doc["workers"][1]["last_exit"], "exit code 1");
    assert_eq!(
        doc["workers"][1]["restarts"], 3,
        "three restarts, then the fourth crash fails it"
    );
    cluster.wait_until("the other slots are ready", Duration::from_secs(10), |s| {
        [0, 2]
            .iter()
            .all(|&i| status::worker(s, i).state == status::SlotState::Ready)
    });
    let mut seen = BTreeSet::new();
    for _ in 0..60 {
        let response = http_get(cluster.listen_addr(), "/").expect("the other workers serve");
        seen.insert(response.worker().expect("header"));
    }
    assert_eq!(seen, BTreeSet::from([0, 2]));
    assert!(cluster.try_exit_status().is_none(), "the primary stays up");
    assert!(cluster.log().contains("slot failed"), "{}", cluster.log());
}

#[test]
fn a_worker_sending_garbage_on_ipc_is_replaced_counted_as_a_crash_and_the_primary_keeps_serving() {
    let script = fd3_worker();
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "kernel",
        "--",
        "python3",
        &script,
        "--garbage-slot",
        "0",
    ]);
    let doc = cluster.wait_until(
        "slot 0 runs a second generation",
        Duration::from_secs(15),
        |s| {
            let w = status::worker(s, 0);
            w.generation == 2 && w.state == status::SlotState::Ready
        },
    );
    assert_eq!(
        doc["workers"][0]["restarts"], 1,
        "a protocol violation counts like a crash (backoff, max-restarts)"
    );
    assert_eq!(doc["workers"][1]["restarts"], 0);
    let log = cluster.log();
    assert!(
        log.contains("IPC protocol violation") && log.contains("malformed IPC message"),
        "{log}"
    );
    for _ in 0..20 {
        must_get(cluster.listen_addr(), "/");
    }
    assert!(cluster.try_exit_status().is_none());
}

#[test]
fn a_worker_flooding_the_primary_with_messages_cannot_starve_it() {
    let script = fd3_worker();
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "kernel",
        "--",
        "python3",
        &script,
        "--flood-slot",
        "0",
    ]);
    // While slot 0 floods, the primary still answers status, sees exits and restarts.
    let slot = 1;
    let pid = cluster.kill_worker(slot);
    cluster.wait_until(
        "slot 1 restarts during the flood",
        Duration::from_secs(10),
        |s| {
            let w = status::worker(s, slot);
            w.state == status::SlotState::Ready && w.pid.is_some_and(|p| p != pid)
        },
    );
    for _ in 0..20 {
        must_get(cluster.listen_addr(), "/");
    }
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn workers_message_each_other_through_the_primary() {
    let script = fd3_worker();
    let cluster = Cluster::start(&[
        "--workers",
        "3",
        "--balance",
        "kernel",
        "--",
        "python3",
        &script,
        "--chat",
        "3",
    ]);
    // Each worker broadcasts to all and writes to the next slot every 100 ms; the primary
    // relays with `from` set. Ask until every slot has shown what reached it.
    let mut inboxes: std::collections::BTreeMap<usize, Vec<Value>> = Default::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let response = must_get(cluster.listen_addr(), "/inbox");
        let slot = response.worker().expect("header");
        let inbox: Vec<Value> = serde_json::from_str(&response.body).expect("json");
        let complete = |inbox: &[Value]| {
            let others: BTreeSet<u64> = inbox
                .iter()
                .filter(|m| m["data"]["hello_all_from"].is_string())
                .filter_map(|m| m["from"].as_u64())
                .collect();
            let previous = (slot + 2) % 3;
            others.len() == 2
                && inbox.iter().any(|m| {
                    m["data"]["hello_next_from"] == previous.to_string().as_str()
                        && m["from"] == previous
                })
        };
        if complete(&inbox) {
            inboxes.insert(slot, inbox);
        }
        if inboxes.len() == 3 {
            break;
        }
    }
    assert_eq!(
        inboxes.len(),
        3,
        "every worker heard from both others, and from its predecessor directly: {inboxes:?}"
    );
    for (slot, inbox) in &inboxes {
        assert!(
            inbox
                .iter()
                .all(|m| m["from"].as_u64() != Some(*slot as u64)),
            "a broadcast is not echoed to its sender: slot {slot} got {inbox:?}"
        );
        assert!(
            inbox
                .iter()
                .all(|m| m["data"]["hello_next_from"].is_null() || m["from"] == (slot + 2) % 3),
            "a message to one slot reaches only that slot: slot {slot} got {inbox:?}"
        );
    }
    // These workers answer pings, so the primary knows they are healthy.
    let doc = cluster.status();
    for w in status::workers(&doc) {
        assert!(
            w.raw["health_ms"].as_u64().is_some_and(|ms| ms < 3000),
            "{}",
            w.raw
        );
    }
}

fn heartbeat_worker() -> String {
    format!(
        "{}/fixtures/heartbeat_worker.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Sends `GET /block?ms=<ms>&slot=<slot>` on new connections until one is held: the
/// request that reached `slot`, whose loop now sleeps. Returns that connection.
fn stall_slot(addr: std::net::SocketAddr, slot: usize, ms: u64) -> std::net::TcpStream {
    use std::io::{Read, Write};
    for _ in 0..100 {
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        write!(
            conn,
            "GET /block?ms={ms}&slot={slot} HTTP/1.1\r\nHost: steer\r\n\r\n"
        )
        .expect("send /block");
        conn.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("read timeout");
        let mut byte = [0u8; 1];
        match conn.read(&mut byte) {
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return conn,
            Err(e) => panic!("reading the /block answer: {e}"),
        }
    }
    panic!("no /block request reached slot {slot} in 100 connections");
}

#[test]
fn a_python_worker_answering_pings_from_its_loop_is_replaced_when_the_loop_stalls() {
    let script = heartbeat_worker();
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--health-interval",
        "100ms",
        "--health-timeout",
        "500ms",
        "--shutdown-timeout",
        "1s",
        "--",
        "python3",
        &script,
    ]);
    for _ in 0..20 {
        must_get(cluster.listen_addr(), "/");
    }
    // Its pongs carry its counters into /status.
    // Its pongs carry its counters into /status.
    let served = cluster.wait_for_reported_requests(20, Duration::from_secs(5));
    let before = status::worker(&served, 1).pid.expect("slot 1 pid");
    assert!(
        status::worker(&served, 1).raw["health_ms"]
            .as_u64()
            .is_some_and(|ms| ms < 500),
        "{served:#}"
    );

    let _held = stall_slot(cluster.listen_addr(), 1, 5_000);
    let replaced = cluster.wait_until(
        "slot 1 replaced after its loop stalled",
        Duration::from_secs(5),
        |s| {
            let w = status::worker(s, 1);
            w.pid.is_some_and(|pid| pid != before) && w.state == steer_tests::SlotState::Ready
        },
    );
    cluster.wait_for_log("hung", Duration::from_secs(1));
    assert_eq!(
        status::worker(&replaced, 0).state,
        steer_tests::SlotState::Ready
    );
    for _ in 0..20 {
        must_get(cluster.listen_addr(), "/");
    }
    cluster.stop_cleanly(Duration::from_secs(10));
}

#[test]
fn an_external_worker_that_never_answers_pings_is_supervised_for_liveness_only() {
    let script = fd3_worker();
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "kernel",
        "--health-interval",
        "100ms",
        "--health-timeout",
        "300ms",
        "--",
        "python3",
        &script,
    ]);
    let pid = status::worker(&cluster.status(), 0)
        .pid
        .expect("slot 0 pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        steer_tests::Signal::SIGSTOP,
    )
    .expect("SIGSTOP");
    std::thread::sleep(Duration::from_millis(1_500));
    let status = cluster.status();
    let slot = status::worker(&status, 0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        steer_tests::Signal::SIGCONT,
    )
    .expect("SIGCONT");
    assert_eq!(slot.pid, Some(pid), "{status:#}");
    assert_eq!(slot.state, steer_tests::SlotState::Ready, "{status:#}");
    assert!(slot.raw["health_ms"].is_null(), "{status:#}");
    assert!(!cluster.log().contains("hung"), "{}", cluster.log());
    cluster.stop_cleanly(Duration::from_secs(10));
}

/// A program that does not speak the protocol reports no counters, so `/status` shows them
/// as `null` and `/metrics` leaves them out, as it does its heartbeat age: a 0 after it
/// served requests would be a lie.
#[test]
fn counters_an_external_worker_never_reports_are_absent_not_zero() {
    let script = fd3_worker();
    let cluster = Cluster::start(&[
        "--workers",
        "1",
        "--balance",
        "kernel",
        "--",
        "python3",
        &script,
    ]);
    for _ in 0..5 {
        must_get(cluster.listen_addr(), "/");
    }
    let doc = cluster.status();
    let worker = &doc["workers"][0];
    for field in ["accepted", "active", "requests", "health_ms"] {
        assert!(
            worker[field].is_null(),
            "{field} of a silent worker: {doc:#}"
        );
    }
    let metrics = must_get(cluster.status_addr(), "/metrics").body;
    for family in [
        "steer_worker_accepted_total",
        "steer_worker_active_connections",
        "steer_worker_requests_total",
        "steer_worker_heartbeat_age_seconds",
    ] {
        assert!(
            !metrics.contains(&format!("{family}{{slot=\"0\"}}")),
            "{family} for a silent worker:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("steer_worker_restarts_total{slot=\"0\"} 0"),
        "what the primary knows itself stays:\n{metrics}"
    );
    cluster.stop_cleanly(Duration::from_secs(15));
}
