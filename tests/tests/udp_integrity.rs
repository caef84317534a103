//! The integrity guarantees of a UDP listener's `SO_REUSEPORT` group, each shown against
//! the binary:
//!
//! - `cpu` keeps a UDP flow on the worker pinned to the CPU that received its first
//!   datagram, wherever its later datagrams are sent from;
//! - a same-user socket that replaces the group's program (classic BPF picking itself, or
//!   an eBPF program dropping everything) is noticed by the UDP ownership probe within a
//!   couple of health intervals, counted, and repaired: it gets nothing afterwards;
//! - a program someone else left on the group before the cluster started (a rogue's
//!   classic filter, a dead cluster's program) does not break a new cluster;
//! - the probe does not misfire: a healthy cluster under flow load counts no takeover, and
//!   no probe datagram ever reaches a worker (seen on the wire: every one is refused).
//!
//! Every cluster here has a TCP listener beside the UDP one (`dns`), as a real one would;
//! each is its own group. The demo answers a datagram with `<slot> <pid> <generation>
//! <payload>`. Every test loads Steer's program or opens raw sockets, so it needs root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use steer_tests::rogue::{
    attach_classic_bpf_returning, attach_ebpf_dropping_everything, rogue_udp_socket,
    udp_sockets_bound_to,
};
use steer_tests::{Cluster, Value, free_local_addr, status};

/// The UDP listener's name in every cluster here.
const UDP_NAME: &str = "dns";

/// A cluster of `workers` under `policy` with a TCP listener and a UDP one on `udp`;
/// `extra` options follow.
fn start_on(udp: SocketAddr, workers: usize, policy: &str, extra: &[&str]) -> Cluster {
    let workers = workers.to_string();
    let tcp = free_local_addr().to_string();
    let udp_arg = format!("{UDP_NAME}=udp://{udp}");
    let mut args = vec![
        "--workers",
        workers.as_str(),
        "--balance",
        policy,
        "--listen",
        tcp.as_str(),
        "--listen",
        udp_arg.as_str(),
    ];
    args.extend_from_slice(extra);
    Cluster::start(&args)
}

/// [`start_on`] a fresh address; the cluster and its UDP address.
fn start(workers: usize, policy: &str, extra: &[&str]) -> (Cluster, SocketAddr) {
    let udp = free_local_addr();
    (start_on(udp, workers, policy, extra), udp)
}

/// The UDP listener in `/status`.
fn udp_listener(doc: &Value) -> &Value {
    doc["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == UDP_NAME))
        .unwrap_or_else(|| panic!("no listener {UDP_NAME} in {doc}"))
}

/// The TCP listener in `/status`.
fn tcp_listener(doc: &Value) -> &Value {
    doc["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["protocol"] == "tcp"))
        .unwrap_or_else(|| panic!("no TCP listener in {doc}"))
}

/// The UDP group's takeovers, and every group's together.
fn takeovers(doc: &Value) -> (u64, u64) {
    let udp = udp_listener(doc)["takeovers"]
        .as_u64()
        .unwrap_or_else(|| panic!("no takeovers for {UDP_NAME} in {doc}"));
    let all = doc["steering"]["takeovers"]
        .as_u64()
        .unwrap_or_else(|| panic!("no steering.takeovers in {doc}"));
    (udp, all)
}

/// One answer of the demo (or of an old group's socket, which answers as slot 99).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    slot: usize,
    pid: u32,
    generation: u64,
    echoed: String,
}

fn parse(text: &str) -> Answer {
    let mut parts = text.splitn(4, ' ');
    let mut number = || -> u64 {
        parts
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("answer {text:?} is `<slot> <pid> <generation> <payload>`"))
    };
    let (slot, pid, generation) = (number() as usize, number() as u32, number());
    Answer {
        slot,
        pid,
        generation,
        echoed: parts.next().unwrap_or_default().to_owned(),
    }
}

