//! The status listener: a thread of its own with its own `mio` poll, so no client can delay
//! supervision, and no supervision work can delay `/ready`.
//!
//! It answers `GET`/`HEAD` of `/status`, `/metrics`, `/ready` and `/live`, then closes the
//! connection. It exposes no action: any other method is `405`, whatever its body, so
//! nothing reachable on this port can stop, restart or reconfigure the cluster. A client
//! whose address is not a loopback address gets only the paths of `status-public` (`403`
//! for the others): probes and scrapers from outside a pod or host can be let in without
//! showing them pids, restarts and memory.
//!
//! - `/ready` (200 while at least one worker serves and the cluster is not stopping, else
//!   503: for load balancers and Kubernetes probes) is answered at once from the readiness
//!   the primary stores in one atomic whenever its loop turns ([`Board`]).
//! - `/status` and `/metrics` are rendered here from a document the primary builds only when
//!   a client asks for one, and at most every [`RENDER_INTERVAL`] unless a slot's state
//!   changed meanwhile; every client that waits is answered from the same rendering. A
//!   document is never older than the request. If the
//!   primary does not publish one within [`RENDER_WAIT`] the answer is `503`: `/status`
//!   stays a liveness check of the primary's loop. `/live` is that check without the
//!   document: it waits for the same publication and answers a bare `200`.
//!
//! Hostile clients cost little. A request head must arrive within [`HEADER_TIMEOUT`], a
//! whole exchange within [`EXCHANGE_TIMEOUT`]. At most [`MAX_CLIENTS`] are connected, and at
//! most [`MAX_PER_IP`] from one address once they have had [`GRACE`] to send their request;
//! past either cap, the client with the least to lose is closed to make room (one that has
//! sent nothing, the oldest first), so a new prober always gets in. A bare `--status PORT` binds 127.0.0.1; another address is logged as
//! reachable from elsewhere.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;

use super::board::{Board, Publication, Readiness};
use super::request::{self, Endpoint, Head, MAX_REQUEST, Standing};
use super::{StatusDocument, render_metrics};
use crate::accept::{AcceptPause, is_exhaustion};
use crate::config::StatusPaths;

/// A request head must be complete this long after the connection was accepted.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// A whole exchange, from accept to the last byte of the response, must fit in this.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// `/status` and `/metrics` are rendered at most this often, shared by every client.
pub const RENDER_INTERVAL: Duration = Duration::from_millis(250);
/// How long a client waits for the primary to publish a document before it gets `503`.
pub const RENDER_WAIT: Duration = Duration::from_secs(2);
/// Clients connected at once.
pub const MAX_CLIENTS: usize = 256;
/// Clients connected at once from one IP address, among those older than [`GRACE`].
pub const MAX_PER_IP: usize = 16;
/// How long a new client is safe from its address's cap: time to send its request.
pub const GRACE: Duration = Duration::from_millis(250);

/// How long an answered client may keep sending before it is closed (its unread bytes
/// would otherwise turn the close into a reset that can destroy the response in flight).
const LINGER: Duration = Duration::from_secs(1);
/// Connections taken from the accept queue per turn of the loop.
const ACCEPT_BUDGET: usize = 64;
/// The accept queue's length (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 1024;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CLIENT: usize = 2;

/// The primary's handle on the status listener thread: the surface the supervisor uses.
#[derive(Debug)]
pub(crate) struct StatusService {
    board: Arc<Board>,
    addr: SocketAddr,
    /// A duplicate of the listening socket, for [`StatusService::listener_fd`].
    handed: std::net::TcpListener,
    thread: Option<JoinHandle<()>>,
}

