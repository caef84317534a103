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
//! `STEER_WORKER_ID` and `STEER_IPC_FD` (see [`worker::env`]).
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
//! ## Modules
//!
//! [`config`] and [`cli`] turn flags and a TOML file into a validated [`config::Config`];
//! [`primary`] supervises; [`steering`] decides who gets the next connection ([`baseline`] holds
//! the userspace balancers it is measured against); [`ipc`] is
//! the primary/worker protocol; [`worker`] is the worker side; [`status`] serves and reads
//! `/status`; [`demo`] is the built-in HTTP app; [`listener`] creates and checks sockets;
//! [`exit`] holds the exit statuses every command shares.

pub mod accept;
pub mod baseline;
pub mod cli;
mod cluster;
pub mod config;
pub mod demo;
pub mod exit;
#[doc(hidden)]
pub mod fuzzing;
pub mod ipc;
pub mod listener;
pub mod logging;
pub mod primary;
pub mod privileges;
pub mod status;
pub mod steering;
mod sys;
pub mod systemd;
pub mod top;
pub mod worker;

pub use cluster::{Cluster, ClusterBuilder};
pub use ipc::Recipient;
pub use primary::Control;
pub use worker::{DrainSignal, Heartbeat, UserMessage, Worker, WorkerStats};

/// Formats an error with its chain of causes: `outer: inner: innermost`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
