//! Several listeners per cluster, TCP and UDP: every worker serves each of them, each is
//! its own `SO_REUSEPORT` group steered by Steer's program, and an external worker finds
//! its sockets the systemd way (`LISTEN_FDS`, `LISTEN_FDNAMES`, fds 3, 4, ...).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use steer_tests::{Cluster, Load, Signal, Value, free_local_addr, must_get, run_steer, status};

/// One datagram from `from`'s socket to `to`; the demo's answer, parsed as
/// `(slot, pid, generation, echoed payload)`, or `None` within `timeout`.
fn ask(from: &UdpSocket, to: SocketAddr, payload: &str, timeout: Duration) -> Option<Answer> {
    from.set_read_timeout(Some(timeout)).expect("timeout");
    from.send_to(payload.as_bytes(), to).expect("send");
    let mut buffer = [0u8; 2048];
    let (len, peer) = from.recv_from(&mut buffer).ok()?;
    assert_eq!(peer, to, "the answer comes from the listener's address");
    let text = std::str::from_utf8(&buffer[..len]).expect("ASCII answer");
    let mut parts = text.splitn(4, ' ');
    let mut number = || -> u64 {
        parts
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("answer {text:?} is `<slot> <pid> <generation> <payload>`"))
    };
    let (slot, pid, generation) = (number() as usize, number() as u32, number());
    let echoed = parts.next().unwrap_or_default().to_owned();
    Some(Answer {
        slot,
        pid,
        generation,
        echoed,
    })
}

#[derive(Debug)]
struct Answer {
    slot: usize,
    pid: u32,
    generation: u64,
    echoed: String,
}

/// A fresh client socket on 127.0.0.1 (a new source port: a new flow).
fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").expect("client socket")
}

#[test]
fn two_tcp_listeners_lose_no_new_connection_through_three_rolling_restarts() {
    let second = free_local_addr();
    let second_arg = format!("admin={second}");
    let cluster = Cluster::start(&[
        "--workers",
        "4",
        "--balance",
        "round-robin",
        "--listen",
        &free_local_addr().to_string(),
        "--listen",
        &second_arg,
    ]);
    let doc = cluster.status();
    let names: Vec<&str> = doc["listeners"]
        .as_array()
        .expect("listeners in /status")
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    assert_eq!(names[1], "admin", "{doc}");
    let first_load = Load::new_connections(cluster.listen_addr(), 4);
    let second_load = Load::new_connections(second, 4);
    first_load.wait_for_ok(100, Duration::from_secs(10));
    second_load.wait_for_ok(100, Duration::from_secs(10));
    for round in 1..=3u64 {
        let before = cluster.worker_pid_list();
        cluster.signal(Signal::SIGUSR2);
        cluster.wait_until(
            &format!("rolling restart {round}: every slot replaced"),
            Duration::from_secs(30),
            |s| {
                s["primary"]["phase"] == "running"
                    && status::all_ready(s)
                    && status::workers(s).iter().all(|w| {
                        w.pid.is_some_and(|p| !before.contains(&p)) && w.generation == round + 1
                    })
            },
        );
    }
    let doc = cluster.wait_until(
        "old generations have exited",
        Duration::from_secs(10),
        |s| status::workers(s).iter().all(|w| w.raw["draining"] == 0),
    );
    let (first, second) = (first_load.stop(), second_load.stop());
    println!("first listener: {first}\nsecond listener: {second}");
    first.assert_all_succeeded();
    second.assert_all_succeeded();
    assert!(first.ok >= 200 && second.ok >= 200, "too little load");
    for listener in doc["listeners"].as_array().expect("listeners") {
        assert!(
            listener["steered"].as_u64().unwrap_or(0) >= 200,
            "each listener's group is steered by the program: {listener}"
        );
        assert_eq!(listener["drops"], 0, "{listener}");
    }
}