impl StatusService {
    /// Creates the listening socket for `addr` (`SO_REUSEADDR`, no `SO_REUSEPORT`: one
    /// primary owns it, and hands it down to its successor on an upgrade).
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        bind(addr)
    }

    /// Starts the thread on `listener` (bound and listening: from [`StatusService::bind`],
    /// or inherited from the primary this one replaces). It accepts clients only once
    /// `accepting` (a successor waits until it has taken over). The thread wakes the
    /// primary's poll through `registry` with `token` when a client wants a document.
    ///
    /// Clients not on loopback get only the paths in `public`.
    pub(crate) fn start(
        listener: std::net::TcpListener,
        registry: &Registry,
        token: Token,
        accepting: bool,
        public: StatusPaths,
    ) -> io::Result<StatusService> {
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            if public == StatusPaths::ALL {
                tracing::warn!(
                    "the status listener on {addr} is reachable from other hosts; it is read-only, \
                     but it shows pids and counters (use a loopback address to keep it local, \
                     or status-public to show other hosts only the probes)"
                );
            } else {
                tracing::info!(
                    "the status listener on {addr} serves other hosts only: {public} (status-public)"
                );
            }
        }
        listener.set_nonblocking(true)?;
        let handed = listener.try_clone()?;
        let listener = TcpListener::from_std(listener);
        let poll = Poll::new()?;
        let board = Arc::new(Board::new(
            Waker::new(registry, token)?,
            Waker::new(poll.registry(), WAKER)?,
            accepting,
        ));
        let server = Server {
            poll,
            listener,
            listening: false,
            public,
            board: Arc::clone(&board),
            clients: Slab::new(),
            per_ip: HashMap::new(),
            pause: AcceptPause::default(),
            backlog: false,
            rendered: None,
            asked: None,
        };
        let thread = std::thread::Builder::new()
            .name("steer-status".into())
            .spawn(move || server.run())?;
        Ok(StatusService {
            board,
            addr,
            handed,
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening socket, to hand down to a successor (a duplicate of the thread's).
    pub(crate) fn listener_fd(&self) -> BorrowedFd<'_> {
        self.handed.as_fd()
    }

    /// Starts accepting clients (a successor that has taken over). Idempotent.
    pub(crate) fn start_accepting(&self) {
        self.board.set_accepting(true);
    }

    /// Stops accepting (a primary that handed over to its successor, which serves the same
    /// socket): clients already connected are still answered, and the socket itself stays
    /// open in the successor, so nobody is refused.
    pub(crate) fn stop_accepting(&self) {
        self.board.set_accepting(false);
    }

    /// Stores what `/ready` answers from, and a `stamp` of the cluster's state (which
    /// changes when a slot's state or process does): two atomic stores, and a wakeup of
    /// the thread only when the stamp changed.
    pub(crate) fn set_readiness(&self, readiness: Readiness, stamp: u64) {
        self.board.set_readiness(readiness, stamp);
    }

    /// Whether a client waits for a fresh document (the primary then builds one and calls
    /// [`StatusService::publish`]).
    pub(crate) fn document_wanted(&self) -> bool {
        self.board.document_wanted()
    }

    /// Hands a fresh document, built under `stamp`, to the thread.
    pub(crate) fn publish(&self, document: StatusDocument, stamp: u64) {
        self.board.publish(document, stamp);
    }
}

impl Drop for StatusService {
    fn drop(&mut self) {
        self.board.stop();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the status listener thread panicked");
        }
    }
}

/// `socket`, `SO_REUSEADDR`, `bind`, `listen(BACKLOG)`. mio's own `bind` listens with a
/// backlog of 128, which a burst of idle connections fills: the kernel then drops the SYNs
/// of the next probes, and they wait a second for the retransmission.
fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// `/status`, `/metrics` and `/live` rendered from one publication.
struct Rendered {
    serial: u64,
    status: Encoded,
    metrics: Encoded,
    live: Encoded,
}

/// A response shared by every client it goes to; a HEAD gets only `..head_len`.
#[derive(Clone)]
struct Encoded {
    bytes: Arc<[u8]>,
    head_len: usize,
}

impl Encoded {
    fn new(status: u16, content_type: &str, body: &[u8]) -> Encoded {
        let (bytes, head_len) = request::encode(status, content_type, body);
        Encoded {
            bytes: bytes.into(),
            head_len,
        }
    }

    fn text(status: u16, body: &str) -> Encoded {
        Encoded::new(status, "text/plain; charset=utf-8", body.as_bytes())
    }
}

enum Stage {
    /// Reading the request head.
    Head { buf: Vec<u8> },
    /// Asked for `/status` or `/metrics`: waits for a publication newer than `after`.
    Waiting {
        endpoint: Endpoint,
        head_only: bool,
        after: u64,
        since: Instant,
    },
    /// Writing `response[..end]`.
    Answering {
        response: Encoded,
        end: usize,
        written: usize,
    },
    /// Answered and shut down for writing; reading what the client still sends, until it
    /// closes or `until`.
    Lingering { until: Instant },
}

