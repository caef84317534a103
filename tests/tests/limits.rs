//! Per-client connection limits (`--client-conn-rate`): the program refuses a client's SYNs
//! over its rate before any worker wakes; exempt prefixes never are; the client table
//! stays within its bound under a flood; SIGHUP changes the limit live, keeping every
//! client's state; and a policy without the program refuses a limit.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};
use steer_tests::{Cluster, Signal, TempFile, http_get_from, run_steer};

/// How long a refused connect may take: the issue's bound ("each refusal fails within
/// 100 ms"); a refusal on loopback is a reset, answered inside `connect(2)`.
const REFUSAL_BOUND: Duration = Duration::from_millis(100);

/// What one source saw while opening connections as fast as it could.
#[derive(Debug, Default)]
struct Blast {
    accepted: u64,
    refused: u64,
    /// Connects that neither succeeded nor were refused within [`REFUSAL_BOUND`], and
    /// other errors.
    other: Vec<String>,
    slowest_refusal: Duration,
}

/// Opens connections from `source` to `addr` one after another for `length` (at most
/// 1,000,000 attempts), closing each accepted one at once.
fn blast(source: Ipv4Addr, addr: SocketAddr, length: Duration) -> Blast {
    let mut out = Blast::default();
    let deadline = Instant::now() + length;
    let mut attempts = 0;
    while Instant::now() < deadline && attempts < 1_000_000 {
        attempts += 1;
        let started = Instant::now();
        match connect_from(source, addr) {
            Ok(_) => out.accepted += 1,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                out.refused += 1;
                out.slowest_refusal = out.slowest_refusal.max(started.elapsed());
            }
            Err(e) => out.other.push(e.to_string()),
        }
    }
    out
}

/// One connection from `source` (port chosen by the kernel), waiting at most
/// [`REFUSAL_BOUND`] for the handshake or the reset.
fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect_timeout(&addr.into(), REFUSAL_BOUND)?;
    Ok(socket)
}

fn limits(status: &Value) -> &Value {
    &status["client_limits"]
}

