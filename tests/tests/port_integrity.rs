//! The cluster's port: who else listens on it, whether the ownership probe can see the
//! group, and whether the port stays the cluster's while no worker listens.
//!
//! - a foreign listener on a more specific address, or in the other address family, forms
//!   a group of its own that Steer cannot steer away from: it is reported (log line,
//!   `/status`, `/metrics`) within two health intervals;
//! - a foreign socket on `127.0.0.1:P` beside a `0.0.0.0:P` cluster took every probe,
//!   which looked like a takeover every interval; the probe goes around it now;
//! - probe edges, each in a network namespace of its own: `[::]` with IPv6 off on `lo`, a
//!   firewall rule dropping the port, a listen address that is not local;
//! - the port reservation kept `SO_REUSEADDR`, which let another user's process bind and
//!   listen on the port while a one-worker cluster was in crash backoff.
//!
//! These tests load the program, make network namespaces and switch users: they need root.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use steer_tests::netns::{self, at};
use steer_tests::rogue::{attach_classic_bpf_returning, rogue_listener};
use steer_tests::{Cluster, Value, free_port, http_get, prometheus};

const INTERVAL: Duration = Duration::from_secs(1);

fn takeovers(doc: &Value) -> u64 {
    doc["steering"]["takeovers"]
        .as_u64()
        .unwrap_or_else(|| panic!("no steering.takeovers in {doc}"))
}

fn foreign(doc: &Value) -> u64 {
    doc["primary"]["foreign_listeners"]
        .as_u64()
        .unwrap_or_else(|| panic!("no primary.foreign_listeners in {doc}"))
}

fn uptime(doc: &Value) -> u64 {
    doc["primary"]["uptime_s"]
        .as_u64()
        .unwrap_or_else(|| panic!("no primary.uptime_s in {doc}"))
}

/// A 2-worker round-robin cluster on `listen`, health interval [`INTERVAL`].
fn cluster_on(listen: SocketAddr) -> Cluster {
    let status = at("127.0.0.1", free_port());
    let (listen_arg, status_arg) = (listen.to_string(), status.to_string());
    Cluster::start_as_given(
        &[
            "--listen",
            &listen_arg,
            "--status",
            &status_arg,
            "--workers",
            "2",
            "--balance",
            "round-robin",
            "--health-interval",
            "1s",
        ],
        listen,
        status,
    )
}

/// Waits until the cluster has run `intervals` more health intervals (by its own uptime).
fn let_intervals_pass(cluster: &Cluster, intervals: u64) -> Value {
    let from = uptime(&cluster.status());
    let seconds = INTERVAL.as_secs().max(1) * intervals;
    cluster.wait_until(
        "more health intervals",
        INTERVAL * (intervals as u32 + 3),
        |s| uptime(s) >= from + seconds,
    )
}

