//! Stalls: every eBPF policy steers new connections around a worker that has connections
//! waiting and accepts none, within milliseconds, and takes it back the moment it accepts
//! again. A stalled worker is not hung: it stays `ready`, in steering, and is not replaced.
//!
//! A worker is stalled here with the demo's `/block?ms=N` (`--demo-faults`), which stops its
//! event loop; the health timeout is raised so the heartbeat never replaces it meanwhile:
//! these tests measure steering alone. Every test loads the program, so it needs root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use steer_tests::{
    Cluster, KeepAlive, SeenTwice, Signal, SynSender, Value, http_get, http_get_from, status,
    wait_for,
};

/// Longer than any stall here: the heartbeat must not replace the blocked worker.
const HEALTH_TIMEOUT: &str = "20s";

/// The demo worker's stall in the closed-loop tests.
const BLOCK: Duration = Duration::from_secs(3);

/// A request slower than this during a stall waited on the stalled worker.
const SLOW: Duration = Duration::from_millis(500);

/// Serializes this file's tests: each loads 2-4 workers and measures throughput or
/// turns, which another test's cluster on the same 2 CPUs would distort.
static QUIET: Mutex<()> = Mutex::new(());

fn quiet() -> MutexGuard<'static, ()> {
    QUIET.lock().unwrap_or_else(PoisonError::into_inner)
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

fn start(policy: &str, workers: usize, extra: &[&str]) -> Cluster {
    let workers = workers.to_string();
    let mut args = vec![
        "--workers",
        workers.as_str(),
        "--balance",
        policy,
        "--demo-faults",
        "--health-timeout",
        HEALTH_TIMEOUT,
    ];
    args.extend_from_slice(extra);
    let cluster = Cluster::start(&args);
    assert_eq!(cluster.status()["primary"]["balance"], policy);
    cluster
}

/// Sends `/block?ms=<ms>` from `ip` on a connection that reached a worker; returns that
/// connection (its answer arrives when the block ends) and the worker's slot.
fn block_from(ip: IpAddr, addr: SocketAddr, ms: u128) -> (KeepAlive, usize) {
    let mut conn = KeepAlive::connect_from(ip, addr).expect("connect the blocker");
    let slot = conn
        .get("/")
        .expect("hello")
        .worker()
        .expect("X-Steer-Worker");
    conn.send_only(&format!("/block?ms={ms}"))
        .expect("send /block");
    (conn, slot)
}

fn stalls(doc: &Value, slot: usize) -> u64 {
    status::worker(doc, slot).raw["stalls"]
        .as_u64()
        .unwrap_or_else(|| panic!("no workers[{slot}].stalls in {doc}"))
}

fn stalled(doc: &Value, slot: usize) -> bool {
    status::worker(doc, slot).raw["stalled"]
        .as_bool()
        .unwrap_or_else(|| panic!("no workers[{slot}].stalled in {doc}"))
}

fn selections(doc: &Value) -> Vec<u64> {
    status::workers(doc).iter().map(|w| w.accepted).collect()
}

/// One request of a closed-loop client: when it started, how long it took, which slot
/// answered (`None`: it failed).
#[derive(Debug, Clone, Copy)]
struct Request {
    started: Instant,
    took: Duration,
    slot: Option<usize>,
}

/// Closed-loop clients, one thread per source address, each sending `GET /` on a new
/// connection after the last one's answer, until stopped.
struct ClosedLoop {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<Request>>>,
}

impl ClosedLoop {
    fn start(addr: SocketAddr, clients: &[IpAddr]) -> ClosedLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + Duration::from_secs(60);
        let threads = clients
            .iter()
            .map(|&ip| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut requests = Vec::new();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let started = Instant::now();
                        let slot = http_get_from(ip, addr, "/").ok().and_then(|r| r.worker());
                        requests.push(Request {
                            started,
                            took: started.elapsed(),
                            slot,
                        });
                    }
                    requests
                })
            })
            .collect();
        ClosedLoop { stop, threads }
    }

    /// Stops the clients (each finishes its request) and returns every request, per client.
    fn stop(self) -> Vec<Vec<Request>> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("a client thread panicked"))
            .collect()
    }
}

