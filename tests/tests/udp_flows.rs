//! UDP flows stay with the process that took them: through rolling restarts, a worker
//! killed, a resize and a policy change, every numbered datagram of every flow is answered,
//! and a flow moves only forward (to its slot's newer generation, once the old one lets
//! go) or, when its process died, to a live one.
//!
//! Each flow is one client socket (one source port) sending a numbered datagram every
//! 20 ms; the demo answers each with `<slot> <pid> <generation> <payload>`. Every test
//! loads Steer's program, so it needs root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use steer_tests::{Cluster, Signal, free_local_addr, net_counter, status};

/// `node` or `python3` with a fixture of `tests/fixtures`.
fn fixture(interpreter: &'static str, file: &str) -> (&'static str, String) {
    (
        interpreter,
        format!("{}/fixtures/{file}", env!("CARGO_MANIFEST_DIR")),
    )
}

/// How often each flow sends.
const PERIOD: Duration = Duration::from_millis(20);

/// No flow runs longer than this, whatever the test does.
const FLOW_LIMIT: Duration = Duration::from_secs(60);

/// One answer: which process answered datagram `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answered {
    seq: u64,
    slot: usize,
    pid: u32,
    generation: u64,
}

/// Parses the demo's answer `<slot> <pid> <generation> <flow>/<seq>`.
fn parse(text: &str) -> Answered {
    let parts: Vec<&str> = text.splitn(4, ' ').collect();
    assert_eq!(parts.len(), 4, "answer {text:?}");
    let seq = parts[3]
        .rsplit('/')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("payload of {text:?}"));
    Answered {
        seq,
        slot: parts[0].parse().expect("slot"),
        pid: parts[1].parse().expect("pid"),
        generation: parts[2].parse().expect("generation"),
    }
}

/// What one flow sent and what came back.
#[derive(Debug, Default)]
struct FlowRecord {
    sent: u64,
    answers: Vec<Answered>,
    /// What the host's UDP counters say happened while the flows ran, to tell a loss in
    /// the kernel's queues from one in steering.
    host: String,
}

impl FlowRecord {
    /// The sequence numbers sent that got no answer.
    fn lost(&self) -> Vec<u64> {
        let got: BTreeSet<u64> = self.answers.iter().map(|a| a.seq).collect();
        (0..self.sent).filter(|s| !got.contains(s)).collect()
    }

    /// Asserts that every datagram `flow` sent was answered; if not, shows who answered
    /// around each lost one.
    fn assert_complete(&self, flow: usize) {
        assert_eq!(
            self.lost(),
            Vec::<u64>::new(),
            "flow {flow} lost datagrams; answers around them: {:?}; host while the flows ran: {}",
            self.around_losses(),
            self.host
        );
    }

    /// The answers to the datagrams just before and after each lost one: who was there.
    fn around_losses(&self) -> Vec<(u64, Vec<Answered>)> {
        self.lost()
            .into_iter()
            .map(|seq| {
                let near = self
                    .answers
                    .iter()
                    .filter(|a| a.seq + 2 >= seq && a.seq <= seq + 2)
                    .copied()
                    .collect();
                (seq, near)
            })
            .collect()
    }

    /// The processes that answered, in order of the datagrams, each once per run of it.
    fn processes(&self) -> Vec<(usize, u32, u64)> {
        let mut by_seq = self.answers.clone();
        by_seq.sort_by_key(|a| a.seq);
        let mut runs: Vec<(usize, u32, u64)> = Vec::new();
        for a in by_seq {
            if runs.last() != Some(&(a.slot, a.pid, a.generation)) {
                runs.push((a.slot, a.pid, a.generation));
            }
        }
        runs
    }
}

/// Flows sending a numbered datagram every [`PERIOD`] until stopped, each on a thread.
struct Flows {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<FlowRecord>>,
    udp_before: Vec<u64>,
}

/// The host's UDP counters that say where a datagram was lost.
const UDP_LOSSES: [&str; 4] = ["InErrors", "RcvbufErrors", "NoPorts", "SndbufErrors"];

fn udp_losses() -> Vec<u64> {
    UDP_LOSSES
        .iter()
        .map(|name| net_counter("Udp", name))
        .collect()
}

