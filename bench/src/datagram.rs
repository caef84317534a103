//! The UDP load generator (there is no wrk for UDP): many client sockets ("flows"), each
//! sending numbered datagrams to one loopback server and counting the answers.
//!
//! The server is Steer's demo worker, which answers each datagram with
//! `<slot> <pid> <generation> <payload>`; the payload is 16 bytes: the datagram's sequence
//! number in its flow and when it was sent (nanoseconds since the run began), so an answer
//! says who answered which datagram and how long it took.
//!
//! Two paces:
//!
//! - [`Pace::Window`]: closed loop, each flow keeps this many datagrams in flight and sends
//!   the next as each is answered (a datagram unanswered after [`UdpSpec::timeout`] gives
//!   its place up). Measures the datagrams per second a server answers.
//! - [`Pace::Rate`]: open loop, the flows together send this many datagrams a second,
//!   spread evenly over them, whatever comes back.
//!
//! Each flow is one connected client socket (its own source port; with
//! [`UdpSpec::sources`], its own loopback address too, so `hash` sees many clients). A
//! thread drives its flows with one `mio` poll, and reads and sends with `recvmmsg` and
//! `sendmmsg`: every answer queued on a socket in one call, and the datagrams that replace
//! them in one more, so that on a small machine the client, which shares the CPUs with the
//! server, spends less of them on system calls than the server does.
//!
//! Bounded: a run stops at its duration or after a count of datagrams sent, and never later
//! than [`MAX_DURATION`]; then it waits at most [`UdpSpec::linger`] for the last answers.
//! Loopback targets only.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::load::{Latency, per_second};

/// No run lasts longer than this, whatever it was asked.
pub const MAX_DURATION: Duration = Duration::from_secs(600);

/// No run opens more flows than this.
pub const MAX_FLOWS: usize = 4096;

/// Datagrams read or sent per system call at most.
const BATCH: usize = 32;

/// The payload: sequence number and send time, 8 bytes each (little-endian).
const PAYLOAD: usize = 16;

/// Room for an answer: the demo's prefix (three numbers and spaces) and the payload.
const ANSWER_ROOM: usize = 128;

/// Longest poll wait (an open-loop thread waits less: until its next datagram is due).
const TICK: Duration = Duration::from_millis(2);

/// How the flows send.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pace {
    /// Closed loop: datagrams in flight per flow.
    Window(usize),
    /// Open loop: datagrams per second, all flows together.
    Rate(f64),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct UdpSpec {
    /// The server (a loopback address).
    pub target: SocketAddr,
    /// Client sockets.
    pub flows: usize,
    /// Client threads, each driving its share of the flows.
    pub threads: usize,
    /// How the flows send.
    pub pace: Pace,
    /// Sending stops after this long ...
    pub length: Duration,
    /// ... or once this many datagrams were sent, whichever comes first.
    pub limit: Option<u64>,
    /// Closed loop: a datagram unanswered this long gives its place in the window up (it
    /// still counts as answered if its answer comes later).
    pub timeout: Duration,
    /// After sending stops, how long to wait for the last answers.
    pub linger: Duration,
    /// Loopback source addresses to spread the flows over (127.0.0.1 up to 127.0.0.N).
    pub sources: u8,
    /// Keep every answer of every flow ([`UdpReport::records`]): who answered which
    /// datagram, to follow flows through a restart.
    pub record: bool,
    /// Set by another thread to stop sending early.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl UdpSpec {
    /// A spec with the defaults: 2 threads, a 1 s timeout, 1 s linger, one source address,
    /// no records.
    pub fn new(target: SocketAddr, flows: usize, pace: Pace, length: Duration) -> UdpSpec {
        UdpSpec {
            target,
            flows,
            threads: 2,
            pace,
            length,
            limit: None,
            timeout: Duration::from_secs(1),
            linger: Duration::from_secs(1),
            sources: 1,
            record: false,
            cancel: None,
        }
    }
}

/// One answer: which process answered datagram `seq` of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Answer {
    /// The datagram's number in its flow.
    pub seq: u64,
    /// The demo's slot.
    pub slot: u32,
    /// The answering process.
    pub pid: u32,
    /// Its slot's generation.
    pub generation: u64,
}

