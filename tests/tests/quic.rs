//! The demo on `quic://` listeners: HTTP/3 with `x-steer-worker`, one process per
//! connection while nothing restarts, the certificate given with `--tls-cert`/`--tls-key`,
//! and the QUIC variables every worker gets.
//!
//! Until Steer's program steers by connection ID, a QUIC listener is steered like a UDP
//! one, each datagram on its own: these tests use `--balance hash`, which keeps every
//! datagram of one client address on one slot (under `round-robin` a connection's
//! datagrams would be spread, and the other workers answer with stateless resets). The
//! first `--listen` is TCP, the harness's readiness address. The restart, upgrade, migration and stateless-reset cases are in
//! `tests/pending_quic.rs`, not yet registered.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use steer_tests::h3::H3Connection;
use steer_tests::{Cluster, free_local_addr};

const PATIENCE: Duration = Duration::from_secs(10);

#[test]
fn the_demo_answers_http3_get_with_its_worker() {
    let quic = free_local_addr();
    let listen = format!("web=quic://{quic}");
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "hash",
        "--listen",
        &free_local_addr().to_string(),
        "--listen",
        &listen,
    ]);
    let pids: BTreeMap<usize, u32> = cluster.worker_pids().into_iter().collect();
    let mut connection = H3Connection::connect(quic, None, PATIENCE).expect("connects");
    let answer = connection.get("/", PATIENCE).expect("answered");
    assert_eq!(answer.status, 200, "{answer:?}");
    let slot: usize = answer
        .worker
        .as_deref()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("x-steer-worker: {answer:?}"));
    assert_eq!(
        answer.body,
        format!("hello from worker {slot} (pid {})\n", pids[&slot])
    );
    assert_eq!(
        connection.get("/nope", PATIENCE).expect("answered").status,
        404
    );
    connection.close();
    let doc = cluster.status();
    let listeners = doc["listeners"].as_array().expect("listeners");
    assert_eq!(listeners[1]["protocol"], "quic", "{doc}");
}

