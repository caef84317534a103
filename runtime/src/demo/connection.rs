//! One client connection (its socket, buffers, where its current request stands and since
//! when it has kept the worker waiting) and the table of open connections, indexed by their
//! poll token.

use std::io::{self, Read as _, Write as _};
use std::net::Shutdown;
use std::time::Instant;

use mio::net::TcpStream;

use super::http::{HeadScan, Rejection, RequestHead};
use super::routes::Route;
use super::timeouts::Timeouts;

/// Unflushed output above which no further pipelined request is answered (nor read) until
/// the client catches up. Small, because a client that never reads holds this much of the
/// worker's memory until the send timeout closes it.
const OUTPUT_BACKLOG: usize = 16 * 1024;

/// Buffer capacity kept across requests; a larger buffer is freed once empty.
const KEPT_CAPACITY: usize = 4 * 1024;

/// Reads attempted while closing, to swallow what the client still sent so the kernel does
/// not answer it with a reset that could destroy the response in flight.
const LINGER_READS: usize = 16;

/// How a request is to be answered, decided when its head is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    /// A HEAD request: headers only.
    pub head_only: bool,
    /// The client may send another request on this connection.
    pub keep_alive: bool,
}

/// Where a connection's current request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Between requests, or with part of a head buffered.
    Head,
    /// A head was parsed; `remaining` body bytes are still to be read and discarded before
    /// `route` is answered.
    Body {
        /// The route to answer once the body is read.
        route: Route,
        /// How the request is answered.
        exchange: Exchange,
        /// Body bytes not yet received.
        remaining: u64,
    },
    /// A `/sleep` waits for its timer; later pipelined requests wait behind it.
    Sleeping {
        /// The requested delay, echoed in the body.
        ms: u64,
        /// How the request is answered.
        exchange: Exchange,
    },
    /// The last response is written; the connection closes once it is flushed.
    Closing,
}

/// What a read from the socket produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Bytes were appended to the input buffer.
    Data,
    /// Nothing more to read until the next readable event.
    Drained,
    /// The client shut down its sending side.
    Eof,
}

/// An accepted client connection.
#[derive(Debug)]
pub struct Connection {
    /// The non-blocking socket.
    pub stream: TcpStream,
    /// Unique for the worker's life, so a timer set for a closed connection cannot fire
    /// on a later one that reuses its token.
    pub serial: u64,
    /// Where the current request stands.
    pub stage: Stage,
    /// The client has sent at least one byte.
    pub heard_from: bool,
    /// The client shut down its sending side.
    pub peer_closed: bool,
    /// Registered with the worker's poll. A connection is registered only once it outlives
    /// its first turn: one whose request came with the handshake is usually answered and
    /// closed before epoll ever hears of it (one `epoll_ctl` fewer per connection).
    pub watched: bool,
    /// `WRITABLE` is part of the registered interest.
    pub watching_writable: bool,
    /// Waiting to be driven again on the next turn of the loop (its budget ran out).
    pub queued: bool,
    /// Received bytes; those before `start` are consumed.
    input: Vec<u8>,
    start: usize,
    /// How far the current head has been looked at.
    scan: HeadScan,
    output: Vec<u8>,
    flushed: usize,
    /// Since when the connection has had nothing in progress (accepted, or last answered).
    idle_since: Instant,
    /// When the first byte of the current head arrived.
    head_since: Option<Instant>,
    /// The last read that brought bytes (or the start of the body).
    read_at: Instant,
    /// Since when output has been waiting without the client reading any of it.
    stalled_since: Option<Instant>,
}

impl Connection {
    /// Wraps a freshly accepted socket; buffers are allocated on first use.
    pub fn new(stream: TcpStream, serial: u64, now: Instant) -> Connection {
        Connection {
            stream,
            serial,
            stage: Stage::Head,
            heard_from: false,
            peer_closed: false,
            watched: false,
            watching_writable: false,
            queued: false,
            input: Vec::new(),
            start: 0,
            scan: HeadScan::default(),
            output: Vec::new(),
            flushed: 0,
            idle_since: now,
            head_since: None,
            read_at: now,
            stalled_since: None,
        }
    }

    /// Received bytes not yet consumed: a partial head, body bytes or pipelined requests.
    pub fn input(&self) -> &[u8] {
        &self.input[self.start..]
    }

    /// Drops the first `len` bytes of input (a parsed head or discarded body). Moves no
    /// memory: the consumed bytes are reclaimed when the buffer empties or before a read.
    pub fn consume(&mut self, len: usize) {
        self.start = (self.start + len).min(self.input.len());
        if self.start == self.input.len() {
            self.input.clear();
            self.start = 0;
            if self.input.capacity() > KEPT_CAPACITY {
                self.input = Vec::new();
            }
        }
    }

