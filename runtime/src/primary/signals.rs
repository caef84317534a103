//! Signals to the primary, mapped to actions in one place.
//!
//! They are caught by handlers (signal-hook) that wake the event loop through a pipe, not
//! read from a `signalfd`: a `signalfd` needs the signals blocked in every thread, and a
//! library host may have threads of its own that would then take a SIGTERM with its
//! default action and kill the primary without a drain. A handler works whichever thread
//! the kernel picks. Installing it also replaces an `SIG_IGN` the primary may have
//! inherited (`nohup` ignores SIGHUP; a careless parent may ignore SIGCHLD), so no signal
//! the primary relies on is lost.
//!
//! Each handler counts its signal, and the loop acts on every one it counted: three
//! SIGTTINs that arrive between two turns add three workers, and a second SIGTERM kills
//! even when it arrives before the loop has read the first. (A set of flags, which is
//! what signal-hook's own iterator keeps, would fold them into one.) The kernel itself
//! still folds a signal sent while the same one is pending, not yet handled: that is
//! the sender's to avoid. Signals counted in one turn are acted on in the order of their
//! numbers, each as many times as it arrived.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mio::event::Source;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use signal_hook::SigId;
use signal_hook::consts::signal::{
    SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2, SIGWINCH,
};

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

/// The signals the primary handles, in the order they are acted on within one turn.
pub(crate) const HANDLED: [i32; 8] = [
    SIGHUP, SIGINT, SIGUSR1, SIGUSR2, SIGTERM, SIGCHLD, SIGTTIN, SIGTTOU,
];

/// The primary's control signals, which its own workers (built-in and library) start
/// with ignored: sent to every process of the service, they reach only the primary's
/// meaning. SIGTERM is not among them: to a worker it means drain, as to the primary.
/// SIGWINCH means nothing to the primary, but a terminal or `systemctl kill` sends it to
/// every process too.
pub(crate) const CONTROL: [i32; 6] = [SIGHUP, SIGUSR1, SIGUSR2, SIGTTIN, SIGTTOU, SIGWINCH];

/// Blocks the primary's signals in the calling thread (and the threads it starts from now
/// on) until [`open`] has installed their handlers: `steer run` calls it first thing, so a
/// SIGTERM while it parses its configuration or sets up its log waits for the loop instead
/// of killing it with the default action.
pub(crate) fn hold() {
    let mut set = nix::sys::signal::SigSet::empty();
    for signal in HANDLED {
        if let Ok(signal) = nix::sys::signal::Signal::try_from(signal) {
            set.add(signal);
        }
    }
    // Nothing to do if it fails: the handlers are installed a moment later anyway.
    let _ = set.thread_block();
}

