//! The demo worker's event loop: one `mio` poll over the listener, the IPC channel and every
//! client connection, with a timer heap for `/sleep` and a sweep for client timeouts.
//!
//! Each turn of the loop is bounded, so no client can starve the others or the primary's
//! pings: each connection gets a budget of requests and reads per turn (and, when that runs
//! out, another turn after everyone else), and at most [`ACCEPT_BUDGET`] connections are
//! accepted per turn. The worker keeps at most its connection cap, below its descriptor
//! limit, shedding idle connections when full ([`super::admission`]), and pauses accepting
//! instead of spinning if `accept` still runs out of descriptors ([`crate::accept`]).

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use tracing::{debug, error, info, warn};

use super::DemoOptions;
use super::admission;
use super::connection::{Connection, Connections, Stage};
use super::responder::{Responder, Verdict};
use crate::accept::{AcceptPause, is_exhaustion};
use crate::ipc::{Channel, Counters, IpcError, Message, Received};
use crate::steering::LoadReporter;

/// Every TCP listener (the queues are emptied on every wake, whichever one woke it).
const LISTENER: Token = Token(0);
/// Every UDP socket (each is read on every wake, [`DATAGRAM_BUDGET`] at a time).
const DATAGRAMS: Token = Token(usize::MAX);
const CHANNEL: Token = Token(1);
/// The QUIC thread is done after a drain (`quic` feature).
#[cfg(feature = "quic")]
const QUIC_DONE: Token = Token(usize::MAX - 1);
/// Connection `i` is registered as `Token(FIRST_CONNECTION + i)`.
const FIRST_CONNECTION: usize = 2;

/// Longest poll while the listener is open. Connections the kernel migrates here from a
/// closing listener raise no epoll event, so the queue is also polled this often.
const ACCEPT_INTERVAL: Duration = Duration::from_millis(50);

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// Connections accepted per turn of the loop; the rest wait for the next turn.
const ACCEPT_BUDGET: usize = 64;

/// Datagrams answered per UDP socket per turn of the loop; the rest on the next turn.
const DATAGRAM_BUDGET: usize = ACCEPT_BUDGET * 4;

/// `SO_SNDBUF` of every connection (the kernel doubles it for its bookkeeping).
pub(crate) const SEND_BUFFER: usize = 32 * 1024;

/// How long a draining worker keeps idle connections: one that has sent nothing yet may
/// have been queued just before the drain, and a keep-alive client may be sending its next
/// request right now. Each is answered with `Connection: close` if its request comes in
/// time.
pub(crate) const IDLE_GRACE: Duration = Duration::from_secs(2);

/// The event loop and everything it owns.
pub struct Server {
    poll: Poll,
    /// The TCP listeners, in the listeners' order; empty once draining.
    listeners: Vec<TcpListener>,
    /// The UDP listeners' sockets: every datagram is answered with one datagram. Empty
    /// once draining: each was read until empty, then closed.
    datagrams: Vec<mio::net::UdpSocket>,
    /// A UDP socket's budget ran out on the last turn: datagrams are still queued, and the
    /// edge-triggered poll will not say so again.
    datagrams_left: bool,
    /// What each answer starts with: `<slot> <pid> <generation> `.
    datagram_prefix: Vec<u8>,
    channel: Channel,
    connections: Connections,
    responder: Responder,
    next_serial: u64,
    /// While draining: when idle connections are given up on.
    idle_deadline: Option<Instant>,
    scratch: Vec<u8>,
    /// Where this worker's load is published (`least-loaded`).
    load: Option<LoadReporter>,
    /// Most connections kept open (see [`admission::connection_cap`]).
    max_connections: usize,
    /// Connections whose budget ran out, to drive again on the next turn.
    again: Vec<usize>,
    /// The accept budget ran out: more may be queued.
    backlog: bool,
    /// Accepting paused after `accept` ran out of descriptors.
    pause: AcceptPause,
    /// Full with nothing idle to shed: when to look again.
    full_until: Option<Instant>,
    /// When connections are next checked against their timeouts.
    next_sweep: Instant,
    /// The listener has `TCP_NODELAY` and `SO_SNDBUF`, which the sockets it accepts inherit.
    listener_nodelay: bool,
    /// The channel to the primary closed or failed: the loop ends at its next turn.
    gone: std::cell::Cell<Option<Gone>>,
    /// HTTP/3 on the QUIC listeners, on a thread of its own.
    #[cfg(feature = "quic")]
    quic: Option<super::quic::QuicSide>,
}

