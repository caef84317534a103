//! The primary: lifecycle only. It spawns workers, takes their registrations, keeps
//! steering true, restarts crashed workers with backoff, replaces workers one slot at a
//! time, drains on shutdown, and serves status. It never touches a client byte, except
//! under the `userspace` baseline ([`crate::baseline`]), where it accepts every connection.
//!
//! Everything happens on one thread in one `mio` loop: signals arrive through a `signalfd`,
//! worker exits through one pidfd per worker, worker messages through one `SOCK_SEQPACKET`
//! socket per worker. Status clients are the status listener's thread's business
//! ([`crate::status`]); the loop only stores its readiness for it, and builds a status
//! document when that thread asks for one.

mod handoff;
mod health;
mod lifecycle;
mod messages;
mod notify;
mod report;
mod restart;
mod signals;
mod slot;
pub(crate) mod spawn;
mod supervisor;

use std::process::ExitCode;

use serde::Serialize;
use serde_json::Value;
pub use slot::SlotState;

use crate::config::Config;

/// What the workers run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerProgram {
    /// The built-in demo HTTP app (this executable, re-executed).
    Demo,
    /// The library user's closure (this executable, re-executed with the same arguments).
    Library,
    /// An external program that gets its listening socket as fd 3 (`LISTEN_FDS=1`).
    External(Vec<String>),
}

/// A user-message callback of the primary: `(control, from_slot, data)`.
pub type MessageHook = Box<dyn FnMut(&mut Control, usize, Value)>;

/// Callbacks a library user installs in the primary.
#[derive(Default)]
pub struct Hooks {
    /// Called for every worker message addressed to the primary.
    pub on_message: Option<MessageHook>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("on_message", &self.on_message.is_some())
            .finish()
    }
}

/// What a primary hook can do: message one worker or all of them.
#[derive(Debug, Default)]
pub struct Control {
    pub(crate) outbox: Vec<(Option<usize>, Value)>,
    pub(crate) workers: usize,
}

impl Control {
    /// Queues `data` for the worker of `slot` (sent when the hook returns).
    pub fn send(&mut self, slot: usize, data: impl Serialize) {
        if let Ok(value) = serde_json::to_value(data) {
            self.outbox.push((Some(slot), value));
        }
    }

    /// Queues `data` for every live worker.
    pub fn broadcast(&mut self, data: impl Serialize) {
        if let Ok(value) = serde_json::to_value(data) {
            self.outbox.push((None, value));
        }
    }

    /// The number of slots.
    pub fn workers(&self) -> usize {
        self.workers
    }
}

/// Runs a primary until it is stopped. Returns the process exit status: 0 after a clean
/// stop, 1 if it could not start (the reason is logged).
pub fn run(config: Config, program: WorkerProgram, hooks: Hooks) -> ExitCode {
    match supervisor::Supervisor::start(config, program, hooks) {
        Ok(supervisor) => supervisor.run(),
        Err(message) => {
            tracing::error!("{message}");
            ExitCode::from(crate::cli::EXIT_FAILURE)
        }
    }
}
