//! The primary's stall judgement of workers that do not publish their accepts.
//!
//! The program judges a stall from a worker's load record: connections steered to it and
//! not accepted, and no accept for 0.5 ms ([`steer_common::SlotLoad::is_stalled`]). A worker
//! that has never published an accept (an external program without a helper) gives it
//! nothing to judge by, so the primary judges it from its listener's real accept queue
//! (`sock_diag`, completed handshakes waiting for `accept`) and writes the verdict into
//! the record, where the program reads it.
//!
//! Once per health interval the primary reads every queue. A silent worker's queue of at
//! least [`STALL_QUEUE`] is suspect: it is read again every [`QUICK_LOOK`], and a queue
//! that did not shrink between two such readings is a stall (the worker accepted nothing
//! while it waited). A stalled worker gets no new connection, so its queue can only shrink
//! from then on: the first reading that shows it smaller (or below [`STALL_QUEUE`]) ends
//! the stall. A silent worker is therefore stalled within one health interval plus
//! [`QUICK_LOOK`] of its stall, and available again within [`QUICK_LOOK`] of its first
//! accept.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use steer_common::STALL_QUEUE;

/// How often a suspect or stalled silent worker's queue is read again.
pub const QUICK_LOOK: Duration = Duration::from_millis(10);

/// A reading older than this is no evidence of what happened since (the worker may have
/// accepted everything and filled its queue again).
const FRESH: Duration = Duration::from_millis(50);

/// One silent worker's last reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reading {
    queued: u64,
    at: Instant,
    stalled: bool,
}

/// The suspect and stalled silent workers, by slot.
#[derive(Debug, Default)]
pub struct SilentWatch {
    watched: BTreeMap<u32, Reading>,
}

impl SilentWatch {
    /// Takes `slot`'s accept queue as read at `now`; whether the worker is stalled.
    pub fn judge(&mut self, slot: u32, queued: u64, now: Instant) -> bool {
        let previous = self.watched.get(&slot).copied();
        if queued < STALL_QUEUE {
            self.watched.remove(&slot);
            return false;
        }
        let stalled = match previous {
            // Stalled until the queue shrinks: nothing new reaches it meanwhile.
            Some(p) if p.stalled => queued >= p.queued,
            Some(p) => now.saturating_duration_since(p.at) <= FRESH && queued >= p.queued,
            None => false,
        };
        self.watched.insert(
            slot,
            Reading {
                queued,
                at: now,
                stalled,
            },
        );
        stalled
    }

    /// Forgets `slot` (its worker published an accept, or left steering).
    pub fn forget(&mut self, slot: u32) {
        self.watched.remove(&slot);
    }

    /// Whether a worker is suspect or stalled: read the queues again in [`QUICK_LOOK`].
    pub fn wants_quick_look(&self) -> bool {
        !self.watched.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_that_does_not_shrink_between_quick_looks_is_a_stall_until_it_shrinks() {
        let mut watch = SilentWatch::default();
        let t0 = Instant::now();
        assert!(!watch.judge(3, 1, t0), "one queued connection is nothing");
        assert!(!watch.wants_quick_look());
        assert!(
            !watch.judge(3, 5, t0),
            "a first deep reading is suspect only"
        );
        assert!(watch.wants_quick_look());
        assert!(
            watch.judge(3, 5, t0 + QUICK_LOOK),
            "no accept between two quick looks"
        );
        assert!(
            watch.judge(3, 5, t0 + 40 * QUICK_LOOK),
            "still nothing accepted"
        );
        assert!(!watch.judge(3, 4, t0 + 41 * QUICK_LOOK), "it accepted one");
        assert!(!watch.judge(3, 0, t0 + 42 * QUICK_LOOK));
        assert!(!watch.wants_quick_look(), "an empty queue is not watched");
    }

    #[test]
    fn a_queue_that_drains_between_looks_or_a_stale_reading_is_no_stall() {
        let mut watch = SilentWatch::default();
        let t0 = Instant::now();
        assert!(!watch.judge(0, 6, t0));
        assert!(!watch.judge(0, 3, t0 + QUICK_LOOK), "it accepted three");
        assert!(
            !watch.judge(0, 9, t0 + Duration::from_secs(1)),
            "a reading a health interval old says nothing about the time between"
        );
        watch.forget(0);
        assert!(!watch.wants_quick_look());
    }
}