/// Why the channel to the primary is no longer usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gone {
    /// The primary closed its end: nobody is left to drain or supervise this worker.
    Primary,
    /// The channel failed otherwise; the primary will see the exit and replace us.
    Failed,
}

impl Server {
    /// Registers the listeners, the UDP sockets and the (now non-blocking) channel with a
    /// new poll.
    pub fn new(
        sockets: Vec<crate::worker::ListenerSocket>,
        channel: Channel,
        options: DemoOptions,
        load: Option<LoadReporter>,
    ) -> io::Result<Server> {
        channel.set_nonblocking(true)?;
        let poll = Poll::new()?;
        // Accepted sockets inherit TCP_NODELAY and a locked SO_SNDBUF from their listener:
        // two setsockopts here instead of two for each connection (each one in ten of a
        // new connection's calls).
        let mut listeners = Vec::new();
        let mut datagrams = Vec::new();
        let mut listener_nodelay = true;
        for socket in sockets {
            match socket {
                crate::worker::ListenerSocket::Tcp(listener) => {
                    let options = socket2::SockRef::from(&listener);
                    listener_nodelay &= options.set_tcp_nodelay(true).is_ok()
                        && options.set_send_buffer_size(SEND_BUFFER).is_ok();
                    listener.set_nonblocking(true)?;
                    let mut listener = TcpListener::from_std(listener);
                    poll.registry()
                        .register(&mut listener, LISTENER, Interest::READABLE)?;
                    listeners.push(listener);
                }
                crate::worker::ListenerSocket::Udp(socket) => {
                    socket.set_nonblocking(true)?;
                    let mut socket = mio::net::UdpSocket::from_std(socket);
                    poll.registry()
                        .register(&mut socket, DATAGRAMS, Interest::READABLE)?;
                    datagrams.push(socket);
                }
            }
        }
        let listener_nodelay = listener_nodelay && !listeners.is_empty();
        let datagram_prefix = format!(
            "{} {} {} ",
            options.slot,
            std::process::id(),
            options.generation
        )
        .into_bytes();
        poll.registry().register(
            &mut SourceFd(&channel.as_raw_fd()),
            CHANNEL,
            Interest::READABLE,
        )?;
        Ok(Server {
            poll,
            listeners,
            datagrams,
            datagrams_left: false,
            datagram_prefix,
            channel,
            connections: Connections::default(),
            responder: Responder::new(options),
            next_serial: 0,
            idle_deadline: None,
            scratch: vec![0; READ_CHUNK],
            load,
            max_connections: admission::process_connection_cap(),
            again: Vec::new(),
            backlog: false,
            pause: AcceptPause::default(),
            full_until: None,
            next_sweep: Instant::now(),
            listener_nodelay,
            gone: std::cell::Cell::new(None),
            #[cfg(feature = "quic")]
            quic: None,
        })
    }

    /// Serves HTTP/3 on `sockets` (the QUIC listeners') on a thread of its own, which
    /// wakes this loop once its connections are gone after a drain.
    #[cfg(feature = "quic")]
    pub(crate) fn with_quic(
        mut self,
        sockets: Vec<std::net::UdpSocket>,
        setup: super::quic::QuicSetup,
    ) -> io::Result<Server> {
        if sockets.is_empty() {
            return Ok(self);
        }
        let waker = mio::Waker::new(self.poll.registry(), QUIC_DONE)?;
        let wake = move || {
            if let Err(error) = waker.wake() {
                warn!(%error, "could not wake the loop after the QUIC drain");
            }
        };
        self.quic = Some(super::quic::QuicSide::start(sockets, setup, wake)?);
        Ok(self)
    }

    /// Whether the QUIC side (if any) has no connection left after a drain.
    fn quic_done(&self) -> bool {
        #[cfg(feature = "quic")]
        if let Some(quic) = &self.quic {
            return quic.is_done();
        }
        true
    }