/// Sends `payload` from `from` to `to`; the answer, or `None` within `timeout`.
fn ask(from: &UdpSocket, to: SocketAddr, payload: &str, timeout: Duration) -> Option<Answer> {
    from.set_read_timeout(Some(timeout)).expect("timeout");
    from.send_to(payload.as_bytes(), to).expect("send");
    let mut buffer = [0u8; 2048];
    let (len, peer) = from.recv_from(&mut buffer).ok()?;
    // A socket bound to a wildcard answers from the route's source address.
    assert_eq!(
        peer.port(),
        to.port(),
        "the answer comes from the listener's port"
    );
    let answer = parse(std::str::from_utf8(&buffer[..len]).expect("ASCII answer"));
    assert_eq!(answer.echoed, payload, "the answer to this datagram");
    Some(answer)
}

/// A fresh client socket on 127.0.0.1 (a new source port: a new flow).
fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").expect("client socket")
}

/// What waits on `socket` (which never answers), as text.
fn queued(socket: &UdpSocket) -> Vec<String> {
    let mut buffer = [0u8; 2048];
    let mut got = Vec::new();
    // Bounded: a socket's receive buffer holds far fewer.
    for _ in 0..100_000 {
        match socket.recv_from(&mut buffer) {
            Ok((len, _)) => got.push(String::from_utf8_lossy(&buffer[..len]).into_owned()),
            Err(_) => break,
        }
    }
    got
}

/// Pins the calling thread to `cpu`. On loopback a datagram is processed (and the
/// reuseport program run) on the sending thread's CPU.
fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).expect("cpu in range");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .expect("pin the client thread");
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

/// New flows opened per CPU in the `cpu` test.
const FLOWS_PER_CPU: usize = 50;

#[test]
fn cpu_policy_keeps_each_udp_flow_on_the_worker_pinned_to_its_first_datagrams_cpu() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "this test needs 2 CPUs or more, the host has {cpus}"
    );
    let (cluster, udp) = start(cpus, "cpu", &[]);
    // --balance cpu pins slot i's worker to CPU i: the worker "of" each CPU.
    let worker_of_cpu: BTreeMap<usize, u32> = status::workers(&cluster.status())
        .iter()
        .map(|w| {
            let pid = w.pid.expect("running");
            let cpu: usize = cpus_allowed(pid)
                .parse()
                .unwrap_or_else(|_| panic!("slot {}'s worker is pinned to one CPU", w.slot));
            (cpu, pid)
        })
        .collect();
    assert_eq!(
        worker_of_cpu.len(),
        cpus,
        "one worker per CPU: {worker_of_cpu:?}"
    );
    let mut moved = Vec::new();
    // Every client socket stays open to the end: a port freed by CPU 0's flows could be
    // given to one of CPU 1's, whose "new" flow would then be CPU 0's, still in the table.
    let mut open = Vec::new();
    for cpu in 0..cpus {
        let other = (cpu + 1) % cpus;
        // Each flow's first datagram leaves from `cpu`, its second from `other`.
        let (first, second, sockets) = std::thread::spawn(move || {
            pin_to(cpu);
            let sockets: Vec<UdpSocket> = (0..FLOWS_PER_CPU).map(|_| client()).collect();
            let round = |name: &str| -> Vec<Answer> {
                sockets
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        ask(s, udp, &format!("{cpu}/{i}/{name}"), Duration::from_secs(2))
                            .unwrap_or_else(|| panic!("flow {i} from CPU {cpu}: no answer"))
                    })
                    .collect()
            };
            let first = round("first");
            pin_to(other);
            let second = round("second");
            (first, second, sockets)
        })
        .join()
        .expect("client thread");
        open.extend(sockets);
        let expected = worker_of_cpu[&cpu];
        let landed: BTreeSet<u32> = first.iter().map(|a| a.pid).collect();
        assert_eq!(
            landed,
            BTreeSet::from([expected]),
            "new flows from CPU {cpu} land on the worker pinned to CPU {cpu} ({expected}): \
             {first:?}"
        );
        for (i, (a, b)) in first.iter().zip(&second).enumerate() {
            if a.pid != b.pid {
                moved.push((cpu, i, a.pid, b.pid));
            }
        }
    }
    let doc = cluster.status();
    let flows = &udp_listener(&doc)["flows"];
    println!(
        "cpu policy, {cpus} CPUs: {FLOWS_PER_CPU} new flows from each CPU all landed on its \
         worker {worker_of_cpu:?}; their second datagram, sent from the next CPU, moved \
         {} of them; flow counters {flows}",
        moved.len()
    );
    assert!(
        moved.is_empty(),
        "a flow stays on its worker when later datagrams come from another CPU: \
         (cpu, flow, first pid, second pid) {moved:?}"
    );
}

