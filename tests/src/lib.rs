//! The harness for black-box tests of the `steer` binary (`tests/tests/*.rs`).
//!
//! Build the binary first: `cargo build -p steer --features quic` (tests/quic.rs needs QUIC;
//! `cargo xtask test` builds it so), then `cargo test -p steer-tests`
//! (`STEER_BIN=/path/to/steer` overrides where it is looked for; see [`steer_bin`]).
//!
//! A test starts a cluster, drives it through signals and HTTP, and states what it waits
//! for as a condition with a deadline; nothing sleeps to "give it time":
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use steer_tests::{Cluster, Load, Signal, status};
//!
//! // `--listen` and `--status` get free ports; start() returns once every worker is ready.
//! let cluster = Cluster::start(&["--workers", "2", "--balance", "kernel"]);
//! let before = cluster.worker_pids();
//!
//! let load = Load::keep_alive(cluster.listen_addr(), 4);
//! load.wait_for_ok(100, Duration::from_secs(10));
//! cluster.signal(Signal::SIGUSR2);
//! cluster.wait_until("every slot replaced", Duration::from_secs(20), |s| {
//!     status::all_ready(s)
//!         && status::worker_pids(s).iter().all(|pid| !before.contains(pid))
//! });
//! load.stop().assert_all_succeeded();
//!
//! assert!(cluster.stop(Duration::from_secs(10)).success());
//! ```
//!
//! The pieces:
//!
//! - [`Cluster`]: a `steer run` primary with its output in a log file. Its panics (timeouts,
//!   an unexpected exit) end with the log's tail; dropping it SIGKILLs the primary and every
//!   worker it has seen, so a failing test leaves no processes behind.
//! - [`status`]: reading the `/status` JSON ([`all_ready`], [`WorkerStatus`], ..).
//! - [`http_get`], [`http_get_from`], [`KeepAlive`]: a small blocking HTTP/1.1 client that
//!   returns `io::Result` so failures can be counted; [`must_get`] panics instead.
//! - [`Load`]: background threads sending requests until stopped, reporting every failure:
//!   the tool for "no request fails while X happens".
//! - [`run_steer`]: run `steer` to completion for command-line and bad-input tests.
//! - [`pid_alive`], [`rss_bytes`], [`children_of`], [`wait_for`]: process inspection and
//!   the generic poll-with-deadline.
//! - [`free_port`], [`TempFile`]: ports and config files for a test.
//! - [`SynSender`]: raw SYNs that never complete (phantom load; needs root); [`SpoofedDatagrams`]: UDP from spoofed sources; [`rogue`]: a
//!   same-user listener on a cluster's port, and the classic BPF filter it may attach;
//!   [`netns`]: a network namespace of a test's own (its sysctls, its firewall).

pub mod chaos;
mod cluster;
mod command;
pub mod h3;
mod http;
mod load;
mod net;
pub mod netns;
mod process;
pub mod prometheus;
pub mod rogue;
pub mod status;
mod syn;
mod temp;
#[cfg(test)]
mod test_server;

pub use nix::sys::signal::Signal;
pub use serde_json::Value;

pub use crate::cluster::{Cluster, READY_TIMEOUT, STATUS_POLL_INTERVAL};
pub use crate::command::{RUN_TIMEOUT, RunOutput, run_steer, run_to_completion, steer_bin};
pub use crate::http::{
    HTTP_TIMEOUT, KeepAlive, Response, WORKER_HEADER, block_slot, http_get, http_get_from,
    http_get_timeout, must_get,
};
pub use crate::load::{LOAD_LIMIT, Load, LoadReport};
pub use crate::net::{SeenTwice, free_local_addr, free_port, net_counter};
pub use crate::process::{
    POLL_INTERVAL, children_of, descendants_of, pid_alive, process_state, rss_bytes,
    signal_pending, wait_for,
};
pub use crate::status::{SlotState, WorkerStatus, all_ready};
pub use crate::syn::{SpoofedDatagrams, SynSender};
pub use crate::temp::TempFile;