/// Requests that started in `[from, to)` and completed, per second.
fn throughput(requests: &[Vec<Request>], from: Instant, to: Instant) -> f64 {
    let done = requests
        .iter()
        .flatten()
        .filter(|r| r.started >= from && r.started + r.took < to && r.slot.is_some())
        .count();
    done as f64 / to.duration_since(from).as_secs_f64()
}

/// Blocks in [`closed_loop_survives_a_blocked_worker`]: its throughput figure is the
/// median of these rounds. Five, not three: with a busy loop beside the suite, two of
/// three round-robin rounds fell just short (67%, 69%, 84%) while the clients the blocked
/// worker caught decided each round.
const ROUNDS: usize = 5;

/// One block of a worker, as the clients lived it.
struct Round {
    /// The start of the window "before" (after the previous round's end).
    start: Instant,
    blocked_at: Instant,
    unblocked: Instant,
    slot: usize,
    seen_stalled: bool,
    stalls_before: u64,
    stalls_after: u64,
}

/// 4 workers, 8 closed-loop clients, one worker blocked for 3 s, [`ROUNDS`] times: the
/// clients caught on it are the only slow ones, the rest keep being served, and the
/// median throughput during a block is at least 70% of the median before.
fn closed_loop_survives_a_blocked_worker(policy: &str) {
    let _quiet = quiet();
    let cluster = start(policy, 4, &[]);
    let addr = cluster.listen_addr();
    let clients = client_ips(8);
    let load = ClosedLoop::start(addr, &clients);
    let mut round_start = Instant::now();
    // Under `hash` each client has one slot. The clients of the blocked slot whose request
    // was already queued there wait out the block, whatever the program does, so the
    // blocker is a client of the slot with the fewest (but some) of the 8: as in a
    // service with many clients, where one slot holds about a quarter of them.
    let mut homes: BTreeMap<usize, Vec<IpAddr>> = BTreeMap::new();
    for &ip in &clients {
        let home = http_get_from(ip, addr, "/")
            .expect("GET /")
            .worker()
            .expect("X-Steer-Worker");
        homes.entry(home).or_default().push(ip);
    }
    let blocker_ip = if policy == "hash" {
        homes.values().min_by_key(|ips| ips.len()).expect("a home")[0]
    } else {
        clients[0]
    };
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        std::thread::sleep(Duration::from_millis(1500));
        let blocked_at = Instant::now();
        let (mut blocker, slot) = block_from(blocker_ip, addr, BLOCK.as_millis());
        let stalls_before = stalls(&cluster.status(), slot);
        let mut seen_stalled = false;
        let status_deadline = blocked_at + BLOCK / 2;
        while Instant::now() < status_deadline && !seen_stalled {
            seen_stalled = stalled(&cluster.status(), slot);
            std::thread::sleep(Duration::from_millis(50));
        }
        let answer = blocker
            .read_response()
            .expect("the blocked worker answers /block");
        assert_eq!(answer.status, 200, "/block answered");
        let unblocked = Instant::now();
        // Let the caught clients' answers arrive, and the loop run on a moment.
        std::thread::sleep(Duration::from_millis(700));
        rounds.push(Round {
            start: round_start,
            blocked_at,
            unblocked,
            slot,
            seen_stalled,
            stalls_before,
            stalls_after: stalls(&cluster.status(), slot),
        });
        round_start = Instant::now();
    }
    let requests = load.stop();
    let all: Vec<&Request> = requests.iter().flatten().collect();
    let failed = all.iter().filter(|r| r.slot.is_none()).count();
    assert_eq!(failed, 0, "{policy}: no request fails");
    // A slow request is one the blocked worker took before it counted as stalled: it
    // started during a block and was answered by the blocked slot.
    let slow: Vec<&Request> = all.iter().copied().filter(|r| r.took > SLOW).collect();
    let unexplained: Vec<&&Request> = slow
        .iter()
        .filter(|r| {
            !rounds.iter().any(|round| {
                r.slot == Some(round.slot)
                    && r.started + Duration::from_millis(50) >= round.blocked_at
                    && r.started <= round.unblocked
            })
        })
        .collect();
    let mut ratios = Vec::with_capacity(ROUNDS);
    for (i, round) in rounds.iter().enumerate() {
        let before = throughput(
            &requests,
            round.start + Duration::from_millis(300),
            round.blocked_at,
        );
        let window = (
            round.blocked_at + Duration::from_millis(200),
            round.unblocked - Duration::from_millis(100),
        );
        let during = throughput(&requests, window.0, window.1);
        let caught = slow
            .iter()
            .filter(|r| r.started <= round.unblocked && r.started + BLOCK >= round.blocked_at)
            .count();
        // Without stall avoidance every client's turn comes to the blocked worker within
        // a few requests, and all are caught: nobody is served for the rest of the block.
        let kept_going = requests
            .iter()
            .filter(|client| {
                client
                    .iter()
                    .filter(|r| {
                        r.slot.is_some() && r.started >= window.0 && r.started + r.took <= window.1
                    })
                    .count()
                    >= 100
            })
            .count();
        println!(
            "{policy} round {i}: slot {} blocked {BLOCK:?}; {before:.0}/s before, {during:.0}/s \
             during ({:.0}%); {caught} clients caught on it; {kept_going} of 8 kept being \
             served; stalls {} -> {}, seen stalled in /status: {}",
            round.slot,
            100.0 * during / before,
            round.stalls_before,
            round.stalls_after,
            round.seen_stalled,
        );
        assert!(
            kept_going >= 1,
            "{policy} round {i}: some client kept being served during the block (100 \
             requests or more); {during:.0}/s during against {before:.0}/s before"
        );
        // Round-robin looks at every slot in turn, so it sees the stall; under hash and
        // cpu only the slot's own clients (or CPU) look, and once they are caught nobody
        // may.
        if policy == "round-robin" {
            assert!(
                round.stalls_after > round.stalls_before && round.seen_stalled,
                "{policy} round {i}: the stall is counted and shown in /status"
            );
        }
        ratios.push(during / before);
    }
    assert!(
        unexplained.is_empty(),
        "{policy}: every slow request is one a blocked worker took before it was stalled; \
         not these: {unexplained:?}"
    );
    // The figure: throughput during a stall at least 70% of before. One block's
    // ratio swings with how many of the 8 clients the worker caught in its first half
    // millisecond (63% to 135% seen on this 2-CPU host, where the clients share the CPUs);
    // the median of the rounds is what is held.
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!(
        "{policy}: median throughput during a block {:.0}% of before",
        100.0 * median
    );
    assert!(
        median >= 0.70,
        "{policy}: median throughput during a block {:.0}% of before (rounds {:?})",
        100.0 * median,
        ratios
    );
    let doc = cluster.status();
    assert!(status::all_ready(&doc), "a stall replaces nobody: {doc}");
    assert!(
        status::workers(&doc)
            .iter()
            .all(|w| w.restarts == 0 && w.generation == 1),
        "nobody was replaced: {doc}"
    );
}