/// What one flow sent and, if recorded, every answer it got.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlowRecord {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams answered.
    pub answered: u64,
    /// Every answer, in arrival order ([`UdpSpec::record`]).
    pub answers: Vec<Answer>,
}

impl FlowRecord {
    /// The processes that answered, in the order of the datagrams, each once per run of it:
    /// `(slot, pid, generation)`.
    pub fn processes(&self) -> Vec<(u32, u32, u64)> {
        let mut by_seq = self.answers.clone();
        by_seq.sort_by_key(|a| a.seq);
        let mut runs: Vec<(u32, u32, u64)> = Vec::new();
        for a in by_seq {
            if runs.last() != Some(&(a.slot, a.pid, a.generation)) {
                runs.push((a.slot, a.pid, a.generation));
            }
        }
        runs
    }
}

/// How flows moved between processes over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FlowMoves {
    /// Flows followed.
    pub flows: usize,
    /// Answered by one process throughout.
    pub kept: usize,
    /// Moved, but only forward: to a newer generation of the same slot.
    pub forward: usize,
    /// Moved otherwise: to another slot, or back to an older process.
    pub moved: usize,
}

impl FlowMoves {
    /// Sorts `records` by how their flows moved.
    pub fn of(records: &[FlowRecord]) -> FlowMoves {
        let mut moves = FlowMoves {
            flows: records.len(),
            ..FlowMoves::default()
        };
        for record in records {
            let runs = record.processes();
            let forward_only = runs.windows(2).all(|w| w[0].0 == w[1].0 && w[1].2 > w[0].2);
            if runs.len() <= 1 {
                moves.kept += 1;
            } else if forward_only {
                moves.forward += 1;
            } else {
                moves.moved += 1;
            }
        }
        moves
    }
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct UdpReport {
    /// How the flows sent.
    pub pace: Pace,
    /// Client sockets.
    pub flows: usize,
    /// Seconds of sending.
    pub elapsed_s: f64,
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams answered.
    pub answered: u64,
    /// Datagrams never answered (`sent - answered`, after the linger).
    pub lost: u64,
    /// Answers that were not the demo's (unparsable).
    pub malformed: u64,
    /// Datagrams answered per second of sending.
    pub rate: f64,
    /// Time from sending a datagram to reading its answer.
    pub latency: Latency,
    /// Answers per slot.
    pub per_worker: BTreeMap<String, u64>,
    /// Every flow, with its answers if [`UdpSpec::record`].
    #[serde(skip)]
    pub records: Vec<FlowRecord>,
    #[serde(skip)]
    histogram: Histogram<u64>,
}

impl UdpReport {
    fn empty(pace: Pace, flows: usize) -> UdpReport {
        UdpReport {
            pace,
            flows,
            elapsed_s: 0.0,
            sent: 0,
            answered: 0,
            lost: 0,
            malformed: 0,
            rate: 0.0,
            latency: Latency::default(),
            per_worker: BTreeMap::new(),
            records: Vec::new(),
            histogram: new_histogram(),
        }
    }