    /// Tells the primary the loop is up, then runs it until drained, or until the channel
    /// to the primary is gone: `Ok` when the primary closed it (nobody is left to drain or
    /// supervise this worker), an error when it failed otherwise. It never exits the
    /// process itself: its caller decides (the demo's entry exits 0 or 1).
    pub fn run(mut self) -> io::Result<()> {
        self.send(&Message::Ready { heartbeats: true });
        let DemoOptions {
            slot,
            generation,
            faults,
            ..
        } = self.responder.options();
        info!(
            slot,
            generation,
            faults,
            max_connections = self.max_connections,
            "demo worker ready"
        );
        let mut events = Events::with_capacity(256);
        loop {
            match self.gone.get() {
                None => {}
                Some(Gone::Primary) => {
                    info!("the primary is gone; exiting");
                    return Ok(());
                }
                Some(Gone::Failed) => {
                    return Err(io::Error::other("the IPC channel to the primary failed"));
                }
            }
            match self
                .poll
                .poll(&mut events, self.poll_timeout(Instant::now()))
            {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
            let mut datagrams_ready = self.datagrams_left;
            for event in &events {
                match event.token() {
                    // The queue is emptied below on every wake.
                    LISTENER => {}
                    DATAGRAMS => datagrams_ready = true,
                    CHANNEL => self.receive_messages(),
                    Token(token) => {
                        if let Some(index) = token.checked_sub(FIRST_CONNECTION) {
                            self.drive(index, event.is_read_closed() || event.is_error());
                        }
                    }
                }
            }
            if datagrams_ready {
                self.answer_datagrams();
            }
            self.drive_again();
            self.accept_queued();
            let now = Instant::now();
            self.wake_sleepers(now);
            self.give_up_on_silent(now);
            self.sweep(now);
            if self.responder.is_draining() && self.connections.is_empty() && self.quic_done() {
                info!(slot, generation, "drained");
                return Ok(());
            }
        }
    }

    /// The poll timeout: none while work is left from this turn, else the next timer, and
    /// at most [`ACCEPT_INTERVAL`] while accepting.
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        let accepting = !self.listeners.is_empty();
        if !self.again.is_empty()
            || self.datagrams_left
            || (accepting && self.backlog && !self.pause.is_paused(now))
        {
            return Some(Duration::ZERO);
        }
        let accept = accepting.then_some(ACCEPT_INTERVAL);
        let sleeper = self.responder.next_wake();
        let sweep = (!self.connections.is_empty()).then_some(self.next_sweep);
        [sleeper, self.idle_deadline, sweep, self.pause.resumes_at()]
            .into_iter()
            .flatten()
            .map(|deadline| deadline.saturating_duration_since(now))
            .chain(accept)
            .min()
    }

    // ---- IPC ----

    /// Handles every queued message (the channel is edge-triggered).
    fn receive_messages(&mut self) {
        loop {
            match self.channel.recv() {
                Ok(None) => return,
                Ok(Some(Received {
                    message: Message::Connection,
                    fd: Some(fd),
                })) => self.admit_handed(fd),
                Ok(Some(received)) => self.obey(received.message),
                Err(IpcError::Closed) => return self.lost(Gone::Primary, None),
                Err(error) => return self.lost(Gone::Failed, Some(&error)),
            }
        }
    }

    fn obey(&mut self, message: Message) {
        match message {
            Message::Ping { seq } => {
                let counters = Counters {
                    active: u64::try_from(self.connections.len()).unwrap_or(u64::MAX),
                    ..self.responder.counters()
                };
                self.send(&Message::Pong { seq, counters });
            }
            Message::Drain => self.start_drain(),
            Message::User { from, data, .. } => debug!(?from, %data, "user message"),
            other => debug!(
                ?other,
                "ignoring an IPC message not meant for a running worker"
            ),
        }
    }

    fn send(&self, message: &Message) {
        match self.channel.send(message) {
            Ok(()) => {}
            Err(IpcError::Closed) => self.lost(Gone::Primary, None),
            // The primary is not reading; a lost pong reads as a slow worker, not a dead one.
            Err(IpcError::Full) => warn!(?message, "IPC socket full, message dropped"),
            Err(error) => self.lost(Gone::Failed, Some(&error)),
        }
    }

    /// The channel is gone; the loop ends at its next turn (the first reason wins).
    fn lost(&self, why: Gone, error: Option<&IpcError>) {
        if let Some(error) = error {
            error!(?error, "IPC channel failed; exiting");
        }
        if self.gone.get().is_none() {
            self.gone.set(Some(why));
        }
    }

