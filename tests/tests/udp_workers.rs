//! External workers on the Node and Python helpers, each with a TCP and a UDP listener:
//! both are served, and a rolling restart loses no datagram that was queued on a
//! worker's UDP socket when it was told to drain.
//!
//! The fixtures answer each datagram as the demo does (`<slot> <pid> <generation> ` and
//! the payload), after `UDP_SLOW_MS` of work each, so that a burst waits in the sockets'
//! queues while the roll reaches them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use steer_tests::{Cluster, Signal, free_local_addr, must_get, status};

/// Work per datagram in the fixtures: the 100 datagrams queued on each worker take 3 s
/// to answer, longer than a helper's replacement takes to start on a loaded machine. The
/// helpers answer pings between batches (libuv's 32 datagrams; Python's 50 ms), well
/// within the health timeout.
const SLOW_MS: &str = "30";
/// Flows in the burst, and datagrams per flow.
const FLOWS: usize = 20;
const PER_FLOW: usize = 10;

#[derive(Debug, Clone)]
struct Answer {
    slot: usize,
    pid: u32,
    generation: u64,
    echoed: String,
}

/// `<slot> <pid> <generation> <payload>`.
fn parse(bytes: &[u8]) -> Answer {
    let text = std::str::from_utf8(bytes).expect("ASCII answer");
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

/// A fresh client socket on 127.0.0.1 (a new source port: a new flow).
fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").expect("client socket")
}

/// One datagram from a new flow, and its answer within `timeout`.
fn ask(to: SocketAddr, payload: &str, timeout: Duration) -> Option<Answer> {
    let socket = client();
    socket.set_read_timeout(Some(timeout)).expect("timeout");
    socket.send_to(payload.as_bytes(), to).expect("send");
    let mut buffer = [0u8; 2048];
    let (len, _) = socket.recv_from(&mut buffer).ok()?;
    Some(parse(&buffer[..len]))
}

/// Asks from new flows until every slot of `slots` has answered with a generation of at
/// least `generation` (a helper's worker may still be starting when Steer counts it
/// ready); bounded to 30 s.
fn every_slot_answers_udp(udp: SocketAddr, slots: usize, generation: u64) -> Vec<Answer> {
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0.. {
        if seen.len() == slots {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only slots {:?} answered UDP in 30 s",
            seen.keys()
        );
        let payload = format!("hello {i}");
        if let Some(answer) = ask(udp, &payload, Duration::from_millis(500)) {
            assert_eq!(answer.echoed, payload, "{answer:?}");
            if answer.generation >= generation {
                seen.insert(answer.slot, answer);
            }
        }
    }
    seen.into_values().collect()
}

/// Every answer to a burst, with when it arrived: one reader thread per flow.
struct Burst {
    stop: Arc<AtomicBool>,
    readers: Vec<std::thread::JoinHandle<Vec<(Instant, Answer)>>>,
}

impl Burst {
    /// Sends `PER_FLOW` numbered datagrams from each of `FLOWS` new flows, as fast as it
    /// can, and starts reading the answers.
    fn send(to: SocketAddr) -> Burst {
        let stop = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for flow in 0..FLOWS {
            let socket = client();
            for n in 0..PER_FLOW {
                socket
                    .send_to(format!("f{flow} n{n}").as_bytes(), to)
                    .expect("send");
            }
            let stop = Arc::clone(&stop);
            readers.push(std::thread::spawn(move || {
                socket
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                let mut answers = Vec::new();
                let mut buffer = [0u8; 2048];
                let end = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    if let Ok(len) = socket.recv(&mut buffer) {
                        answers.push((Instant::now(), parse(&buffer[..len])));
                    }
                }
                // What arrived since the last read (loopback delivers within `sendto`).
                socket.set_nonblocking(true).expect("nonblocking");
                while let Ok(len) = socket.recv(&mut buffer) {
                    answers.push((Instant::now(), parse(&buffer[..len])));
                }
                answers
            }));
        }
        Burst { stop, readers }
    }

    fn collect(self) -> Vec<(Instant, Answer)> {
        self.stop.store(true, Ordering::Relaxed);
        self.readers
            .into_iter()
            .flat_map(|reader| reader.join().expect("reader"))
            .collect()
    }
}