    fn merge(&mut self, other: UdpReport) {
        self.sent += other.sent;
        self.answered += other.answered;
        self.malformed += other.malformed;
        for (worker, count) in other.per_worker {
            *self.per_worker.entry(worker).or_insert(0) += count;
        }
        self.records.extend(other.records);
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    fn finish(&mut self, elapsed: Duration) {
        self.elapsed_s = elapsed.as_secs_f64();
        self.lost = self.sent.saturating_sub(self.answered);
        self.rate = per_second(self.answered, self.elapsed_s);
        self.latency = Latency::of(&self.histogram);
    }

    /// Busiest slot's answers over the idlest's, over `workers` slots.
    pub fn max_over_min(&self, workers: usize) -> f64 {
        let mut counts: Vec<f64> = self.per_worker.values().map(|&c| c as f64).collect();
        counts.resize(counts.len().max(workers), 0.0);
        crate::load::fairness_of(&counts).max_over_min
    }
}

/// One line: rate, loss, percentiles, per-slot split.
impl std::fmt::Display for UdpReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.latency;
        write!(
            f,
            "{} of {} answered in {:.1}s = {:.0}/s; lost {}; latency p50 {}us p99 {}us p99.9 {}us \
             max {}us; per slot {:?}",
            self.answered,
            self.sent,
            self.elapsed_s,
            self.rate,
            self.lost,
            l.p50_us,
            l.p99_us,
            l.p999_us,
            l.max_us,
            self.per_worker
        )
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("1 us to 60 s, 3 digits: valid bounds")
}

/// Parses the demo's answer `<slot> <pid> <generation> <payload>`.
fn parse_answer(bytes: &[u8]) -> Option<(Answer, u64)> {
    let mut fields = bytes.splitn(4, |&b| b == b' ');
    let mut number = || -> Option<u64> { std::str::from_utf8(fields.next()?).ok()?.parse().ok() };
    let slot = u32::try_from(number()?).ok()?;
    let pid = u32::try_from(number()?).ok()?;
    let generation = number()?;
    let payload = fields.next()?;
    if payload.len() != PAYLOAD {
        return None;
    }
    let seq = u64::from_le_bytes(payload[..8].try_into().ok()?);
    let sent_ns = u64::from_le_bytes(payload[8..].try_into().ok()?);
    Some((
        Answer {
            seq,
            slot,
            pid,
            generation,
        },
        sent_ns,
    ))
}

/// Runs the load and returns what it saw. Blocks for the run's length and the linger.
pub fn run(spec: &UdpSpec) -> io::Result<UdpReport> {
    if !spec.target.ip().is_loopback() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: the UDP load is for loopback targets only", spec.target),
        ));
    }
    let flows = spec.flows.clamp(1, MAX_FLOWS);
    let threads = spec.threads.clamp(1, flows);
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + spec.length.min(MAX_DURATION);
    let handles = (0..threads)
        .map(|t| {
            let share = flows / threads + usize::from(t < flows % threads);
            let driver = Driver {
                spec: spec.clone(),
                first: (0..t)
                    .map(|u| flows / threads + usize::from(u < flows % threads))
                    .sum(),
                share,
                rate: match spec.pace {
                    Pace::Rate(rate) => Some(rate * share as f64 / flows as f64),
                    Pace::Window(_) => None,
                },
                started,
                end,
                sent: Arc::clone(&sent),
            };
            std::thread::Builder::new()
                .name(format!("udp-load-{t}"))
                .spawn(move || driver.run())
        })
        .collect::<io::Result<Vec<_>>>()?;
    let mut report = UdpReport::empty(spec.pace, flows);
    let mut failure = None;
    let mut stopped = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok((part, stop))) => {
                report.merge(part);
                stopped = stopped.max(Some(stop));
            }
            Ok(Err(err)) => failure = Some(err),
            Err(_) => failure = Some(io::Error::other("a UDP load thread panicked")),
        }
    }
    if let Some(err) = failure {
        return Err(err);
    }
    report.finish(stopped.unwrap_or(end).saturating_duration_since(started));
    Ok(report)
}

/// One client thread's flows.
struct Driver {
    spec: UdpSpec,
    /// The index of its first flow (for the source address rotation).
    first: usize,
    share: usize,
    /// Open loop: this thread's datagrams per second.
    rate: Option<f64>,
    started: Instant,
    end: Instant,
    /// Datagrams sent by every thread (for [`UdpSpec::limit`]).
    sent: Arc<AtomicU64>,
}

/// One client socket.
struct Flow {
    socket: mio::net::UdpSocket,
    record: FlowRecord,
    /// Closed loop: datagrams in flight, oldest first.
    in_flight: VecDeque<(u64, Instant)>,
}