fn occurrences(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[test]
fn a_foreign_listener_on_a_more_specific_address_or_the_other_family_is_reported() {
    netns::isolated(|| {
        let port = free_port();
        let cluster = cluster_on(at("0.0.0.0", port));
        assert_eq!(foreign(&cluster.status()), 0, "no foreign listener yet");
        let specific = rogue_listener(at("127.0.0.2", port));
        let other_family = rogue_listener(at("::", port));
        let placed = Instant::now();
        let doc = cluster.wait_until(
            "both foreign listeners reported",
            INTERVAL * 2 + Duration::from_millis(500),
            |s| foreign(s) == 2,
        );
        println!(
            "two foreign listeners (127.0.0.2:{port}, [::]:{port}) reported {} ms after they \
             listened (health interval {} ms)",
            placed.elapsed().as_millis(),
            INTERVAL.as_millis()
        );
        let addresses = doc["primary"]["foreign_listener_addresses"].to_string();
        assert!(
            addresses.contains(&format!("127.0.0.2:{port}"))
                && addresses.contains(&format!("[::]:{port}")),
            "/status names them: {addresses}"
        );
        // The more specific group takes that address's connections: what is reported.
        let taken = std::net::TcpStream::connect(at("127.0.0.2", port));
        assert!(
            taken.is_ok() && specific.accept().is_ok(),
            "127.0.0.2 is the rogue's"
        );
        let metrics = prometheus::Exposition::parse(
            &http_get(cluster.status_addr(), "/metrics")
                .expect("GET /metrics")
                .body,
        )
        .expect("metrics parse");
        assert_eq!(metrics.value("steer_foreign_listeners", &[]), 2.0);

        let doc = let_intervals_pass(&cluster, 3);
        let log = cluster.log();
        assert_eq!(
            occurrences(&log, &format!("listens on 127.0.0.2:{port}")),
            1,
            "reported once, not every interval: {log}"
        );
        assert_eq!(occurrences(&log, &format!("listens on [::]:{port}")), 1);
        assert!(log.contains("every connection to 127.0.0.2"), "{log}");
        assert_eq!(takeovers(&doc), 0, "nothing took the group: {doc}");

        drop((specific, other_family));
        cluster.wait_until("the foreign listeners are gone", INTERVAL * 3, |s| {
            foreign(s) == 0
        });
    });
}

#[test]
fn a_foreign_socket_on_loopback_beside_a_wildcard_cluster_is_no_takeover() {
    netns::isolated(|| {
        let port = free_port();
        let cluster = cluster_on(at("0.0.0.0", port));
        let loopback = rogue_listener(at("127.0.0.1", port));
        cluster.wait_until("the foreign listener reported", INTERVAL * 3, |s| {
            foreign(s) == 1
        });
        let doc = let_intervals_pass(&cluster, 4);
        let log = cluster.log();
        println!(
            "a foreign socket on 127.0.0.1:{port} beside 0.0.0.0:{port}, 4 intervals: {} \
             takeovers, {} takeover lines",
            takeovers(&doc),
            occurrences(&log, "steering takeover")
        );
        assert_eq!(takeovers(&doc), 0, "no takeover: {doc}");
        assert_eq!(occurrences(&log, "steering takeover"), 0, "{log}");

        // The probe still sees Steer's group: a real takeover is still noticed.
        let in_group = rogue_listener(at("0.0.0.0", port));
        attach_classic_bpf_returning(&in_group, 2);
        cluster.wait_until("the real takeover is noticed", INTERVAL * 3, |s| {
            takeovers(s) >= 1
        });
        drop((loopback, in_group));
    });
}

#[test]
fn the_probe_works_on_a_dual_stack_cluster_with_ipv6_off_on_loopback() {
    netns::isolated(|| {
        netns::sysctl("net.ipv6.conf.lo.disable_ipv6", "1");
        let port = free_port();
        let cluster = cluster_on(at("::", port));
        let doc = let_intervals_pass(&cluster, 3);
        assert_eq!(takeovers(&doc), 0, "{doc}");
        let log = cluster.log();
        assert_eq!(
            occurrences(&log, "cannot check who decides"),
            0,
            "the probe goes over IPv4 to the dual-stack group: {log}"
        );
        assert_eq!(occurrences(&log, "ownership probe cannot"), 0, "{log}");

        let rogue = rogue_listener(at("::", port));
        attach_classic_bpf_returning(&rogue, 2);
        let attacked = Instant::now();
        cluster.wait_until("the takeover is noticed", INTERVAL * 3, |s| {
            takeovers(s) >= 1
        });
        println!(
            "[::] with IPv6 off on lo: a takeover noticed {} ms after it",
            attacked.elapsed().as_millis()
        );
        drop(rogue);
    });
}

#[test]
fn a_firewall_rule_dropping_the_port_is_said_once_and_is_no_takeover() {
    netns::isolated(|| {
        let port = free_port();
        let cluster = cluster_on(at("127.0.0.1", port));
        netns::drop_tcp_port(port);
        let said = "no socket of the group has a full accept queue";
        cluster.wait_for_log(said, INTERVAL * 4);
        let doc = let_intervals_pass(&cluster, 4);
        let log = cluster.log();
        println!(
            "a drop rule on port {port}, 4 more intervals: {} takeovers, said {} time(s)",
            takeovers(&doc),
            occurrences(&log, said)
        );
        assert_eq!(takeovers(&doc), 0, "a dropped probe is no takeover: {doc}");
        assert_eq!(occurrences(&log, said), 1, "said once: {log}");

        netns::allow_all();
        cluster.wait_for_log("reaches Steer's program again", INTERVAL * 4);
        assert_eq!(takeovers(&cluster.status()), 0);
    });
}

#[test]
fn a_listen_address_that_is_not_local_is_not_probed_until_it_is() {
    netns::isolated(|| {
        netns::sysctl("net.ipv4.ip_nonlocal_bind", "1");
        let port = free_port();
        let vip = at("10.77.0.1", port);
        let cluster = Cluster::spawn(&[
            "--listen",
            &vip.to_string(),
            "--workers",
            "2",
            "--balance",
            "round-robin",
            "--health-interval",
            "1s",
        ]);
        cluster.wait_ready(steer_tests::READY_TIMEOUT);
        let said = "is not an address of this host";
        cluster.wait_for_log(said, INTERVAL * 3);
        let doc = let_intervals_pass(&cluster, 3);
        assert_eq!(takeovers(&doc), 0, "{doc}");
        assert_eq!(occurrences(&cluster.log(), said), 1, "said once");

        netns::run("ip", &["addr", "add", "10.77.0.1/32", "dev", "lo"]);
        cluster.wait_for_log("reaches Steer's program again", INTERVAL * 4);
        assert_eq!(takeovers(&cluster.status()), 0);
    });
}

/// Tries, as user `nobody`, to bind `addr` with `SO_REUSEADDR` and listen; the outcome
/// as the intruder printed it.
fn intruder_as_nobody(addr: SocketAddr) -> String {
    use std::os::unix::process::CommandExt;
    let script = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         try:\n\
         \x20   s.bind(('{}', {}))\n\
         \x20   s.listen(8)\n\
         \x20   print('listening')\n\
         except OSError as e:\n\
         \x20   print('refused: errno', e.errno)\n",
        addr.ip(),
        addr.port()
    );
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("python3 as nobody");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn another_user_cannot_take_the_port_while_the_only_worker_is_in_backoff() {
    let listen = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port());
    let cluster = Cluster::spawn(&[
        "--listen",
        &listen.to_string(),
        "--workers",
        "1",
        "--balance",
        "kernel",
        "--",
        "sh",
        "-c",
        "exit 1",
    ]);
    // Crash after crash, the backoff doubles: wait for one long enough that nothing of
    // the cluster listens while the intruder tries (or for the slot to have failed).
    let doc = cluster.wait_until("a long crash backoff", Duration::from_secs(20), |s| {
        let slot = &s["workers"][0];
        slot["state"] == "failed"
            || (slot["state"] == "backoff"
                && slot["next_restart_in_ms"].as_u64().unwrap_or(0) >= 1000)
    });
    let outcome = intruder_as_nobody(listen);
    println!(
        "user nobody binding {listen} with SO_REUSEADDR while the slot is {}: {outcome}",
        doc["workers"][0]["state"]
    );
    assert_eq!(
        outcome,
        format!("refused: errno {}", libc::EADDRINUSE),
        "the reservation keeps the port the cluster's"
    );
}