#[test]
fn round_robin_steers_around_a_blocked_worker() {
    closed_loop_survives_a_blocked_worker("round-robin");
}

#[test]
fn hash_steers_around_a_blocked_worker() {
    closed_loop_survives_a_blocked_worker("hash");
}

#[test]
fn cpu_steers_around_a_blocked_worker() {
    closed_loop_survives_a_blocked_worker("cpu");
}

#[test]
fn round_robin_stays_exact_with_every_worker_healthy() {
    let _quiet = quiet();
    let cluster = start("round-robin", 4, &[]);
    let addr = cluster.listen_addr();
    let doc = cluster.status();
    let before = selections(&doc);
    let lost_before = doc["steering"]["turns_lost"].as_u64().expect("turns_lost");
    let seen_twice = SeenTwice::mark();
    // Four clients at once: the workers are busy, but none stalls.
    let per_client = 2500;
    let threads: Vec<_> = client_ips(4)
        .into_iter()
        .map(|ip| {
            std::thread::spawn(move || {
                let mut per_worker = [0u64; 4];
                for _ in 0..per_client {
                    let r = http_get_from(ip, addr, "/").expect("GET /");
                    per_worker[r.worker().expect("X-Steer-Worker")] += 1;
                }
                per_worker
            })
        })
        .collect();
    let mut per_worker = [0u64; 4];
    for t in threads {
        for (sum, n) in per_worker.iter_mut().zip(t.join().expect("client")) {
            *sum += n;
        }
    }
    // On a busy host the scheduler can keep a worker off the CPU for half a millisecond
    // with two connections waiting: a stall as far as the program can tell, and round-robin
    // owes it the turns it skipped (per CPU). One connection at a time from each CPU (on
    // loopback the SYN is processed on the sending CPU) gives them back: no worker has two
    // waiting, so none stalls; 40 cover a full turn plus the most a CPU can owe (8 a slot).
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("cpus");
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&cpu| allowed.is_set(cpu).unwrap_or(false))
        .collect();
    for &cpu in &cpus {
        let given_back = std::thread::spawn(move || {
            let mut set = nix::sched::CpuSet::new();
            set.set(cpu).expect("cpu in range");
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                .expect("pin the client thread");
            let mut per_worker = [0u64; 4];
            for _ in 0..40 {
                let r = http_get(addr, "/").expect("GET /");
                per_worker[r.worker().expect("X-Steer-Worker")] += 1;
            }
            per_worker
        })
        .join()
        .expect("client");
        for (sum, n) in per_worker.iter_mut().zip(given_back) {
            *sum += n;
        }
    }
    let doc = cluster.status();
    let stalls: Vec<u64> = (0..4).map(|s| stalls(&doc, s)).collect();
    let steered: Vec<u64> = selections(&doc)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    let lost = doc["steering"]["turns_lost"].as_u64().expect("turns_lost") - lost_before;
    let max = per_worker.iter().max().copied().unwrap_or(0) as f64;
    let min = per_worker.iter().min().copied().unwrap_or(1).max(1) as f64;
    println!(
        "round-robin, 10,000 connections from 4 clients at once, then 40 per CPU one at a \
         time: {per_worker:?}, max/min {:.4}, stalls {stalls:?}, turns lost {lost}",
        max / min
    );
    // Each connection was one selection, plus one for each handshake the program saw
    // twice (a SYN sent again after the first was dropped on a full queue).
    seen_twice.assert_selections_cover(&steered, &per_worker, &doc["steering"].to_string());
    let (most, least) = (
        steered.iter().max().copied().unwrap_or(0),
        steered.iter().min().copied().unwrap_or(0),
    );
    // The cursor is per CPU: each CPU's turns are exact, so the totals are at most one
    // turn apart per CPU, and SYNs sent again add theirs. A moment's stall costs nothing
    // (its turns are given back); only a turn the program counted lost may add drift.
    assert!(
        most - least <= cpus.len() as u64 + seen_twice.since() + lost,
        "round-robin's selections are exact (one turn apart per CPU, {lost} lost): \
         {steered:?}"
    );
    // With no turn lost, no worker stalled for longer than its owed turns cover: healthy,
    // and the split is exact. (With 3 busy loops beside this test on 2 CPUs, 6 runs lost
    // 13-222 turns and split 1.004-1.033, each within the bound above.)
    if lost == 0 {
        assert!(
            max / min <= 1.01,
            "max/min {:.4} > 1.01: {per_worker:?}",
            max / min
        );
    }
}