/// How a rogue takes the UDP group over.
#[derive(Debug, Clone, Copy)]
enum Attack {
    /// A classic BPF filter returning the rogue's own index: it gets everything, and
    /// never answers (the probe is swallowed silently).
    ClassicPickingItself,
    /// An eBPF program of its own that drops everything (the probe is refused, uncounted).
    EbpfDroppingEverything,
}

/// The whole attack on a 4-worker `round-robin` cluster with `--health-interval 1s`: the
/// attack works, the primary notices it within two health intervals, counts it once for
/// the UDP group (and none for the TCP one), attaches Steer's program again, and the
/// rogue, still in the group, then gets 0 of 200 new flows.
///
/// On a wildcard address (`wildcard`), a failed probe is confirmed through a second
/// loopback address before it counts (another group may hold the first): one probe more,
/// so up to three intervals.
fn takeover_of_the_udp_group_is_repaired(attack: Attack, wildcard: bool) {
    let interval = Duration::from_secs(1);
    let workers = 4;
    let port = steer_tests::free_port();
    let listen = SocketAddr::from(([0, 0, 0, 0], port));
    let udp = SocketAddr::from(([127, 0, 0, 1], port));
    let (cluster, bound) = if wildcard {
        let extra = ["--health-interval", "1s"];
        (start_on(listen, workers, "round-robin", &extra), listen)
    } else {
        let extra = ["--health-interval", "1s"];
        (start_on(udp, workers, "round-robin", &extra), udp)
    };
    let probes_to_a_verdict = if wildcard { 3 } else { 2 };
    assert_eq!(takeovers(&cluster.status()), (0, 0));
    let rogue = rogue_udp_socket(bound);
    // The group: the primary's reservation of the address, the workers, then the rogue,
    // each at the end of the group's socket array as it joined.
    let members = udp_sockets_bound_to(bound);
    assert_eq!(
        members,
        workers + 2,
        "the group holds the reservation, {workers} workers and the rogue"
    );
    let mut _program = None;
    match attack {
        Attack::ClassicPickingItself => attach_classic_bpf_returning(&rogue, members as u32 - 1),
        Attack::EbpfDroppingEverything => {
            _program = Some(attach_ebpf_dropping_everything(&rogue));
        }
    }
    let attacked = Instant::now();
    // The attack works at all: 20 new flows sent at once, read 300 ms later.
    let before: Vec<UdpSocket> = (0..20).map(|_| client()).collect();
    for (i, socket) in before.iter().enumerate() {
        socket
            .send_to(format!("before/{i}").as_bytes(), udp)
            .expect("send");
    }
    std::thread::sleep(Duration::from_millis(300));
    let answered_before = before
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).expect("nonblocking");
            !queued(s).is_empty()
        })
        .count();
    assert!(
        answered_before < 20,
        "{attack:?}: the attack works at all ({answered_before} of 20 answered)"
    );
    let doc = cluster.wait_until("the takeover is noticed", interval * 6, |s| {
        takeovers(s).0 >= 1
    });
    let noticed = attacked.elapsed();
    // The warning is written once the program is attached again.
    let log = cluster.wait_for_log("steering takeover", Duration::from_secs(5));
    let rogue_got = queued(&rogue);
    println!(
        "{attack:?} on {bound}: {answered_before} of 20 flows sent right after the attack were answered; \
         the primary noticed and repaired it {} ms after the attack (health interval {} ms); \
         the rogue had received {:?}",
        noticed.as_millis(),
        interval.as_millis(),
        rogue_got
    );
    assert!(
        noticed <= interval * probes_to_a_verdict + Duration::from_secs(1),
        "{attack:?}: noticed {noticed:?} after the attack: at most the interval until the \
         next probe, then one interval for its verdict"
    );
    assert_eq!(
        (
            udp_listener(&doc)["takeovers"].as_u64(),
            tcp_listener(&doc)["takeovers"].as_u64()
        ),
        (Some(1), Some(0)),
        "{attack:?}: counted once, for the UDP group only: {doc}"
    );
    assert_eq!(
        takeovers(&doc).1,
        1,
        "{attack:?}: steering.takeovers: {doc}"
    );
    let evidence = match attack {
        Attack::ClassicPickingItself => "not counted by Steer's program within a health interval",
        Attack::EbpfDroppingEverything => "refused without Steer's program seeing it",
    };
    assert!(
        log.contains(evidence),
        "{attack:?}: the warning says what the evidence was ({evidence}): {log}"
    );
    let mut per_slot = [0u32; 4];
    for i in 0..200 {
        let answer = ask(
            &client(),
            udp,
            &format!("after/{i}"),
            Duration::from_secs(2),
        )
        .unwrap_or_else(|| {
            panic!(
                "{attack:?}: flow {i} after the repair unanswered (the rogue got {:?})",
                queued(&rogue)
            )
        });
        per_slot[answer.slot] += 1;
    }
    let after = queued(&rogue);
    println!(
        "{attack:?}: 200 new flows after the repair went {per_slot:?}, the rogue got {after:?}"
    );
    assert!(
        after.is_empty(),
        "{attack:?}: the rogue got {} of 200",
        after.len()
    );
    assert!(
        per_slot.iter().all(|&n| (40..=60).contains(&n)),
        "{attack:?}: round-robin decides again: {per_slot:?}"
    );
    assert_eq!(
        takeovers(&cluster.status()),
        (1, 1),
        "{attack:?}: no takeover since the repair"
    );
}

