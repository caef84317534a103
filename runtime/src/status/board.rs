//! What the primary and the status thread share: the readiness in one atomic, which the
//! thread reads without ever waiting for the primary, and the last status document the
//! primary published, which the thread renders for `/status` and `/metrics`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use mio::Waker;

use super::StatusDocument;

/// Where the cluster stands, as `/ready` and `/status` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Serving.
    Running,
    /// Serving, with a rolling restart under way.
    Rolling,
    /// Serving, while a new primary starts to take over (`SIGUSR1`).
    Upgrading,
    /// Draining for exit.
    Stopping,
}

impl Phase {
    /// The name in `/status` (`primary.phase`) and in `/ready`'s body.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Rolling => "rolling",
            Phase::Upgrading => "upgrading",
            Phase::Stopping => "stopping",
        }
    }
}

/// What `/ready` answers from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Readiness {
    /// Slots in state `ready`.
    pub ready: usize,
    /// Slots.
    pub workers: usize,
    /// The cluster's phase.
    pub phase: Phase,
    /// This primary has handed over to its successor (and drains): the cluster at this
    /// address is the successor's now, which was ready when it took over.
    pub handed_over: bool,
}

impl Readiness {
    /// Serving now, and staying: what load balancers and Kubernetes probes want to know.
    pub(crate) fn is_ready(self) -> bool {
        self.handed_over || (self.phase != Phase::Stopping && self.ready > 0)
    }

    /// Packs into one word, so the thread never sees a count from one update beside a
    /// phase from another. Counts are at most `MAX_SLOTS` (1024), far below 2^24.
    fn pack(self) -> u64 {
        let phase = match self.phase {
            Phase::Running => 0,
            Phase::Rolling => 1,
            Phase::Upgrading => 2,
            Phase::Stopping => 3,
        };
        let field = |n: usize| u64::try_from(n).unwrap_or(u64::MAX).min(0xff_ffff);
        field(self.ready)
            | field(self.workers) << 24
            | phase << 48
            | u64::from(self.handed_over) << 56
    }

    fn unpack(word: u64) -> Readiness {
        let field = |shift: u32| usize::try_from(word >> shift & 0xff_ffff).unwrap_or(0);
        Readiness {
            ready: field(0),
            workers: field(24),
            phase: match word >> 48 & 0xff {
                0 => Phase::Running,
                1 => Phase::Rolling,
                2 => Phase::Upgrading,
                _ => Phase::Stopping,
            },
            handed_over: word >> 56 & 1 == 1,
        }
    }
}

/// A status document as published by the primary.
#[derive(Debug)]
pub(crate) struct Publication {
    /// The document.
    pub document: StatusDocument,
    /// When the primary built it.
    pub at: Instant,
    /// Grows with every publication.
    pub serial: u64,
    /// The cluster's state stamp when the primary built it.
    pub stamp: u64,
}

/// The shared state. The primary writes readiness and documents; the thread reads them.
#[derive(Debug)]
pub(crate) struct Board {
    readiness: AtomicU64,
    /// The primary's stamp of the cluster's state (see [`Board::set_readiness`]).
    stamp: AtomicU64,
    /// The thread has clients waiting for a fresh document.
    wanted: AtomicBool,
    /// The thread takes new clients.
    accepting: AtomicBool,
    /// The primary is gone: the thread stops.
    stop: AtomicBool,
    published: Mutex<Option<Arc<Publication>>>,
    /// Wakes the primary's poll when a document is wanted.
    primary: Waker,
    /// Wakes the thread's poll when a document is published or the thread must stop.
    thread: Waker,
}

impl Board {
    /// A board with nothing ready and nothing published yet, accepting clients or not.
    pub(crate) fn new(primary: Waker, thread: Waker, accepting: bool) -> Board {
        let nothing = Readiness {
            ready: 0,
            workers: 0,
            phase: Phase::Running,
            handed_over: false,
        };
        Board {
            readiness: AtomicU64::new(nothing.pack()),
            stamp: AtomicU64::new(0),
            wanted: AtomicBool::new(false),
            accepting: AtomicBool::new(accepting),
            stop: AtomicBool::new(false),
            published: Mutex::new(None),
            primary,
            thread,
        }
    }

