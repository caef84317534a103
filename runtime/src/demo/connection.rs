//! One client connection (its socket, buffers and where its current request stands) and
//! the table of open connections, indexed by their poll token.

use std::io::{self, Read as _, Write as _};
use std::net::Shutdown;

use mio::net::TcpStream;

use super::routes::Route;

/// Unflushed output above which no further pipelined request is answered (nor read) until
/// the client catches up.
const OUTPUT_BACKLOG: usize = 64 * 1024;

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
    /// `WRITABLE` is part of the registered interest.
    pub watching_writable: bool,
    input: Vec<u8>,
    output: Vec<u8>,
    flushed: usize,
}

impl Connection {
    /// Wraps a freshly accepted socket; buffers are allocated on first use.
    pub fn new(stream: TcpStream, serial: u64) -> Connection {
        Connection {
            stream,
            serial,
            stage: Stage::Head,
            heard_from: false,
            peer_closed: false,
            watching_writable: false,
            input: Vec::new(),
            output: Vec::new(),
            flushed: 0,
        }
    }

    /// Received bytes not yet consumed: a partial head, body bytes or pipelined requests.
    pub fn input(&self) -> &[u8] {
        &self.input
    }

    /// Drops the first `len` bytes of input (a parsed head or discarded body).
    pub fn consume(&mut self, len: usize) {
        self.input.drain(..len.min(self.input.len()));
        if self.input.is_empty() && self.input.capacity() > KEPT_CAPACITY {
            self.input = Vec::new();
        }
    }

    /// Forgets all buffered input (nothing after a closing response is answered).
    pub fn discard_input(&mut self) {
        self.consume(self.input.len());
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
        self.stage == Stage::Head && self.input.is_empty() && self.pending_output() == 0
    }

    /// One `read(2)` into `scratch`, appended to the input buffer.
    pub fn fill(&mut self, scratch: &mut [u8]) -> io::Result<Fill> {
        loop {
            return match self.stream.read(scratch) {
                Ok(0) => Ok(Fill::Eof),
                Ok(len) => {
                    self.input.extend_from_slice(&scratch[..len]);
                    self.heard_from = true;
                    Ok(Fill::Data)
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(Fill::Drained),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => Err(error),
            };
        }
    }

    /// Writes pending output until it is all sent or the socket buffer is full.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.pending_output() > 0 {
            match self.stream.write(&self.output[self.flushed..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(len) => self.flushed += len,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
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
    /// The index the next [`Connections::insert`] will use.
    pub fn next_index(&self) -> usize {
        self.vacant.last().copied().unwrap_or(self.slots.len())
    }

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
