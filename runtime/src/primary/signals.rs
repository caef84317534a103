//! Signals to the primary, read from a `signalfd` in the event loop and mapped to actions
//! in one place.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// What an operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// SIGTERM / SIGINT: drain every worker, then exit 0. A second one kills at once.
    Stop,
    /// SIGUSR2: replace every worker, one slot at a time.
    RollingRestart,
    /// SIGHUP: re-read the config file, revive failed slots, then roll.
    Reload,
}

fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR2,
        Signal::SIGHUP,
    ] {
        set.add(signal);
    }
    set
}

/// Blocks the handled signals and opens a non-blocking `signalfd` for them.
pub(crate) fn open() -> nix::Result<SignalFd> {
    let set = handled();
    set.thread_block()?;
    SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
}

/// Maps a received signal number to its action.
pub(crate) fn action(signo: u32) -> Option<Action> {
    match Signal::try_from(i32::try_from(signo).ok()?).ok()? {
        Signal::SIGTERM | Signal::SIGINT => Some(Action::Stop),
        Signal::SIGUSR2 => Some(Action::RollingRestart),
        Signal::SIGHUP => Some(Action::Reload),
        _ => None,
    }
}