fn number(value: &Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {value:#}"))
}

fn refused_total(status: &Value) -> u64 {
    limits(status)["refused"]
        .as_array()
        .map_or(0, |l| l.iter().map(|e| number(e, "refused")).sum())
}

/// 50/s with a burst of 10: one source opening connections as fast as it can for 2 s gets
/// 10 + 50 x 2 of them (within 10 %), each refusal is a reset within 100 ms, and another
/// source at 20/s meanwhile has every connection accepted (and answered).
#[test]
fn a_client_over_its_rate_is_refused_and_another_under_it_is_not() {
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--client-conn-rate",
        "50/s",
        "--client-conn-burst",
        "10",
    ]);
    let addr = cluster.listen_addr();
    let fast = Ipv4Addr::new(127, 22, 0, 1);
    let polite = Ipv4Addr::new(127, 22, 0, 2);
    let length = Duration::from_secs(2);
    let (blast, polite_results) = std::thread::scope(|scope| {
        let fast = scope.spawn(move || blast(fast, addr, length));
        // 20/s: one request every 50 ms, for as long as the fast source runs.
        let mut results = Vec::new();
        let start = Instant::now();
        for i in 0..40u32 {
            let due = start + Duration::from_millis(50) * i;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            results.push(http_get_from(IpAddr::V4(polite), addr, "/").map(|r| r.status));
        }
        (fast.join().expect("fast source"), results)
    });
    println!("{blast:?}");
    let expected = 10.0 + 50.0 * length.as_secs_f64();
    let accepted = blast.accepted as f64;
    assert!(
        (0.9 * expected..=1.1 * expected).contains(&accepted),
        "accepted {accepted} of the fast source's connections, expected {expected} +- 10%: {blast:?}"
    );
    assert!(blast.refused > 0, "nothing refused: {blast:?}");
    assert!(
        blast.other.is_empty() && blast.slowest_refusal < REFUSAL_BOUND,
        "every refusal is a reset within {REFUSAL_BOUND:?}: {blast:?}"
    );
    let failed: Vec<_> = polite_results
        .iter()
        .filter(|r| !matches!(r, Ok(200)))
        .collect();
    assert!(
        failed.is_empty(),
        "the source at 20/s had {} of 40 requests fail: {failed:?}",
        failed.len()
    );
    let status = cluster.wait_until(
        "the refusals and the refused prefix in /status",
        Duration::from_secs(10),
        |s| {
            // The prefixes are read once per health interval; the total at once.
            let top = &limits(s)["top_refused"][0];
            refused_total(s) == blast.refused
                && top["prefix"] == "127.22.0.1/32"
                && top["refused"] == blast.refused
        },
    );
    let l = limits(&status);
    assert_eq!(l["rate"], "50/s");
    assert_eq!(number(l, "burst"), 10);
    assert_eq!(
        number(&l["top_refused"][0], "refused"),
        blast.refused,
        "{l:#}"
    );
    assert!(
        l["top_refused"]
            .as_array()
            .is_some_and(|t| t.iter().all(|p| p["prefix"] != "127.22.0.2/32")),
        "the polite source was never refused: {l:#}"
    );
    assert!(
        cluster
            .log()
            .contains("client prefix over --client-conn-rate"),
        "a refused prefix is logged"
    );
    let metrics = steer_tests::http_get(cluster.status_addr(), "/metrics")
        .expect("GET /metrics")
        .body;
    assert!(
        metrics.contains(&format!(
            "steer_client_refusals_total{{listener=\"{addr}\"}} {}",
            refused_total(&status)
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("steer_client_prefix_refusals_total{prefix=\"127.22.0.1/32\"}"),
        "{metrics}"
    );
    assert!(cluster.stop(Duration::from_secs(10)).success());
}

/// A source in an exempt prefix is never refused, however fast it opens connections;
/// one next to it, outside the prefix, is.
#[test]
fn an_exempt_source_is_never_refused() {
    let cluster = Cluster::start(&[
        "--workers",
        "1",
        "--balance",
        "hash",
        "--client-conn-rate",
        "5/s",
        "--client-conn-burst",
        "2",
        "--client-exempt",
        "127.23.1.0/24",
    ]);
    let addr = cluster.listen_addr();
    let exempt = blast(
        Ipv4Addr::new(127, 23, 1, 7),
        addr,
        Duration::from_millis(500),
    );
    let limited = blast(
        Ipv4Addr::new(127, 23, 2, 7),
        addr,
        Duration::from_millis(500),
    );
    println!("exempt {exempt:?}\nlimited {limited:?}");
    assert!(
        exempt.refused == 0 && exempt.other.is_empty() && exempt.accepted > 20,
        "{exempt:?}"
    );
    assert!(limited.refused > 0 && limited.accepted <= 5, "{limited:?}");
    assert!(cluster.stop(Duration::from_secs(10)).success());
}

/// Many sources on 127.0.0.0/8, each new to the table: it stays within its bound (the
/// least recently seen are evicted, and counted), and a real client under its limit is
/// never refused meanwhile.
#[test]
fn a_flood_of_sources_keeps_the_table_bounded_and_a_real_client_served() {
    const TABLE: u64 = 1024;
    const SOURCES: u32 = 4000;
    let table = TABLE.to_string();
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--client-conn-rate",
        "20/s",
        "--client-conn-burst",
        "5",
        "--client-table-size",
        &table,
    ]);
    let addr = cluster.listen_addr();
    let real = Ipv4Addr::new(127, 24, 255, 1);
    let (flood, real_results) = std::thread::scope(|scope| {
        let flood = scope.spawn(move || {
            let mut failures = Vec::new();
            for i in 0..SOURCES {
                let source = Ipv4Addr::new(127, 25, (i >> 8) as u8, i as u8);
                if let Err(e) = connect_from(source, addr) {
                    failures.push(format!("{source}: {e}"));
                }
            }
            failures
        });
        // 10/s, half its limit, while the flood lasts (bounded in count).
        let mut results = Vec::new();
        for _ in 0..200 {
            let next = Instant::now() + Duration::from_millis(100);
            results.push(connect_from(real, addr).map(drop));
            if flood.is_finished() && results.len() >= 10 {
                break;
            }
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        (flood.join().expect("flood"), results)
    });
    assert!(
        flood.is_empty(),
        "every flood source opened its one connection (each is new, within its burst): {:?}",
        &flood[..flood.len().min(5)]
    );
    let refused: Vec<_> = real_results.iter().filter(|r| r.is_err()).collect();
    assert!(
        refused.is_empty(),
        "the real client was refused {} of {} times: {refused:?}",
        refused.len(),
        real_results.len()
    );
    let status = cluster.wait_until(
        "a survey of the table after the flood",
        Duration::from_secs(10),
        |s| {
            number(limits(s), "inserts") >= u64::from(SOURCES)
                && number(limits(s), "clients_tracked") > 0
        },
    );
    let l = limits(&status);
    println!("{l:#}");
    assert_eq!(number(l, "table_size"), TABLE);
    assert!(number(l, "clients_tracked") <= TABLE, "{l:#}");
    assert!(
        number(l, "evictions") >= u64::from(SOURCES) - TABLE,
        "evictions are counted: {l:#}"
    );
    assert_eq!(refused_total(&status), 0, "{l:#}");
    assert!(cluster.stop(Duration::from_secs(10)).success());
}

