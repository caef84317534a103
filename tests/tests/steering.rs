//! eBPF steering, measured over real TCP connections on loopback, in the style of aya's
//! `sk_reuseport` integration tests and the kernel's `select_reuseport` / `migrate_reuseport`
//! selftests: each policy's property, the rogue-listener guarantee, migration out of a
//! killed listener, zero-loss rolling restarts, and the fallback without CAP_BPF.
//!
//! Every test here loads the program, so it needs root (CAP_BPF), as `cargo xtask test` runs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use steer_tests::rogue::{rogue_listener, rogue_share};
use steer_tests::{
    Cluster, KeepAlive, Load, Signal, Value, block_slot, http_get, http_get_from,
    run_to_completion, status, steer_bin,
};

const EBPF_POLICIES: [&str; 4] = ["round-robin", "hash", "least-loaded", "cpu"];

/// The program's counters from `/status`.
fn steering(doc: &Value) -> &Value {
    &doc["steering"]
}

fn counter(doc: &Value, name: &str) -> u64 {
    steering(doc)[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no steering.{name} in {doc}"))
}

/// 127.0.0.2, 127.0.0.3, ...: `n` distinct client addresses.
fn client_ips(n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|i| {
            IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                u8::try_from(2 + i).expect("n <= 250"),
            ))
        })
        .collect()
}

/// Which slot answers each client IP (one new connection each).
fn slots_by_client(addr: SocketAddr, clients: &[IpAddr]) -> BTreeMap<IpAddr, usize> {
    clients
        .iter()
        .map(|&ip| {
            let response = http_get_from(ip, addr, "/")
                .unwrap_or_else(|e| panic!("GET / from {ip} failed: {e}"));
            (ip, response.worker().expect("X-Steer-Worker"))
        })
        .collect()
}

/// Waits until every slot runs a process not in `before`, all ready, generation `generation`.
fn wait_rolled(cluster: &Cluster, before: &[u32], generation: u64) -> Value {
    cluster.wait_until(
        &format!("rolling restart to generation {generation}"),
        Duration::from_secs(30),
        |s| {
            s["primary"]["phase"] == "running"
                && status::all_ready(s)
                && status::workers(s).iter().all(|w| {
                    w.pid.is_some_and(|p| !before.contains(&p)) && w.generation == generation
                })
        },
    )
}

#[test]
fn round_robin_spreads_10000_new_connections_within_2_percent() {
    let cluster = Cluster::start(&["--workers", "4", "--balance", "round-robin"]);
    assert_eq!(cluster.status()["primary"]["balance"], "round-robin");
    let addr = cluster.listen_addr();
    let seen_twice = steer_tests::SeenTwice::mark();
    let mut per_worker = [0u64; 4];
    for _ in 0..10_000 {
        let response = http_get(addr, "/").expect("request on a new connection");
        per_worker[response.worker().expect("X-Steer-Worker")] += 1;
    }
    let (max, min) = (
        per_worker.iter().max().copied().unwrap_or(0),
        per_worker.iter().min().copied().unwrap_or(0),
    );
    println!("round-robin over 10,000 connections: {per_worker:?}");
    assert!(
        (max - min) as f64 <= 0.02 * max as f64,
        "busiest and idlest differ by more than 2%: {per_worker:?}"
    );
    // The program's own per-slot counters agree with what the clients saw.
    let doc = cluster.status();
    let accepted: Vec<u64> = status::workers(&doc).iter().map(|w| w.accepted).collect();
    seen_twice.assert_selections_cover(&accepted, &per_worker, "per-slot selections in /status");
    assert_eq!(counter(&doc, "drops"), 0);
    assert_eq!(counter(&doc, "fallbacks"), 0);
}