#[test]
fn a_rogue_classic_bpf_program_on_a_udp_group_is_noticed_counted_and_replaced() {
    takeover_of_the_udp_group_is_repaired(Attack::ClassicPickingItself, false);
}

#[test]
fn a_rogue_classic_bpf_program_on_a_wildcard_udp_group_is_counted_once_after_confirmation() {
    takeover_of_the_udp_group_is_repaired(Attack::ClassicPickingItself, true);
}

#[test]
fn a_rogue_ebpf_program_dropping_a_udp_groups_datagrams_is_noticed_counted_and_replaced() {
    takeover_of_the_udp_group_is_repaired(Attack::EbpfDroppingEverything, false);
}

#[test]
fn a_classic_program_a_rogue_left_on_the_udp_group_before_the_cluster_started_gets_nothing() {
    // The rogue binds first, so it is index 0 of the group's socket array, and its filter
    // picks it: until the first worker's socket enters the group and Steer's program
    // replaces the filter, every datagram would be the rogue's.
    let udp = free_local_addr();
    let rogue = rogue_udp_socket(udp);
    attach_classic_bpf_returning(&rogue, 0);
    let probe = client();
    assert!(
        ask(&probe, udp, "before", Duration::from_millis(300)).is_none(),
        "the filter gives the rogue everything before the cluster starts"
    );
    assert_eq!(queued(&rogue), vec!["before".to_owned()]);
    let cluster = start_on(udp, 2, "round-robin", &[]);
    let pids: BTreeSet<u32> = cluster.worker_pid_list().into_iter().collect();
    let mut per_pid: BTreeMap<u32, u32> = BTreeMap::new();
    for i in 0..200 {
        let answer = ask(&client(), udp, &format!("flow/{i}"), Duration::from_secs(2))
            .unwrap_or_else(|| panic!("flow {i} unanswered (the rogue got {:?})", queued(&rogue)));
        *per_pid.entry(answer.pid).or_default() += 1;
    }
    let got = queued(&rogue);
    println!(
        "a rogue's filter left on the group: 200 new flows went {per_pid:?}, the rogue got {}",
        got.len()
    );
    assert!(
        got.is_empty(),
        "the rogue got {} of 200: {got:?}",
        got.len()
    );
    assert_eq!(
        per_pid.keys().copied().collect::<BTreeSet<u32>>(),
        pids,
        "both workers serve"
    );
    assert_eq!(takeovers(&cluster.status()), (0, 0));
}

