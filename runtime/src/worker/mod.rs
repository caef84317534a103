//! The worker side: bootstrap from the environment, bind an own `SO_REUSEPORT` listener,
//! register it with the primary, then serve.
//!
//! Built-in workers (the demo app) and library workers (a closure given to
//! [`crate::Cluster`]) are the same executable as their primary, re-executed with the
//! variables of [`env`]. External workers (`steer run -- COMMAND`) get their sockets as
//! fds 3, 4, ... instead; an external Rust program takes them by name with
//! [`InheritedSockets`]. Either drains its UDP sockets with [`drain_datagrams`].

mod activation;
mod datagrams;
pub mod env;
mod intake;
mod link;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// What the workers run (the primary spawns each kind differently; the baselines accept
/// only some).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerProgram {
    /// The built-in demo HTTP app (this executable, re-executed).
    Demo,
    /// The library user's closure (this executable, re-executed with the same arguments).
    Library,
    /// An external program that gets its listening socket as fd 3 (`LISTEN_FDS=1`).
    External(Vec<String>),
}

pub use activation::{ActivationError, InheritedSockets};
pub use datagrams::drain_datagrams;
pub use intake::ListenerSocket;
pub use link::{DrainSignal, Heartbeat, INBOX_CAPACITY, UserMessage, WorkerStats};
use serde::Serialize;

use crate::ipc::{Channel, IpcError, Message, Payload, Recipient};
use env::WorkerEnv;

/// A library worker: what the closure passed to [`crate::ClusterBuilder::run`] receives.
///
/// It owns the worker's listening socket (already bound, listening and registered) and the
/// link to the primary. A drain request from the primary (rolling restart, shutdown) is
/// visible through [`Worker::drain_signal`]; when the primary dies the worker process
/// exits.
///
/// # Heartbeats
///
/// The primary pings every worker each `--health-interval` and replaces one that has not
/// answered for `--health-timeout` (it is taken out of steering at once, its queued
/// connections go to the others). The answer must come from the loop that serves, so that
/// a loop stuck in user code is detected rather than masked. Any one of these does it
/// without further code:
///
/// - a blocking server that gets its connections from [`Worker::accept`];
/// - an async server that spawns [`Worker::heartbeat`] on its runtime
///   (`tokio::spawn(worker.heartbeat())`);
/// - a hand-written event loop that calls [`Worker::answer_pings`] on every turn.
///
/// A worker that does none of these never answers, and the primary then supervises it
/// for liveness only (exit and restart), as it does an external program that does not
/// speak the IPC protocol.
#[derive(Debug)]
pub struct Worker {
    env: WorkerEnv,
    /// The first listener's socket when it is TCP: what [`Worker::accept`] and
    /// [`Worker::listener`] serve.
    listener: Option<TcpListener>,
    /// The other listeners' sockets, by name.
    others: Vec<(crate::config::Listener, ListenerSocket)>,
    link: Arc<link::Link>,
    load: Option<crate::steering::LoadReporter>,
}

impl Worker {
    /// The cluster's listeners, in order: each has a socket here (unless it was taken).
    pub fn listeners(&self) -> &[crate::config::Listener] {
        &self.env.listeners
    }

    /// The listening TCP socket of the listener named `name` (`--listen name=...`), if
    /// there is one and it was not taken with [`Worker::take_listener`].
    pub fn tcp_listener(&self, name: &str) -> Option<&TcpListener> {
        if self.env.listeners.first().is_some_and(|l| l.name == name) {
            return self.listener.as_ref();
        }
        self.others.iter().find_map(|(l, socket)| match socket {
            ListenerSocket::Tcp(listener) if l.name == name => Some(listener),
            _ => None,
        })
    }

    /// The bound UDP socket of the listener named `name` (`--listen name=udp://...`), if
    /// there is one.
    pub fn udp_socket(&self, name: &str) -> Option<&UdpSocket> {
        self.others.iter().find_map(|(l, socket)| match socket {
            ListenerSocket::Udp(udp) if l.name == name => Some(udp),
            _ => None,
        })
    }

    /// The slot index, `0..N-1`, stable across restarts of this slot.
    pub fn slot(&self) -> usize {
        self.env.slot
    }

    /// The slot's generation: 1 for the first process, then one more per replacement.
    pub fn generation(&self) -> u64 {
        self.env.generation
    }

    /// Unique id of this worker process over the primary's life (Node's `worker.id`).
    pub fn id(&self) -> u64 {
        self.env.id
    }

    /// The worker's own listening socket (blocking; set non-blocking for async runtimes).
    ///
    /// # Panics
    /// After [`Worker::take_listener`].
    pub fn listener(&self) -> &TcpListener {
        self.listener
            .as_ref()
            .expect("the listener was taken with Worker::take_listener")
    }

    /// Takes the listening socket, e.g. to hand it to tokio. Close it (drop it) when
    /// draining: connections still queued then migrate to the other workers.
    ///
    /// Connections the kernel migrates onto this socket from another worker's closing
    /// listener raise no readiness event: an event-driven worker should also try `accept`
    /// periodically (every few tens of milliseconds), not only when woken.
    pub fn take_listener(&mut self) -> Option<TcpListener> {
        self.listener.take()
    }

