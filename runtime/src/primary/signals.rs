//! Signals to the primary, mapped to actions in one place.
//!
//! They are caught by handlers (signal-hook) that wake the event loop through a pipe, not
//! read from a `signalfd`: a `signalfd` needs the signals blocked in every thread, and a
//! library host may have threads of its own that would then take a SIGTERM with its
//! default action and kill the primary without a drain. A handler works whichever thread
//! the kernel picks. Installing it also replaces an `SIG_IGN` the primary may have
//! inherited (`nohup` ignores SIGHUP; a careless parent may ignore SIGCHLD), so no signal
//! the primary relies on is lost.

use std::io;

use signal_hook::consts::signal::{
    SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2,
};
use signal_hook_mio::v1_0::Signals;

/// What a signal asks of the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// SIGTERM / SIGINT: drain every worker, then exit 0. A second one kills at once.
    Stop,
    /// SIGUSR2: replace every worker, one slot at a time.
    RollingRestart,
    /// SIGHUP: re-read the config file, resize, revive failed slots, then roll.
    Reload,
    /// SIGUSR1: a new primary, from the executable now on disk, takes over.
    Upgrade,
    /// SIGTTIN: one more worker (gunicorn's convention); no other slot is touched.
    AddWorker,
    /// SIGTTOU: one worker fewer, the highest slot; no other slot is touched.
    RemoveWorker,
    /// SIGCHLD: a child changed state (a worker, or an orphan of a worker's tree that
    /// this primary, as subreaper, has inherited).
    Child,
}

/// The signals the primary handles.
pub(crate) const HANDLED: [i32; 8] = [
    SIGTERM, SIGINT, SIGUSR2, SIGHUP, SIGCHLD, SIGUSR1, SIGTTIN, SIGTTOU,
];

/// Installs the handlers, then unblocks the signals (a successor primary starts with
/// them blocked, so that one sent before its handlers were in waited instead of killing
/// it); the returned source is registered with the event loop.
pub(crate) fn open() -> io::Result<Signals> {
    let signals = Signals::new(HANDLED)?;
    let mut set = nix::sys::signal::SigSet::empty();
    for signal in HANDLED {
        if let Ok(signal) = nix::sys::signal::Signal::try_from(signal) {
            set.add(signal);
        }
    }
    set.thread_unblock().map_err(io::Error::from)?;
    Ok(signals)
}

/// Maps a received signal number to its action.
pub(crate) fn action(signal: i32) -> Option<Action> {
    match signal {
        SIGTERM | SIGINT => Some(Action::Stop),
        SIGUSR2 => Some(Action::RollingRestart),
        SIGHUP => Some(Action::Reload),
        SIGCHLD => Some(Action::Child),
        SIGUSR1 => Some(Action::Upgrade),
        SIGTTIN => Some(Action::AddWorker),
        SIGTTOU => Some(Action::RemoveWorker),
        _ => None,
    }
}
