//! One client thread: a `mio` poll over its lanes, each a connection going through
//! connect, write, read (and, in connect mode, waiting for the server's close).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::report::{ErrorKind, LoadReport};
use super::{Mode, Shared};

/// Bytes read at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Longest poll wait, so deadlines and the stop flag are checked often enough.
const TICK: Duration = Duration::from_millis(10);

/// The worker header every Steer response carries (and the peers' scripts add).
const WORKER_HEADER: &str = "x-steer-worker";

/// Everything one client thread needs.
#[derive(Debug)]
pub(crate) struct Driver {
    pub target: SocketAddr,
    pub mode: Mode,
    pub request: Arc<[u8]>,
    pub timeout: Duration,
    /// Source addresses in rotation (empty: let the kernel choose).
    pub sources: Vec<IpAddr>,
    /// Where in `sources` this thread starts.
    pub first_source: usize,
    pub lanes: usize,
    /// When a duration-bound run ends.
    pub end: Instant,
    /// Request limit of a count-bound run.
    pub limit: Option<u64>,
    pub shared: Arc<Shared>,
    /// The run's phase counter, read when each request starts.
    pub phase: Option<Arc<AtomicU64>>,
    /// Ends the run early when set.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// Where a lane's current request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not running a request.
    Idle,
    /// `connect` in progress.
    Connecting,
    /// Request (partly) written.
    Writing { written: usize },
    /// Waiting for the complete response.
    Reading,
    /// Connect mode: response complete, waiting for the server's close.
    Closing,
}

/// One connection slot of the load.
#[derive(Debug)]
struct Lane {
    stream: Option<TcpStream>,
    phase: Phase,
    input: Vec<u8>,
    /// When the current request started (connect mode: before `connect`).
    started: Instant,
    /// When the current step gives up.
    deadline: Instant,
    /// The run's phase when the current request started.
    run_phase: Option<u64>,
}

impl Lane {
    fn new(now: Instant) -> Lane {
        Lane {
            stream: None,
            phase: Phase::Idle,
            input: Vec::with_capacity(1024),
            started: now,
            deadline: now,
            run_phase: None,
        }
    }
}

/// A complete response.
#[derive(Debug)]
struct Response {
    status: u16,
    worker: Option<String>,
    close: bool,
}