/// A UDP socket of an "old group" that answers what it gets as a leftover worker would,
/// as slot 99: `99 0 0 <payload>`. Returns how many it answered, once `stop` is set.
fn lingering_udp_server(addr: SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    let socket = rogue_udp_socket(addr);
    socket.set_nonblocking(false).expect("blocking");
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .expect("timeout");
    std::thread::spawn(move || {
        let mut served = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut buffer = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok((len, peer)) = socket.recv_from(&mut buffer) {
                let mut answer = b"99 0 0 ".to_vec();
                answer.extend_from_slice(&buffer[..len]);
                let _ = socket.send_to(&answer, peer);
                served += 1;
            }
        }
        served
    })
}

/// An eBPF cluster attaches its program to the UDP group an old socket is in, serves 8
/// flows, then dies (SIGKILL, every worker with it): the group keeps the dead cluster's
/// program (whose sockets are gone) and its pinned flow maps stay in bpffs. A new cluster
/// under `policy` on the address; the 8 flows go on and 100 new ones start. Returns each
/// flow's answers (old flows first), the old socket's count, and the new cluster.
fn after_a_dead_udp_cluster(policy: &str) -> (Vec<Option<Answer>>, u64, Cluster) {
    let udp = free_local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let old_socket = lingering_udp_server(udp, Arc::clone(&stop));
    let old_flows: Vec<UdpSocket> = (0..8).map(|_| client()).collect();
    {
        let old = start_on(udp, 2, "round-robin", &[]);
        for (i, socket) in old_flows.iter().enumerate() {
            let answer = ask(socket, udp, &format!("old/{i}"), Duration::from_secs(2))
                .unwrap_or_else(|| panic!("old flow {i} unanswered by the old cluster"));
            assert_ne!(
                answer.slot, 99,
                "the old cluster's program never picks the old socket"
            );
        }
        let pids = old.worker_pid_list();
        drop(old);
        steer_tests::wait_for(
            "the old cluster's workers are gone",
            Duration::from_secs(10),
            || pids.iter().all(|&pid| !steer_tests::pid_alive(pid)),
        );
    }
    let cluster = start_on(udp, 2, policy, &[]);
    let mut answers: Vec<Option<Answer>> = old_flows
        .iter()
        .enumerate()
        .map(|(i, s)| ask(s, udp, &format!("again/{i}"), Duration::from_secs(2)))
        .collect();
    answers
        .extend((0..100).map(|i| ask(&client(), udp, &format!("new/{i}"), Duration::from_secs(2))));
    stop.store(true, Ordering::Relaxed);
    let served = old_socket.join().expect("old group thread");
    (answers, served, cluster)
}

#[test]
fn a_kernel_cluster_where_a_dead_udp_cluster_left_its_program_answers_every_flow() {
    let (answers, served, cluster) = after_a_dead_udp_cluster("kernel");
    let unanswered = answers.iter().filter(|a| a.is_none()).count();
    let per_slot: BTreeMap<usize, usize> =
        answers.iter().flatten().fold(BTreeMap::new(), |mut m, a| {
            *m.entry(a.slot).or_default() += 1;
            m
        });
    println!(
        "kernel cluster beside an old UDP group's socket: per slot {per_slot:?} (99 = the old \
         socket, which answered {served}), {unanswered} unanswered"
    );
    assert_eq!(unanswered, 0, "every flow is answered: {answers:?}");
    assert_eq!(
        per_slot.keys().filter(|&&s| s != 99).count(),
        2,
        "the kernel hashes over both new workers: {per_slot:?}"
    );
    assert!(
        cluster.log().contains("steering takeover"),
        "the detach is logged: {}",
        cluster.log()
    );
}