impl Flows {
    fn start(to: SocketAddr, count: usize) -> Flows {
        let stop = Arc::new(AtomicBool::new(false));
        let udp_before = udp_losses();
        let threads = (0..count)
            .map(|flow| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || run_flow(to, flow, &stop))
            })
            .collect();
        Flows {
            stop,
            threads,
            udp_before,
        }
    }

    fn stop(mut self) -> Vec<FlowRecord> {
        self.stop.store(true, Ordering::Relaxed);
        let mut records: Vec<FlowRecord> = std::mem::take(&mut self.threads)
            .into_iter()
            .map(|t| t.join().expect("a flow thread panicked"))
            .collect();
        // Host-wide, so other tests' datagrams count too: a hint, not a measure.
        let host = UDP_LOSSES
            .iter()
            .zip(udp_losses().iter().zip(&self.udp_before))
            .map(|(name, (now, before))| format!("Udp {name} +{}", now - before))
            .collect::<Vec<_>>()
            .join(", ");
        for record in &mut records {
            record.host.clone_from(&host);
        }
        records
    }
}

impl Drop for Flows {
    /// A test that fails midway stops its flows too (the next test must not share the CPUs
    /// with them).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn run_flow(to: SocketAddr, flow: usize, stop: &AtomicBool) -> FlowRecord {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("client socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(2)))
        .expect("timeout");
    let mut record = FlowRecord::default();
    let started = Instant::now();
    let mut next = started;
    let mut buffer = [0u8; 512];
    let mut receive = |record: &mut FlowRecord| {
        while let Ok((len, _)) = socket.recv_from(&mut buffer) {
            record
                .answers
                .push(parse(std::str::from_utf8(&buffer[..len]).expect("ASCII")));
        }
    };
    while !stop.load(Ordering::Relaxed) && started.elapsed() < FLOW_LIMIT {
        if Instant::now() >= next {
            let payload = format!("{flow}/{}", record.sent);
            socket.send_to(payload.as_bytes(), to).expect("send");
            record.sent += 1;
            next += PERIOD;
        }
        receive(&mut record);
    }
    // The last answers: a draining worker answers what it read before it exits.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until && (record.answers.len() as u64) < record.sent {
        receive(&mut record);
    }
    record
}