struct Client {
    stream: TcpStream,
    ip: IpAddr,
    accepted: Instant,
    stage: Stage,
}

impl Client {
    fn standing(&self) -> Standing {
        match &self.stage {
            Stage::Head { buf } if buf.is_empty() => Standing::Silent,
            Stage::Head { .. } => Standing::Sending,
            Stage::Waiting { .. } => Standing::Waiting,
            Stage::Answering { .. } => Standing::Reading,
            Stage::Lingering { .. } => Standing::Lingering,
        }
    }

    /// When the client is given up on.
    fn deadline(&self) -> Instant {
        match self.stage {
            Stage::Head { .. } => self.accepted + HEADER_TIMEOUT,
            Stage::Waiting { since, .. } => since + RENDER_WAIT,
            Stage::Answering { .. } => self.accepted + EXCHANGE_TIMEOUT,
            Stage::Lingering { until } => until,
        }
    }
}

/// What is left of a client after it made progress.
enum Progress {
    Open,
    Done,
}

struct Server {
    poll: Poll,
    listener: TcpListener,
    /// The listener is registered with `poll` (the board says whether it should be).
    listening: bool,
    /// What clients not on loopback may read.
    public: StatusPaths,
    board: Arc<Board>,
    clients: Slab<Client>,
    per_ip: HashMap<IpAddr, usize>,
    pause: AcceptPause,
    /// The accept budget ran out with connections possibly still queued.
    backlog: bool,
    rendered: Option<Rendered>,
    /// When the current request for a document went to the primary.
    asked: Option<Instant>,
}

