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
    /// Still open, with work left that this turn's budget did not cover: drive it again on
    /// the next turn of the loop (no event will say so).
    Again,
    /// Everything owed is sent: close politely.
    Close,
    /// The socket failed, or the client went away: drop it.
    Drop,
}

/// Requests one connection may have answered per turn of the event loop. A client that
/// pipelines thousands of requests then waits its turn like everyone else, and the loop
/// gets back to other connections, the listener and the primary's pings in between.
pub const REQUESTS_PER_TURN: u32 = 16;

/// Reads (of up to 8 KiB) from one connection per turn of the event loop.
pub const READS_PER_TURN: u32 = 4;

/// What one connection may still do in this turn.
#[derive(Debug, Clone, Copy)]
struct Budget {
    requests: u32,
    reads: u32,
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

    /// Drops the timers of `/sleep`s whose connection is gone (`live` says which are not)
    /// once they outnumber the `sleeping` connections twice over: a client that asks for a
    /// long sleep and hangs up must not leave its timer behind for minutes.
    pub fn forget_stale_sleepers(
        &mut self,
        sleeping: usize,
        mut live: impl FnMut(&Sleeper) -> bool,
    ) {
        if self.sleepers.len() > 2 * sleeping + 64 {
            self.sleepers.retain(|Reverse(sleeper)| live(sleeper));
        }
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
    pub fn finish_sleep(&mut self, connection: &mut Connection, now: Instant) {
        if let Stage::Sleeping { ms, exchange } = connection.stage {
            connection.stage = Stage::Head;
            self.respond(
                connection,
                exchange,
                Status::Ok,
                format_args!("slept {ms} ms\n"),
                now,
            );
        }
    }

    /// Alternates answering buffered requests, flushing and reading, until the connection
    /// has to wait (for the socket, a timer or the client), is done, or has used up this
    /// turn's budget ([`REQUESTS_PER_TURN`], [`READS_PER_TURN`]). `hung_up` is the event's
    /// word that the client closed or reset the connection.
    pub fn pump(
        &mut self,
        connection: &mut Connection,
        index: usize,
        scratch: &mut [u8],
        hung_up: bool,
        now: Instant,
    ) -> Verdict {
        let mut budget = Budget {
            requests: REQUESTS_PER_TURN,
            reads: READS_PER_TURN,
        };
        // Set once a read finds the socket empty. No readable event comes for what is
        // already buffered, so the loop goes round once more to answer it (a pipelining
        // client that has sent everything waits for exactly that), and only then waits.
        let mut drained = false;
        loop {
            self.answer_buffered(connection, index, &mut budget, now);
            if let Err(error) = connection.flush(now) {
                debug!(%error, "connection write failed");
                return Verdict::Drop;
            }
            match connection.stage {
                Stage::Closing if connection.pending_output() == 0 => return Verdict::Close,
                Stage::Closing => return Verdict::Keep,
                Stage::Sleeping { .. } => return watch_sleeper(connection, scratch, hung_up, now),
                Stage::Head | Stage::Body { .. } => {}
            }
            if connection.backlogged() {
                return Verdict::Keep;
            }
            if budget.requests == 0 || budget.reads == 0 {
                return Verdict::Again;
            }
            if drained {
                return Verdict::Keep;
            }
            if connection.peer_closed {
                // Every complete request is answered; what is left can never complete.
                connection.stage = Stage::Closing;
                continue;
            }
            budget.reads -= 1;
            match connection.fill(scratch, now) {
                Ok(Fill::Data) => {}
                Ok(Fill::Eof) => connection.peer_closed = true,
                Ok(Fill::Drained) => drained = true,
                Err(error) => {
                    debug!(%error, "connection read failed");
                    return Verdict::Drop;
                }
            }
        }
    }

    /// Answers the requests complete in the input buffer, in order, until one has to wait
    /// or the budget is spent.
    fn answer_buffered(
        &mut self,
        connection: &mut Connection,
        index: usize,
        budget: &mut Budget,
        now: Instant,
    ) {
        while !connection.backlogged() && budget.requests > 0 {
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
                    budget.requests -= 1;
                    self.dispatch(connection, index, route, exchange, now);
                }
                Stage::Head if connection.input().is_empty() => return,
                Stage::Head => {
                    if !self.start_request(connection, index, budget, now) {
                        return;
                    }
                }
            }
        }
    }

    /// Looks for the head at the start of the input and answers it, or sets up reading its
    /// body. Returns `false` when the head is incomplete or was rejected.
    fn start_request(
        &mut self,
        connection: &mut Connection,
        index: usize,
        budget: &mut Budget,
        now: Instant,
    ) -> bool {
        let head = match connection.scan_head(now) {
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
                    now,
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
            budget.requests -= 1;
            self.dispatch(connection, index, route, exchange, now);
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
        now: Instant,
    ) {
        let (slot, pid) = (self.options.slot, self.pid);
        match route {
            Route::Hello => {
                self.respond(
                    connection,
                    exchange,
                    Status::Ok,
                    format_args!("hello from worker {slot} (pid {pid})\n"),
                    now,
                );
            }
            Route::Sleep { ms } => {
                connection.stage = Stage::Sleeping { ms, exchange };
                let wake_at = now + Duration::from_millis(ms);
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
                    now,
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
                    now,
                );
            }
            Route::Reject {
                status,
                explanation,
            } => self.respond(connection, exchange, status, explanation, now),
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
        now: Instant,
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
        connection.answered(now);
        self.counters.requests += 1;
        if !keep_alive {
            connection.stage = Stage::Closing;
            connection.discard_input();
        }
    }
}

/// Keeps an eye on a connection whose `/sleep` is pending: a client that closed or reset it
/// is dropped at once (nginx's 499), so its descriptor and buffers do not wait for the
/// timer. Pipelined bytes are kept, up to one head's worth; past that the client is not
/// read until its sleep ends, and the event's hang-up flag still tells a close.
fn watch_sleeper(
    connection: &mut Connection,
    scratch: &mut [u8],
    hung_up: bool,
    now: Instant,
) -> Verdict {
    if hung_up {
        return Verdict::Drop;
    }
    while connection.input().len() < http::MAX_HEAD_BYTES {
        match connection.fill(scratch, now) {
            Ok(Fill::Data) => {}
            Ok(Fill::Drained) => return Verdict::Keep,
            Ok(Fill::Eof) => return Verdict::Drop,
            Err(error) => {
                debug!(%error, "connection read failed");
                return Verdict::Drop;
            }
        }
    }
    Verdict::Keep
}
