//! The userspace balancers Steer is measured against. They exist for `cargo xtask bench`,
//! not for production: both put every connection through one accept queue.
//!
//! - `shared` ([`Baseline::Shared`]): the primary creates **one** listening socket and every
//!   worker inherits it and accepts from it: the classic prefork shape, and Node's cluster
//!   module with `SCHED_NONE`. Every worker's event loop wakes for every new connection (the
//!   thundering herd) and whichever calls `accept` first gets it, so the spread follows
//!   scheduling luck, not a policy.
//! - `userspace` ([`Baseline::Userspace`]): the primary owns the only listening socket,
//!   accepts every connection itself and passes it round-robin to a worker over the IPC
//!   socket (`SCM_RIGHTS`): Node's default `SCHED_RR` shape. Every connection costs the
//!   primary an `accept`, a `sendmsg` and a `close`, and waits for it to be scheduled.
//!
//! In both, a worker that exits (drained, replaced or crashed) leaves the queue intact: the
//! socket belongs to the primary, so rolling restarts lose nothing that was queued. Only
//! the demo app can be a `userspace` worker: it is the one that reads connections from IPC.

mod handoff;

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use socket2::Socket;

pub use handoff::{HandOff, Target};

use crate::config::Balance;
use crate::worker::WorkerProgram;
use crate::worker::env;

/// fd number of the shared listening socket in re-executed workers under `shared` (fd 3
/// is their IPC socket).
pub const SHARED_LISTEN_FD: RawFd = 4;

/// A userspace balancer and the listening socket it owns.
#[derive(Debug)]
pub enum Baseline {
    /// One socket, inherited by every worker.
    Shared {
        /// The listening socket; each worker gets a duplicate.
        socket: Socket,
    },
    /// The primary accepts and hands connections out.
    Userspace(HandOff),
}

impl Baseline {
    /// Creates the listening socket for `balance` on `listen` (already reserved by the
    /// primary, so port 0 is resolved); `None` for the kernel and eBPF policies.
    ///
    /// Fails when `userspace` is asked for a program other than the demo app (nothing
    /// else reads connections from IPC), or when `socket`/`bind`/`listen` fails.
    pub fn open(
        balance: Balance,
        listen: SocketAddr,
        program: &WorkerProgram,
    ) -> Result<Option<Baseline>, String> {
        let bind = || {
            let socket = crate::listener::bind_reuseport(listen, true)
                .map_err(|err| crate::listener::explain_bind_error(listen, &err))?;
            socket
                .set_nonblocking(true)
                .map_err(|err| format!("cannot make the {balance} socket non-blocking: {err}"))?;
            Ok::<Socket, String>(socket)
        };
        match balance {
            Balance::Shared => Ok(Some(Baseline::Shared { socket: bind()? })),
            Balance::Userspace if *program != WorkerProgram::Demo => Err(
                "the userspace baseline hands connections to workers over IPC, which only the \
                 demo app reads; use --balance shared (or kernel, or an eBPF policy) with a \
                 COMMAND or a library worker"
                    .into(),
            ),
            Balance::Userspace => {
                let socket = bind()?;
                // The demo's connection options, set once on the listener so that every
                // connection handed over has them already, as a worker's own listener
                // gives them to what it accepts: the baseline pays no per-connection
                // `setsockopt` that the policies it is measured against do not.
                socket
                    .set_tcp_nodelay(true)
                    .and_then(|()| socket.set_send_buffer_size(crate::demo::SEND_BUFFER))
                    .map_err(|err| format!("cannot set the userspace socket's options: {err}"))?;
                Ok(Some(Baseline::Userspace(HandOff::new(socket))))
            }
            _ => Ok(None),
        }
    }

    /// Watches the listening socket (`userspace` only: under `shared` the workers do).
    pub fn register(&self, registry: &Registry, token: Token) -> io::Result<()> {
        match self {
            Baseline::Shared { .. } => Ok(()),
            Baseline::Userspace(handoff) => registry.register(
                &mut SourceFd(&handoff.listener_fd()),
                token,
                Interest::READABLE,
            ),
        }
    }

    /// Whether workers register a socket of their own before `ready` (`shared`: the one
    /// they inherited; `userspace`: none, they have no listener).
    pub fn workers_register(&self) -> bool {
        matches!(self, Baseline::Shared { .. })
    }

    /// What a re-executed worker inherits: environment variables and fds to place.
    pub fn worker_inheritance(&self) -> io::Result<Inheritance> {
        Ok(match self {
            Baseline::Shared { socket } => Inheritance {
                env: vec![(env::LISTEN_FD.into(), SHARED_LISTEN_FD.to_string().into())],
                fds: vec![(OwnedFd::from(socket.try_clone()?), SHARED_LISTEN_FD)],
            },
            Baseline::Userspace(_) => Inheritance {
                env: vec![(env::HANDOFF.into(), "1".into())],
                fds: Vec::new(),
            },
        })
    }

    /// The socket an external worker gets as fd 3 (`shared` only): a duplicate of the
    /// shared one instead of a socket of its own.
    pub fn external_socket(&self) -> Option<io::Result<OwnedFd>> {
        match self {
            Baseline::Shared { socket } => Some(socket.try_clone().map(OwnedFd::from)),
            Baseline::Userspace(_) => None,
        }
    }

    /// The hand-off state (`userspace` only).
    pub fn handoff(&mut self) -> Option<&mut HandOff> {
        match self {
            Baseline::Userspace(handoff) => Some(handoff),
            Baseline::Shared { .. } => None,
        }
    }
}

/// Environment variables and fds a re-executed worker gets from a baseline.
#[derive(Debug, Default)]
pub struct Inheritance {
    /// Variables to set.
    pub env: Vec<(OsString, OsString)>,
    /// `(fd, number in the child)`.
    pub fds: Vec<(OwnedFd, RawFd)>,
}