#[test]
fn an_ebpf_cluster_where_a_dead_udp_cluster_left_its_program_and_pins_takes_every_flow() {
    let (answers, served, cluster) = after_a_dead_udp_cluster("round-robin");
    let pids: BTreeSet<u32> = cluster.worker_pid_list().into_iter().collect();
    let unanswered: Vec<usize> = (0..answers.len())
        .filter(|&i| answers[i].is_none())
        .collect();
    let per_pid: BTreeMap<u32, usize> =
        answers.iter().flatten().fold(BTreeMap::new(), |mut m, a| {
            *m.entry(a.pid).or_default() += 1;
            m
        });
    println!(
        "round-robin cluster after a dead one: 8 old flows and 100 new ones went {per_pid:?} \
         (0 = the old socket, which answered {served}); unanswered {unanswered:?}"
    );
    assert!(
        unanswered.is_empty(),
        "every flow is answered: {unanswered:?}"
    );
    assert_eq!(
        served, 0,
        "the old group's socket gets nothing under Steer's program"
    );
    assert_eq!(
        per_pid.keys().copied().collect::<BTreeSet<u32>>(),
        pids,
        "the new workers take every flow, old and new"
    );
}

/// A packet capture on `lo` (`AF_PACKET`, IPv4, incoming only): the UDP datagrams to and
/// from `port`, and the ICMP port-unreachable errors about datagrams to it. Needs root.
struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Wire>,
}

/// What the capture saw, by the source port of the datagrams sent to the listener.
#[derive(Debug, Default)]
struct Wire {
    /// Datagrams to the port, per source port.
    to_port: BTreeMap<u16, u64>,
    /// Datagrams from the port, per destination port (answers).
    from_port: BTreeMap<u16, u64>,
    /// ICMP port-unreachable errors about a datagram to the port, per its source port.
    refused: BTreeMap<u16, u64>,
    /// One payload seen from each source port not in `known` (the probe's).
    payloads: BTreeMap<u16, String>,
    /// Packets the kernel dropped because the capture did not read them in time.
    dropped: u32,
}

/// `ETH_P_IP`, in network order as `socket(2)` and `sockaddr_ll` want it.
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();

/// `sll_pkttype` of a packet this host sent (seen once more as it is received on `lo`).
const PACKET_OUTGOING: u8 = 4;

impl Capture {
    fn start(port: u16, known: BTreeSet<u16>) -> Capture {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM,
                libc::c_int::from(ETH_P_IP_BE),
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket (root): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a new fd nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a NUL-terminated name.
        let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        assert_ne!(lo, 0, "lo's index");
        // SAFETY: an all-zero sockaddr_ll is valid; the fields set below are what bind needs.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_IP_BE;
        addr.sll_ifindex = lo as i32;
        // SAFETY: a valid sockaddr_ll of its own size.
        let bound = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(bound, 0, "bind to lo: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        // SAFETY: a timeval option value that outlives the call.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "SO_RCVTIMEO");
        // Room for the whole test's packets, so that none is dropped while this thread is
        // not reading (checked: `Wire::dropped`).
        let room: libc::c_int = 64 << 20;
        // SAFETY: an int option value that outlives the call.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const room).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "SO_RCVBUFFORCE (root)");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || capture(&socket, port, &known, &stop))
        };
        Capture { stop, thread }
    }

    fn stop(self) -> Wire {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("capture thread")
    }
}

