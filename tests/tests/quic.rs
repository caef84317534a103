//! The demo on `quic://` listeners: HTTP/3 with `x-steer-worker`, one process per
//! connection while nothing restarts, the certificate given with `--tls-cert`/`--tls-key`,
//! and the QUIC variables every worker gets.
//!
//! Steer's program steers each datagram by its connection ID, so these tests use
//! `--balance round-robin`: a policy that would spread a connection's datagrams over the
//! workers if anything but the ID kept them together (the other workers would answer with
//! stateless resets). The first `--listen` is TCP, the harness's readiness address.
//!
//! Then what the issue asks of QUIC: connections that live through rolling restarts and a
//! primary upgrade, migration to a new client port, a stateless reset at once when the
//! process holding a connection dies, handshakes of several datagrams kept together under
//! every policy, new connections on the new generation only, a rogue socket in the group
//! that gets nothing, and datagrams that are not QUIC.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use steer_tests::h3::{ConnectOptions, H3Connection};
use steer_tests::{Cluster, free_local_addr, status};

const PATIENCE: Duration = Duration::from_secs(10);

#[test]
fn the_demo_answers_http3_get_with_its_worker() {
    let quic = free_local_addr();
    let listen = format!("web=quic://{quic}");
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
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
        "round-robin",
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
            "round-robin",
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

/// A cluster of `workers` demo workers under `policy` with a TCP listener (the harness's)
/// and a QUIC one, plus `extra` arguments; returns it and the QUIC address.
fn quic_cluster(workers: usize, policy: &str, extra: &[&str]) -> (Cluster, SocketAddr) {
    let quic = free_local_addr();
    let listen = format!("h3=quic://{quic}");
    let workers = workers.to_string();
    let tcp = free_local_addr().to_string();
    let mut args = vec![
        "--workers",
        &workers,
        "--balance",
        policy,
        "--listen",
        &tcp,
        "--listen",
        &listen,
    ];
    args.extend_from_slice(extra);
    (Cluster::start(&args), quic)
}

/// The pid and slot that answered `GET /` on `connection`.
fn served_by(connection: &mut H3Connection) -> Result<(u32, usize), String> {
    let answer = connection.get("/", PATIENCE)?;
    let pid = answer.pid().ok_or_else(|| format!("no pid: {answer:?}"))?;
    let slot = answer
        .worker
        .as_deref()
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| format!("no x-steer-worker: {answer:?}"))?;
    Ok((pid, slot))
}

/// pid -> generation of every worker `/status` shows.
fn generations(doc: &serde_json::Value) -> BTreeMap<u32, u64> {
    status::workers(doc)
        .iter()
        .filter_map(|w| Some((w.pid?, w.generation)))
        .collect()
}

/// What one connection of the restart test saw.
#[derive(Debug, Default)]
struct Run {
    requests: usize,
    failures: Vec<String>,
    pids: BTreeSet<u32>,
    closed: Option<String>,
}

