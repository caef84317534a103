//! One worker's heartbeat ledger: the pings it has not answered yet, each with the moment
//! it was sent, so a verdict asks "has the oldest unanswered ping waited longer than
//! `health-timeout`?" rather than "has the worker said anything lately?".
//!
//! Only `pong` counts as life for a watched worker: a worker whose side thread keeps
//! sending user messages while its serving loop is stuck is still hung.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most unanswered pings remembered per worker. The oldest is the one that matters, and a
/// watched worker is declared hung long before this many are owed, so pings past the cap
/// are sent without being recorded.
const LEDGER: usize = 64;

/// What the primary knows of one worker's heartbeats.
#[derive(Debug, Clone, Default)]
pub(crate) struct Heartbeat {
    /// It has sent at least one protocol message, so it reads its IPC and is pinged.
    pub speaks: bool,
    /// Silence means it is stuck: it declared `heartbeats` in `ready`, or it has answered a
    /// ping. A worker that is not watched is supervised for liveness only.
    pub watched: bool,
    /// Its IPC is no longer read (after a protocol violation): it can prove nothing.
    pub deaf: bool,
    /// Unanswered pings, oldest first: `(seq, sent at)`.
    outstanding: VecDeque<(u64, Instant)>,
    /// The newest `seq` sent to it; a pong for a later one is a lie.
    last_sent: u64,
}

impl Heartbeat {
    /// Records a ping sent now.
    pub(crate) fn sent(&mut self, seq: u64, now: Instant) {
        self.last_sent = self.last_sent.max(seq);
        if self.outstanding.len() < LEDGER {
            self.outstanding.push_back((seq, now));
        }
    }

    /// Records a pong for `seq`: every ping up to it is answered. Refused when `seq` was
    /// never sent.
    pub(crate) fn answered(&mut self, seq: u64) -> Result<(), String> {
        if seq > self.last_sent {
            return Err(format!(
                "pong for ping {seq}, but the newest ping sent was {}",
                self.last_sent
            ));
        }
        while self.outstanding.front().is_some_and(|&(s, _)| s <= seq) {
            self.outstanding.pop_front();
        }
        self.watched = true;
        Ok(())
    }

    /// Starts watching (a worker that declared heartbeats, from `ready` on).
    pub(crate) fn watch(&mut self) {
        self.watched = true;
    }

    /// When it turns hung if its oldest unanswered ping stays unanswered; `None` if it is
    /// not watched or owes nothing.
    pub(crate) fn deadline(&self, timeout: Duration) -> Option<Instant> {
        if !self.watched || self.deaf {
            return None;
        }
        self.outstanding.front().map(|&(_, sent)| sent + timeout)
    }

    /// Whether it owes a ping older than `timeout`.
    pub(crate) fn overdue(&self, now: Instant, timeout: Duration) -> bool {
        self.deadline(timeout).is_some_and(|at| now > at)
    }

    /// The primary itself did not run for `late`: the pings it owes are that much
    /// younger, so nobody is blamed for time the primary did not run.
    pub(crate) fn forgive(&mut self, late: Duration, now: Instant) {
        for (_, sent) in &mut self.outstanding {
            *sent = (*sent + late).min(now);
        }
    }

    /// How long it has owed an answer: since the oldest ping it has not answered was sent,
    /// zero when it owes none (`None` if it never spoke the protocol). For `/status`: a
    /// healthy worker stays near zero, a stuck one grows towards `health-timeout`.
    pub(crate) fn owed(&self, now: Instant) -> Option<Duration> {
        if !self.speaks {
            return None;
        }
        Some(
            self.outstanding
                .front()
                .map_or(Duration::ZERO, |&(_, sent)| {
                    now.saturating_duration_since(sent)
                }),
        )
    }

    /// Notes that it spoke (any message): from now on it is pinged.
    pub(crate) fn spoke(&mut self) {
        self.speaks = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(3);

    #[test]
    fn a_watched_worker_is_overdue_only_past_its_oldest_unanswered_ping() {
        let t0 = Instant::now();
        let mut beat = Heartbeat::default();
        beat.watch();
        assert_eq!(beat.deadline(TIMEOUT), None, "nothing owed yet");
        beat.sent(1, t0);
        beat.sent(2, t0 + Duration::from_secs(1));
        assert!(!beat.overdue(t0 + TIMEOUT, TIMEOUT));
        assert!(beat.overdue(t0 + TIMEOUT + Duration::from_millis(1), TIMEOUT));
        beat.answered(1).expect("sent");
        assert_eq!(
            beat.deadline(TIMEOUT),
            Some(t0 + Duration::from_secs(1) + TIMEOUT)
        );
        beat.answered(2).expect("sent");
        assert_eq!(beat.deadline(TIMEOUT), None);
    }

    #[test]
    fn an_unwatched_or_deaf_worker_is_never_overdue() {
        let t0 = Instant::now();
        let mut beat = Heartbeat::default();
        beat.sent(1, t0);
        assert!(!beat.overdue(t0 + 10 * TIMEOUT, TIMEOUT));
        beat.watch();
        beat.deaf = true;
        assert!(!beat.overdue(t0 + 10 * TIMEOUT, TIMEOUT));
    }

    #[test]
    fn a_pong_for_a_ping_never_sent_is_refused() {
        let t0 = Instant::now();
        let mut beat = Heartbeat::default();
        beat.sent(4, t0);
        assert!(beat.answered(5).is_err());
        assert!(beat.answered(4).is_ok());
        assert!(beat.watched, "answering a ping makes it watched");
    }

    #[test]
    fn forgiving_excuses_exactly_the_time_the_primary_did_not_run() {
        let t0 = Instant::now();
        let mut beat = Heartbeat::default();
        beat.watch();
        beat.sent(1, t0);
        let resumed = t0 + Duration::from_secs(5);
        assert!(beat.overdue(resumed, TIMEOUT));
        beat.forgive(Duration::from_secs(10), resumed);
        assert!(
            !beat.overdue(resumed + TIMEOUT, TIMEOUT),
            "never later than now"
        );
        assert!(beat.overdue(resumed + TIMEOUT + Duration::from_millis(1), TIMEOUT));
        let mut short = Heartbeat::default();
        short.watch();
        short.sent(1, t0);
        short.forgive(Duration::from_millis(200), t0 + Duration::from_secs(1));
        assert_eq!(
            short.deadline(TIMEOUT),
            Some(t0 + Duration::from_millis(200) + TIMEOUT)
        );
    }
}