fn capture(socket: &OwnedFd, port: u16, known: &BTreeSet<u16>, stop: &AtomicBool) -> Wire {
    let mut wire = Wire::default();
    let mut packet = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // SAFETY: an all-zero sockaddr_ll is valid, for recvfrom to fill.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buffers of the sizes given, which outlive the call.
        let len = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                packet.as_mut_ptr().cast(),
                packet.len(),
                0,
                (&raw mut from).cast(),
                &raw mut from_len,
            )
        };
        if len <= 0 || from.sll_pkttype == PACKET_OUTGOING {
            continue;
        }
        let ip = &packet[..len as usize];
        let Some((protocol, l4)) = ipv4_payload(ip) else {
            continue;
        };
        let ports = |l4: &[u8]| -> Option<(u16, u16)> {
            Some((
                u16::from_be_bytes(l4.get(0..2)?.try_into().ok()?),
                u16::from_be_bytes(l4.get(2..4)?.try_into().ok()?),
            ))
        };
        match protocol {
            libc::IPPROTO_UDP => {
                let Some((source, destination)) = ports(l4) else {
                    continue;
                };
                if destination == port {
                    *wire.to_port.entry(source).or_default() += 1;
                    if !known.contains(&source) {
                        wire.payloads.entry(source).or_insert_with(|| {
                            String::from_utf8_lossy(l4.get(8..).unwrap_or_default()).into_owned()
                        });
                    }
                } else if source == port {
                    *wire.from_port.entry(destination).or_default() += 1;
                }
            }
            // Destination unreachable, port unreachable: the offending datagram's IP
            // header and 8 bytes follow the ICMP header.
            libc::IPPROTO_ICMP if l4.len() > 8 && l4[0] == 3 && l4[1] == 3 => {
                if let Some((libc::IPPROTO_UDP, inner)) = ipv4_payload(&l4[8..])
                    && let Some((source, destination)) = ports(inner)
                    && destination == port
                {
                    *wire.refused.entry(source).or_default() += 1;
                }
            }
            _ => {}
        }
    }
    // `struct tpacket_stats`: packets, drops.
    let mut stats = [0u32; 2];
    let mut stats_len = size_of::<[u32; 2]>() as libc::socklen_t;
    // SAFETY: a buffer of the size given, which outlives the call.
    let got = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            stats.as_mut_ptr().cast(),
            &raw mut stats_len,
        )
    };
    assert_eq!(got, 0, "PACKET_STATISTICS");
    wire.dropped = stats[1];
    wire
}

/// An IPv4 packet's protocol and payload.
fn ipv4_payload(ip: &[u8]) -> Option<(i32, &[u8])> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let header = usize::from(ip[0] & 0xf) * 4;
    Some((i32::from(ip[9]), ip.get(header..)?))
}