#[test]
fn hash_moves_only_a_stalled_slots_clients_and_takes_them_back() {
    let _quiet = quiet();
    let cluster = start("hash", 4, &[]);
    let addr = cluster.listen_addr();
    let clients = client_ips(40);
    let home: BTreeMap<IpAddr, usize> = clients
        .iter()
        .map(|&ip| {
            let r = http_get_from(ip, addr, "/").expect("GET /");
            (ip, r.worker().expect("X-Steer-Worker"))
        })
        .collect();
    let (mut blocker, slot) = block_from(clients[0], addr, 1500);
    let own: Vec<IpAddr> = clients
        .iter()
        .copied()
        .filter(|ip| home[ip] == slot)
        .collect();
    // While the slot is stalled: every client, one connection each, a few rounds. A
    // connection that gets no answer in 300 ms is queued on the stalled worker.
    let mut moved: BTreeMap<IpAddr, BTreeSet<usize>> = BTreeMap::new();
    let mut stuck = Vec::new();
    for _ in 0..3 {
        for &ip in &clients {
            let mut conn = KeepAlive::connect_from(ip, addr).expect("connect");
            conn.send_only("/").expect("send");
            if conn
                .wait_readable(Duration::from_millis(300))
                .expect("poll")
            {
                let worker = conn
                    .read_response()
                    .expect("answer")
                    .worker()
                    .expect("slot");
                if worker != home[&ip] {
                    moved.entry(ip).or_default().insert(worker);
                }
            } else {
                stuck.push((ip, conn));
            }
        }
    }
    let answer = blocker.read_response().expect("/block answered");
    let unblocked = Instant::now();
    assert_eq!(answer.status, 200);
    // Back home: each of the slot's clients, once its first connection after the stall
    // lands on the slot again.
    let mut back_after = Vec::new();
    for &ip in &own {
        let limit = Instant::now() + Duration::from_secs(2);
        loop {
            let r = http_get_from(ip, addr, "/").expect("GET / after the stall");
            if r.worker() == Some(slot) {
                back_after.push(unblocked.elapsed());
                break;
            }
            assert!(
                Instant::now() < limit,
                "{ip} never came back to slot {slot}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    for (ip, mut conn) in stuck {
        let r = conn
            .read_response()
            .expect("a queued connection is answered after the stall");
        assert_eq!(
            r.worker(),
            Some(slot),
            "{ip}'s connection waited on slot {slot}"
        );
    }
    let after: BTreeMap<IpAddr, usize> = clients
        .iter()
        .map(|&ip| {
            let r = http_get_from(ip, addr, "/").expect("GET /");
            (ip, r.worker().expect("X-Steer-Worker"))
        })
        .collect();
    println!(
        "hash: slot {slot} stalled 1.5 s; its {} clients {own:?} moved: {moved:?}; back \
         {back_after:?} after the stall",
        own.len()
    );
    assert!(
        !own.is_empty(),
        "the blocker's own address is the slot's client"
    );
    let others_moved: Vec<_> = moved.keys().filter(|ip| home[ip] != slot).collect();
    assert!(
        others_moved.is_empty(),
        "no other client moves: {others_moved:?} did"
    );
    assert!(
        own.iter().all(|ip| moved.contains_key(ip)),
        "every client of the stalled slot went to its second choice: {moved:?}"
    );
    assert!(
        moved.values().all(|to| to.len() == 1),
        "each moved client stays on one second choice: {moved:?}"
    );
    assert!(
        back_after.iter().all(|d| *d <= Duration::from_millis(100)),
        "every client of the slot is back within 100 ms of the stall's end: {back_after:?}"
    );
    assert_eq!(after, home, "afterwards every client is home");
}

#[test]
fn phantom_syns_do_not_stall_a_slot_past_one_interval() {
    let _quiet = quiet();
    let interval = Duration::from_secs(1);
    let cluster = start("round-robin", 2, &["--health-interval", "1s"]);
    let addr = cluster.listen_addr();
    let SocketAddr::V4(target) = addr else {
        panic!("the cluster listens on IPv4");
    };
    // Both workers have accepted connections: the program judges them from their records
    // (a worker that never accepted one is the primary's to judge).
    for _ in 0..20 {
        http_get(addr, "/").expect("GET /");
    }
    let victim = status::worker(&cluster.status(), 1)
        .pid
        .expect("slot 1 runs");
    let before = cluster.status();
    // As in the least-loaded test: slot 1 goes away while the primary is stopped, so every
    // phantom SYN is steered to slot 0, whose worker then looks stalled (thousands
    // queued, nothing accepted).
    let primary = nix::unistd::Pid::from_raw(cluster.pid() as i32);
    nix::sys::signal::kill(primary, Signal::SIGSTOP).expect("stop the primary");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL)
        .expect("kill slot 1");
    wait_for("slot 1's worker is dead", Duration::from_secs(5), || {
        matches!(steer_tests::process_state(victim), None | Some('Z'))
    });
    let mut syns = SynSender::open().expect("a raw socket (root)");
    syns.send(target, 5000).expect("send SYNs");
    nix::sys::signal::kill(primary, Signal::SIGCONT).expect("continue the primary");
    let phantom_stopped = Instant::now();
    cluster.wait_until("slot 1 serves again", Duration::from_secs(20), |s| {
        status::all_ready(s) && status::worker(s, 1).pid.is_some_and(|p| p != victim)
    });
    let back = phantom_stopped.elapsed();
    assert!(back < interval * 2, "slot 1 took {back:?} to serve again");
    let doc = cluster.status();
    assert!(
        stalls(&doc, 0) > stalls(&before, 0),
        "the phantom SYNs made slot 0 look stalled"
    );
    std::thread::sleep((phantom_stopped + interval).saturating_duration_since(Instant::now()));
    let mut per_slot = [0u32; 2];
    for _ in 0..200 {
        let response = http_get(addr, "/").expect("GET /");
        per_slot[response.worker().expect("X-Steer-Worker")] += 1;
    }
    println!("round-robin, one interval after 5,000 phantom SYNs to slot 0: {per_slot:?}");
    // Each CPU keeps its own cursor, and one client's SYNs may be handled on either CPU:
    // each CPU's turns alternate exactly, so a slot is short of its half by at most one
    // per CPU. Slot 0 may get more: the turns it was skipped for while the phantoms kept
    // it stalled are owed to it and given back. A slot still counted stalled would get
    // none.
    let cpus = u32::try_from(std::thread::available_parallelism().map_or(1, |n| n.get()))
        .expect("a CPU count");
    assert!(
        per_slot[0] + cpus >= 100,
        "slot 0 is back in rotation (at least its half, less one turn per CPU): {per_slot:?}"
    );
}

#[test]
fn a_few_phantom_syns_hold_a_healthy_slot_out_for_a_moment_not_a_health_interval() {
    // A handful of SYNs that never become connections (retransmits, clients that give
    // up, here spoofed sources whose SYN-ACK is answered with a reset) are steered and
    // never accepted: by the estimate the slot has connections waiting and makes no
    // progress, so the program judges it stalled. The program tells the primary at once,
    // which settles the records against the real (empty) queues: the slot is back long
    // before the next health interval, when it would be settled otherwise.
    let _quiet = quiet();
    let interval = Duration::from_secs(10);
    let cluster = start("round-robin", 2, &["--health-interval", "10s"]);
    let addr = cluster.listen_addr();
    let SocketAddr::V4(target) = addr else {
        panic!("the cluster listens on IPv4");
    };
    for _ in 0..20 {
        http_get(addr, "/").expect("GET /");
    }
    let before = cluster.status();
    let mut syns = SynSender::open().expect("a raw socket (root)");
    let mut sent = 0;
    let mut stalled_at = None;
    // A few phantoms to each slot, then a real connection whose steering judges them; as
    // many rounds as it takes for a stall to be seen (a bounded few).
    for _ in 0..20 {
        syns.send(target, 6).expect("send SYNs");
        sent += 6;
        std::thread::sleep(Duration::from_millis(2));
        http_get(addr, "/").expect("GET / while phantoms wait");
        let doc = cluster.status();
        if (0..2).any(|slot| stalls(&doc, slot) > stalls(&before, slot)) {
            stalled_at = Some(Instant::now());
            break;
        }
    }
    let stalled_at = stalled_at.expect("the phantom SYNs made a slot look stalled");
    let doc = cluster.wait_until("no slot judged stalled any more", interval / 4, |s| {
        (0..2).all(|slot| !stalled(s, slot))
    });
    let back = stalled_at.elapsed();
    println!(
        "{sent} phantom SYNs: a healthy slot judged stalled was back {} ms later (health \
         interval {} s); stalls {:?}",
        back.as_millis(),
        interval.as_secs(),
        (0..2).map(|slot| stalls(&doc, slot)).collect::<Vec<_>>()
    );
    let mut per_slot = [0u32; 2];
    for _ in 0..200 {
        let response = http_get(addr, "/").expect("GET /");
        per_slot[response.worker().expect("X-Steer-Worker")] += 1;
    }
    println!("round-robin after the phantoms: {per_slot:?}");
    // Near half each: exact turns per CPU, less or plus the few turns a slot was skipped
    // for and is given back. A slot still judged stalled would get none.
    assert!(
        per_slot.iter().all(|&n| n >= 80),
        "both slots are in rotation again: {per_slot:?}"
    );
}

#[test]
fn with_no_avoid_stalls_a_blocked_worker_keeps_its_share() {
    // Avoidance is on by default (every test above runs without the flag);
    // `--no-avoid-stalls` turns it off: round-robin keeps handing the blocked worker its
    // turn, and no stall is counted.
    let _quiet = quiet();
    let cluster = start("round-robin", 4, &["--no-avoid-stalls"]);
    let addr = cluster.listen_addr();
    let (mut blocker, slot) = block_from(client_ips(1)[0], addr, 1500);
    let (waiting, steered, doc) = forty_waiting(&cluster);
    println!("--no-avoid-stalls: slot {slot} blocked; 40 connections steered {steered:?}");
    for mut conn in waiting {
        conn.read_response().expect("answered");
    }
    blocker.read_response().expect("/block answered");
    // A quarter of 40, less a turn per CPU (each CPU has its own cursor); with avoidance
    // on it would get 2 or 3.
    assert!(
        steered[slot] >= 8,
        "the blocked worker got its turns: {steered:?}"
    );
    assert_eq!(stalls(&doc, slot), 0, "no stall counted");
}

/// 40 connections, one after another, each sending `GET /` and left waiting for its
/// answer: the connections, what the program steered to each slot meanwhile, and the
/// `/status` read after them.
fn forty_waiting(cluster: &Cluster) -> (Vec<KeepAlive>, Vec<u64>, Value) {
    let addr = cluster.listen_addr();
    let before = selections(&cluster.status());
    let mut waiting = Vec::new();
    for _ in 0..40 {
        let mut conn = KeepAlive::connect(addr).expect("the handshake completes: nothing refused");
        conn.send_only("/").expect("send");
        waiting.push(conn);
    }
    let doc = cluster.status();
    let steered = selections(&doc)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    (waiting, steered, doc)
}

#[test]
fn with_every_worker_stalled_connections_still_spread() {
    let _quiet = quiet();
    let cluster = start("round-robin", 4, &[]);
    let addr = cluster.listen_addr();
    let mut blockers = Vec::new();
    let mut blocked = BTreeSet::new();
    for _ in 0..200 {
        if blocked.len() == 4 {
            break;
        }
        let mut conn = KeepAlive::connect(addr).expect("connect");
        let slot = conn.get("/").expect("hello").worker().expect("slot");
        if blocked.insert(slot) {
            conn.send_only("/block?ms=1500").expect("send /block");
            blockers.push(conn);
        }
    }
    assert_eq!(blocked.len(), 4, "every worker blocked");
    // Connections while every worker is stalled: each completes its handshake in the
    // kernel and waits in a queue.
    let (waiting, steered, _) = forty_waiting(&cluster);
    let mut answered = [0u32; 4];
    for mut conn in waiting {
        let r = conn
            .read_response()
            .expect("answered once the workers resume");
        answered[r.worker().expect("slot")] += 1;
    }
    for mut b in blockers {
        b.read_response().expect("/block answered");
    }
    println!("round-robin with every worker stalled: 40 connections steered {steered:?}");
    // Not exactly even: until every worker's queue has grown, the ones not yet judged
    // stalled take more ([15, 15, 5, 5] is common here, [19, 13, 4, 4] seen). But no
    // worker is left out, and none takes three quarters of them.
    assert!(
        steered.iter().all(|&n| (1..=30).contains(&n)),
        "the connections still spread over every worker: {steered:?}"
    );
    assert_eq!(
        answered.iter().sum::<u32>(),
        40,
        "every connection answered"
    );
}