    // ---- accepting and draining ----

    fn accept_queued(&mut self) {
        let now = Instant::now();
        self.pause.expire(now);
        if self.pause.is_paused(now) || self.full_until.is_some_and(|until| now < until) {
            return;
        }
        self.full_until = None;
        let mut backlog = false;
        for mut listener in std::mem::take(&mut self.listeners) {
            if self.accept_from(&listener, ACCEPT_BUDGET) {
                self.listeners.push(listener);
            } else if let Err(error) = self.poll.registry().deregister(&mut listener) {
                debug!(%error, "could not stop watching the shut-down listener");
            }
            backlog |= self.backlog;
        }
        self.backlog = backlog;
    }

    /// Answers what is queued on the UDP sockets, at most [`DATAGRAM_BUDGET`] datagrams
    /// each, so one flooded socket cannot starve the rest of the loop. What is left raises
    /// no new edge: `datagrams_left` has the loop look again at once.
    fn answer_datagrams(&mut self) {
        let mut buffer = DatagramBuffer::new(&self.datagram_prefix);
        let mut left = false;
        for socket in &self.datagrams {
            left |= !buffer.answer_queued(socket, DATAGRAM_BUDGET);
        }
        self.datagrams_left = left;
    }

    /// Accepts until the queue is empty or `budget` connections are taken (then
    /// [`Server::backlog`] says to come back next turn), or the worker is full with nothing
    /// idle to let go. Returns false once the listener is no longer
    /// listening: the primary shut it down because this worker stopped answering
    /// heartbeats (its queue went to the other workers). Open connections are still served.
    fn accept_from(&mut self, listener: &TcpListener, budget: usize) -> bool {
        self.backlog = false;
        for _ in 0..budget {
            if self.connections.len() >= self.max_connections && !self.make_room() {
                // Nothing idle to let go: the queue waits in the kernel until a connection
                // closes (or becomes idle); look again after a while.
                self.full_until = Some(Instant::now() + ACCEPT_INTERVAL);
                return true;
            }
            match listener.accept() {
                Ok((stream, _peer)) => self.admit(stream, !self.listener_nodelay),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return true,
                Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                    warn!("the primary shut this worker's listener down (declared hung)");
                    return false;
                }
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(error) => {
                    // Out of descriptors below the cap (something else holds them): let
                    // idle connections go, and pause instead of failing again at once.
                    if is_exhaustion(&error) {
                        self.make_room();
                    }
                    self.pause.failed(Instant::now(), "demo worker", &error);
                    return true;
                }
            }
        }
        self.backlog = true;
        true
    }

    /// Closes a batch of the longest-idle connections ([`admission::shed_count`]). Returns
    /// false when none is idle.
    fn make_room(&mut self) -> bool {
        let mut idle: Vec<(Instant, usize)> = (0..self.connections.span())
            .filter_map(|index| {
                let connection = self.connections.get_mut(index)?;
                connection
                    .is_idle()
                    .then(|| (connection.idle_since(), index))
            })
            .collect();
        let count = admission::shed_count(idle.len());
        if count == 0 {
            return false;
        }
        if count < idle.len() {
            idle.select_nth_unstable(count - 1);
        }
        debug!(
            count,
            idle = idle.len(),
            "full: closing the longest-idle connections"
        );
        for &(_, index) in &idle[..count] {
            self.close(index, Verdict::Close);
        }
        true
    }

    /// A connection the primary accepted and sent over IPC (`userspace` baseline).
    fn admit_handed(&mut self, fd: std::os::fd::OwnedFd) {
        let stream = std::net::TcpStream::from(fd);
        if self.connections.len() >= self.max_connections {
            self.make_room();
        }
        // The primary's `userspace` listener carries the demo's TCP_NODELAY and SO_SNDBUF,
        // and what it accepts inherits them, as from a worker's own listener.
        match stream.set_nonblocking(true) {
            Ok(()) => self.admit(TcpStream::from_std(stream), false),
            Err(error) => warn!(%error, "could not take a handed-over connection"),
        }
    }

    /// Watches an accepted connection; `tune` when it did not inherit TCP_NODELAY and
    /// SO_SNDBUF from its listener (setting them on the listener failed).
    fn admit(&mut self, stream: TcpStream, tune: bool) {
        // Small responses on keep-alive connections must not wait for Nagle.
        if tune && let Err(error) = stream.set_nodelay(true) {
            debug!(%error, "TCP_NODELAY failed");
        }
        // The demo's responses are small; a fixed send buffer bounds what a client that
        // never reads can make this worker compute and hold (autotuning would let it grow
        // to megabytes of responses per connection).
        if tune
            && let Err(error) = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER)
        {
            debug!(%error, "SO_SNDBUF failed");
        }
        self.responder.count_accepted();
        self.next_serial += 1;
        let index =
            self.connections
                .insert(Connection::new(stream, self.next_serial, Instant::now()));
        self.publish_load();
        // The request often arrived with the handshake: answer it before anything can
        // count this connection as idle. `drive` registers it with the poll only if it
        // stays open (edge-triggered: registering reports what is already readable).
        self.drive(index, false);
    }

    /// Publishes accepted and open connection counts for `least-loaded` (two stores into
    /// shared memory). A draining worker is out of steering: it publishes nothing more,
    /// so it cannot disturb the record of the worker that replaced it.
    fn publish_load(&self) {
        if let Some(load) = &self.load
            && !self.responder.is_draining()
        {
            let active = u64::try_from(self.connections.len()).unwrap_or(u64::MAX);
            load.publish(self.responder.counters().accepted, active);
        }
    }

    /// Stops accepting (after taking what is queued), and answers every datagram queued
    /// on the UDP sockets before closing them. Each connection's next request is answered
    /// with `Connection: close`; connections still idle after [`IDLE_GRACE`] are closed.
    fn start_drain(&mut self) {
        if self.responder.is_draining() {
            return;
        }
        info!(connections = self.connections.len(), "draining");
        self.responder.start_draining();
        #[cfg(feature = "quic")]
        if let Some(quic) = &self.quic {
            quic.drain();
        }
        // Before the last accepts: what they take gets the same grace as everyone else.
        self.idle_deadline = Some(Instant::now() + IDLE_GRACE);
        for mut listener in std::mem::take(&mut self.listeners) {
            if let Err(error) = self.poll.registry().deregister(&mut listener) {
                warn!(%error, "could not stop watching the listener");
            }
            // All of it, whatever the budget: what stays queued leaves with the listener.
            let _still_listening = self.accept_from(&listener, usize::MAX);
        }
        // The primary took the UDP sockets out of steering before asking for the drain:
        // nothing new reaches them. Answer all that is queued, whatever the budget, then
        // close them; a datagram left in a socket would be freed with it.
        let mut buffer = DatagramBuffer::new(&self.datagram_prefix);
        for mut socket in std::mem::take(&mut self.datagrams) {
            if let Err(error) = self.poll.registry().deregister(&mut socket) {
                warn!(%error, "could not stop watching a UDP socket");
            }
            let _emptied = buffer.answer_queued(&socket, usize::MAX);
        }
        self.datagrams_left = false;
        for index in 0..self.connections.span() {
            self.drive(index, false);
        }
    }

    /// Once the grace after a drain is over, closes the connections that are idle: those
    /// that never sent a byte and keep-alive connections between requests.
    fn give_up_on_silent(&mut self, now: Instant) {
        if self.idle_deadline.is_none_or(|deadline| deadline > now) {
            return;
        }
        self.idle_deadline = None;
        for index in 0..self.connections.span() {
            if self.connections.get_mut(index).is_some_and(|c| c.is_idle()) {
                self.close(index, Verdict::Close);
            }
        }
    }

    // ---- connections ----

    /// Checks every connection against its timeouts, every
    /// [`Timeouts::sweep_interval`](super::timeouts::Timeouts::sweep_interval): a client
    /// that keeps the worker waiting past one is closed (dropped if it is not reading).
    /// Forgets the timers of closed sleepers when they pile up.
    fn sweep(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        let timeouts = self.responder.options().timeouts;
        self.next_sweep = now + timeouts.sweep_interval();
        let mut sleeping = 0;
        for index in 0..self.connections.span() {
            let Some(connection) = self.connections.get_mut(index) else {
                continue;
            };
            sleeping += usize::from(matches!(connection.stage, Stage::Sleeping { .. }));
            if connection.deadline(&timeouts).is_some_and(|at| at <= now) {
                let verdict = if connection.stalled() {
                    Verdict::Drop
                } else {
                    Verdict::Close
                };
                debug!(index, ?verdict, stage = ?connection.stage, "client timed out");
                self.close(index, verdict);
            }
        }
        let connections = &mut self.connections;
        self.responder.forget_stale_sleepers(sleeping, |sleeper| {
            connections
                .get_mut(sleeper.index)
                .is_some_and(|c| c.serial == sleeper.serial)
        });
    }

    /// Drives the connections whose budget ran out on the last turn.
    fn drive_again(&mut self) {
        for index in std::mem::take(&mut self.again) {
            if let Some(connection) = self.connections.get_mut(index)
                && connection.queued
            {
                connection.queued = false;
                self.drive(index, false);
            }
        }
    }

    /// Reads, answers and writes what a connection allows now, then closes it or updates
    /// its interest. `hung_up`: the event said the client closed or reset it.
    fn drive(&mut self, index: usize, hung_up: bool) {
        let Some(connection) = self.connections.get_mut(index) else {
            return;
        };
        let mut verdict = self.responder.pump(
            connection,
            index,
            &mut self.scratch,
            hung_up,
            Instant::now(),
        );
        // A draining worker answers the next request on each connection with
        // `Connection: close`. Closing an idle keep-alive connection at once would race a
        // client that is sending on it right then (HAProxy's `idle-close-on-response`
        // reasoning), so idle connections get until the grace deadline; once it has
        // passed, none is kept.
        if verdict == Verdict::Keep
            && self.responder.is_draining()
            && self.idle_deadline.is_none()
            && connection.is_idle()
        {
            verdict = Verdict::Close;
        }
        if verdict == Verdict::Again && !connection.queued {
            connection.queued = true;
            self.again.push(index);
        }
        match verdict {
            Verdict::Keep | Verdict::Again => {
                let wants_writable = connection.pending_output() > 0;
                if !connection.watched || wants_writable != connection.watching_writable {
                    let interest = if wants_writable {
                        Interest::READABLE | Interest::WRITABLE
                    } else {
                        Interest::READABLE
                    };
                    self.watch(index, interest);
                }
            }
            Verdict::Close | Verdict::Drop => self.close(index, verdict),
        }
    }

    /// Registers connection `index` with the poll for `interest`, or changes its interest
    /// if it is registered already.
    fn watch(&mut self, index: usize, interest: Interest) {
        let Some(connection) = self.connections.get_mut(index) else {
            return;
        };
        let registry = self.poll.registry();
        let watched = if connection.watched {
            registry.reregister(&mut connection.stream, token_of(index), interest)
        } else {
            registry.register(&mut connection.stream, token_of(index), interest)
        };
        match watched {
            Ok(()) => {
                connection.watched = true;
                connection.watching_writable = interest.is_writable();
            }
            Err(error) => {
                warn!(%error, "could not watch a connection");
                self.close(index, Verdict::Drop);
            }
        }
    }

    fn close(&mut self, index: usize, verdict: Verdict) {
        let Some(connection) = self.connections.remove(index) else {
            return;
        };
        // No `deregister`: the socket's fd is not shared, and closing the last fd of a
        // file takes it out of the epoll set; an `EPOLL_CTL_DEL` first would be one more
        // system call per connection for nothing.
        if verdict == Verdict::Close {
            connection.linger(&mut self.scratch);
        }
        self.publish_load();
    }

    /// Answers every `/sleep` whose time has come, then resumes its connection.
    fn wake_sleepers(&mut self, now: Instant) {
        while let Some(sleeper) = self.responder.due_sleeper(now) {
            let Some(connection) = self.connections.get_mut(sleeper.index) else {
                continue;
            };
            if connection.serial == sleeper.serial {
                self.responder.finish_sleep(connection, now);
                self.drive(sleeper.index, false);
            }
        }
    }
}