/// The buffers of one `recvmmsg` or `sendmmsg` call.
struct Batch {
    buffers: Vec<[u8; ANSWER_ROOM]>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            buffers: vec![[0u8; ANSWER_ROOM]; BATCH],
            // SAFETY: iovec and mmsghdr are plain C structs for which all zeroes is valid
            // (null pointers, zero lengths); they are filled before each call.
            iovecs: vec![unsafe { std::mem::zeroed() }; BATCH],
            // SAFETY: as above.
            headers: vec![unsafe { std::mem::zeroed() }; BATCH],
        }
    }

    /// Points the first `n` headers at the first `n` buffers, `len` bytes each.
    fn prepare(&mut self, n: usize, len: usize) {
        for i in 0..n {
            self.iovecs[i] = libc::iovec {
                iov_base: self.buffers[i].as_mut_ptr().cast(),
                iov_len: len,
            };
            // SAFETY: all zeroes is a valid msghdr (no name, no control data).
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            header.msg_iov = &raw mut self.iovecs[i];
            header.msg_iovlen = 1;
            self.headers[i] = libc::mmsghdr {
                msg_hdr: header,
                msg_len: 0,
            };
        }
    }

    /// Reads up to [`BATCH`] datagrams queued on `fd` (connected, non-blocking); how many.
    fn receive(&mut self, fd: i32) -> io::Result<usize> {
        self.prepare(BATCH, ANSWER_ROOM);
        // SAFETY: `headers` holds BATCH prepared entries whose iovecs point into
        // `buffers`, which outlive the call; MSG_DONTWAIT never blocks.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// The `i`th datagram read.
    fn datagram(&self, i: usize) -> &[u8] {
        let len = (self.headers[i].msg_len as usize).min(ANSWER_ROOM);
        &self.buffers[i][..len]
    }

    /// Sends the payloads `(seq, sent_ns)` on `fd` (connected); how many went.
    fn send(&mut self, fd: i32, payloads: &[(u64, u64)]) -> io::Result<usize> {
        let n = payloads.len().min(BATCH);
        for (i, (seq, sent_ns)) in payloads.iter().take(n).enumerate() {
            self.buffers[i][..8].copy_from_slice(&seq.to_le_bytes());
            self.buffers[i][8..PAYLOAD].copy_from_slice(&sent_ns.to_le_bytes());
        }
        self.prepare(n, PAYLOAD);
        // SAFETY: `headers` holds `n` prepared entries whose iovecs point into `buffers`,
        // which outlive the call; the socket is connected, so no address is needed.
        let sent = unsafe {
            libc::sendmmsg(
                fd,
                self.headers.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(sent).map_err(|_| io::Error::last_os_error())
    }
}

impl Driver {
    /// Runs this thread's flows; its part of the report and when it stopped sending.
    fn run(self) -> io::Result<(UdpReport, Instant)> {
        let mut poll = Poll::new()?;
        let mut flows = Vec::with_capacity(self.share);
        for i in 0..self.share {
            let mut socket = mio::net::UdpSocket::from_std(self.socket(self.first + i)?);
            poll.registry()
                .register(&mut socket, Token(i), Interest::READABLE)?;
            flows.push(Flow {
                socket,
                record: FlowRecord::default(),
                in_flight: VecDeque::new(),
            });
        }
        let mut report = UdpReport::empty(self.spec.pace, self.share);
        let mut batch = Batch::new();
        let mut events = Events::with_capacity(256);
        let mut next_flow = 0usize;
        let mut sent_here = 0u64;
        let mut sending = true;
        let mut stopped = self.end;
        let mut last_expiry = Instant::now();
        if let Pace::Window(window) = self.spec.pace {
            for flow in &mut flows {
                self.refill(flow, window, &mut batch);
            }
        }
        loop {
            let now = Instant::now();
            if sending
                && (now >= self.end
                    || self.limit_reached()
                    || self
                        .spec
                        .cancel
                        .as_ref()
                        .is_some_and(|c| c.load(Ordering::Relaxed)))
            {
                sending = false;
                stopped = now;
            }
            let answered_all = flows.iter().all(|f| f.record.answered >= f.record.sent);
            if !sending && (answered_all || now >= stopped + self.spec.linger) {
                break;
            }
            // Open loop: what is due by now, spread over the flows in turn.
            if sending && let Some(rate) = self.rate {
                let due = (now.duration_since(self.started).as_secs_f64() * rate) as u64;
                let mut owed = due.saturating_sub(sent_here);
                while owed > 0 && !self.limit_reached() {
                    let flow = &mut flows[next_flow % self.share];
                    next_flow += 1;
                    let n = self.send(flow, 1, &mut batch);
                    sent_here += n as u64;
                    owed = owed.saturating_sub(1);
                }
            }
            let wait = match self.rate {
                Some(rate) if sending => {
                    let next =
                        self.started + Duration::from_secs_f64((sent_here + 1) as f64 / rate);
                    next.saturating_duration_since(now).min(TICK)
                }
                _ => TICK,
            };
            match poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
            for event in &events {
                let Some(flow) = flows.get_mut(event.token().0) else {
                    continue;
                };
                self.drain(flow, &mut batch, &mut report);
                if sending && let Pace::Window(window) = self.spec.pace {
                    self.refill(flow, window, &mut batch);
                }
            }
            // Closed loop: datagrams unanswered past the timeout give their places up.
            if let Pace::Window(window) = self.spec.pace
                && sending
                && now.duration_since(last_expiry) >= Duration::from_millis(10)
            {
                last_expiry = now;
                for flow in &mut flows {
                    let before = flow.in_flight.len();
                    while flow
                        .in_flight
                        .front()
                        .is_some_and(|(_, at)| now.duration_since(*at) >= self.spec.timeout)
                    {
                        flow.in_flight.pop_front();
                    }
                    if flow.in_flight.len() < before {
                        self.refill(flow, window, &mut batch);
                    }
                }
            }
        }
        for flow in flows {
            report.sent += flow.record.sent;
            report.answered += flow.record.answered;
            report.records.push(flow.record);
        }
        Ok((report, stopped))
    }

    fn limit_reached(&self) -> bool {
        self.spec
            .limit
            .is_some_and(|limit| self.sent.load(Ordering::Relaxed) >= limit)
    }

    /// Flow `index`'s socket: bound to its source address, connected to the target,
    /// non-blocking.
    fn socket(&self, index: usize) -> io::Result<std::net::UdpSocket> {
        let domain = Domain::for_address(self.spec.target);
        let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if self.spec.sources > 1 && self.spec.target.is_ipv4() {
            let last = u8::try_from(index % usize::from(self.spec.sources)).unwrap_or(0) + 1;
            let source = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0);
            socket.bind(&SockAddr::from(source))?;
        }
        socket.connect(&SockAddr::from(self.spec.target))?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    }

    /// Sends up to `n` datagrams on `flow` (fewer if the count limit is reached); how many
    /// went.
    fn send(&self, flow: &mut Flow, n: usize, batch: &mut Batch) -> usize {
        let n = n.min(BATCH);
        let allowed = match self.spec.limit {
            Some(limit) => {
                let before = self.sent.fetch_add(n as u64, Ordering::Relaxed);
                let left = limit.saturating_sub(before);
                usize::try_from(left).unwrap_or(n).min(n)
            }
            None => n,
        };
        if allowed == 0 {
            return 0;
        }
        let now = Instant::now();
        let sent_ns = u64::try_from(now.duration_since(self.started).as_nanos()).unwrap_or(0);
        let first = flow.record.sent;
        let payloads: Vec<(u64, u64)> = (first..first + allowed as u64)
            .map(|seq| (seq, sent_ns))
            .collect();
        let went = batch.send(flow.socket.as_raw_fd(), &payloads).unwrap_or(0);
        if self.spec.limit.is_none() {
            self.sent.fetch_add(went as u64, Ordering::Relaxed);
        }
        flow.record.sent += went as u64;
        if matches!(self.spec.pace, Pace::Window(_)) {
            flow.in_flight
                .extend((first..first + went as u64).map(|seq| (seq, now)));
        }
        went
    }

    /// Closed loop: sends until `window` datagrams are in flight.
    fn refill(&self, flow: &mut Flow, window: usize, batch: &mut Batch) {
        while flow.in_flight.len() < window {
            let want = window - flow.in_flight.len();
            if self.send(flow, want, batch) == 0 {
                return;
            }
        }
    }

    /// Reads every answer queued on `flow`'s socket.
    fn drain(&self, flow: &mut Flow, batch: &mut Batch, report: &mut UdpReport) {
        loop {
            let n = match batch.receive(flow.socket.as_raw_fd()) {
                Ok(n) => n,
                // Would block (empty), or an ICMP error from a port nobody served: the
                // datagram is lost, and counted so.
                Err(_) => return,
            };
            if n == 0 {
                return;
            }
            let now_ns =
                u64::try_from(Instant::now().duration_since(self.started).as_nanos()).unwrap_or(0);
            for i in 0..n {
                let Some((answer, sent_ns)) = parse_answer(batch.datagram(i)) else {
                    report.malformed += 1;
                    continue;
                };
                flow.record.answered += 1;
                let _ = report
                    .histogram
                    .record((now_ns.saturating_sub(sent_ns) / 1000).max(1));
                *report
                    .per_worker
                    .entry(answer.slot.to_string())
                    .or_insert(0) += 1;
                if let Some(at) = flow
                    .in_flight
                    .iter()
                    .position(|(seq, _)| *seq == answer.seq)
                {
                    flow.in_flight.remove(at);
                }
                if self.spec.record {
                    flow.record.answers.push(answer);
                }
            }
            if n < BATCH {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server answering as the demo does, `<slot> <pid> <generation> <payload>`,
    /// for `length`, on a thread; its address.
    fn demo_like(slot: u32, length: Duration) -> (SocketAddr, std::thread::JoinHandle<u64>) {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let addr = socket.local_addr().expect("addr");
        let handle = std::thread::spawn(move || {
            let until = Instant::now() + length;
            let mut answered = 0;
            let mut buffer = [0u8; 256];
            while Instant::now() < until {
                if let Ok((n, from)) = socket.recv_from(&mut buffer) {
                    let mut answer = format!("{slot} 4242 7 ").into_bytes();
                    answer.extend_from_slice(&buffer[..n]);
                    let _ = socket.send_to(&answer, from);
                    answered += 1;
                }
            }
            answered
        });
        (addr, handle)
    }

    #[test]
    fn a_closed_loop_counts_every_answer_and_stops_at_its_count() {
        let (addr, server) = demo_like(3, Duration::from_secs(10));
        let mut spec = UdpSpec::new(addr, 8, Pace::Window(4), Duration::from_secs(5));
        spec.limit = Some(2000);
        spec.sources = 4;
        spec.record = true;
        let report = run(&spec).expect("runs");
        assert_eq!(report.sent, 2000, "{report}");
        assert_eq!(report.answered, 2000, "{report}");
        assert_eq!((report.lost, report.malformed), (0, 0));
        assert_eq!(report.per_worker.get("3"), Some(&2000));
        assert!(report.latency.max_us > 0);
        let moves = FlowMoves::of(&report.records);
        assert_eq!((moves.flows, moves.kept), (8, 8), "{moves:?}");
        drop(server);
    }

    #[test]
    fn an_open_loop_sends_at_its_rate_and_counts_what_nobody_answers_as_lost() {
        // A bound socket that never reads: nothing is answered.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = silent.local_addr().expect("addr");
        let mut spec = UdpSpec::new(addr, 4, Pace::Rate(1000.0), Duration::from_millis(500));
        spec.linger = Duration::from_millis(100);
        let started = Instant::now();
        let report = run(&spec).expect("runs");
        assert!(started.elapsed() < Duration::from_secs(5), "bounded");
        // 500 due in 0.5 s; the last tick may be a few short.
        assert!((400..=520).contains(&report.sent), "{report}");
        assert_eq!(report.answered, 0);
        assert_eq!(report.lost, report.sent);
    }

    #[test]
    fn moves_are_kept_forward_or_otherwise() {
        let answers = |runs: &[(u32, u64)]| FlowRecord {
            sent: runs.len() as u64,
            answered: runs.len() as u64,
            answers: runs
                .iter()
                .enumerate()
                .map(|(seq, &(slot, generation))| Answer {
                    seq: seq as u64,
                    slot,
                    pid: 100 * slot + u32::try_from(generation).unwrap_or(0),
                    generation,
                })
                .collect(),
        };
        let records = [
            answers(&[(0, 1), (0, 1)]),
            answers(&[(0, 1), (0, 2), (0, 2)]),
            answers(&[(0, 1), (1, 2)]),
            answers(&[(1, 2), (1, 1)]),
        ];
        assert_eq!(
            FlowMoves::of(&records),
            FlowMoves {
                flows: 4,
                kept: 1,
                forward: 1,
                moved: 2
            }
        );
        assert_eq!(parse_answer(b"1 2 3 short"), None);
    }

    #[test]
    fn only_loopback() {
        let spec = UdpSpec::new(
            "192.0.2.1:9".parse().expect("addr"),
            1,
            Pace::Window(1),
            Duration::from_millis(10),
        );
        assert!(run(&spec).is_err());
    }
}