    /// Waits for the next connection on the worker's listener, answering the primary's
    /// heartbeats while it waits (`accept4(2)` on the non-blocking listener, then
    /// `poll(2)` for at most 20 ms, so connections migrated here without a readiness event
    /// are seen too). Counts the connection in [`Worker::stats`].
    ///
    /// Returns `Ok(None)` once the primary asks this worker to drain. The listener is
    /// closed then, so connections still queued on it migrate to the other workers; serve
    /// what is open and return.
    ///
    /// # Errors
    /// What `accept4(2)` or `poll(2)` report, other than `EAGAIN` and `EINTR`; an error if
    /// the listener was taken with [`Worker::take_listener`].
    pub fn accept(&mut self) -> io::Result<Option<(TcpStream, SocketAddr)>> {
        loop {
            self.link.answer_ping();
            if self.link.drain.is_set() {
                self.listener = None;
                return Ok(None);
            }
            let listener = self
                .listener
                .as_ref()
                .ok_or_else(|| io::Error::other("the listener was taken with take_listener"))?;
            listener.set_nonblocking(true)?;
            match listener.accept() {
                Ok((stream, peer)) => {
                    stream.set_nonblocking(false)?;
                    self.link.stats.connection_accepted();
                    return Ok(Some((stream, peer)));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    wait_readable(listener, ACCEPT_POLL)?;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// A future that answers the primary's heartbeats from the runtime it runs on; spawn
    /// it once (`tokio::spawn(worker.heartbeat())`). See [`Heartbeat`].
    pub fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            link: Arc::clone(&self.link),
        }
    }

    /// Answers the primary's waiting heartbeat, if there is one, with the counters of
    /// [`Worker::stats`]. For hand-written event loops: call it on every turn (it is one
    /// atomic load when nothing waits), and make sure a turn comes at least every few
    /// hundred milliseconds even when idle.
    pub fn answer_pings(&self) {
        self.link.answer_ping();
    }

    /// Counters reported to the primary with every heartbeat; bump them as you serve.
    pub fn stats(&self) -> &WorkerStats {
        &self.link.stats
    }

    /// Sends a JSON message to the primary's message hook (Node's `process.send`).
    pub fn send(&self, data: impl Serialize) -> Result<(), IpcError> {
        self.send_to(Recipient::Primary, data)
    }

    /// Sends a JSON message to another worker, or to all others, through the primary.
    pub fn send_to(&self, to: Recipient, data: impl Serialize) -> Result<(), IpcError> {
        let data = Payload::new(&data).map_err(|source| IpcError::Malformed {
            preview: "user message".into(),
            source,
        })?;
        self.link.channel.send(&Message::User {
            to: Some(to),
            from: None,
            data,
        })
    }

    /// Waits for the next message from the primary or another worker (Node's
    /// `process.on('message')`). `None` once the link is closed.
    pub fn recv(&self) -> Option<UserMessage> {
        self.link.inbox.lock().ok()?.recv().ok()
    }

    /// Like [`Worker::recv`], giving up after `timeout` (so a reader thread can also watch
    /// [`Worker::drain_signal`]).
    pub fn recv_timeout(&self, timeout: Duration) -> Option<UserMessage> {
        self.link.inbox.lock().ok()?.recv_timeout(timeout).ok()
    }

    /// The next message if one is waiting.
    pub fn try_recv(&self) -> Option<UserMessage> {
        self.link.inbox.lock().ok()?.try_recv().ok()
    }

    /// User messages dropped because more than [`INBOX_CAPACITY`] were waiting
    /// unread.
    pub fn dropped_messages(&self) -> u64 {
        self.link.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Publishes this worker's load for `--balance least-loaded`: connections accepted so
    /// far and connections open now. Two stores into this worker's own record, in memory
    /// shared with the kernel; call it on every accept and close. Under other policies,
    /// and once the primary has asked this worker to drain (it is out of steering then),
    /// it does nothing. A worker that never calls it is balanced on its listener's real
    /// accept queue, which the primary reads once per health interval, plus what was
    /// steered to it since: that sees a stuck worker, but not its open connections.
    pub fn report_load(&self, accepted: u64, active: u64) {
        if let Some(load) = &self.load
            && !self.link.drain.is_set()
        {
            load.publish(accepted, active);
        }
    }

    /// A handle that becomes set when the primary asks this worker to drain. It can be
    /// cloned and moved to another thread (e.g. `tokio::task::spawn_blocking`).
    pub fn drain_signal(&self) -> DrainSignal {
        self.link.drain.clone()
    }
}

/// The worker half of [`crate::ClusterBuilder::run`]: bootstrap, then the user's closure.
pub(crate) fn run_library<F>(serve: F) -> ExitCode
where
    F: FnOnce(Worker) -> io::Result<()>,
{
    crate::logging::init_from_env();
    let (env, sockets, channel, load) = match bootstrap() {
        Ok(parts) => parts,
        Err(message) => {
            tracing::error!("worker bootstrap failed: {message}");
            return ExitCode::FAILURE;
        }
    };
    let link = match link::Link::start(channel, env.slot) {
        Ok(link) => link,
        Err(err) => {
            tracing::error!("worker link failed: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(err) = link.channel.send(&Message::Ready { heartbeats: true }) {
        tracing::error!("cannot report ready: {err}");
        return ExitCode::FAILURE;
    }
    let slot = env.slot;
    let mut sockets = env.listeners.iter().cloned().zip(sockets);
    let listener = match sockets.next() {
        Some((_, ListenerSocket::Tcp(listener))) => Some(listener),
        Some(first) => {
            let mut others = vec![first];
            others.extend(sockets.by_ref());
            return run_serving(serve, env, None, others, link, load, slot);
        }
        None => None,
    };
    let others = sockets.collect();
    run_serving(serve, env, listener, others, link, load, slot)
}

/// Runs the user's closure over the worker's parts.
fn run_serving<F>(
    serve: F,
    env: WorkerEnv,
    listener: Option<TcpListener>,
    others: Vec<(crate::config::Listener, ListenerSocket)>,
    link: Arc<link::Link>,
    load: Option<crate::steering::LoadReporter>,
    slot: usize,
) -> ExitCode
where
    F: FnOnce(Worker) -> io::Result<()>,
{
    match serve(Worker {
        env,
        listener,
        others,
        link,
        load,
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(slot, "worker failed: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the environment, binds the worker's own socket, and registers it with the
/// primary. Returns once the primary has accepted the socket.
pub(crate) fn bootstrap() -> Result<Bootstrapped, String> {
    let env = WorkerEnv::from_process()?;
    if env.ipc_fd < 3 || !fd_is_open(env.ipc_fd) {
        return Err(format!("{}={} is not an open fd", env::IPC_FD, env.ipc_fd));
    }
    // SAFETY: the primary passed this fd for the worker's exclusive use; we checked it is
    // open and it is owned by nothing else in this freshly exec'd process.
    let channel = unsafe { Channel::from_raw_fd(env.ipc_fd) }
        .map_err(|err| format!("{}={}: {err}", env::IPC_FD, env.ipc_fd))?;
    let sockets = intake::open_sockets(&env)?;
    // `userspace` baseline: no socket to register; connections arrive over IPC.
    if sockets.is_empty() {
        crate::privileges::drop_after_registration()?;
        return Ok((env, sockets, channel, None));
    }
    // One `register` per listener, in order; the primary answers after the last.
    for (place, socket) in sockets.iter().enumerate() {
        channel
            .send_with_fd(
                &Message::Register {
                    pid: std::process::id(),
                    fd: Some(socket.fd().as_raw_fd()),
                    listener: Some(place as u32),
                },
                socket.fd(),
            )
            .map_err(|err| format!("cannot register with the primary: {err}"))?;
    }
    let load = loop {
        match channel.recv() {
            Ok(Some(received)) => match received.message {
                Message::Registered { load } => break load.zip(received.fd),
                Message::Drain => std::process::exit(0),
                _ => continue,
            },
            Ok(None) => continue,
            // The primary is gone or refused us: nothing to serve for.
            Err(IpcError::Closed) => std::process::exit(0),
            Err(err) => return Err(format!("registration failed: {err}")),
        }
    };
    // Publishing load is an optimisation: without it least-loaded still counts what it
    // steered here. Never a reason not to serve.
    let load = load.and_then(
        |(share, fd)| match crate::steering::LoadReporter::new(fd, share) {
            Ok(reporter) => Some(reporter),
            Err(err) => {
                tracing::warn!("cannot map the load record, not publishing load: {err}");
                None
            }
        },
    );
    // Registered and mapped: the user's code may run unprivileged from here.
    crate::privileges::drop_after_registration()?;
    Ok((env, sockets, channel, load))
}

/// What [`bootstrap`] sets up: the environment, the registered sockets, one per listener
/// in order (none under the `userspace` baseline), the IPC channel, and (under
/// `least-loaded`) where to publish load.
pub(crate) type Bootstrapped = (
    WorkerEnv,
    Vec<ListenerSocket>,
    Channel,
    Option<crate::steering::LoadReporter>,
);

/// How long [`Worker::accept`] sleeps between looks at its queue and its heartbeats.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// Waits until `listener` is readable or `timeout` passes (`poll(2)`).
fn wait_readable(listener: &TcpListener, timeout: Duration) -> io::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, timeout) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

fn fd_is_open(fd: std::os::fd::RawFd) -> bool {
    std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists()
}

#[cfg(test)]
mod tests {
    /// The worker side is the library users build on; the demo is an app on it that the
    /// command line picks. (`env.rs` only lists the demo's variables among those the
    /// primary strips.)
    #[test]
    fn the_worker_side_does_not_reach_into_the_demo() {
        let demo = concat!("crate::", "demo");
        for (file, text) in [
            ("worker/mod.rs", include_str!("mod.rs")),
            ("worker/link.rs", include_str!("link.rs")),
            ("worker/intake.rs", include_str!("intake.rs")),
        ] {
            assert!(!text.contains(demo), "{file} reaches into the demo");
        }
    }
}