/// Room for one answer: the prefix `<slot> <pid> <generation> `, then the datagram read
/// right behind it, so the answer goes out with no copy.
struct DatagramBuffer {
    bytes: Vec<u8>,
    prefix: usize,
}

impl DatagramBuffer {
    fn new(prefix: &[u8]) -> DatagramBuffer {
        let mut bytes = vec![0u8; prefix.len() + 65_536];
        bytes[..prefix.len()].copy_from_slice(prefix);
        DatagramBuffer {
            bytes,
            prefix: prefix.len(),
        }
    }

    /// Answers up to `budget` datagrams queued on `socket` (`recvfrom`, then `sendto` to
    /// the sender). Returns whether the socket is empty (`EAGAIN`). A datagram longer than
    /// 64 KiB is answered with what fits of it; an answer the socket cannot take now is
    /// lost, as a datagram may be.
    fn answer_queued(&mut self, socket: &mio::net::UdpSocket, budget: usize) -> bool {
        let prefix = self.prefix;
        for _ in 0..budget {
            match socket.recv_from(&mut self.bytes[prefix..]) {
                Ok((len, peer)) => {
                    let _lost_if_full = socket.send_to(&self.bytes[..prefix + len], peer);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return true,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                // An ICMP error of an earlier answer, reported here: nothing to do.
                Err(_) => {}
            }
        }
        false
    }
}

/// The poll token of connection `index`.
fn token_of(index: usize) -> Token {
    Token(FIRST_CONNECTION + index)
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read, Write};
    use std::net::TcpStream;
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::demo::Timeouts;