#[test]
fn a_tcp_and_a_udp_listener_are_both_served_by_the_demo() {
    let udp = free_local_addr();
    let udp_arg = format!("dns=udp://{udp}");
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--listen",
        &free_local_addr().to_string(),
        "--listen",
        &udp_arg,
    ]);
    assert_eq!(must_get(cluster.listen_addr(), "/").status, 200);
    let pids: BTreeMap<usize, u32> = cluster.worker_pids().into_iter().collect();
    let mut slots = BTreeSet::new();
    for i in 0..20 {
        let payload = format!("hello {i}");
        let answer = ask(&client(), udp, &payload, Duration::from_secs(2))
            .unwrap_or_else(|| panic!("datagram {i} unanswered"));
        assert_eq!(answer.echoed, payload);
        assert_eq!(pids.get(&answer.slot), Some(&answer.pid), "{answer:?}");
        assert_eq!(answer.generation, 1);
        slots.insert(answer.slot);
    }
    assert_eq!(
        slots,
        BTreeSet::from([0, 1]),
        "round-robin spreads UDP flows"
    );
    let doc = cluster.status();
    let listeners = doc["listeners"].as_array().expect("listeners");
    assert_eq!(listeners[1]["name"], "dns");
    assert_eq!(listeners[1]["protocol"], "udp");
    assert_eq!(listeners[1]["address"], udp.to_string());
    assert!(listeners[1]["steered"].as_u64().unwrap_or(0) >= 20, "{doc}");
    let metrics = steer_tests::http_get(cluster.status_addr(), "/metrics")
        .expect("metrics")
        .body;
    assert!(
        metrics.contains("steer_listener_steered_total{listener=\"dns\",protocol=\"udp\""),
        "{metrics}"
    );
}