    /// Looks at the input for the current request's head, picking up where the last look
    /// stopped; a complete head resets the scan for the next one (once consumed).
    pub fn scan_head(&mut self, now: Instant) -> Result<Option<RequestHead<'_>>, Rejection> {
        if self.head_since.is_none() && !self.input().is_empty() {
            self.head_since = Some(now);
        }
        let head = self.scan.advance(&self.input[self.start..])?;
        if head.is_some() {
            self.scan = HeadScan::default();
            self.head_since = None;
            self.read_at = now;
        }
        Ok(head)
    }

    /// A response was written: the connection is idle from now unless more is buffered.
    pub fn answered(&mut self, now: Instant) {
        self.idle_since = now;
    }

    /// When this connection is given up on, if it is waiting for its client: the head,
    /// idle and body timeouts by stage, and the send timeout while output is not read.
    /// `None` while the worker itself makes it wait (a `/sleep`).
    pub fn deadline(&self, timeouts: &Timeouts) -> Option<Instant> {
        if let Some(since) = self.stalled_since {
            return Some(since + timeouts.send);
        }
        match self.stage {
            Stage::Sleeping { .. } | Stage::Closing => None,
            Stage::Body { .. } => Some(self.read_at + timeouts.body),
            Stage::Head => Some(match self.head_since {
                Some(since) => since + timeouts.header,
                None if self.input().is_empty() && !self.heard_from => {
                    self.idle_since + timeouts.header
                }
                None if self.input().is_empty() => self.idle_since + timeouts.idle,
                // Pipelined bytes not looked at yet: the head timeout from the last answer.
                None => self.idle_since + timeouts.header,
            }),
        }
    }

    /// Whether output is waiting for the client to read (the send timeout applies).
    pub fn stalled(&self) -> bool {
        self.stalled_since.is_some()
    }

    /// Forgets all buffered input (nothing after a closing response is answered).
    pub fn discard_input(&mut self) {
        self.consume(self.input.len());
        self.scan = HeadScan::default();
        self.head_since = None;
    }

    /// The buffer responses are appended to.
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.output
    }

    /// Bytes written to the output buffer but not yet to the socket.
    pub fn pending_output(&self) -> usize {
        self.output.len() - self.flushed
    }

    /// Too much output is waiting for the client to read it.
    pub fn backlogged(&self) -> bool {
        self.pending_output() > OUTPUT_BACKLOG
    }

    /// Nothing in progress: no partial request, no body or timer pending, all output sent.
    pub fn is_idle(&self) -> bool {
        self.stage == Stage::Head && self.input().is_empty() && self.pending_output() == 0
    }

    /// Since when the connection has been idle (meaningful when [`Connection::is_idle`]).
    pub fn idle_since(&self) -> Instant {
        self.idle_since
    }

    /// One `read(2)` into `scratch`, appended to the input buffer.
    pub fn fill(&mut self, scratch: &mut [u8], now: Instant) -> io::Result<Fill> {
        // Reclaim consumed bytes before the buffer grows: at most what is left is moved,
        // and only once at least as much was consumed.
        if self.start > 0 && self.start >= self.input.len() - self.start {
            self.input.drain(..self.start);
            self.start = 0;
        }
        loop {
            return match self.stream.read(scratch) {
                Ok(0) => Ok(Fill::Eof),
                Ok(len) => {
                    self.input.extend_from_slice(&scratch[..len]);
                    self.heard_from = true;
                    self.read_at = now;
                    Ok(Fill::Data)
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(Fill::Drained),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => Err(error),
            };
        }
    }

    /// Writes pending output until it is all sent or the socket buffer is full.
    pub fn flush(&mut self, now: Instant) -> io::Result<()> {
        let mut wrote = false;
        while self.pending_output() > 0 {
            match self.stream.write(&self.output[self.flushed..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(len) => {
                    self.flushed += len;
                    wrote = true;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    if wrote || self.stalled_since.is_none() {
                        self.stalled_since = Some(now);
                    }
                    return Ok(());
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        self.stalled_since = None;
        self.output.clear();
        self.flushed = 0;
        if self.output.capacity() > KEPT_CAPACITY {
            self.output = Vec::new();
        }
        Ok(())
    }

    /// Closes after the last response: sends FIN, then swallows what the client already
    /// sent, so closing with unread data does not reset the connection under the response.
    pub fn linger(self, scratch: &mut [u8]) {
        let mut stream = self.stream;
        if stream.shutdown(Shutdown::Write).is_err() {
            return;
        }
        for _ in 0..LINGER_READS {
            match stream.read(scratch) {
                Ok(len) if len > 0 => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                _ => return,
            }
        }
    }
}

/// Open connections by index (poll token minus a fixed offset), reusing freed indices.
#[derive(Debug, Default)]
pub struct Connections {
    slots: Vec<Option<Connection>>,
    vacant: Vec<usize>,
    open: usize,
}

impl Connections {
    /// Stores `connection` and returns its index.
    pub fn insert(&mut self, connection: Connection) -> usize {
        self.open += 1;
        match self.vacant.pop() {
            Some(index) => {
                self.slots[index] = Some(connection);
                index
            }
            None => {
                self.slots.push(Some(connection));
                self.slots.len() - 1
            }
        }
    }

    /// The connection at `index`, if open.
    pub fn get_mut(&mut self, index: usize) -> Option<&mut Connection> {
        self.slots.get_mut(index).and_then(Option::as_mut)
    }

    /// Takes the connection at `index` out of the table, freeing its index.
    pub fn remove(&mut self, index: usize) -> Option<Connection> {
        let connection = self.slots.get_mut(index)?.take()?;
        self.open -= 1;
        self.vacant.push(index);
        Some(connection)
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.open
    }

    /// No connection is open.
    pub fn is_empty(&self) -> bool {
        self.open == 0
    }

    /// One past the highest index ever used: iterate `0..span()` to visit every connection.
    pub fn span(&self) -> usize {
        self.slots.len()
    }
}