/// A TCP and a UDP listener on 2 workers of `program`: both served; a burst queued on
/// the workers' UDP sockets, then a rolling restart: every datagram answered once, some
/// of them by an old worker after it was told to drain; then new flows reach the new
/// generation, and TCP is still served.
fn serves_both_and_a_roll_loses_no_queued_datagram(program: &[&str]) {
    let udp = free_local_addr();
    let udp_arg = format!("dns=udp://{udp}");
    // Unnamed: the harness reads the first `--listen` as an address.
    let tcp = free_local_addr();
    let tcp_arg = tcp.to_string();
    let mut args = vec![
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--shutdown-timeout",
        "20s",
        "--listen",
        &tcp_arg,
        "--listen",
        &udp_arg,
        "--",
    ];
    args.extend(program);
    let cluster = Cluster::start_with(&args, |cmd| {
        cmd.env("UDP_SLOW_MS", SLOW_MS);
    });
    let first = every_slot_answers_udp(udp, 2, 1);
    let pids: BTreeMap<usize, u32> = cluster.worker_pids().into_iter().collect();
    for answer in &first {
        assert_eq!(pids.get(&answer.slot), Some(&answer.pid), "{answer:?}");
    }
    let page = must_get(tcp, "/");
    assert!(page.body.starts_with("hello from worker "), "{}", page.body);
    let named = format!("listeners tcp-{}:tcp:", tcp.port());
    let log = cluster.wait_for_log(&named, Duration::from_secs(10));
    assert!(
        log.contains("dns:udp:"),
        "the helper names both listeners:\n{log}"
    );

    let burst = Burst::send(udp);
    let signalled = Instant::now();
    cluster.signal(Signal::SIGUSR2);
    // When each slot's old worker is first seen draining (a moment after it was told).
    let mut draining_seen: BTreeMap<usize, Instant> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let doc = cluster.status();
        let workers = status::workers(&doc);
        for w in &workers {
            if w.raw["draining"].as_u64().unwrap_or(0) > 0 {
                draining_seen.entry(w.slot).or_insert_with(Instant::now);
            }
        }
        let rolled = status::all_ready(&doc)
            && workers
                .iter()
                .all(|w| w.generation == 2 && w.raw["draining"].as_u64().unwrap_or(0) == 0);
        if rolled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the roll did not end in 30 s: {doc}\n{}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The old workers have exited: on loopback, whatever they answered is in the
    // clients' sockets already.
    let answers = burst.collect();

    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for (_, answer) in &answers {
        *answered.entry(answer.echoed.clone()).or_default() += 1;
    }
    let expected: BTreeSet<String> = (0..FLOWS)
        .flat_map(|f| (0..PER_FLOW).map(move |n| format!("f{f} n{n}")))
        .collect();
    let missing: Vec<&String> = expected
        .iter()
        .filter(|p| !answered.contains_key(*p))
        .collect();
    let twice: Vec<(&String, &usize)> = answered.iter().filter(|&(_, &n)| n > 1).collect();
    let after_drain: usize = answers
        .iter()
        .filter(|(at, a)| {
            a.generation == 1 && draining_seen.get(&a.slot).is_some_and(|seen| at > seen)
        })
        .count();
    let after_signal = answers
        .iter()
        .filter(|(at, a)| a.generation == 1 && *at > signalled)
        .count();
    println!(
        "{program:?}: {} of {} datagrams answered, {} missing, {} twice; answered by \
         generation 1 after SIGUSR2: {after_signal}, after its drain was seen: {after_drain}",
        answered.len(),
        expected.len(),
        missing.len(),
        twice.len(),
    );
    assert!(
        missing.is_empty(),
        "datagrams lost at the roll: {missing:?}\n{}",
        cluster.log()
    );
    assert!(twice.is_empty(), "answered twice: {twice:?}");
    assert!(
        after_drain > 0,
        "no datagram was still queued when an old worker was told to drain: the test \
         shows nothing (answers {answers:?})"
    );

    let second = every_slot_answers_udp(udp, 2, 2);
    let pids: BTreeMap<usize, u32> = cluster.worker_pids().into_iter().collect();
    for answer in &second {
        assert_eq!(pids.get(&answer.slot), Some(&answer.pid), "{answer:?}");
    }
    assert_eq!(must_get(tcp, "/").status, 200);
    cluster.stop_cleanly(Duration::from_secs(30));
}

#[test]
fn a_node_worker_on_the_helper_serves_tcp_and_udp_and_a_roll_loses_no_queued_datagram() {
    let script = format!(
        "{}/fixtures/node_udp_worker.mjs",
        env!("CARGO_MANIFEST_DIR")
    );
    serves_both_and_a_roll_loses_no_queued_datagram(&["node", &script]);
}

#[test]
fn a_python_worker_on_the_helper_serves_tcp_and_udp_and_a_roll_loses_no_queued_datagram() {
    let script = format!(
        "{}/fixtures/python_udp_worker.py",
        env!("CARGO_MANIFEST_DIR")
    );
    serves_both_and_a_roll_loses_no_queued_datagram(&["python3", &script]);
}