#[test]
fn hash_keeps_each_client_ip_on_its_slot_through_restarts_and_empty_slots() {
    let cluster = Cluster::start(&[
        "--workers",
        "4",
        "--balance",
        "hash",
        "--demo-faults",
        // One crash and the slot is `failed`: it stays empty until SIGHUP.
        "--max-restarts",
        "0",
    ]);
    let addr = cluster.listen_addr();
    let clients = client_ips(200);
    let first = slots_by_client(addr, &clients);
    let mut share = [0usize; 4];
    for slot in first.values() {
        share[*slot] += 1;
    }
    // 50 each on average; a skewed table (or hash) would put far more on one slot.
    assert!(
        share.iter().all(|&n| (25..=80).contains(&n)),
        "200 clients should spread over the 4 slots: {share:?}"
    );
    assert_eq!(
        slots_by_client(addr, &clients),
        first,
        "with the worker set unchanged, every client IP reaches the same slot"
    );

    // A rolling restart replaces every worker; each slot's clients come back to it.
    let before = cluster.worker_pid_list();
    cluster.signal(Signal::SIGUSR2);
    wait_rolled(&cluster, &before, 2);
    let after_roll = slots_by_client(addr, &clients);
    let kept = clients
        .iter()
        .filter(|ip| after_roll[ip] == first[ip])
        .count();
    println!("hash: {kept}/200 clients on their old slot after a rolling restart");
    assert!(
        kept >= 190,
        "only {kept} of 200 clients kept their slot: {after_roll:?}"
    );

    // Empty slot 1 (it crashes once and, with --max-restarts 0, stays `failed`).
    let victim_client = *clients
        .iter()
        .find(|ip| first[ip] == 1)
        .expect("a client of slot 1");
    let crashed = http_get_from(victim_client, addr, "/crash");
    assert!(crashed.is_err() || crashed.is_ok_and(|r| r.worker() == Some(1)));
    cluster.wait_until("slot 1 failed", Duration::from_secs(10), |s| {
        status::worker(s, 1).state == status::SlotState::Failed
    });
    let emptied = slots_by_client(addr, &clients);
    let mut spread = BTreeSet::new();
    for ip in &clients {
        if first[ip] == 1 {
            assert_ne!(
                emptied[ip], 1,
                "a client of the empty slot still reached it"
            );
            spread.insert(emptied[ip]);
        } else {
            assert_eq!(
                emptied[ip], first[ip],
                "client {ip} moved although its slot is live"
            );
        }
    }
    assert!(
        spread.len() >= 2,
        "the empty slot's clients should spread over the others, went to {spread:?}"
    );
    let doc = cluster.status();
    assert!(
        counter(&doc, "fallbacks") > 0,
        "the detour is counted: {doc}"
    );

    // SIGHUP revives the failed slot; its clients come back to it.
    cluster.signal(Signal::SIGHUP);
    cluster.wait_until("slot 1 ready again", Duration::from_secs(30), |s| {
        s["primary"]["phase"] == "running" && status::all_ready(s)
    });
    assert_eq!(
        slots_by_client(addr, &clients),
        first,
        "after the slot is back, every client is where it started"
    );
}