impl Driver {
    /// Runs this thread's lanes until the run ends.
    pub(crate) fn run(mut self) -> io::Result<LoadReport> {
        let mut poll = Poll::new()?;
        let mut events = Events::with_capacity(1024);
        let mut report = LoadReport::empty(self.mode, self.lanes);
        let now = Instant::now();
        let mut lanes: Vec<Lane> = (0..self.lanes).map(|_| Lane::new(now)).collect();
        for (index, lane) in lanes.iter_mut().enumerate() {
            self.begin(&mut poll, lane, index, &mut report);
        }
        loop {
            let now = Instant::now();
            if self.limit.is_none() && (now >= self.end || self.cancelled()) {
                self.shared.stop.store(true, Ordering::Relaxed);
                return Ok(report);
            }
            if lanes.iter().all(|lane| lane.phase == Phase::Idle) {
                return Ok(report);
            }
            match poll.poll(&mut events, Some(TICK)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
            for event in &events {
                let index = event.token().0;
                if let Some(lane) = lanes.get_mut(index) {
                    self.advance(&mut poll, lane, index, &mut report);
                }
            }
            let now = Instant::now();
            for (index, lane) in lanes.iter_mut().enumerate() {
                if lane.phase != Phase::Idle && now >= lane.deadline {
                    self.expire(&mut poll, lane, index, &mut report);
                }
            }
        }
    }

    /// Starts the lane's next request, if the run allows one more.
    fn begin(&mut self, poll: &mut Poll, lane: &mut Lane, index: usize, report: &mut LoadReport) {
        loop {
            if !self.shared.claim(self.limit) {
                self.close(poll, lane);
                lane.phase = Phase::Idle;
                return;
            }
            let now = Instant::now();
            lane.started = now;
            lane.deadline = now + self.timeout;
            lane.run_phase = self.phase.as_ref().map(|p| p.load(Ordering::Relaxed));
            lane.input.clear();
            if lane.stream.is_some() {
                lane.phase = Phase::Writing { written: 0 };
                self.advance(poll, lane, index, report);
                return;
            }
            match self.connect(poll, index) {
                Ok(stream) => {
                    lane.stream = Some(stream);
                    lane.phase = Phase::Connecting;
                    return;
                }
                Err(err) => {
                    report.fail(ErrorKind::of(&err));
                    // A refusing server fails every connect at once: do not spin on it.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// A non-blocking connect from the next source address.
    fn connect(&mut self, poll: &mut Poll, index: usize) -> io::Result<TcpStream> {
        let socket = Socket::new(
            Domain::for_address(self.target),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        socket.set_tcp_nodelay(true)?;
        if !self.sources.is_empty() {
            let ip = self.sources[self.first_source % self.sources.len()];
            self.first_source = self.first_source.wrapping_add(1);
            socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
        }
        match socket.connect(&SockAddr::from(self.target)) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(err) => return Err(err),
        }
        let mut stream = TcpStream::from_std(std::net::TcpStream::from(socket));
        poll.registry().register(
            &mut stream,
            Token(index),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        Ok(stream)
    }

    /// Moves the lane as far as its socket allows.
    fn advance(&mut self, poll: &mut Poll, lane: &mut Lane, index: usize, report: &mut LoadReport) {
        match self.step(lane) {
            Ok(Some(response)) => {
                report.succeed_or_fail(
                    response.status,
                    response.worker,
                    lane.started.elapsed(),
                    lane.run_phase,
                    self.shared_live(),
                );
                match self.mode {
                    Mode::KeepAlive if !response.close => self.begin(poll, lane, index, report),
                    Mode::KeepAlive => {
                        self.close(poll, lane);
                        self.begin(poll, lane, index, report);
                    }
                    Mode::Connect => {
                        lane.phase = Phase::Closing;
                        lane.deadline = Instant::now() + self.timeout;
                        // The close may already be here.
                        self.advance(poll, lane, index, report);
                    }
                }
            }
            Ok(None) if lane.phase == Phase::Idle => {
                // Connect mode: the server closed after the response.
                self.close(poll, lane);
                self.begin(poll, lane, index, report);
            }
            Ok(None) => {}
            Err(err) => {
                report.fail(ErrorKind::of(&err));
                self.close(poll, lane);
                self.begin(poll, lane, index, report);
            }
        }
    }

    /// Whether results still count (a duration-bound run past its end does not).
    fn shared_live(&self) -> bool {
        self.limit.is_some() || (Instant::now() < self.end && !self.cancelled())
    }

    /// Whether another thread ended the run early ([`LoadSpec::cancel`](super::LoadSpec)).
    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|cancel| cancel.load(Ordering::Relaxed))
    }

    /// Runs the lane's state machine on a non-blocking socket. `Ok(Some)` when a response
    /// completed; `Ok(None)` when it must wait (or, from `Closing`, the close arrived and
    /// the lane is `Idle`).
    fn step(&mut self, lane: &mut Lane) -> io::Result<Option<Response>> {
        let Some(stream) = lane.stream.as_mut() else {
            return Ok(None);
        };
        loop {
            match lane.phase {
                Phase::Idle => return Ok(None),
                Phase::Connecting => {
                    if let Some(err) = stream.take_error()? {
                        return Err(err);
                    }
                    match stream.peer_addr() {
                        Ok(_) => lane.phase = Phase::Writing { written: 0 },
                        Err(err) if err.kind() == io::ErrorKind::NotConnected => return Ok(None),
                        Err(err) => return Err(err),
                    }
                }
                Phase::Writing { written } => match stream.write(&self.request[written..]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) if written + n == self.request.len() => lane.phase = Phase::Reading,
                    Ok(n) => {
                        lane.phase = Phase::Writing {
                            written: written + n,
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => return Err(err),
                },
                Phase::Reading => {
                    if let Some(response) = parse(&mut lane.input)? {
                        return Ok(Some(response));
                    }
                    match read_some(stream, &mut lane.input)? {
                        Some(0) => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "closed before a complete response",
                            ));
                        }
                        Some(_) => {}
                        None => return Ok(None),
                    }
                }
                Phase::Closing => {
                    lane.input.clear();
                    match read_some(stream, &mut lane.input) {
                        Ok(Some(0)) | Err(_) => {
                            lane.phase = Phase::Idle;
                            return Ok(None);
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => return Ok(None),
                    }
                }
            }
        }
    }

    /// The lane's deadline passed.
    fn expire(&mut self, poll: &mut Poll, lane: &mut Lane, index: usize, report: &mut LoadReport) {
        if lane.phase != Phase::Closing && self.shared_live() {
            report.fail(ErrorKind::Timeout);
        }
        self.close(poll, lane);
        lane.phase = Phase::Idle;
        self.begin(poll, lane, index, report);
    }

    fn close(&self, poll: &mut Poll, lane: &mut Lane) {
        if let Some(mut stream) = lane.stream.take() {
            let _ = poll.registry().deregister(&mut stream);
        }
    }
}

/// One `read`: `Some(n)` bytes appended (0 at end of file), `None` if nothing is there.
fn read_some(stream: &mut TcpStream, input: &mut Vec<u8>) -> io::Result<Option<usize>> {
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        return match stream.read(&mut chunk) {
            Ok(n) => {
                input.extend_from_slice(&chunk[..n]);
                Ok(Some(n))
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => Err(err),
        };
    }
}

/// Parses one complete response off the front of `input` (httparse for the head,
/// `Content-Length` for the body); `None` until it is all there.
fn parse(input: &mut Vec<u8>) -> io::Result<Option<Response>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut head = httparse::Response::new(&mut headers);
    let head_len = match head.parse(input) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed response: {err}"),
            ));
        }
    };
    let mut body = 0usize;
    let mut worker = None;
    let mut close = head.version == Some(0);
    for header in head.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            body = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?;
        } else if header.name.eq_ignore_ascii_case(WORKER_HEADER) {
            worker = Some(String::from_utf8_lossy(header.value).trim().to_owned());
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = header.value.eq_ignore_ascii_case(b"close");
        }
    }
    let status = head.code.unwrap_or(0);
    if input.len() < head_len + body {
        return Ok(None);
    }
    input.drain(..head_len + body);
    Ok(Some(Response {
        status,
        worker,
        close,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_waits_for_the_whole_body_and_reads_the_worker_header() {
        let full = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Steer-Worker: 3\r\n\r\nhello";
        let mut input = full[..full.len() - 2].to_vec();
        assert!(parse(&mut input).expect("valid").is_none());
        input.extend_from_slice(b"loHTTP/1.1");
        let response = parse(&mut input).expect("valid").expect("complete");
        assert_eq!(response.status, 200);
        assert_eq!(response.worker.as_deref(), Some("3"));
        assert!(!response.close);
        assert_eq!(input, b"HTTP/1.1", "the next response's bytes stay");
    }

    #[test]
    fn parse_sees_connection_close_and_rejects_garbage() {
        let mut input =
            b"HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".to_vec();
        let response = parse(&mut input).expect("valid").expect("complete");
        assert_eq!((response.status, response.close), (503, true));
        assert!(parse(&mut b"\x00garbage\r\n\r\n".to_vec()).is_err());
    }
}