    fn server(listener: std::net::TcpListener) -> (Server, Channel) {
        let (primary, worker) = Channel::pair().expect("socketpair");
        let options = DemoOptions {
            slot: 0,
            generation: 1,
            faults: false,
            timeouts: Timeouts::default(),
        };
        let server = Server::new(
            vec![crate::worker::ListenerSocket::Tcp(listener)],
            worker,
            options,
            None,
        )
        .expect("server");
        (server, primary)
    }

    /// A connection still queued when the drain begins, whose request has not arrived
    /// yet, gets the drain's grace like every other idle connection, and is answered.
    #[test]
    fn a_connection_the_drain_accepts_gets_the_grace() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (mut server, _primary) = server(listener);
        let mut client = TcpStream::connect(addr).expect("connect");
        server.start_drain();
        assert_eq!(server.connections.len(), 1, "kept through the grace");
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .expect("send the request");
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.connections.len() == 1 && Instant::now() < deadline {
            for index in 0..server.connections.span() {
                server.drive(index, false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut reply = String::new();
        client.read_to_string(&mut reply).expect("the answer");
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.contains("Connection: close"), "{reply}");
    }

    /// A pipelining client that has sent everything and now only reads gets every answer.
    /// Events are simulated as edge-triggered epoll delivers them: the server is driven
    /// only when the client read from a connection that had output waiting (a writable
    /// edge) or when it asked to go again. A turn that ends with requests buffered but no
    /// output waiting would never be woken again; that was a lost wakeup.
    #[test]
    fn a_client_that_sent_everything_gets_every_answer() {
        // Whether the socket is empty while answers are held back depends on where reads
        // and the send buffer's edge fall, so several request counts are tried.
        for requests in (300..4000).step_by(170) {
            every_answer_without_a_lost_wakeup(requests);
        }
    }

    fn every_answer_without_a_lost_wakeup(requests: usize) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (mut server, _primary) = server(listener);
        let mut client = TcpStream::connect(addr).expect("connect");
        client
            .write_all("GET / HTTP/1.1\r\n\r\n".repeat(requests).as_bytes())
            .expect("every request fits in the socket buffers");
        client.set_nonblocking(true).expect("nonblocking");
        server.accept_queued();
        assert_eq!(server.connections.len(), 1);
        let mut answers = 0;
        let mut chunk = vec![0u8; 1 << 16];
        for _ in 0..100_000 {
            while !server.again.is_empty() {
                server.drive_again();
            }
            let waiting = server
                .connections
                .get_mut(0)
                .expect("open")
                .pending_output()
                > 0;
            let mut read = 0;
            loop {
                match client.read(&mut chunk) {
                    Ok(0) => panic!("closed after {answers} answers"),
                    Ok(len) => {
                        read += len;
                        answers += chunk[..len].windows(8).filter(|w| w == b"HTTP/1.1").count();
                    }
                    Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                    Err(error) => panic!("read: {error}"),
                }
            }
            if answers == requests {
                return;
            }
            // Request bytes that reached the server's socket after its last read (the
            // client's send buffer drains as the server reads): a readable edge.
            let arrived = unread(&server.connections.get_mut(0).expect("open").stream) > 0;
            assert!(
                waiting || read > 0 || arrived,
                "stuck after {answers} of {requests} answers: no output waiting, so no event \
                 will come, with {} request bytes buffered",
                server.connections.get_mut(0).expect("open").input().len()
            );
            if (waiting && read > 0) || arrived {
                server.drive(0, false);
            }
        }
        panic!("only {answers} of {requests} answers");
    }