#[test]
fn least_loaded_sends_under_10_percent_to_a_blocked_worker() {
    let cluster = Cluster::start(&[
        "--workers",
        "4",
        "--balance",
        "least-loaded",
        "--demo-faults",
        "--health-timeout",
        "10s",
    ]);
    let addr = cluster.listen_addr();
    // Block one worker's event loop for 5 s (the health timeout is raised so the primary
    // does not replace it meanwhile: this measures the policy alone). Measure once its
    // heartbeat shows the loop is stuck.
    let mut blocker = KeepAlive::connect(addr).expect("connect");
    let hello = blocker.get("/").expect("hello");
    let blocked = hello.worker().expect("slot");
    let blocked_pid = pid_in(&hello.body);
    blocker.send_only("/block?ms=5000").expect("send /block");
    cluster.wait_until(
        "the blocked worker stops answering heartbeats",
        Duration::from_secs(3),
        |s| status::worker(s, blocked).raw["health_ms"].as_u64() > Some(300),
    );

    // New connections one after another for 2 s. An answer within 100 ms came from a
    // healthy worker; a connection that gets none is queued on the blocked one: keep it,
    // and read its answer once the block ends.
    let mut per_pid: BTreeMap<u32, u64> = BTreeMap::new();
    let mut stuck = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut sent = 0u64;
    while Instant::now() < deadline {
        let mut conn = KeepAlive::connect(addr).expect("handshake completes in the kernel");
        conn.send_only("/").expect("send");
        sent += 1;
        if conn
            .wait_readable(Duration::from_millis(100))
            .expect("poll")
        {
            let response = conn.read_response().expect("response");
            *per_pid.entry(pid_in(&response.body)).or_default() += 1;
        } else {
            stuck.push(conn);
        }
    }
    for mut conn in stuck {
        let response = conn
            .read_response()
            .expect("the blocked worker answers once it resumes");
        *per_pid.entry(pid_in(&response.body)).or_default() += 1;
    }
    let to_blocked = per_pid.get(&blocked_pid).copied().unwrap_or(0);
    println!(
        "least-loaded with slot {blocked} (pid {blocked_pid}) blocked: {sent} connections, \
         per pid {per_pid:?}"
    );
    assert!(sent >= 100, "too few connections to judge: {sent}");
    assert!(
        (to_blocked as f64) < 0.10 * sent as f64,
        "the blocked worker got {to_blocked} of {sent} new connections: {per_pid:?}"
    );
    assert_eq!(
        per_pid.values().sum::<u64>(),
        sent,
        "every request answered"
    );
}

/// The pid in a demo body, `hello from worker <slot> (pid <pid>)`.
fn pid_in(body: &str) -> u32 {
    body.split("(pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {body:?}"))
}

#[test]
fn cpu_policy_lands_every_connection_on_the_worker_pinned_to_the_syns_cpu() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = cpus.to_string();
    let cluster = Cluster::start(&["--workers", &workers, "--balance", "cpu"]);
    let doc = cluster.status();
    // --balance cpu implies --cpu-affinity: slot i's worker may run on CPU i only.
    for worker in status::workers(&doc) {
        let pid = worker.pid.expect("running");
        let allowed = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("proc status")
            .lines()
            .find_map(|l| {
                l.strip_prefix("Cpus_allowed_list:")
                    .map(|v| v.trim().to_owned())
            })
            .expect("Cpus_allowed_list");
        assert_eq!(
            allowed,
            worker.slot.to_string(),
            "slot {} pinned",
            worker.slot
        );
    }
    let addr = cluster.listen_addr();
    for cpu in 0..cpus {
        // On loopback the SYN is processed on the sending CPU: pin the client there.
        let seen = std::thread::spawn(move || {
            let mut set = nix::sched::CpuSet::new();
            set.set(cpu).expect("cpu in range");
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                .expect("pin the client thread");
            (0..100)
                .map(|_| http_get(addr, "/").expect("GET /").worker().expect("slot"))
                .collect::<BTreeSet<usize>>()
        })
        .join()
        .expect("client thread");
        assert_eq!(
            seen,
            BTreeSet::from([cpu]),
            "SYNs from CPU {cpu} reached {seen:?}"
        );
    }
}

/// `Cpus_allowed_list` of `pid`, as the kernel prints it (`1`, `4-7`).
fn cpus_allowed(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("proc status")
        .lines()
        .find_map(|l| {
            l.strip_prefix("Cpus_allowed_list:")
                .map(|v| v.trim().to_owned())
        })
        .expect("Cpus_allowed_list")
}

/// `GET /` 100 times from a thread pinned to `cpu` (on loopback the SYN is processed on
/// the sending CPU): the slots that answered.
fn slots_seen_from_cpu(addr: SocketAddr, cpu: usize) -> Vec<usize> {
    std::thread::spawn(move || {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).expect("cpu in range");
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
            .expect("pin the client thread");
        (0..100)
            .map(|_| http_get(addr, "/").expect("GET /").worker().expect("slot"))
            .collect()
    })
    .join()
    .expect("client thread")
}

