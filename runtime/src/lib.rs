//! # Steer: N worker processes behind one port, balanced in the kernel
//!
//! Steer runs a network server as several worker processes on one Linux host. Each worker
//! owns its **own** `SO_REUSEPORT` listening socket, so each has its own accept queue and
//! there is no thundering herd; the kernel spreads new connections over the sockets. A
//! small **primary** process does lifecycle only: it spawns the workers, checks and
//! records their sockets, restarts crashed ones with backoff, replaces them one at a time
//! on `SIGUSR2`, drains them on `SIGTERM`, and serves `/status`. It never touches a client
//! byte.
//!
//! ## As a program
//!
//! ```text
//! steer run --listen 127.0.0.1:8000 --workers 4 --status 127.0.0.1:8001      # demo app
//! steer run --listen 0.0.0.0:8080 -- python3 app.py                          # any program
//! steer status --status 127.0.0.1:8001
//! ```
//!
//! An external program gets its own listening socket as fd 3, the systemd way
//! (`LISTEN_FDS=1`, `LISTEN_PID`, `LISTEN_FDNAMES=steer`), plus `STEER_WORKER_SLOT`,
//! `STEER_WORKER_ID` and `STEER_IPC_FD` (see `docs/workers.md`).
//!
//! ## As a library
//!
//! The same executable is primary and worker: [`ClusterBuilder::run`] supervises in the
//! process the user started, and calls the closure in each worker process.
//!
//! ```no_run
//! use std::io::Write;
//!
//! fn main() -> std::process::ExitCode {
//!     steer::Cluster::builder()
//!         .listen("127.0.0.1:8000".parse().unwrap())
//!         .workers(4)
//!         .run(|mut worker| {
//!             // `accept` answers the primary's heartbeats between connections and
//!             // returns `None` when the primary asks this worker to drain.
//!             while let Some((mut stream, _peer)) = worker.accept()? {
//!                 write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nhi\n")?;
//!                 worker.stats().connection_closed();
//!             }
//!             Ok(())
//!         })
//! }
//! ```
//!
//! Heartbeats are answered by the loop that serves, never by a helper thread, so a worker
//! stuck in its own code is seen as hung, taken out of steering and replaced. An async
//! worker spawns [`Worker::heartbeat`] on its runtime instead (see
//! `runtime/examples/hyper_cluster.rs`).
//!
//! A worker talks to the primary with [`Worker::send`] / [`Worker::recv`], and the primary
//! answers or broadcasts from [`ClusterBuilder::on_message`] (Node's `worker.send` and
//! `process.on('message')`).
//!
//! ## What the crate offers
//!
//! The surface is small, and all of it is at the root: [`Cluster`] and [`ClusterBuilder`]
//! start the primary; [`Worker`] (with [`WorkerStats`], [`Heartbeat`], [`DrainSignal`]) is
//! what a worker process gets; [`Control`], [`UserMessage`], [`Recipient`] and
//! [`IpcError`] carry messages between workers and the primary's hook. A program run as
//! `steer run -- ./prog` takes its sockets by name with [`InheritedSockets`] (systemd's
//! `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`), each a [`ListenerSocket`]; a draining
//! worker empties its UDP sockets with [`drain_datagrams`]. [`config`] holds
//! the values [`ClusterBuilder`] takes ([`config::Balance`], [`config::LogFormat`]) and
//! [`config::parse_duration`], which reads durations the way the command line does.
//!
//! Everything else is the `steer` program's own, and private. `/status` is read as JSON
//! over HTTP, like any other client reads it (`steer status --json` prints one document;
//! the README and `docs/operations.md` name its fields): the types that build it change
//! with the primary, and are not a Rust interface.
//!
//! ## Inside
//!
//! For whoever works on Steer (`cargo doc --document-private-items`): `config` and `cli`
//! turn flags and a TOML file into a validated `Config`; `primary` supervises; `steering`
//! decides who gets the next connection (`baseline` holds the userspace balancers it is
//! measured against); `ipc` is the primary/worker protocol; `worker` is the worker side;
//! `status` serves and reads `/status`, and `top` shows it live; `demo` is the built-in
//! HTTP app, which the command line picks like any other program on the library;
//! `listener` creates and checks sockets; `exit` and `errors` hold the exit statuses and
//! the error text every command shares.

