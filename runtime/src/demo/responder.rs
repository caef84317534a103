//! Answering the requests of one connection: reading, parsing, routing, timers for
//! `/sleep`, and writing responses in order, as far as the connection allows without waiting.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::{self, Write as _};
use std::time::{Duration, Instant};

use tracing::debug;

use super::DemoOptions;
use super::connection::{Connection, Exchange, Fill, Stage};
use super::faults;
use super::http::{self, Response, Status};
use super::routes::{self, Route};
use crate::ipc::Counters;

/// A `/sleep` response due at `wake_at` on connection `index`, if it is still `serial`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Sleeper {
    /// When the response is due.
    pub wake_at: Instant,
    /// The connection's index in the table.
    pub index: usize,
    /// The connection's serial: a later connection on the same index is not woken.
    pub serial: u64,
}

/// How a pass over a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Still open: wait for the next event or timer.
    Keep,
    /// Everything owed is sent: close politely.
    Close,
    /// The socket failed: drop it.
    Drop,
}

/// What answering needs besides the connection: identity, counters, timers, drain state.
#[derive(Debug)]
pub struct Responder {
    options: DemoOptions,
    pid: u32,
    counters: Counters,
    draining: bool,
    sleepers: BinaryHeap<Reverse<Sleeper>>,
    /// Reused for every response body, so answering allocates nothing once warm.
    body: String,
}

impl Responder {
    /// A responder for this process, not draining, with zeroed counters.
    pub fn new(options: DemoOptions) -> Responder {
        Responder {
            options,
            pid: std::process::id(),
            counters: Counters::default(),
            draining: false,
            sleepers: BinaryHeap::new(),
            body: String::new(),
        }
    }

    /// The worker's identity and options.
    pub fn options(&self) -> DemoOptions {
        self.options
    }

    /// Connections accepted and requests answered so far (`active` is the caller's to fill).
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Counts an accepted connection.
    pub fn count_accepted(&mut self) {
        self.counters.accepted += 1;
    }

    /// From now on every response closes its connection.
    pub fn start_draining(&mut self) {
        self.draining = true;
    }

    /// A drain has started.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// When the earliest pending `/sleep` is due.
    pub fn next_wake(&self) -> Option<Instant> {
        self.sleepers.peek().map(|Reverse(sleeper)| sleeper.wake_at)
    }

    /// Takes the earliest `/sleep` if it is due at `now`.
    pub fn due_sleeper(&mut self, now: Instant) -> Option<Sleeper> {
        let Reverse(sleeper) = *self.sleepers.peek()?;
        (sleeper.wake_at <= now).then(|| {
            self.sleepers.pop();
            sleeper
        })
    }

    /// Answers the `/sleep` `connection` waits for, if it still waits; the caller then
    /// drives the connection on to its pipelined requests.
    pub fn finish_sleep(&mut self, connection: &mut Connection) {
        if let Stage::Sleeping { ms, exchange } = connection.stage {
            connection.stage = Stage::Head;
            self.respond(
                connection,
                exchange,
                Status::Ok,
                format_args!("slept {ms} ms\n"),
            );
        }
    }

    /// Alternates answering buffered requests, flushing and reading, until the connection
    /// has to wait (for the socket, a timer or the client) or is done.
    pub fn pump(
        &mut self,
        connection: &mut Connection,
        index: usize,
        scratch: &mut [u8],
    ) -> Verdict {
        loop {
            self.answer_buffered(connection, index);
            if let Err(error) = connection.flush() {
                debug!(%error, "connection write failed");
                return Verdict::Drop;
            }
            match connection.stage {
                Stage::Closing if connection.pending_output() == 0 => return Verdict::Close,
                Stage::Closing | Stage::Sleeping { .. } => return Verdict::Keep,
                Stage::Head | Stage::Body { .. } => {}
            }
            if connection.backlogged() {
                return Verdict::Keep;
            }
            if connection.peer_closed {
                // Every complete request is answered; what is left can never complete.
                connection.stage = Stage::Closing;
                continue;
            }
            match connection.fill(scratch) {
                Ok(Fill::Data) => {}
                Ok(Fill::Eof) => connection.peer_closed = true,
                Ok(Fill::Drained) => return Verdict::Keep,
                Err(error) => {
                    debug!(%error, "connection read failed");
                    return Verdict::Drop;
                }
            }
        }
    }