/// Asks once from a fresh socket (a new flow); the answer.
fn new_flow(to: SocketAddr) -> Answered {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("client socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    socket.send_to(b"new/0", to).expect("send");
    let mut buffer = [0u8; 512];
    let (len, _) = socket
        .recv_from(&mut buffer)
        .expect("a new flow is answered");
    parse(std::str::from_utf8(&buffer[..len]).expect("ASCII"))
}

fn start(workers: usize, extra: &[&str]) -> (Cluster, SocketAddr) {
    start_program(workers, extra, &[])
}

/// A cluster of `workers` with a TCP and a UDP listener, running `program` (after `--`)
/// if not empty; the UDP listener's address.
fn start_program(workers: usize, extra: &[&str], program: &[&str]) -> (Cluster, SocketAddr) {
    let tcp = free_local_addr();
    let udp = free_local_addr();
    let workers = workers.to_string();
    let tcp_arg = tcp.to_string();
    let udp_arg = format!("flows=udp://{udp}");
    let mut args = vec![
        "--workers",
        workers.as_str(),
        "--listen",
        tcp_arg.as_str(),
        "--listen",
        udp_arg.as_str(),
    ];
    args.extend_from_slice(extra);
    if !program.is_empty() {
        args.push("--");
        args.extend_from_slice(program);
    }
    (Cluster::start(&args), udp)
}

/// The serving generation of each slot.
fn generations(cluster: &Cluster) -> BTreeMap<usize, u64> {
    status::workers(&cluster.status())
        .iter()
        .map(|w| (w.slot, w.generation))
        .collect()
}

#[test]
fn udp_flows_stay_with_their_process_through_two_rolling_restarts() {
    flows_stay_through_two_rolling_restarts(&[]);
}

#[test]
fn udp_flows_of_a_node_worker_stay_with_their_process_through_two_rolling_restarts() {
    let (node, script) = fixture("node", "node_udp_worker.mjs");
    flows_stay_through_two_rolling_restarts(&[node, &script]);
}

#[test]
fn udp_flows_of_a_python_worker_stay_with_their_process_through_two_rolling_restarts() {
    let (python, script) = fixture("python3", "python_udp_worker.py");
    flows_stay_through_two_rolling_restarts(&[python, &script]);
}

/// 4 workers (the demo, or `program`), 32 flows, two rolling restarts: no datagram lost,
/// no flow changes slot, each moves only forward, and new flows reach the new generation.
fn flows_stay_through_two_rolling_restarts(program: &[&str]) {
    let (cluster, udp) = start_program(
        4,
        &["--balance", "round-robin", "--shutdown-timeout", "3s"],
        program,
    );
    let flows = Flows::start(udp, 32);
    std::thread::sleep(Duration::from_secs(2));
    let mut after_rolls = Vec::new();
    for _ in 0..2 {
        cluster.rolling_restart(Duration::from_secs(20));
        let serving = generations(&cluster);
        // Flows opened after the roll go to the new generation at once.
        for _ in 0..8 {
            let a = new_flow(udp);
            after_rolls.push((a, serving[&a.slot]));
        }
        std::thread::sleep(Duration::from_millis(3500));
    }
    let records = flows.stop();
    let mut moved_forward = 0;
    for (flow, record) in records.iter().enumerate() {
        assert!(record.sent >= 300, "flow {flow} sent only {}", record.sent);
        record.assert_complete(flow);
        let runs = record.processes();
        let slots: BTreeSet<usize> = runs.iter().map(|r| r.0).collect();
        assert_eq!(slots.len(), 1, "flow {flow} changed slot: {runs:?}");
        assert!(
            runs.windows(2).all(|w| w[0].2 < w[1].2),
            "flow {flow} moved only forward, one generation run after another: {runs:?}"
        );
        moved_forward += runs.len() - 1;
    }
    println!(
        "{program:?}: 32 flows, {} datagrams, 0 lost; {moved_forward} forward moves; new flows after the \
         rolls: {after_rolls:?}",
        records.iter().map(|r| r.sent).sum::<u64>()
    );
    assert!(
        moved_forward >= 32,
        "the old generations let their flows go once the hold was over: {moved_forward}"
    );
    for (a, serving) in after_rolls {
        assert_eq!(
            a.generation, serving,
            "a new flow reached its slot's new generation"
        );
    }
}

#[test]
fn a_killed_udp_workers_flows_go_to_a_live_process_and_no_other_flow_moves() {
    let (cluster, udp) = start(4, &["--balance", "round-robin"]);
    let flows = Flows::start(udp, 16);
    std::thread::sleep(Duration::from_secs(1));
    let victim = status::worker(&cluster.status(), 1)
        .pid
        .expect("slot 1 runs");
    let killed_at = Instant::now();
    cluster.kill_worker(1);
    std::thread::sleep(Duration::from_secs(2));
    let records = flows.stop();
    let since_start = killed_at.elapsed();
    let mut victims = 0;
    for (flow, record) in records.iter().enumerate() {
        let runs = record.processes();
        if runs.first().map(|r| r.1) != Some(victim) {
            assert_eq!(
                runs.len(),
                1,
                "flow {flow} moved, yet its process lived: {runs:?}"
            );
            record.assert_complete(flow);
            continue;
        }
        victims += 1;
        assert!(runs.len() >= 2, "flow {flow} was answered again: {runs:?}");
        assert!(runs[1..].iter().all(|r| r.1 != victim));
        // Datagrams queued on the killed socket die with it; the flow's gap is how long
        // it went unanswered: at most one second.
        let lost = record.lost();
        let gap = PERIOD * lost.len() as u32;
        assert!(
            gap <= Duration::from_secs(1),
            "flow {flow} unanswered for {gap:?} ({} datagrams) of {since_start:?}",
            lost.len()
        );
    }
    assert!(victims > 0, "some flows were on the killed worker");
}

#[test]
fn a_resize_and_a_policy_change_move_no_active_flow_and_lose_nothing() {
    let config = steer_tests::TempFile::new("toml", "balance = \"round-robin\"\n");
    let config_path = config.path().to_str().expect("a UTF-8 path").to_owned();
    let (cluster, udp) = start(2, &["--config", &config_path, "--shutdown-timeout", "30s"]);
    let flows = Flows::start(udp, 24);
    std::thread::sleep(Duration::from_secs(1));
    for workers in [3, 4] {
        cluster.signal(Signal::SIGTTIN);
        cluster.wait_until("one more worker ready", Duration::from_secs(20), |s| {
            status::workers(s).len() == workers && status::all_ready(s)
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    cluster.signal(Signal::SIGTTOU);
    cluster.wait_until("3 workers serving", Duration::from_secs(20), |s| {
        status::workers(s)
            .iter()
            .filter(|w| w.state == status::SlotState::Ready)
            .count()
            == 3
    });
    std::thread::sleep(Duration::from_secs(1));
    std::fs::write(config.path(), "balance = \"hash\"\n").expect("rewrite the config");
    cluster.signal(Signal::SIGHUP);
    cluster.wait_until("hash", Duration::from_secs(10), |s| {
        status::balance(s) == Some("hash")
    });
    // New flows under hash: every flow of one client address on one slot.
    let hashed: BTreeSet<usize> = (0..10).map(|_| new_flow(udp).slot).collect();
    std::thread::sleep(Duration::from_secs(1));
    let records = flows.stop();
    for (flow, record) in records.iter().enumerate() {
        record.assert_complete(flow);
        let runs = record.processes();
        assert_eq!(
            runs.len(),
            1,
            "flow {flow} changed process through 2 -> 4 -> 3 and a switch to hash: {runs:?}"
        );
    }
    println!(
        "resize 2 -> 4 -> 3 and round-robin -> hash: {} datagrams of 24 flows, 0 lost, none \
         moved; new flows from one address under hash: slots {hashed:?}",
        records.iter().map(|r| r.sent).sum::<u64>()
    );
    assert_eq!(
        hashed.len(),
        1,
        "new flows of one client IP share a slot under hash"
    );
}

#[test]
fn a_spoofed_source_flood_moves_no_real_flow_and_loses_nothing() {
    // A table of 4,096 flows and 30,000 spoofed sources, 15 new ones per millisecond:
    // the table is full for most of the flood and evicts the least recently used flows.
    // A real flow sends every 20 ms, so 300 new flows arrive between two of its
    // datagrams, far fewer than the table holds: it is never the least recently used.
    let (cluster, udp) = start(4, &["--balance", "round-robin", "--udp-flow-table", "4096"]);
    let SocketAddr::V4(target) = udp else {
        panic!("the UDP listener is IPv4");
    };
    let flows = Flows::start(udp, 16);
    std::thread::sleep(Duration::from_millis(500));
    let mut spoofed = steer_tests::SpoofedDatagrams::open().expect("a raw socket (root)");
    let flood_started = Instant::now();
    for _ in 0..200 {
        spoofed.send(target, 150).expect("send spoofed datagrams");
        std::thread::sleep(Duration::from_millis(10));
    }
    let flood = flood_started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let records = flows.stop();
    let doc = cluster.status();
    for (flow, record) in records.iter().enumerate() {
        record.assert_complete(flow);
        let runs = record.processes();
        assert_eq!(
            runs.len(),
            1,
            "flow {flow} changed process in the flood: {runs:?}"
        );
    }
    let listener = doc["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == "flows"))
        .cloned()
        .unwrap_or_default();
    println!(
        "{} spoofed sources in {flood:?} with a 4,096-flow table: 16 real flows, {} \
         datagrams, 0 lost, none moved; listener {listener}",
        spoofed.sent(),
        records.iter().map(|r| r.sent).sum::<u64>()
    );
}

#[test]
fn a_primary_upgrade_moves_no_active_flow_and_loses_nothing() {
    let (cluster, udp) = start(
        4,
        &["--balance", "round-robin", "--shutdown-timeout", "30s"],
    );
    let old = cluster.pid();
    let flows = Flows::start(udp, 32);
    std::thread::sleep(Duration::from_secs(1));
    cluster.signal(Signal::SIGUSR1);
    // Not `Cluster::wait_until`: the primary the harness started hands over and drains.
    let deadline = Instant::now() + Duration::from_secs(30);
    let doc = loop {
        if let Ok(doc) = cluster.try_status()
            && status::primary_pid(&doc).is_some_and(|p| p != old)
            && status::all_ready(&doc)
        {
            break doc;
        }
        assert!(Instant::now() < deadline, "no successor took over");
        std::thread::sleep(Duration::from_millis(20));
    };
    let serving: BTreeMap<usize, u64> = status::workers(&doc)
        .iter()
        .map(|w| (w.slot, w.generation))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let fresh: Vec<Answered> = (0..8).map(|_| new_flow(udp)).collect();
    let records = flows.stop();
    for (flow, record) in records.iter().enumerate() {
        record.assert_complete(flow);
        let runs = record.processes();
        assert_eq!(
            runs.len(),
            1,
            "flow {flow} changed process in the upgrade: {runs:?}"
        );
        assert_eq!(
            runs[0].2, 1,
            "flow {flow} stayed on the old primary's worker"
        );
    }
    for a in &fresh {
        assert_eq!(
            a.generation, serving[&a.slot],
            "a new flow goes to the new primary's worker: {a:?}"
        );
    }
    println!(
        "upgrade under 32 flows: {} datagrams, 0 lost, none moved; the new primary's \
         workers {serving:?} took the new flows {fresh:?}",
        records.iter().map(|r| r.sent).sum::<u64>()
    );
}

/// Datagrams sent to a paused worker in [`datagrams_through_a_pause`].
const SENT_IN_PAUSE: u64 = 1500;

/// A one-worker cluster (the demo, or `program`) with `extra` options; the worker is
/// stopped (SIGSTOP: a GC pause, a blocking call) while [`SENT_IN_PAUSE`] datagrams of one
/// flow are sent to it, then continued. Returns how many of them were answered.
fn datagrams_through_a_pause(program: &[&str], extra: &[&str]) -> u64 {
    let mut options = vec!["--balance", "round-robin"];
    options.extend_from_slice(extra);
    let (cluster, udp) = start_program(1, &options, program);
    let pid = status::worker(&cluster.status(), 0)
        .pid
        .expect("slot 0 runs");
    let client = UdpSocket::bind("127.0.0.1:0").expect("client socket");
    // The answers come in one burst once the worker reads again: room for all of them.
    socket2::SockRef::from(&client)
        .set_recv_buffer_size(4 << 20)
        .expect("SO_RCVBUF");
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut buffer = [0u8; 512];
    client.send_to(b"pause/first", udp).expect("send");
    client.recv_from(&mut buffer).expect("the worker reads");
    let worker = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(worker, Signal::SIGSTOP).expect("stop the worker");
    for seq in 0..SENT_IN_PAUSE {
        client
            .send_to(format!("pause/{seq}").as_bytes(), udp)
            .expect("send");
    }
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(worker, Signal::SIGCONT).expect("continue the worker");
    let mut answered = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while (answered.len() as u64) < SENT_IN_PAUSE && Instant::now() < deadline {
        let Ok((len, _)) = client.recv_from(&mut buffer) else {
            break;
        };
        answered.insert(parse(std::str::from_utf8(&buffer[..len]).expect("ASCII")).seq);
    }
    answered.len() as u64
}

/// [`datagrams_through_a_pause`] with the default queue: every datagram answered.
fn a_pause_loses_nothing(who: &str, program: &[&str]) {
    let answered = datagrams_through_a_pause(program, &[]);
    println!("{who}: {answered} of {SENT_IN_PAUSE} datagrams sent during a pause answered");
    assert_eq!(
        answered, SENT_IN_PAUSE,
        "{who}: every datagram waited in the queue"
    );
}

#[test]
fn a_paused_demo_worker_answers_every_datagram_sent_while_it_was_stopped() {
    a_pause_loses_nothing("demo", &[]);
}

#[test]
fn a_paused_node_worker_answers_every_datagram_sent_while_it_was_stopped() {
    let (node, script) = fixture("node", "node_udp_worker.mjs");
    a_pause_loses_nothing("node", &[node, &script]);
}

#[test]
fn a_paused_python_worker_answers_every_datagram_sent_while_it_was_stopped() {
    let (python, script) = fixture("python3", "python_udp_worker.py");
    a_pause_loses_nothing("python", &[python, &script]);
}

/// The control: with the smallest queue allowed, the same pause loses datagrams, so the
/// tests above hold because of `udp-receive-buffer`, for external workers as well.
#[test]
fn with_a_small_udp_receive_buffer_a_pause_loses_datagrams() {
    let (node, script) = fixture("node", "node_udp_worker.mjs");
    let answered = datagrams_through_a_pause(&[node, &script], &["--udp-receive-buffer", "64KiB"]);
    let demo = datagrams_through_a_pause(&[], &["--udp-receive-buffer", "64KiB"]);
    println!(
        "udp-receive-buffer 64KiB: node {answered}, demo {demo} of {SENT_IN_PAUSE} datagrams \
         sent during a pause answered"
    );
    assert!(
        answered < SENT_IN_PAUSE / 2 && demo < SENT_IN_PAUSE / 2,
        "a 128 KiB queue holds a few hundred datagrams: node {answered}, demo {demo}"
    );
}