mod accept;
mod baseline;
mod cli;
mod cluster;
pub mod config;
mod demo;
mod errors;
mod exit;
#[doc(hidden)]
pub mod fuzzing;
mod ipc;
mod listener;
mod logging;
mod primary;
mod privileges;
pub mod quic;
mod status;
mod steering;
mod sys;
mod systemd;
mod top;
mod worker;

pub use cluster::{Cluster, ClusterBuilder};
pub use ipc::{IpcError, MAX_MESSAGE_BYTES, Recipient};
pub use primary::Control;
pub use worker::{
    ActivationError, DrainSignal, Heartbeat, INBOX_CAPACITY, InheritedSockets, ListenerSocket,
    UserMessage, Worker, WorkerStats, drain_datagrams,
};

/// The `steer` binary's entry point (`runtime/src/main.rs`): not for library users.
#[doc(hidden)]
pub fn cli_main() -> std::process::ExitCode {
    cli::main()
}

/// What the integration tests in `runtime/tests/` drive directly: each needs a test binary
/// of its own (a counting allocator, a lowered open-file limit). Not for library users.
#[doc(hidden)]
pub mod internals {
    pub use crate::baseline::{HandOff, Target};
    pub use crate::ipc::{Channel, Counters, Encoded, Message, Payload};
}

/// Doctests that hold the surface to what the crate docs say: every public item above is
/// there, and each block below fails to compile (`E0603`, private), because the module it
/// names is the `steer` program's own.
///
/// ```
/// use steer::config::{Balance, LogFormat, parse_duration};
/// use steer::{
///     ActivationError, Cluster, ClusterBuilder, Control, DrainSignal, Heartbeat,
///     INBOX_CAPACITY, InheritedSockets, IpcError, ListenerSocket, MAX_MESSAGE_BYTES,
///     Recipient, UserMessage, Worker, WorkerStats, drain_datagrams,
/// };
/// ```
///
/// The configuration a primary runs with, and the helper every error message goes through,
/// are not part of it either:
///
/// ```compile_fail,E0603
/// use steer::config::Config;
/// ```
///
/// ```compile_fail,E0425
/// let _ = steer::error_chain;
/// ```
///
/// ```compile_fail,E0603
/// use steer::accept;
/// ```
/// ```compile_fail,E0603
/// use steer::baseline;
/// ```
/// ```compile_fail,E0603
/// use steer::cli;
/// ```
/// ```compile_fail,E0603
/// use steer::demo;
/// ```
/// ```compile_fail,E0603
/// use steer::exit;
/// ```
/// ```compile_fail,E0603
/// use steer::ipc;
/// ```
/// ```compile_fail,E0603
/// use steer::listener;
/// ```
/// ```compile_fail,E0603
/// use steer::logging;
/// ```
/// ```compile_fail,E0603
/// use steer::primary;
/// ```
/// ```compile_fail,E0603
/// use steer::privileges;
/// ```
/// ```compile_fail,E0603
/// use steer::status;
/// ```
/// ```compile_fail,E0603
/// use steer::steering;
/// ```
/// ```compile_fail,E0603
/// use steer::systemd;
/// ```
/// ```compile_fail,E0603
/// use steer::top;
/// ```
/// ```compile_fail,E0603
/// use steer::worker;
/// ```
#[cfg(doctest)]
pub struct CuratedSurface;

/// The README's Rust example, compiled by `cargo test --doc` so that it stays true to the
/// API. (`docs/workers.md`'s complete example is the crate's own, above; its second block is
/// a fragment.)
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeExample;
