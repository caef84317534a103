//! The primary: lifecycle only. It spawns workers, takes their registrations, keeps
//! steering true, restarts crashed workers with backoff, replaces workers one slot at a
//! time, drains on shutdown, and serves status. It never touches a client byte, except
//! under the `userspace` baseline ([`crate::baseline`]), where it accepts every connection.
//!
//! The decisions live in [`core`](self::core), apart from the I/O: a state machine that
//! takes events and the time and acts through a small trait, tested without processes.
//! The [`supervisor`](self::supervisor) runs it on one thread in one `mio` loop: signals
//! arrive through signal-hook's pipe, worker exits through one pidfd per worker, worker
//! messages through one IPC socket per worker. Status clients are the status listener
//! thread's business ([`crate::status`]): the loop only stores its readiness for it, and
//! builds a status document when that thread asks for one. A worker is its process group
//! ([`process`](self::process)).

mod core;
mod group;
mod handoff;
mod host;
mod limits;
mod messages;
mod notify;
mod output;
pub mod pidfile;
mod process;
mod report;
mod signals;
pub(crate) mod spawn;
mod supervisor;
pub(crate) mod upgrade;

use std::process::ExitCode;

use serde::Serialize;
use serde_json::Value;

use crate::config::Config;

pub use crate::worker::WorkerProgram;

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

/// Holds the primary's signals back until its handlers are in (see `signals::hold`).
pub(crate) fn hold_signals() {
    signals::hold();
}

/// Runs a primary until it is stopped. Returns the process exit status: 0 after a clean
/// stop; 2 if the pid file is held by a running primary; 1 if it could not start or its
/// loop failed (the reason is logged).
pub fn run(config: Config, program: WorkerProgram, hooks: Hooks) -> ExitCode {
    let code = start_and_run(config, program, hooks);
    // What the log writer still holds is written before the process exits.
    crate::logging::flush();
    code
}

fn start_and_run(config: Config, program: WorkerProgram, hooks: Hooks) -> ExitCode {
    // fds 0-2 first, so that nothing opened below lands on a closed standard stream.
    limits::ensure_standard_fds();
    // Then catch the signals: setting up takes a moment (loading the program, a few
    // hundred ms in a debug build), and a SIGTERM meanwhile must wait for the loop, not
    // kill the primary with the default action.
    let signals = match signals::open() {
        Ok(signals) => signals,
        Err(err) => {
            tracing::error!("cannot catch signals: {err}");
            return ExitCode::from(crate::exit::EXIT_FAILURE);
        }
    };
    // A successor primary (an upgrade) takes what its predecessor handed down first.
    let mut inheritance = upgrade::Inheritance::take();
    if let Some(inherited) = &inheritance {
        tracing::info!(
            predecessor = inherited.from,
            "starting as the successor of the running primary"
        );
    }
    // The QUIC stateless-reset key: the predecessor's, so that its workers' connections
    // get the resets they expect from the new workers too; else a fresh one.
    let inherited_key = inheritance
        .as_ref()
        .and_then(|_| upgrade::inherited_reset_key());
    if let Err(err) = crate::quic::init_cluster_reset_key(inherited_key) {
        tracing::error!("cannot make the QUIC stateless-reset key (getrandom): {err}");
        return ExitCode::from(crate::exit::EXIT_FAILURE);
    }
    let inherited_pid_file = inheritance.as_mut().and_then(|i| i.pid_file.take());
    let pid_file = match (config.pid_file.as_deref(), inherited_pid_file) {
        (None, _) => None,
        (Some(path), Some(file)) => match pidfile::PidFile::adopt(path, file) {
            Ok(file) => Some(file),
            // A changed `pid-file`: take the new one.
            Err(_) => match pidfile::PidFile::acquire(path) {
                Ok(file) => Some(file),
                Err(err) => {
                    tracing::error!("--pid-file: {}", crate::errors::error_chain(&err));
                    return ExitCode::from(crate::exit::EXIT_USAGE);
                }
            },
        },
        (Some(path), None) => match pidfile::PidFile::acquire(path) {
            Ok(file) => Some(file),
            Err(err) => {
                tracing::error!("--pid-file: {}", crate::errors::error_chain(&err));
                return ExitCode::from(crate::exit::EXIT_USAGE);
            }
        },
    };
    let inherited_nofile = match limits::raise_for(config.workers, config.listeners.len()) {
        Ok(limits) => Some(limits),
        Err(message) => {
            tracing::error!("{message}");
            return ExitCode::from(crate::exit::EXIT_FAILURE);
        }
    };
    match supervisor::Supervisor::start(
        config,
        program,
        hooks,
        pid_file,
        inherited_nofile,
        inheritance,
        signals,
    ) {
        Ok(supervisor) => supervisor.run(),
        Err(message) => {
            tracing::error!("{message}");
            ExitCode::from(crate::exit::EXIT_FAILURE)
        }
    }
}