#[test]
fn connections_live_through_two_rolling_restarts_and_a_primary_upgrade() {
    // The old workers hold their connections for the whole test: a minute to drain.
    let (cluster, quic) = quic_cluster(2, "round-robin", &["--shutdown-timeout", "60s"]);
    let first = generations(&cluster.status());
    let old_primary = cluster.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (stop, started) = (stop.clone(), started.clone());
            std::thread::spawn(move || {
                let mut run = Run::default();
                let mut connection = match H3Connection::connect(quic, None, PATIENCE) {
                    Ok(c) => c,
                    Err(e) => {
                        run.failures.push(e);
                        started.fetch_add(1, Ordering::SeqCst);
                        return run;
                    }
                };
                let begun = Instant::now();
                // A request every 100 ms for at least 12 s, and until the events are over
                // (at most 90 s).
                while (!stop.load(Ordering::SeqCst) || begun.elapsed() < Duration::from_secs(12))
                    && begun.elapsed() < Duration::from_secs(90)
                {
                    run.requests += 1;
                    match served_by(&mut connection) {
                        Ok((pid, _)) => {
                            run.pids.insert(pid);
                        }
                        Err(e) => run.failures.push(e),
                    }
                    if run.requests == 1 {
                        started.fetch_add(1, Ordering::SeqCst);
                    }
                    // Every 3 s the client moves to a new port: only its connection ID,
                    // not a flow, keeps it on its process.
                    if run.requests % 30 == 0
                        && let Err(e) = connection.rebind()
                    {
                        run.failures.push(e);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                run.closed = connection.close_reason().map(|r| r.to_string());
                connection.close();
                run
            })
        })
        .collect();
    let deadline = Instant::now() + PATIENCE;
    while started.load(Ordering::SeqCst) < 8 {
        assert!(Instant::now() < deadline, "the connections did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    cluster.rolling_restart(Duration::from_secs(30));
    cluster.rolling_restart(Duration::from_secs(30));
    cluster.signal(Signal::SIGUSR1);
    // Not `Cluster::wait_until`: the primary the harness started hands over and drains.
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        if let Ok(doc) = cluster.try_status()
            && status::primary_pid(&doc).is_some_and(|p| p != old_primary)
            && status::all_ready(&doc)
        {
            break doc;
        }
        assert!(Instant::now() < deadline, "no successor took over");
        std::thread::sleep(Duration::from_millis(20));
    };
    stop.store(true, Ordering::SeqCst);
    let runs: Vec<Run> = threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect();
    let successor = generations(&after);
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(
            run.failures,
            Vec::<String>::new(),
            "connection {i} failed requests"
        );
        assert_eq!(run.closed, None, "connection {i} was closed");
        assert_eq!(run.pids.len(), 1, "connection {i} moved: {:?}", run.pids);
        let pid = run.pids.first().expect("a pid");
        assert!(
            first.contains_key(pid),
            "connection {i} on a first-generation worker"
        );
        assert!(
            run.requests >= 100,
            "connection {i}: {} requests",
            run.requests
        );
    }
    // The successor's workers went on counting generations: their IDs name no old worker.
    let oldest_new = successor.values().min().copied().unwrap_or(0);
    assert!(
        first.values().all(|&g| g + 3 <= oldest_new),
        "generations go on across the upgrade: {first:?} then {successor:?}"
    );
    // A new connection goes to a worker of the successor.
    let mut fresh = H3Connection::connect(quic, None, PATIENCE).expect("connects after");
    let (pid, _) = served_by(&mut fresh).expect("answered");
    assert!(
        successor.contains_key(&pid),
        "{pid} is not one of {successor:?}"
    );
    fresh.close();
    println!(
        "8 connections, {} requests through 2 rolls and an upgrade: 0 failed, 0 closed; \
         generations {first:?} -> {successor:?}",
        runs.iter().map(|r| r.requests).sum::<usize>()
    );
}