    /// Answers the requests complete in the input buffer, in order, until one has to wait.
    fn answer_buffered(&mut self, connection: &mut Connection, index: usize) {
        while !connection.backlogged() {
            match connection.stage {
                Stage::Closing | Stage::Sleeping { .. } => return,
                Stage::Body {
                    route,
                    exchange,
                    remaining,
                } => {
                    let available = connection.input().len();
                    let taken = usize::try_from(remaining)
                        .map_or(available, |remaining| remaining.min(available));
                    connection.consume(taken);
                    let remaining = remaining - taken as u64;
                    if remaining > 0 {
                        connection.stage = Stage::Body {
                            route,
                            exchange,
                            remaining,
                        };
                        return;
                    }
                    connection.stage = Stage::Head;
                    self.dispatch(connection, index, route, exchange);
                }
                Stage::Head if connection.input().is_empty() => return,
                Stage::Head => {
                    if !self.start_request(connection, index) {
                        return;
                    }
                }
            }
        }
    }

    /// Parses the head at the start of the input and answers it, or sets up reading its
    /// body. Returns `false` when the head is incomplete or was rejected.
    fn start_request(&mut self, connection: &mut Connection, index: usize) -> bool {
        let head = match http::parse_head(connection.input()) {
            Ok(Some(head)) => head,
            Ok(None) => return false,
            Err(rejection) => {
                let exchange = Exchange {
                    head_only: false,
                    keep_alive: false,
                };
                self.respond(
                    connection,
                    exchange,
                    rejection.status(),
                    rejection.explanation(),
                );
                return false;
            }
        };
        let route = routes::resolve(head.method, head.target, self.options.faults);
        let exchange = Exchange {
            head_only: head.method == "HEAD",
            keep_alive: head.keep_alive,
        };
        let (head_len, body_len, expects_continue) =
            (head.len, head.content_length, head.expects_continue);
        connection.consume(head_len);
        if body_len == 0 {
            self.dispatch(connection, index, route, exchange);
        } else {
            if expects_continue {
                connection.output().extend_from_slice(http::CONTINUE);
            }
            connection.stage = Stage::Body {
                route,
                exchange,
                remaining: body_len,
            };
        }
        true
    }

    /// Carries out a request whose body (if any) has been read.
    fn dispatch(
        &mut self,
        connection: &mut Connection,
        index: usize,
        route: Route,
        exchange: Exchange,
    ) {
        let (slot, pid) = (self.options.slot, self.pid);
        match route {
            Route::Hello => {
                self.respond(
                    connection,
                    exchange,
                    Status::Ok,
                    format_args!("hello from worker {slot} (pid {pid})\n"),
                );
            }
            Route::Sleep { ms } => {
                connection.stage = Stage::Sleeping { ms, exchange };
                let wake_at = Instant::now() + Duration::from_millis(ms);
                self.sleepers.push(Reverse(Sleeper {
                    wake_at,
                    index,
                    serial: connection.serial,
                }));
            }
            Route::Block { ms } => {
                faults::hang(ms);
                self.respond(
                    connection,
                    exchange,
                    Status::Ok,
                    format_args!("blocked {ms} ms\n"),
                );
            }
            Route::Crash => faults::crash(),
            Route::Alloc { mb } => {
                faults::grow(mb);
                self.respond(
                    connection,
                    exchange,
                    Status::Ok,
                    format_args!("allocated {mb} MiB\n"),
                );
            }
            Route::Reject {
                status,
                explanation,
            } => self.respond(connection, exchange, status, explanation),
        }
    }

    /// Appends a response; a response that ends the connection (the client's wish, a
    /// rejection or a drain) makes it close once flushed, forgetting any pipelined input.
    fn respond(
        &mut self,
        connection: &mut Connection,
        exchange: Exchange,
        status: Status,
        body: impl fmt::Display,
    ) {
        self.body.clear();
        // Formatting into a String cannot fail.
        let _ = write!(self.body, "{body}");
        let keep_alive = exchange.keep_alive && !self.draining;
        let response = Response {
            status,
            body: &self.body,
            slot: self.options.slot,
            head_only: exchange.head_only,
            keep_alive,
        };
        http::write_response(connection.output(), &response);
        self.counters.requests += 1;
        if !keep_alive {
            connection.stage = Stage::Closing;
            connection.discard_input();
        }
    }
}