    /// The primary: stores the readiness, and the stamp of the cluster's state; a changed
    /// stamp wakes the thread, so a client waiting out the render interval gets the news.
    pub(crate) fn set_readiness(&self, readiness: Readiness, stamp: u64) {
        self.readiness.store(readiness.pack(), Ordering::Release);
        if self.stamp.swap(stamp, Ordering::AcqRel) != stamp
            && let Err(err) = self.thread.wake()
        {
            tracing::warn!("cannot wake the status thread: {err}");
        }
    }

    /// The thread: the stamp of the cluster's state as last stored.
    pub(crate) fn stamp(&self) -> u64 {
        self.stamp.load(Ordering::Acquire)
    }

    /// The thread: the readiness as last stored.
    pub(crate) fn readiness(&self) -> Readiness {
        Readiness::unpack(self.readiness.load(Ordering::Acquire))
    }

    /// The thread: asks the primary for a fresh document, waking it once per request.
    pub(crate) fn want_document(&self) {
        if !self.wanted.swap(true, Ordering::AcqRel)
            && let Err(err) = self.primary.wake()
        {
            tracing::warn!("cannot wake the primary for a status document: {err}");
        }
    }

    /// The primary: whether a fresh document is wanted.
    pub(crate) fn document_wanted(&self) -> bool {
        self.wanted.load(Ordering::Acquire)
    }

    /// The primary: publishes `document`, built under `stamp`, and wakes the thread.
    pub(crate) fn publish(&self, document: StatusDocument, stamp: u64) {
        {
            let mut published = self
                .published
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let serial = published.as_ref().map_or(1, |p| p.serial + 1);
            *published = Some(Arc::new(Publication {
                document,
                at: Instant::now(),
                serial,
                stamp,
            }));
        }
        self.wanted.store(false, Ordering::Release);
        if let Err(err) = self.thread.wake() {
            tracing::warn!("cannot wake the status thread: {err}");
        }
    }

    /// The thread: the last publication, if any.
    pub(crate) fn latest(&self) -> Option<Arc<Publication>> {
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The primary: lets the thread take new clients, or not, and wakes it to follow.
    pub(crate) fn set_accepting(&self, accepting: bool) {
        if self.accepting.swap(accepting, Ordering::AcqRel) != accepting
            && let Err(err) = self.thread.wake()
        {
            tracing::warn!("cannot wake the status thread: {err}");
        }
    }

    /// The thread: whether to take new clients.
    pub(crate) fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// Tells the thread to stop and wakes it.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Err(err) = self.thread.wake() {
            tracing::warn!("cannot wake the status thread to stop it: {err}");
        }
    }

    /// The thread: whether it must stop.
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_survives_packing() {
        for phase in [
            Phase::Running,
            Phase::Rolling,
            Phase::Upgrading,
            Phase::Stopping,
        ] {
            for (ready, workers) in [(0, 0), (3, 4), (1024, 1024)] {
                for handed_over in [false, true] {
                    let readiness = Readiness {
                        ready,
                        workers,
                        phase,
                        handed_over,
                    };
                    assert_eq!(Readiness::unpack(readiness.pack()), readiness);
                }
            }
        }
        let stopping = Readiness {
            ready: 2,
            workers: 2,
            phase: Phase::Stopping,
            handed_over: false,
        };
        assert!(!stopping.is_ready());
        assert!(
            Readiness {
                phase: Phase::Rolling,
                ..stopping
            }
            .is_ready()
        );
        assert!(
            Readiness {
                handed_over: true,
                ..stopping
            }
            .is_ready(),
            "a primary that handed over speaks for its ready successor"
        );
    }
}