#[test]
fn a_draining_workers_connection_ends_with_goaway_at_the_shutdown_timeout() {
    // The demo sends GOAWAY at nine tenths of the shutdown timeout; its socket stays in
    // steering until it closes it, so the close reaches the client, not a stateless reset.
    let (cluster, quic) = quic_cluster(2, "round-robin", &["--shutdown-timeout", "4s"]);
    let mut connection = H3Connection::connect(quic, None, PATIENCE).expect("connects");
    let (pid, _) = served_by(&mut connection).expect("answered");
    cluster.rolling_restart(Duration::from_secs(30));
    let rolled = Instant::now();
    let mut answered = 0;
    let mut refused = Vec::new();
    while connection.close_reason().is_none() && rolled.elapsed() < Duration::from_secs(10) {
        match served_by(&mut connection) {
            Ok((now, _)) => {
                assert_eq!(now, pid);
                assert!(refused.is_empty(), "answered after a refusal: {refused:?}");
                answered += 1;
            }
            Err(e) => refused.push(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let reason = connection.wait_closed(PATIENCE);
    let took = rolled.elapsed();
    match &reason {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(close.error_code, 0x100u32.into(), "H3_NO_ERROR: {close:?}");
        }
        other => panic!("not a graceful close: {other:?}"),
    }
    assert!(answered >= 10, "served while draining: {answered}");
    assert!(took < Duration::from_secs(10), "closed after {took:?}");
    println!("drained: {answered} answers, then {refused:?}, closed after {took:?}: {reason:?}");
}

#[test]
fn a_client_that_changes_its_port_stays_on_its_process() {
    let (_cluster, quic) = quic_cluster(3, "round-robin", &[]);
    let mut connection = H3Connection::connect(quic, None, PATIENCE).expect("connects");
    let (pid, _) = served_by(&mut connection).expect("answered");
    let mut ports = BTreeSet::new();
    ports.insert(connection.local_addr().expect("address").port());
    for move_ in 0..6 {
        let new = connection.rebind().expect("rebinds");
        ports.insert(new.port());
        for request in 0..3 {
            let (now, _) = served_by(&mut connection)
                .unwrap_or_else(|e| panic!("move {move_}, request {request}: {e}"));
            assert_eq!(now, pid, "move {move_}: the connection changed process");
        }
        assert_eq!(connection.local_addr(), Some(new));
    }
    assert_eq!(ports.len(), 7, "seven client ports: {ports:?}");
    assert!(connection.close_reason().is_none());
    connection.close();
}

/// Whether process `pid` has exited (gone, or a zombie: its sockets are closed).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn a_killed_workers_client_gets_a_stateless_reset_at_once() {
    let (cluster, quic) = quic_cluster(2, "round-robin", &[]);
    let mut connection = H3Connection::connect(quic, None, PATIENCE).expect("connects");
    let (pid, slot) = served_by(&mut connection).expect("answered");
    assert_eq!(cluster.kill_worker(slot), pid);
    let deadline = Instant::now() + PATIENCE;
    while !exited(pid) {
        assert!(Instant::now() < deadline, "{pid} did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The next packet (this request, or a keep-alive) names a process that is gone: a
    // live worker answers with a stateless reset. The idle timeout is 30 s.
    let sent = Instant::now();
    let answer = connection.get("/", PATIENCE);
    let reason = connection.wait_closed(PATIENCE);
    let took = sent.elapsed();
    assert!(answer.is_err(), "answered by a dead process: {answer:?}");
    assert!(
        matches!(reason, Some(quinn::ConnectionError::Reset)),
        "closed by {reason:?}, not a stateless reset"
    );
    assert!(
        took < Duration::from_secs(1),
        "the connection ended after {took:?}"
    );
    let mut fresh = H3Connection::connect(quic, None, PATIENCE).expect("a new connection");
    let (now, _) = served_by(&mut fresh).expect("answered");
    assert_ne!(now, pid);
    fresh.close();
    println!("killed {pid}: its client was reset {took:?} after its next request");
}

#[test]
fn new_connections_go_to_the_new_generation_and_split_handshakes_stay_together() {
    for policy in ["round-robin", "hash", "least-loaded", "cpu"] {
        let (cluster, quic) = quic_cluster(2, policy, &["--shutdown-timeout", "30s"]);
        // A ClientHello of two Initial datagrams, under every policy.
        let big = ConnectOptions {
            extra_alpn: 40,
            ..ConnectOptions::default()
        };
        let port = UdpSocket::bind("127.0.0.1:0").expect("a port");
        let local = port.local_addr().expect("address");
        drop(port);
        // A connection from `local`, which then moves away (it keeps its old worker
        // draining), so that `local`'s entry in the flow table names a draining worker.
        let mut held = H3Connection::connect_with(
            quic,
            &ConnectOptions {
                local: Some(local),
                ..big.clone()
            },
            PATIENCE,
        )
        .unwrap_or_else(|e| panic!("{policy}: {e}"));
        let (held_pid, _) = served_by(&mut held).expect("answered");
        held.rebind().expect("rebinds");
        served_by(&mut held).expect("answered after moving");
        cluster.rolling_restart(Duration::from_secs(30));
        let new = generations(&cluster.status());
        assert!(!new.contains_key(&held_pid));
        for i in 0..6 {
            let options = ConnectOptions {
                local: (i == 0).then_some(local),
                ..big.clone()
            };
            let mut c = H3Connection::connect_with(quic, &options, PATIENCE)
                .unwrap_or_else(|e| panic!("{policy}, connection {i}: {e}"));
            let (pid, _) = served_by(&mut c).expect("answered");
            assert!(
                new.contains_key(&pid),
                "{policy}, connection {i}: served by {pid}, not one of the new {new:?}"
            );
            c.close();
        }
        // The moved connection still runs on its draining worker.
        assert_eq!(served_by(&mut held).map(|a| a.0), Ok(held_pid), "{policy}");
        held.close();
    }
}

/// A same-user socket in the QUIC listener's group.
fn rogue_udp(addr: SocketAddr) -> UdpSocket {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .expect("socket");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    socket
        .bind(&addr.into())
        .expect("the rogue joins the group");
    socket.set_nonblocking(true).expect("nonblocking");
    socket.into()
}

/// Datagrams `socket` has queued.
fn queued(socket: &UdpSocket) -> usize {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while socket.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

#[test]
fn a_rogue_socket_in_the_quic_group_gets_nothing() {
    for policy in ["round-robin", "hash"] {
        let (_cluster, quic) = quic_cluster(2, policy, &[]);
        let rogue = rogue_udp(quic);
        let mut pids = BTreeSet::new();
        for i in 0..8 {
            let options = ConnectOptions {
                extra_alpn: if i % 2 == 0 { 40 } else { 0 },
                ..ConnectOptions::default()
            };
            let mut c = H3Connection::connect_with(quic, &options, PATIENCE)
                .unwrap_or_else(|e| panic!("{policy}, connection {i}: {e}"));
            for _ in 0..5 {
                pids.insert(served_by(&mut c).expect("answered").0);
            }
            c.rebind().expect("rebinds");
            pids.insert(served_by(&mut c).expect("answered").0);
            c.close();
        }
        assert_eq!(queued(&rogue), 0, "{policy}: the rogue got datagrams");
        if policy == "round-robin" {
            assert_eq!(pids.len(), 2, "both workers served: {pids:?}");
        }
    }
}

/// Datagrams that are not QUIC for this cluster, or only barely.
fn hostile_datagrams() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = vec![
        vec![],
        vec![0x40],
        vec![0xc0, 0, 0, 0],
        // A long header whose 16-byte DCID is cut short.
        vec![0xc0, 0, 0, 0, 1, 16, 0, 0, 1, 0, 0],
        // A short header shorter than a DCID, and one with the fixed bit clear.
        vec![0x41; 10],
        vec![0x01; 64],
    ];
    // Version negotiation (version 0) and an unknown version, with client-chosen IDs.
    for version in [0u32, 0x1a2a_3a4a] {
        let mut d = vec![0xc0];
        d.extend_from_slice(&version.to_be_bytes());
        d.push(8);
        d.extend_from_slice(&[9; 8]);
        d.push(8);
        d.extend_from_slice(&[7; 8]);
        d.extend_from_slice(&1u32.to_be_bytes());
        d.resize(1200, 0);
        out.push(d);
    }
    // A short header naming slots and generations that do not exist.
    for (slot, generation) in [(0u16, 999u16), (1023, 1), (1024, 1), (65_535, 65_535)] {
        let mut d = vec![0x41, 0];
        d.extend_from_slice(&slot.to_be_bytes());
        d.extend_from_slice(&generation.to_be_bytes());
        d.extend_from_slice(&[0x5a; 60]);
        out.push(d);
    }
    // Pseudo-random garbage of every length up to 1,500.
    let mut x: u32 = 0x2545_f491;
    for len in (1..1500).step_by(37) {
        let d: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        out.push(d);
    }
    out
}

#[test]
fn garbage_truncated_and_version_negotiation_datagrams_break_nothing() {
    let (cluster, quic) = quic_cluster(2, "round-robin", &[]);
    let rogue = rogue_udp(quic);
    let pids = cluster.worker_pid_list();
    let mut connection = H3Connection::connect(quic, None, PATIENCE).expect("connects");
    let (pid, _) = served_by(&mut connection).expect("answered");
    let sender = UdpSocket::bind("127.0.0.1:0").expect("sender");
    let corpus = hostile_datagrams();
    for round in 0..3 {
        for d in &corpus {
            sender.send_to(d, quic).expect("send");
        }
        let (now, _) = served_by(&mut connection)
            .unwrap_or_else(|e| panic!("round {round}: the connection broke: {e}"));
        assert_eq!(now, pid);
    }
    // Whatever was answered came from the listener's address (a worker's socket).
    sender
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = [0u8; 2048];
    let mut answers = 0;
    while let Ok((_, from)) = sender.recv_from(&mut buf) {
        assert_eq!(from, quic);
        answers += 1;
        assert!(answers < 10_000, "bounded");
    }
    assert_eq!(queued(&rogue), 0, "the rogue got datagrams");
    let doc = cluster.status();
    assert_eq!(cluster.worker_pid_list(), pids, "no worker crashed");
    let counts = &doc["listeners"][1]["quic"];
    assert!(
        counts["malformed"].as_u64().is_some_and(|n| n >= 3 * 4),
        "{counts}"
    );
    assert!(
        counts["steered"].as_u64().is_some_and(|n| n > 0),
        "{counts}"
    );
    let mut fresh = H3Connection::connect(quic, None, PATIENCE).expect("a new connection");
    served_by(&mut fresh).expect("answered");
    fresh.close();
    connection.close();
    println!(
        "3 x {} hostile datagrams: {answers} answered, {counts}",
        corpus.len()
    );
}

#[test]
fn the_quinn_example_serves_through_a_rolling_restart() {
    let quic = free_local_addr();
    let cluster = Cluster::start_program(
        &quic_example(),
        &[
            "--workers",
            "2",
            "--balance",
            "round-robin",
            "--quic",
            &quic.to_string(),
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut requests = 0;
            let begun = Instant::now();
            // New connections and requests on an open one until the roll is over.
            let mut open = H3Connection::connect(quic, None, PATIENCE);
            while !stop.load(Ordering::SeqCst) && begun.elapsed() < Duration::from_secs(60) {
                requests += 1;
                let on_open = match open.as_mut() {
                    Ok(c) => c.get("/", PATIENCE).map(|_| ()),
                    Err(e) => Err(e.clone()),
                };
                let fresh = H3Connection::connect(quic, None, PATIENCE).and_then(|mut c| {
                    let answer = c.get("/", PATIENCE);
                    c.close();
                    answer.map(|_| ())
                });
                failures.extend(on_open.err());
                failures.extend(fresh.err());
                std::thread::sleep(Duration::from_millis(50));
            }
            (requests, failures)
        })
    };
    cluster.rolling_restart(Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let (requests, failures) = client.join().expect("client");
    assert!(requests > 0);
    assert_eq!(failures, Vec::<String>::new(), "{requests} rounds");
}