#[test]
fn a_connection_is_served_by_one_process_throughout() {
    let quic = free_local_addr();
    let listen = format!("quic://{quic}");
    let cluster = Cluster::start(&[
        "--workers",
        "3",
        "--balance",
        "hash",
        "--listen",
        &free_local_addr().to_string(),
        "--listen",
        &listen,
    ]);
    let mut connections: Vec<H3Connection> = (0..3)
        .map(|_| H3Connection::connect(quic, None, PATIENCE).expect("connects"))
        .collect();
    let mut served_by: Vec<Option<u32>> = vec![None; connections.len()];
    // A request every 100 ms for 3 s on each connection.
    let start = Instant::now();
    for round in 0..30 {
        for (i, connection) in connections.iter_mut().enumerate() {
            let answer = connection
                .get("/", PATIENCE)
                .unwrap_or_else(|e| panic!("connection {i}, round {round}: {e}"));
            let pid = answer.pid().expect("a greeting with a pid");
            assert_eq!(
                *served_by[i].get_or_insert(pid),
                pid,
                "connection {i} moved"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(start.elapsed() < Duration::from_secs(60), "bounded");
    let workers = cluster.worker_pid_list();
    for pid in served_by.iter().flatten() {
        assert!(workers.contains(pid), "served by a worker of the cluster");
    }
    for connection in connections {
        assert!(connection.close_reason().is_none(), "still open");
        connection.close();
    }
}

#[test]
fn the_demo_presents_the_certificate_it_was_given() {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let dir = std::env::temp_dir().join(format!("steer-quic-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).expect("cert.pem");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("key.pem");
    let quic = free_local_addr();
    let listen = format!("quic://{quic}");
    let cluster = Cluster::start(&[
        "--workers",
        "1",
        "--listen",
        &free_local_addr().to_string(),
        "--listen",
        &listen,
        "--tls-cert",
        cert.to_str().expect("utf-8"),
        "--tls-key",
        key.to_str().expect("utf-8"),
    ]);
    let expected = made.cert.der().clone();
    let mut connection =
        H3Connection::connect(quic, Some(expected.clone()), PATIENCE).expect("connects");
    assert_eq!(connection.peer_certificate(), Some(expected));
    assert_eq!(connection.get("/", PATIENCE).expect("answered").status, 200);
    connection.close();
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn steer_check_refuses_half_a_tls_pair() {
    let out = steer_tests::run_steer(&[
        "check",
        "--listen",
        "quic://127.0.0.1:4433",
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("tls-cert"), "{}", out.stderr);
}

/// The report `tests/fixtures/listeners_worker.py` writes for the worker `pid` in `dir`.
fn worker_report(dir: &std::path::Path, pid: u32) -> serde_json::Value {
    let report = dir.join(format!("{pid}.json"));
    let deadline = Instant::now() + PATIENCE;
    while !report.exists() {
        assert!(Instant::now() < deadline, "worker {pid} wrote no report");
        std::thread::sleep(Duration::from_millis(20));
    }
    serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json")
}

#[test]
fn every_worker_gets_its_server_id_and_the_clusters_reset_key() {
    let dir = std::env::temp_dir().join(format!("steer-quic-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = format!(
        "{}/fixtures/listeners_worker.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let listen = format!("h3=quic://{}", free_local_addr());
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--listen",
        &free_local_addr().to_string(),
        "--listen",
        &listen,
        "--",
        "python3",
        &script,
        dir.to_str().expect("utf-8 path"),
    ]);
    let quic_env = |pid: u32| {
        let env = worker_report(&dir, pid)["env"].clone();
        let var = |name: &str| env[name].as_str().unwrap_or_default().to_owned();
        (
            var("STEER_WORKER_SLOT"),
            var("STEER_WORKER_GENERATION"),
            var("STEER_QUIC_CID_LEN"),
            var("STEER_QUIC_SERVER_ID"),
            var("STEER_QUIC_RESET_KEY"),
        )
    };
    let mut keys = Vec::new();
    for (slot, pid) in cluster.worker_pids() {
        let (s, generation, len, server, key) = quic_env(pid);
        assert_eq!(s, slot.to_string());
        assert_eq!(len, "16");
        let generation: u16 = generation.parse().expect("a generation");
        assert_eq!(
            server,
            format!("{slot:04x}{generation:04x}"),
            "slot then generation"
        );
        assert!(
            key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()),
            "{key:?}"
        );
        keys.push(key);
    }
    let killed = cluster.kill_worker(0);
    let replaced = cluster.wait_until("slot 0 is replaced", PATIENCE, |doc| {
        doc["workers"][0]["pid"]
            .as_u64()
            .is_some_and(|pid| pid != u64::from(killed))
    });
    let pid = replaced["workers"][0]["pid"].as_u64().expect("pid") as u32;
    let (_, generation, _, server, key) = quic_env(pid);
    assert_eq!(
        server,
        format!("0000{:04x}", generation.parse::<u16>().expect("generation"))
    );
    assert_ne!(generation, "1", "a new generation");
    keys.push(key);
    keys.dedup();
    assert_eq!(keys.len(), 1, "one reset key for the cluster: {keys:?}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `target/<profile>/examples/quic_worker` (`cargo build -p steer --examples` builds it).
fn quic_example() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the running test executable");
    let deps = exe.parent().expect("its directory");
    let profile = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().unwrap_or(deps)
    } else {
        deps
    };
    let bin = profile.join("examples/quic_worker");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p steer --examples` first",
        bin.display()
    );
    bin
}

#[test]
fn the_quinn_example_serves_http3_on_the_library() {
    let quic = free_local_addr();
    let cluster = Cluster::start_program(
        &quic_example(),
        &[
            "--workers",
            "2",
            "--balance",
            "hash",
            "--quic",
            &quic.to_string(),
        ],
    );
    let workers = cluster.worker_pid_list();
    let mut connection = H3Connection::connect(quic, None, PATIENCE).expect("connects");
    for _ in 0..5 {
        let answer = connection.get("/", PATIENCE).expect("answered");
        assert_eq!(answer.status, 200, "{answer:?}");
        assert!(
            answer.body.starts_with("hello from quinn worker"),
            "{answer:?}"
        );
        let pid = answer.pid().expect("a pid");
        assert!(workers.contains(&pid), "{pid} is not one of {workers:?}");
    }
    connection.close();
}