/// SIGHUP from 50/s to 200/s applies to the running primary, and the clients it tracks
/// keep their state: a client seen before the reload is not entered into the table again.
#[test]
fn sighup_changes_the_rate_live_and_keeps_every_clients_state() {
    let file = TempFile::new(
        "toml",
        "client-conn-rate = \"50/s\"\nclient-conn-burst = 10\n",
    );
    let cluster = Cluster::start(&[
        "--config",
        file.as_arg(),
        "--workers",
        "1",
        "--balance",
        "round-robin",
    ]);
    let addr = cluster.listen_addr();
    let pid = cluster.pid();
    let second = Duration::from_secs(1);
    let before = blast(Ipv4Addr::new(127, 26, 0, 1), addr, second);
    let seen = Ipv4Addr::new(127, 26, 0, 9);
    connect_from(seen, addr).expect("a client under its limit");
    let status = cluster.wait_until("both clients tracked", Duration::from_secs(10), |s| {
        number(limits(s), "clients_tracked") == 2
    });
    let inserts = number(limits(&status), "inserts");
    std::fs::write(
        file.path(),
        "client-conn-rate = \"200/s\"\nclient-conn-burst = 10\n",
    )
    .expect("rewrite the config");
    cluster.signal(Signal::SIGHUP);
    cluster.wait_until("the new rate in /status", Duration::from_secs(10), |s| {
        limits(s)["rate"] == "200/s"
    });
    connect_from(seen, addr).expect("the same client, still under its limit");
    let after = blast(Ipv4Addr::new(127, 26, 0, 2), addr, second);
    println!("before {before:?}\nafter {after:?}");
    for (blast, rate) in [(&before, 50.0), (&after, 200.0)] {
        let expected = 10.0 + rate;
        let accepted = blast.accepted as f64;
        assert!(
            (0.9 * expected..=1.1 * expected).contains(&accepted),
            "at {rate}/s: accepted {accepted}, expected {expected} +- 10%: {blast:?}"
        );
    }
    let status = cluster.wait_until("the last client tracked", Duration::from_secs(10), |s| {
        number(limits(s), "clients_tracked") == 3
    });
    assert_eq!(
        number(limits(&status), "inserts"),
        inserts + 1,
        "only the new client was entered: the table survived the reload"
    );
    assert_eq!(cluster.pid(), pid, "no restart");
    assert!(cluster.stop(Duration::from_secs(10)).success());
}

/// A limit needs Steer's program: under `kernel` or a userspace baseline, `check` and
/// `run` exit 2 naming the setting (flag or file key).
#[test]
fn a_limit_without_the_program_is_a_configuration_error() {
    for balance in ["kernel", "userspace"] {
        for command in ["check", "run"] {
            let out = run_steer(&[command, "--balance", balance, "--client-conn-rate", "50/s"]);
            assert_eq!(out.code(), Some(2), "{out}");
            assert!(out.stderr.contains("--client-conn-rate"), "{out}");
        }
    }
    let file = TempFile::new(
        "toml",
        "balance = \"kernel\"\nclient-exempt = [\"10.0.0.0/8\"]\n",
    );
    let out = run_steer(&["check", "-c", file.as_arg()]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("`client-exempt` at line 2"), "{out}");
    let out = run_steer(&["check", "--client-conn-rate", "50/day"]);
    assert_eq!(out.code(), Some(2), "{out}");
}