#[test]
fn an_external_worker_gets_one_fd_per_listener_named_then_its_ipc_fd() {
    let dir = std::env::temp_dir().join(format!("steer-listeners-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = format!(
        "{}/fixtures/listeners_worker.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let udp = free_local_addr();
    let udp_arg = format!("dns=udp://{udp}");
    let tcp = free_local_addr();
    let tcp_arg = tcp.to_string();
    let cluster = Cluster::start(&[
        "--workers",
        "1",
        "--balance",
        "round-robin",
        "--listen",
        &tcp_arg,
        "--listen",
        &udp_arg,
        "--",
        "python3",
        &script,
        dir.to_str().expect("utf-8 path"),
    ]);
    let pid = cluster.worker_pid_list()[0];
    let report = dir.join(format!("{pid}.json"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !report.exists() {
        assert!(Instant::now() < deadline, "the worker wrote no report");
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
    let env = &seen["env"];
    assert_eq!(env["LISTEN_FDS"], "2", "{seen}");
    assert_eq!(
        env["LISTEN_FDNAMES"],
        format!("tcp-{}:dns", tcp.port()).as_str(),
        "{seen}"
    );
    assert_eq!(env["LISTEN_PID"], pid.to_string().as_str());
    assert_eq!(env["STEER_IPC_FD"], "5", "{seen}");
    assert_eq!(env["NODE_CHANNEL_FD"], "5", "{seen}");
    let sockets = seen["sockets"].as_array().expect("sockets");
    assert_eq!(sockets[0]["fd"], 3);
    assert_eq!(sockets[0]["type"], "stream");
    assert_eq!(sockets[0]["listening"], true);
    assert_eq!(sockets[0]["address"], tcp.to_string());
    assert_eq!(sockets[1]["fd"], 4);
    assert_eq!(sockets[1]["type"], "dgram");
    assert_eq!(sockets[1]["address"], udp.to_string());
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A same-user socket that joins the UDP listener's group (`SO_REUSEPORT`, same address).
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
    UdpSocket::from(socket)
}

/// Datagrams waiting on `socket` (it never answers them).
fn queued(socket: &UdpSocket) -> usize {
    let mut buffer = [0u8; 2048];
    let mut n = 0;
    while socket.recv_from(&mut buffer).is_ok() {
        n += 1;
    }
    n
}

/// A UDP cluster of 4 under `policy`, with a rogue socket in its group: 500 new flows (500
/// source ports) all reach the workers, none the rogue. Returns the slot of each flow.
fn flows_past_a_rogue(policy: &str) -> Vec<usize> {
    let udp = free_local_addr();
    let udp_arg = format!("dns=udp://{udp}");
    let cluster = Cluster::start(&[
        "--workers",
        "4",
        "--balance",
        policy,
        "--listen",
        &free_local_addr().to_string(),
        "--listen",
        &udp_arg,
    ]);
    let rogue = rogue_udp(udp);
    let mut slots = Vec::new();
    let mut ports = BTreeSet::new();
    // Every client socket stays open, so that each flow has a source port of its own.
    let mut clients = Vec::new();
    for i in 0..500 {
        let socket = client();
        ports.insert(socket.local_addr().expect("port").port());
        let answer = ask(&socket, udp, &format!("flow {i}"), Duration::from_secs(2))
            .unwrap_or_else(|| {
                panic!(
                    "{policy}: flow {i} unanswered ({} taken by the rogue so far)",
                    queued(&rogue)
                )
            });
        slots.push(answer.slot);
        clients.push(socket);
    }
    assert_eq!(ports.len(), 500, "500 distinct source ports");
    assert_eq!(
        queued(&rogue),
        0,
        "{policy}: the rogue socket in the group got flows"
    );
    let _keep = rogue.as_raw_fd();
    drop(cluster);
    slots
}

#[test]
fn a_rogue_udp_socket_in_the_group_gets_no_flow_under_round_robin() {
    let slots = flows_past_a_rogue("round-robin");
    let spread: BTreeSet<usize> = slots.iter().copied().collect();
    assert_eq!(
        spread,
        BTreeSet::from([0, 1, 2, 3]),
        "round-robin spreads UDP flows over every slot"
    );
}

#[test]
fn a_rogue_udp_socket_in_the_group_gets_no_flow_under_hash_and_one_client_keeps_its_slot() {
    let slots = flows_past_a_rogue("hash");
    // Every flow above came from 127.0.0.1: under `hash` they share one slot; 50 of them
    // are the acceptance's count, 500 is more.
    let spread: BTreeSet<usize> = slots.iter().take(50).copied().collect();
    assert_eq!(spread.len(), 1, "one client IP, one slot: {spread:?}");
    let all: BTreeSet<usize> = slots.iter().copied().collect();
    assert_eq!(all, spread, "all 500 flows of 127.0.0.1 on one slot");
}

#[test]
fn steer_check_refuses_conflicting_listeners_by_name() {
    for (args, needles) in [
        (
            &[
                "--listen",
                "a=127.0.0.1:9100",
                "--listen",
                "a=127.0.0.1:9101",
            ][..],
            &["two listeners are named \"a\""][..],
        ),
        (
            &[
                "--listen",
                "a=udp://127.0.0.1:9100",
                "--listen",
                "b=udp://127.0.0.1:9100",
            ],
            &["\"a\"", "\"b\"", "both take udp 127.0.0.1:9100"],
        ),
        (
            &["--listen", "a=0.0.0.0:9100", "--listen", "b=127.0.0.1:9100"],
            &["\"a\"", "\"b\"", "wildcard"],
        ),
        (
            &[
                "--balance",
                "shared",
                "--listen",
                "127.0.0.1:9100",
                "--listen",
                "udp://127.0.0.1:9100",
            ],
            &["exactly one TCP listener"],
        ),
    ] {
        let mut full = vec!["check"];
        full.extend_from_slice(args);
        let out = run_steer(&full);
        assert_eq!(out.code(), Some(2), "{args:?}: {out:?}");
        for needle in needles {
            assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
        }
    }
    let ok = run_steer(&[
        "check",
        "--listen",
        "web=127.0.0.1:9100",
        "--listen",
        "dns=udp://127.0.0.1:9100",
    ]);
    assert_eq!(ok.code(), Some(0), "{ok:?}");
    assert!(
        ok.stdout
            .contains("listen = [\"web=tcp://127.0.0.1:9100\", \"dns=udp://127.0.0.1:9100\"]"),
        "{}",
        ok.stdout
    );
}