impl Server {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            self.follow_accepting();
            let timeout = self.timeout(Instant::now());
            if let Err(err) = self.poll.poll(&mut events, Some(timeout))
                && err.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!("the status listener's event loop failed: {err}");
                return;
            }
            if self.board.stopping() {
                return;
            }
            for event in &events {
                match event.token() {
                    LISTENER => self.backlog = self.listening,
                    WAKER => {}
                    Token(n) => self.progress(n - FIRST_CLIENT),
                }
            }
            self.take_publication();
            let now = Instant::now();
            self.pause.expire(now);
            if self.backlog && self.listening && !self.pause.is_paused(now) {
                self.accept(now);
            }
            self.expire(Instant::now());
            self.ask_for_document(Instant::now());
        }
    }

    /// Registers or deregisters the listener as the board says (the primary starts a
    /// successor's accepting when it takes over, and stops a predecessor's when it hands
    /// over). Connected clients are answered either way.
    fn follow_accepting(&mut self) {
        let wanted = self.board.accepting();
        if wanted == self.listening {
            return;
        }
        let registry = self.poll.registry();
        let done = if wanted {
            registry.register(&mut self.listener, LISTENER, Interest::READABLE)
        } else {
            self.backlog = false;
            registry.deregister(&mut self.listener)
        };
        match done {
            Ok(()) => self.listening = wanted,
            Err(err) => tracing::error!("cannot (un)watch the status listener: {err}"),
        }
    }

    /// Until the next deadline, a due render request or the end of an accept pause.
    fn timeout(&self, now: Instant) -> Duration {
        if self.backlog && self.listening && !self.pause.is_paused(now) {
            return Duration::ZERO;
        }
        let mut at = self.clients.iter().map(|(_, c)| c.deadline()).min();
        let mut sooner = |t: Option<Instant>| {
            if let Some(t) = t {
                at = Some(at.map_or(t, |at| at.min(t)));
            }
        };
        sooner(self.pause.resumes_at());
        sooner(self.next_ask(now));
        at.map_or(Duration::from_secs(60), |at| {
            at.saturating_duration_since(now)
        })
    }

    fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPT_BUDGET {
            match self.listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer.ip().to_canonical(), now),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    self.backlog = false;
                    return;
                }
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(err) if is_exhaustion(&err) => {
                    // Making room may free the descriptor the next accept needs.
                    if let Some(key) = self.victim(None, None) {
                        self.close(key);
                    }
                    self.pause.failed(now, "the status listener", &err);
                    return;
                }
                Err(err) => {
                    tracing::debug!("status accept failed: {err}");
                    return;
                }
            }
        }
    }

    /// Makes room if a cap is reached, then takes the client and reads what it already sent.
    fn admit(&mut self, mut stream: TcpStream, ip: IpAddr, now: Instant) {
        // Past the address's cap, one of its clients that has had its grace gives way;
        // none has when one address opens connections faster than they can send a
        // request, and then only the total cap holds it (its own oldest go first there).
        let from_ip = self.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= MAX_PER_IP
            && let Some(key) = self.victim(Some(ip), now.checked_sub(GRACE))
        {
            self.close(key);
        }
        if self.clients.len() >= MAX_CLIENTS
            && let Some(key) = self.victim(None, None)
        {
            self.close(key);
        }
        let entry = self.clients.vacant_entry();
        let key = entry.key();
        if let Err(err) = self.poll.registry().register(
            &mut stream,
            Token(FIRST_CLIENT + key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::debug!("cannot watch a status client: {err}");
            return;
        }
        entry.insert(Client {
            stream,
            ip,
            accepted: now,
            stage: Stage::Head { buf: Vec::new() },
        });
        *self.per_ip.entry(ip).or_insert(0) += 1;
        // The request usually arrived with the handshake: answer it before anything can
        // push this client out.
        self.progress(key);
    }

    /// The client to close for room: among those of `ip` (or all), accepted no later than
    /// `accepted_by` (if given).
    fn victim(&self, ip: Option<IpAddr>, accepted_by: Option<Instant>) -> Option<usize> {
        request::victim(
            self.clients
                .iter()
                .filter(|(_, c)| ip.is_none_or(|ip| c.ip == ip))
                .filter(|(_, c)| accepted_by.is_none_or(|by| c.accepted <= by))
                .map(|(key, c)| (key, c.standing(), c.accepted)),
        )
    }

    fn close(&mut self, key: usize) {
        let Some(mut client) = self.clients.try_remove(key) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut client.stream);
        if let Some(count) = self.per_ip.get_mut(&client.ip) {
            *count -= 1;
            if *count == 0 {
                self.per_ip.remove(&client.ip);
            }
        }
    }

    fn progress(&mut self, key: usize) {
        let readiness = self.board.readiness();
        let serial = self.rendered.as_ref().map_or(0, |r| r.serial);
        let public = self.public;
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        match client.progress(readiness, serial, public) {
            Ok(Progress::Open) => {}
            Ok(Progress::Done) => self.close(key),
            Err(err) => {
                tracing::debug!("status client dropped: {err}");
                self.close(key);
            }
        }
    }

    /// Answers every waiting client from a new publication, rendered once.
    fn take_publication(&mut self) {
        let Some(publication) = self.board.latest() else {
            return;
        };
        if self
            .rendered
            .as_ref()
            .is_some_and(|r| r.serial >= publication.serial)
        {
            return;
        }
        self.asked = None;
        let rendered = render(&publication);
        let serial = rendered.serial;
        let mut ready = Vec::new();
        for (key, client) in &mut self.clients {
            if let Stage::Waiting {
                endpoint,
                head_only,
                after,
                ..
            } = client.stage
                && after < serial
            {
                let response = match endpoint {
                    Endpoint::Metrics => rendered.metrics.clone(),
                    Endpoint::Live => rendered.live.clone(),
                    _ => rendered.status.clone(),
                };
                client.answer(response, head_only);
                ready.push(key);
            }
        }
        self.rendered = Some(rendered);
        for key in ready {
            self.progress(key);
        }
    }

    /// When the primary should next be asked for a document: now if a client waits and the
    /// last rendering is [`RENDER_INTERVAL`] old or the cluster's state changed since,
    /// later if it is younger, never if nobody waits or a request is out. Only cluster
    /// events, not clients, can make renderings more frequent than the interval.
    fn next_ask(&self, now: Instant) -> Option<Instant> {
        if self.asked.is_some() {
            return None;
        }
        let waiting = self
            .clients
            .iter()
            .any(|(_, c)| matches!(c.stage, Stage::Waiting { .. }));
        if !waiting {
            return None;
        }
        let Some(last) = self.board.latest() else {
            return Some(now);
        };
        if last.stamp != self.board.stamp() {
            return Some(now);
        }
        Some((last.at + RENDER_INTERVAL).max(now))
    }

    fn ask_for_document(&mut self, now: Instant) {
        if self.next_ask(now).is_some_and(|at| at <= now) {
            self.asked = Some(now);
            self.board.want_document();
        }
    }

    /// Gives up on clients past their deadline: a late head gets 408 and a document that
    /// did not come 503 (best effort, one write), the rest are closed.
    fn expire(&mut self, now: Instant) {
        let late: Vec<usize> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline() <= now)
            .map(|(key, _)| key)
            .collect();
        for key in late {
            let Some(client) = self.clients.get_mut(key) else {
                continue;
            };
            let last_word = match client.stage {
                Stage::Head { .. } => Some(Encoded::text(408, "request head too slow\n")),
                Stage::Waiting { head_only, .. } => Some(Encoded::text(
                    503,
                    if head_only {
                        ""
                    } else {
                        "the primary did not publish its status in time\n"
                    },
                )),
                Stage::Answering { .. } | Stage::Lingering { .. } => None,
            };
            if let Some(response) = last_word {
                let _ = client.stream.write(&response.bytes);
            }
            self.close(key);
        }
    }
}