/// A primary confined to some CPUs (a cpuset, `taskset -c 1`) pins its workers inside
/// that set, and the `cpu` policy maps the set's CPUs back to their slots. Before, slot i
/// went to CPU i (outside the set, or refused by a cpuset, leaving it unpinned) and the
/// program mapped CPU numbers as if the set were 0..N-1.
#[test]
fn cpu_policy_pins_inside_the_primarys_cpu_set_and_steers_by_it() {
    use std::os::unix::process::CommandExt;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "this test needs two CPUs, to confine the primary to one"
    );
    let confined = cpus - 1;
    let cluster = Cluster::start_with(&["--workers", "2", "--balance", "cpu"], |cmd| {
        // SAFETY: sched_setaffinity is async-signal-safe; nothing else runs here.
        unsafe {
            cmd.pre_exec(move || {
                let mut set = nix::sched::CpuSet::new();
                set.set(confined).map_err(std::io::Error::from)?;
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                    .map_err(std::io::Error::from)
            });
        }
    });
    assert_eq!(cpus_allowed(cluster.pid()), confined.to_string());
    for worker in status::workers(&cluster.status()) {
        let pid = worker.pid.expect("running");
        assert_eq!(
            cpus_allowed(pid),
            confined.to_string(),
            "slot {} is pinned inside the primary's set",
            worker.slot
        );
    }
    // Both slots run on the one allowed CPU: its SYNs go to both, in turn.
    let inside: BTreeSet<usize> = slots_seen_from_cpu(cluster.listen_addr(), confined)
        .into_iter()
        .collect();
    assert_eq!(inside, BTreeSet::from([0, 1]), "SYNs from CPU {confined}");
    // A SYN handled outside the set (interrupts ignore cpusets) still gets a worker.
    let outside = slots_seen_from_cpu(cluster.listen_addr(), 0);
    assert_eq!(outside.len(), 100, "every SYN from CPU 0 was served");
    let doc = cluster.status();
    assert_eq!(doc["steering"]["drops"], 0, "{doc:#}");
}

#[test]
fn a_rogue_reuseport_listener_gets_nothing_under_any_ebpf_policy() {
    // Under `kernel` the rogue is just another member of the group: it gets its share,
    // which is what makes this test able to fail.
    {
        let cluster = Cluster::start(&["--workers", "2", "--balance", "kernel"]);
        let rogue = rogue_listener(cluster.listen_addr());
        let got = rogue_share(cluster.listen_addr(), &rogue, &client_ips(200), 1000);
        println!("kernel: the rogue listener got {got} of 1000 connections");
        assert!(
            got > 0,
            "under kernel balancing the rogue should receive some"
        );
    }
    for policy in EBPF_POLICIES {
        let cluster = Cluster::start(&["--workers", "2", "--balance", policy]);
        let rogue = rogue_listener(cluster.listen_addr());
        let got = rogue_share(cluster.listen_addr(), &rogue, &client_ips(200), 1000);
        assert_eq!(
            got, 0,
            "{policy}: the rogue listener received {got} of 1000 connections"
        );
        let doc = cluster.status();
        assert_eq!(counter(&doc, "drops"), 0, "{policy}: {doc}");
        assert!(
            status::total(&doc, "accepted") >= 1000,
            "{policy}: the workers got them all: {doc}"
        );
    }
}

