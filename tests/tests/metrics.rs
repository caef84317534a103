//! `GET /metrics` is Prometheus text that a strict parser accepts, with the per-slot and
//! steering series operators alert on; the status listener answers reads only and binds
//! loopback for a bare port.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use steer_tests::prometheus::Exposition;
use steer_tests::{Cluster, free_port, http_get, must_get, status};

fn metrics(cluster: &Cluster) -> Exposition {
    let response = http_get(cluster.status_addr(), "/metrics").expect("GET /metrics");
    assert_eq!(response.status, 200, "{}", response.body);
    Exposition::parse(&response.body).unwrap_or_else(|e| {
        panic!(
            "/metrics is not valid exposition text: {e}\n{}",
            response.body
        )
    })
}

#[test]
fn metrics_parse_with_per_slot_series_and_ebpf_steering_counters() {
    let cluster = Cluster::start(&["--workers", "2", "--balance", "round-robin"]);
    // A worker is reported ready once its slot is handed to the publisher, which waits at
    // most 20 ms for the kernel's grace period: on a loaded host the first connections may
    // still see the set without it. Round-robin reaches both slots once it is out.
    let mut seen = std::collections::BTreeSet::new();
    let mut warm_up = 0;
    while seen.len() < 2 && warm_up < 200 {
        let reply = must_get(cluster.listen_addr(), "/");
        seen.extend(reply.worker());
        warm_up += 1;
    }
    assert_eq!(seen.len(), 2, "both workers answer within 200 requests");
    let requests = 20;
    for _ in 0..requests {
        must_get(cluster.listen_addr(), "/");
    }
    // The heartbeat that carries the workers' counters comes once a second.
    cluster.wait_until("requests counted", Duration::from_secs(10), |s| {
        status::workers(s)
            .iter()
            .map(|w| w.raw["requests"].as_u64().unwrap_or(0))
            .sum::<u64>()
            >= requests
    });
    let m = metrics(&cluster);
    let doc = cluster.status();

    for family in [
        "steer_worker_accepted_total",
        "steer_worker_restarts_total",
        "steer_worker_rss_bytes",
        "steer_worker_heartbeat_age_seconds",
        "steer_steering_selections_total",
    ] {
        let slots: Vec<&str> = m
            .family(family)
            .samples
            .iter()
            .map(|s| s.labels["slot"].as_str())
            .collect();
        assert_eq!(slots, ["0", "1"], "{family} has one series per slot");
    }
    for kind in [
        ("steer_worker_accepted_total", "counter"),
        ("steer_worker_state", "gauge"),
        ("steer_steering_fallbacks_total", "counter"),
        ("steer_steering_drops_total", "counter"),
        ("steer_steering_migrations_total", "counter"),
    ] {
        assert_eq!(m.family(kind.0).kind, kind.1, "{}", kind.0);
    }
    for w in status::workers(&doc) {
        let slot = w.slot.to_string();
        assert_eq!(
            m.value("steer_worker_state", &[("slot", &slot), ("state", "ready")]),
            1.0
        );
        assert_eq!(
            m.value(
                "steer_worker_state",
                &[("slot", &slot), ("state", "failed")]
            ),
            0.0
        );
        let rss = m.value("steer_worker_rss_bytes", &[("slot", &slot)]);
        assert!(rss > 1e6, "slot {slot} RSS {rss}");
        let age = m.value("steer_worker_heartbeat_age_seconds", &[("slot", &slot)]);
        assert!(
            (0.0..10.0).contains(&age),
            "slot {slot} heartbeat age {age}"
        );
    }
    let selected: f64 = m
        .family("steer_steering_selections_total")
        .samples
        .iter()
        .map(|s| s.value)
        .sum();
    assert!(
        selected >= requests as f64,
        "the program steered {selected} of {requests} connections"
    );
    // Round-robin over two workers: each got about half.
    for slot in ["0", "1"] {
        let share = m.value("steer_steering_selections_total", &[("slot", slot)]);
        assert!(share >= 9.0, "slot {slot} got {share} of {selected}");
        assert_eq!(
            m.value("steer_worker_accepted_total", &[("slot", slot)]),
            share,
            "under eBPF, accepted is what the program steered"
        );
    }
    assert_eq!(m.value("steer_steering_drops_total", &[]), 0.0);
    assert_eq!(
        m.value("steer_info", &[("balance", "round-robin")]),
        1.0,
        "the policy in force"
    );

    // A crash shows up as a restart and as the slot's state while it is away.
    cluster.kill_worker(1);
    cluster.wait_until("slot 1 restarted", Duration::from_secs(20), |s| {
        status::all_ready(s) && status::worker(s, 1).restarts == 1
    });
    let m = metrics(&cluster);
    assert_eq!(
        m.value("steer_worker_restarts_total", &[("slot", "1")]),
        1.0
    );
    assert_eq!(
        m.value("steer_worker_restarts_total", &[("slot", "0")]),
        0.0
    );
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn kernel_mode_metrics_have_no_steering_families() {
    let cluster = Cluster::start(&["--workers", "1", "--balance", "kernel"]);
    let m = metrics(&cluster);
    assert!(!m.families.contains_key("steer_steering_selections_total"));
    assert_eq!(m.value("steer_workers_ready", &[]), 1.0);
    assert_eq!(m.value("steer_info", &[("balance", "kernel")]), 1.0);
    cluster.stop_cleanly(Duration::from_secs(15));
}

/// Sends a raw request and returns the status line.
fn status_line(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("write");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn the_status_listener_is_read_only_and_a_bare_port_is_loopback() {
    let port = free_port();
    let cluster = Cluster::start(&[
        "--workers",
        "1",
        "--balance",
        "kernel",
        "--status",
        &port.to_string(),
    ]);
    let addr = cluster.status_addr();
    assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], port)));
    // The primary's lines reach its stderr through the sink's writer thread, which a
    // loaded host may not have run yet when the cluster is ready.
    let log = cluster.wait_for_log(&format!("status=127.0.0.1:{port}"), Duration::from_secs(10));
    assert!(!log.contains("reachable from other hosts"), "{log}");

    for (request, expected) in [
        ("GET /status HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 200 OK"),
        (
            "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            "HTTP/1.1 200 OK",
        ),
        ("GET /ready HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 200 OK"),
        (
            "POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (
            "DELETE /status HTTP/1.1\r\nHost: x\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (
            "PUT /workers/0 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (
            "GET /restart HTTP/1.1\r\nHost: x\r\n\r\n",
            "HTTP/1.1 404 Not Found",
        ),
        (
            "GET /stop HTTP/1.1\r\nHost: x\r\n\r\n",
            "HTTP/1.1 404 Not Found",
        ),
    ] {
        assert_eq!(status_line(addr, request), expected, "{request:?}");
    }
    // Nothing above changed anything.
    let doc = cluster.status();
    assert!(status::all_ready(&doc));
    assert_eq!(status::worker(&doc, 0).generation, 1, "{doc:#}");

    cluster.stop_cleanly(Duration::from_secs(15));
}