impl Client {
    /// Reads, answers and writes what the socket allows now.
    fn progress(
        &mut self,
        readiness: Readiness,
        rendered: u64,
        public: StatusPaths,
    ) -> io::Result<Progress> {
        if let Stage::Head { buf } = &mut self.stage {
            match read_head(&mut self.stream, buf)? {
                None => return Ok(Progress::Done),
                Some(Head::Partial) => return Ok(Progress::Open),
                Some(head) => self.route(head, readiness, rendered, public),
            }
        }
        if let Stage::Answering {
            response,
            end,
            written,
        } = &mut self.stage
        {
            while *written < *end {
                match self.stream.write(&response.bytes[*written..*end]) {
                    Ok(0) => return Ok(Progress::Done),
                    Ok(n) => *written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Progress::Open),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.stream.shutdown(Shutdown::Write)?;
            self.stage = Stage::Lingering {
                until: Instant::now() + LINGER,
            };
        }
        if let Stage::Lingering { .. } = self.stage {
            let mut sink = [0u8; 4096];
            loop {
                match self.stream.read(&mut sink) {
                    Ok(0) => return Ok(Progress::Done),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Progress::Open),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(Progress::Open)
    }

    /// Decides the answer to a complete (or refused) head.
    fn route(&mut self, head: Head, readiness: Readiness, rendered: u64, public: StatusPaths) {
        let (response, head_only) = match head {
            Head::Partial => return,
            Head::Read {
                endpoint,
                head_only,
            } if !self.ip.is_loopback()
                && endpoint.path().is_some_and(|path| !public.contains(path)) =>
            {
                (
                    Encoded::text(
                        403,
                        &format!("other hosts may read only {public} (status-public)\n"),
                    ),
                    head_only,
                )
            }
            Head::Read {
                endpoint: endpoint @ (Endpoint::Status | Endpoint::Metrics | Endpoint::Live),
                head_only,
            } => {
                self.stage = Stage::Waiting {
                    endpoint,
                    head_only,
                    after: rendered,
                    since: Instant::now(),
                };
                return;
            }
            Head::Read {
                endpoint: Endpoint::Ready,
                head_only,
            } => (ready_response(readiness), head_only),
            Head::Read {
                endpoint: Endpoint::NotFound,
                head_only,
            } => (
                Encoded::text(404, "try /status, /metrics, /ready or /live\n"),
                head_only,
            ),
            Head::NotAllowed => (Encoded::text(405, "read-only: only GET and HEAD\n"), false),
            Head::Malformed => (Encoded::text(400, "bad request\n"), false),
            Head::TooLarge => (Encoded::text(431, "request head too large\n"), false),
        };
        self.answer(response, head_only);
    }

    fn answer(&mut self, response: Encoded, head_only: bool) {
        let end = if head_only {
            response.head_len
        } else {
            response.bytes.len()
        };
        self.stage = Stage::Answering {
            response,
            end,
            written: 0,
        };
    }
}

/// Reads what the client sent, up to [`MAX_REQUEST`] bytes, and says where the head stands;
/// `None` when the client closed first.
fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<Head>> {
    let mut chunk = [0u8; 2048];
    loop {
        let room = MAX_REQUEST - buf.len();
        if room == 0 {
            return Ok(Some(request::parse(buf)));
        }
        match stream.read(&mut chunk[..room.min(2048)]) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                let head = request::parse(buf);
                if head != Head::Partial {
                    return Ok(Some(head));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Ok(Some(Head::Partial));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn ready_response(readiness: Readiness) -> Encoded {
    if readiness.handed_over {
        // A request this primary took just before it handed over: the cluster at this
        // address is its successor now, which is ready (that is why this one handed over).
        return Encoded::text(200, "ready (handed over to the new primary)\n");
    }
    let ready = readiness.is_ready();
    Encoded::text(
        if ready { 200 } else { 503 },
        &format!(
            "{} ({} of {} workers ready, {})\n",
            if ready { "ready" } else { "not ready" },
            readiness.ready,
            readiness.workers,
            readiness.phase.as_str()
        ),
    )
}

fn render(publication: &Publication) -> Rendered {
    let json = serde_json::to_string_pretty(&publication.document).unwrap_or_default() + "\n";
    Rendered {
        serial: publication.serial,
        status: Encoded::new(200, "application/json", json.as_bytes()),
        metrics: Encoded::new(
            200,
            "text/plain; version=0.0.4",
            render_metrics(&publication.document).as_bytes(),
        ),
        live: Encoded::text(200, "live\n"),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    use mio::{Events, Poll, Token};

    use super::*;
    use crate::status::board::{Phase, Readiness};

    /// One `GET /status`: the status code, or 0 if the exchange failed.
    fn get_status(addr: SocketAddr) -> u16 {
        let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
            return 0;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        if stream
            .write_all(b"GET /status HTTP/1.1\r\nHost: t\r\n\r\n")
            .is_err()
        {
            return 0;
        }
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        std::str::from_utf8(reply.get(9..12).unwrap_or_default())
            .ok()
            .and_then(|code| code.parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn clients_share_renderings_at_most_one_per_interval() {
        // The test plays the primary: it publishes a document whenever the thread asks.
        // 40 clients asking again 20 ms after each answer would make 400 renderings if each
        // were answered from its own; with a stable cluster state the thread asks at most
        // once per RENDER_INTERVAL, and every waiting client gets that rendering (a
        // document is never older than the request, so each waits for the next one).
        let listener = StatusService::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let mut primary = Poll::new().expect("poll");
        let service = StatusService::start(
            listener,
            primary.registry(),
            Token(0),
            true,
            StatusPaths::ALL,
        )
        .expect("start");
        let document: StatusDocument =
            serde_json::from_str(include_str!("../top/fixtures/status-after.json"))
                .expect("fixture");
        let readiness = Readiness {
            ready: 2,
            workers: 2,
            phase: Phase::Running,
            handed_over: false,
        };
        service.set_readiness(readiness, 1);
        let addr = service.local_addr();
        let clients: Vec<_> = (0..40)
            .map(|_| {
                std::thread::spawn(move || {
                    (0..10)
                        .map(|_| {
                            let code = get_status(addr);
                            std::thread::sleep(Duration::from_millis(20));
                            code
                        })
                        .collect::<Vec<u16>>()
                })
            })
            .collect();
        let started = Instant::now();
        let mut published = 0u32;
        let mut events = Events::with_capacity(8);
        while !clients.iter().all(|c| c.is_finished())
            && started.elapsed() < Duration::from_secs(30)
        {
            primary
                .poll(&mut events, Some(Duration::from_millis(5)))
                .expect("poll");
            if service.document_wanted() {
                service.publish(document.clone(), 1);
                published += 1;
            }
        }
        let elapsed = started.elapsed();
        let codes: Vec<u16> = clients
            .into_iter()
            .flat_map(|c| c.join().expect("client"))
            .collect();
        let answered = codes.iter().filter(|&&c| c == 200).count();
        let bound = (elapsed.as_millis() / RENDER_INTERVAL.as_millis()) as u32 + 2;
        println!(
            "{} requests from 40 clients in {elapsed:?}: {answered} answered 200, from \
             {published} renderings (bound {bound})",
            codes.len()
        );
        assert_eq!(answered, codes.len(), "every request answered: {codes:?}");
        assert!(
            published <= bound,
            "{published} renderings in {elapsed:?}: more than one per {RENDER_INTERVAL:?}"
        );
        drop(service);
    }
}