#[test]
fn the_udp_probe_never_reaches_a_worker_and_counts_no_takeover_in_a_healthy_cluster() {
    let interval = Duration::from_secs(1);
    let (cluster, udp) = start(2, "round-robin", &["--health-interval", "1s"]);
    let steered_before = udp_listener(&cluster.status())["steered"]
        .as_u64()
        .expect("steered");
    // 16 flows, each sending a numbered datagram every 20 ms for 5 health intervals.
    let flows: Vec<UdpSocket> = (0..16).map(|_| client()).collect();
    for socket in &flows {
        socket.set_nonblocking(true).expect("nonblocking");
    }
    let known: BTreeSet<u16> = flows
        .iter()
        .map(|s| s.local_addr().expect("port").port())
        .collect();
    let wire = Capture::start(udp.port(), known.clone());
    let mut sent = 0u64;
    let mut answered = 0u64;
    let mut buffer = [0u8; 512];
    let window = interval * 5 + Duration::from_millis(500);
    let started = Instant::now();
    let mut next = started;
    while started.elapsed() < window {
        if Instant::now() >= next {
            for (i, socket) in flows.iter().enumerate() {
                socket
                    .send_to(format!("{i}/{sent}").as_bytes(), udp)
                    .expect("send");
                sent += 1;
            }
            next += Duration::from_millis(20);
        }
        for socket in &flows {
            while socket.recv_from(&mut buffer).is_ok() {
                answered += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // The last answers (each is on its way within a moment on loopback).
    let until = Instant::now() + Duration::from_secs(1);
    while answered < sent && Instant::now() < until {
        for socket in &flows {
            while socket.recv_from(&mut buffer).is_ok() {
                answered += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let wire = wire.stop();
    let doc = cluster.status();
    let listener = udp_listener(&doc);
    let steered = listener["steered"].as_u64().expect("steered") - steered_before;
    let probes: BTreeMap<u16, u64> = wire
        .to_port
        .iter()
        .filter(|(p, _)| !known.contains(p))
        .map(|(&p, &n)| (p, n))
        .collect();
    let probe_count: u64 = probes.values().sum();
    let answers_to_probes: u64 = probes
        .keys()
        .map(|p| wire.from_port.get(p).copied().unwrap_or(0))
        .sum();
    let refused_probes: u64 = probes
        .keys()
        .map(|p| wire.refused.get(p).copied().unwrap_or(0))
        .sum();
    let client_datagrams: u64 = known
        .iter()
        .map(|p| wire.to_port.get(p).copied().unwrap_or(0))
        .sum();
    println!(
        "healthy UDP cluster, {} ms of flow load (health interval {} ms): {sent} datagrams \
         sent, {answered} answered, {steered} steered by the program, {client_datagrams} seen \
         on the wire; probes seen {probe_count} from {:?} ({:?}), refused by ICMP \
         {refused_probes}, answered by a worker {answers_to_probes}; takeovers {:?}",
        window.as_millis(),
        interval.as_millis(),
        probes.keys().collect::<Vec<_>>(),
        wire.payloads.values().collect::<BTreeSet<_>>(),
        takeovers(&doc),
    );
    assert_eq!(
        takeovers(&doc),
        (0, 0),
        "no takeover in a healthy cluster: {doc}"
    );
    assert!(
        probe_count >= 3,
        "the probe runs once per health interval ({probe_count} seen in {window:?})"
    );
    assert_eq!(answers_to_probes, 0, "no worker ever answered a probe");
    assert_eq!(
        refused_probes, probe_count,
        "every probe was dropped by Steer's program (ICMP port unreachable)"
    );
    assert_eq!(wire.dropped, 0, "the capture saw every packet");
    assert_eq!(client_datagrams, sent, "the capture saw every datagram");
    assert_eq!(answered, sent, "every datagram answered, once");
    assert_eq!(
        steered, sent,
        "the program steered the clients' datagrams and nothing else"
    );
    assert_eq!(listener["drops"], 0, "{listener}");
}

#[test]
fn a_wildcard_udp_cluster_beside_another_group_on_loopback_counts_no_takeover() {
    // A same-user socket on 127.0.0.1:P forms a group of its own beside the cluster's
    // 0.0.0.0:P, and the kernel prefers it for every datagram to 127.0.0.1: the probe must
    // go where the cluster's group is reached, not count that group as a takeover.
    let interval = Duration::from_secs(1);
    let port = steer_tests::free_port();
    let wildcard = SocketAddr::from(([0, 0, 0, 0], port));
    let cluster = start_on(wildcard, 2, "round-robin", &["--health-interval", "1s"]);
    let other_group = rogue_udp_socket(SocketAddr::from(([127, 0, 0, 1], port)));
    let beside = Instant::now();
    let reached = SocketAddr::from(([127, 0, 0, 2], port));
    let mut served = 0;
    // Four health intervals, with the cluster served through another loopback address.
    while beside.elapsed() < interval * 4 {
        let answer = ask(&client(), reached, "hello", Duration::from_secs(2))
            .expect("the cluster answers on 127.0.0.2");
        assert_ne!(answer.slot, 99);
        served += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let doc = cluster.status();
    let taken = queued(&other_group);
    println!(
        "wildcard UDP cluster beside a group on 127.0.0.1:{port}: {served} datagrams answered \
         through 127.0.0.2, the other group got {taken:?}; takeovers {:?}",
        takeovers(&doc)
    );
    assert_eq!(
        takeovers(&doc),
        (0, 0),
        "another group on a more specific address is no takeover: {}",
        cluster.log()
    );
    assert!(
        taken.len() <= 1,
        "one probe at most went to the other group before the probe moved: {taken:?}"
    );
    assert!(
        cluster.log().contains("was taken by another group"),
        "the move is said: {}",
        cluster.log()
    );
}