/// While stopping, `/ready` says 503 so a balancer stops sending new connections.
#[test]
fn ready_is_503_while_draining() {
    // A worker busy in a long request keeps the primary in `stopping` for a while.
    let cluster = Cluster::start(&[
        "--workers",
        "1",
        "--balance",
        "kernel",
        "--shutdown-timeout",
        "30s",
    ]);
    let listen = cluster.listen_addr();
    let busy = std::thread::spawn(move || http_get(listen, "/sleep?ms=3000"));
    cluster.wait_until("the request in flight", Duration::from_secs(10), |s| {
        status::worker(s, 0).raw["active"].as_u64() == Some(1)
    });
    cluster.signal(steer_tests::Signal::SIGTERM);
    // `/ready` answers from the readiness the primary stores once its loop has handled the
    // signal: within a turn of that loop, long before the 3 s request ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let ready = status_line(
            cluster.status_addr(),
            "GET /ready HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        if ready == "HTTP/1.1 503 Service Unavailable" {
            break;
        }
        assert_eq!(ready, "HTTP/1.1 200 OK", "before the stop is handled");
        assert!(
            std::time::Instant::now() < deadline,
            "/ready still 200 a second after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let answered = busy.join().expect("client thread");
    assert_eq!(
        answered.expect("the in-flight request finishes").status,
        200
    );
    assert_eq!(cluster.wait_exit(Duration::from_secs(15)).code(), Some(0));
}