#[test]
fn connections_queued_on_a_killed_worker_migrate_through_the_program() {
    // Stall avoidance would keep the queue from building on the blocked worker (2 or 3
    // connections, not 30): this is about what happens to a queue once it is there.
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--demo-faults",
        "--no-avoid-stalls",
    ]);
    let addr = cluster.listen_addr();
    let victim = status::worker(&cluster.status(), 0)
        .pid
        .expect("slot 0 runs");
    // Block slot 0's loop: from now on its listener queues and never accepts.
    let _blocker = block_slot(addr, 0, 30_000);
    cluster.wait_until(
        "slot 0 stops answering heartbeats",
        Duration::from_secs(5),
        |s| status::worker(s, 0).raw["health_ms"].as_u64() > Some(300),
    );
    let before = counter(&cluster.status(), "migrations");

    // Round-robin puts every other new connection on slot 0's queue.
    let mut pending: Vec<KeepAlive> = (0..60)
        .map(|_| {
            let mut conn = KeepAlive::connect(addr).expect("handshake completes in the kernel");
            conn.send_only("/").expect("send request");
            conn
        })
        .collect();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL)
        .expect("kill");
    let answered: Vec<usize> = pending
        .iter_mut()
        .map(|conn| {
            conn.read_response()
                .expect("a queued request is served after its listener died")
                .worker()
                .expect("slot")
        })
        .collect();
    assert_eq!(answered.len(), 60);
    let migrated = counter(&cluster.status(), "migrations") - before;
    println!("killed worker: {migrated} queued connections migrated by the program");
    assert!(
        migrated >= 25,
        "about 30 connections were queued on the killed worker, the program migrated {migrated}"
    );
}

#[test]
fn twenty_rolling_restarts_under_new_connection_load_lose_no_connection() {
    let cluster = Cluster::start(&["--workers", "4", "--balance", "round-robin"]);
    let load = Load::new_connections(cluster.listen_addr(), 8);
    load.wait_for_ok(200, Duration::from_secs(10));
    let mut generation = 1;
    for _ in 0..20 {
        let before = cluster.worker_pid_list();
        cluster.signal(Signal::SIGUSR2);
        generation += 1;
        wait_rolled(&cluster, &before, generation);
    }
    cluster.wait_until(
        "old generations have exited",
        Duration::from_secs(10),
        |s| status::workers(s).iter().all(|w| w.raw["draining"] == 0),
    );
    let report = load.stop();
    println!("20 rolling restarts under load: {report}");
    // With the program, a socket leaves steering before it closes: not even a handshake
    // may fail.
    report.assert_all_succeeded();
    assert!(
        report.ok >= 1000,
        "too little load to prove anything: {report}"
    );
    let doc = cluster.status();
    assert_eq!(counter(&doc, "drops"), 0, "{doc}");
    assert_eq!(
        status::total(&doc, "restarts"),
        0,
        "a rolling restart is not a crash"
    );
}

/// `steer run` with CAP_BPF and CAP_SYS_ADMIN out of its bounding set: root, but unable to
/// load eBPF.
fn without_cap_bpf(cmd: &mut std::process::Command) {
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut wrapped = std::process::Command::new("setpriv");
    wrapped
        .args(["--bounding-set", "-bpf,-sys_admin,-perfmon", "--"])
        .arg(program)
        .args(args);
    *cmd = wrapped;
}

#[test]
fn without_cap_bpf_auto_falls_back_to_kernel_and_explicit_policies_exit_1() {
    let cluster = Cluster::start_with(&["--workers", "2"], without_cap_bpf);
    let doc = cluster.status();
    assert_eq!(doc["primary"]["balance"], "kernel", "{doc}");
    assert!(doc.get("steering").is_none_or(Value::is_null), "{doc}");
    http_get(cluster.listen_addr(), "/").expect("kernel balancing serves");
    let log = cluster.log();
    assert_eq!(
        log.matches("eBPF steering unavailable").count(),
        1,
        "one warning: {log}"
    );
    assert!(
        log.contains("CAP_BPF"),
        "the warning names the capability: {log}"
    );
    drop(cluster);

    for policy in EBPF_POLICIES {
        let mut cmd = std::process::Command::new(steer_bin());
        cmd.args(["run", "--workers", "1", "--balance", policy, "--listen"])
            .arg(steer_tests::free_local_addr().to_string());
        without_cap_bpf(&mut cmd);
        let out = run_to_completion(&mut cmd, Duration::from_secs(10));
        assert_eq!(out.code(), Some(1), "{policy}: {out:?}");
        assert!(
            out.stderr.contains("CAP_BPF") && out.stderr.contains(policy),
            "{policy}: the error names the capability and the flag: {}",
            out.stderr
        );
    }
}