/// Installs the handlers, then unblocks the signals (a successor primary starts with
/// them blocked, so that one sent before its handlers were in waited instead of killing
/// it); the returned source is registered with the event loop.
pub(crate) fn open() -> io::Result<Signals> {
    let signals = Signals::catching(&HANDLED)?;
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

/// The signals caught since the loop last looked, counted: a `mio` source that is
/// readable when one has arrived. Dropping it removes the handlers.
#[derive(Debug)]
pub(crate) struct Signals {
    /// The caught signals, and beside each (same index) how many arrived unread.
    signals: Vec<i32>,
    counts: Arc<[AtomicUsize]>,
    /// Read end of the wake pipe (non-blocking); each handler writes a byte to the other.
    wake: OwnedFd,
    handlers: Vec<SigId>,
}

impl Signals {
    /// Installs a counting handler for each of `signals` (`sigaction(2)` through
    /// signal-hook), with one non-blocking pipe (`pipe2(2)`) to wake the loop.
    fn catching(signals: &[i32]) -> io::Result<Signals> {
        let (wake, wake_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let wake_write = Arc::new(wake_write);
        let counts: Arc<[AtomicUsize]> = signals.iter().map(|_| AtomicUsize::new(0)).collect();
        let mut caught = Signals {
            signals: signals.to_vec(),
            counts,
            wake,
            handlers: Vec::with_capacity(signals.len()),
        };
        for (index, &signal) in signals.iter().enumerate() {
            let counts = Arc::clone(&caught.counts);
            let wake_write = Arc::clone(&wake_write);
            let count_and_wake = move || {
                counts[index].fetch_add(1, Ordering::SeqCst);
                // A full pipe (EAGAIN) already wakes the loop, which reads the counts.
                let _ = nix::unistd::write(&*wake_write, b"!");
            };
            // SAFETY: the action is async-signal-safe: one atomic add and one write(2) on
            // a non-blocking pipe, no allocation, no lock (signal-hook keeps errno).
            let id = unsafe { signal_hook::low_level::register(signal, count_and_wake) }?;
            // Pushed at once: dropping `caught` on a later error removes this handler.
            caught.handlers.push(id);
        }
        Ok(caught)
    }

    /// Every signal caught since the last call, each as many times as it arrived (a
    /// SIGCHLD at most once: one reaping pass serves any number of them).
    pub(crate) fn pending(&mut self) -> impl Iterator<Item = i32> + use<> {
        self.drain_wake_pipe();
        // After the pipe: a signal counted from here on also leaves a byte for the next
        // turn, so none is read late.
        let received: Vec<(i32, usize)> = self
            .signals
            .iter()
            .zip(self.counts.iter())
            .map(|(&signal, count)| {
                let times = count.swap(0, Ordering::SeqCst);
                (
                    signal,
                    if signal == SIGCHLD {
                        times.min(1)
                    } else {
                        times
                    },
                )
            })
            .collect();
        received
            .into_iter()
            .flat_map(|(signal, times)| std::iter::repeat_n(signal, times))
    }

    fn drain_wake_pipe(&self) {
        let mut buffer = [0u8; 256];
        loop {
            match nix::unistd::read(&self.wake, &mut buffer) {
                Ok(0) => return,
                Ok(_) | Err(Errno::EINTR) => {}
                // EAGAIN: empty. Anything else cannot happen on our own pipe; the counts
                // are read either way.
                Err(_) => return,
            }
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for &id in &self.handlers {
            signal_hook::low_level::unregister(id);
        }
    }
}

impl Source for Signals {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        SourceFd(&self.wake.as_raw_fd()).register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        SourceFd(&self.wake.as_raw_fd()).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        SourceFd(&self.wake.as_raw_fd()).deregister(registry)
    }
}

#[cfg(test)]
mod tests {
    use signal_hook::low_level::raise;

    use super::*;

    #[test]
    fn repeated_signals_are_counted_not_folded() {
        // Signals no other test here uses (one sets SIGWINCH to SIG_IGN for a moment); `raise` runs the handler before
        // it returns, so each one is handled before the next is sent.
        let mut signals = Signals::catching(&[SIGTTIN, SIGTTOU]).expect("handlers");
        for signal in [SIGTTIN, SIGTTOU, SIGTTIN, SIGTTIN] {
            raise(signal).expect("raise");
        }
        assert_eq!(
            signals.pending().collect::<Vec<_>>(),
            [SIGTTIN, SIGTTIN, SIGTTIN, SIGTTOU]
        );
        assert_eq!(signals.pending().count(), 0, "read once");
        raise(SIGTTOU).expect("raise");
        assert_eq!(signals.pending().collect::<Vec<_>>(), [SIGTTOU]);
    }

    #[test]
    fn a_caught_signal_makes_the_source_readable() {
        let mut signals = Signals::catching(&[SIGUSR1]).expect("handlers");
        let mut poll = mio::Poll::new().expect("poll");
        poll.registry()
            .register(&mut signals, Token(0), Interest::READABLE)
            .expect("register");
        raise(SIGUSR1).expect("raise");
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(std::time::Duration::from_secs(10)))
            .expect("poll");
        assert_eq!(events.iter().count(), 1, "woken by the signal");
        assert_eq!(signals.pending().collect::<Vec<_>>(), [SIGUSR1]);
    }
}