    /// Bytes waiting in a socket's receive queue (`FIONREAD`).
    fn unread(stream: &impl AsRawFd) -> usize {
        let mut len: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, which is valid.
        let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut len) };
        assert_eq!(rc, 0, "FIONREAD: {}", io::Error::last_os_error());
        usize::try_from(len).expect("a length")
    }

    /// A drain takes everything queued, past the per-turn accept budget: what stayed in
    /// the queue would leave with the listener.
    #[test]
    fn a_drain_accepts_everything_queued() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (mut server, _primary) = server(listener);
        let clients: Vec<TcpStream> = (0..ACCEPT_BUDGET * 2)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        server.start_drain();
        assert_eq!(server.connections.len(), clients.len());
    }

    /// A server on a TCP listener and a UDP socket with `queued` datagrams waiting on the
    /// UDP socket (both receive buffers big enough for all of them), and the client that
    /// sent them.
    fn server_with_queued_datagrams(queued: usize) -> (Server, Channel, std::net::UdpSocket) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("client");
        for socket in [&udp, &client] {
            socket2::SockRef::from(socket)
                .set_recv_buffer_size(4 << 20)
                .expect("SO_RCVBUF");
        }
        client.set_nonblocking(true).expect("nonblocking");
        let to = udp.local_addr().expect("addr");
        let (primary, worker) = Channel::pair().expect("socketpair");
        let options = DemoOptions {
            slot: 3,
            generation: 7,
            faults: false,
            timeouts: Timeouts::default(),
        };
        let server = Server::new(
            vec![
                crate::worker::ListenerSocket::Tcp(listener),
                crate::worker::ListenerSocket::Udp(udp),
            ],
            worker,
            options,
            None,
        )
        .expect("server");
        for i in 0..queued {
            client
                .send_to(format!("n{i}").as_bytes(), to)
                .expect("send");
        }
        (server, primary, client)
    }

    /// The payloads of the demo's answers waiting on `client` (each checked for the
    /// prefix of slot 3, generation 7).
    fn answers(client: &std::net::UdpSocket) -> Vec<String> {
        let prefix = format!("3 {} 7 ", std::process::id());
        let mut answers = Vec::new();
        let mut buffer = [0u8; 256];
        while let Ok(len) = client.recv(&mut buffer) {
            let text = std::str::from_utf8(&buffer[..len]).expect("ASCII");
            let payload = text.strip_prefix(&prefix).expect("the demo's answer");
            answers.push(payload.to_owned());
        }
        answers
    }

    /// Datagrams queued on a UDP socket when the drain begins, more than a turn's budget,
    /// are each answered before the socket is closed: none is freed with it.
    #[test]
    fn a_drain_answers_every_queued_datagram_then_closes_the_udp_socket() {
        let queued = DATAGRAM_BUDGET * 3;
        let (mut server, _primary, client) = server_with_queued_datagrams(queued);
        server.start_drain();
        assert!(server.datagrams.is_empty(), "closed once read until empty");
        let answered: std::collections::BTreeSet<String> = answers(&client).into_iter().collect();
        let expected: std::collections::BTreeSet<String> =
            (0..queued).map(|i| format!("n{i}")).collect();
        assert_eq!(answered.len(), queued, "every datagram answered once");
        assert_eq!(answered, expected);
    }

    /// Past a turn's budget, the datagrams left on a socket get the next turn at once:
    /// the edge-triggered poll would not wake the loop for them again.
    #[test]
    fn datagrams_past_the_budget_are_answered_on_the_next_turn() {
        let (mut server, _primary, client) = server_with_queued_datagrams(DATAGRAM_BUDGET + 5);
        server.answer_datagrams();
        assert_eq!(answers(&client).len(), DATAGRAM_BUDGET);
        assert_eq!(
            server.poll_timeout(Instant::now()),
            Some(Duration::ZERO),
            "the loop goes on at once"
        );
        server.answer_datagrams();
        assert_eq!(answers(&client).len(), 5);
        assert!(!server.datagrams_left);
    }
}
