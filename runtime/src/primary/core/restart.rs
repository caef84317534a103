//! When a crashed slot starts again: exponential backoff, and `failed` after too many
//! crashes in the restart window. Pure logic, so it is tested without processes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// First backoff delay.
pub(crate) const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Largest backoff delay.
pub(crate) const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// A worker that stayed ready this long resets its slot's backoff.
///
/// Backoff is there to keep a crash loop (a worker that dies while starting or right
/// after) from spinning. A worker that served for a second was not looping: killed by
/// the OOM killer or an operator, its slot comes back after [`BACKOFF_BASE`]. A slower
/// loop is still caught by `--max-restarts` per `--restart-window`.
pub(crate) const HEALTHY_RESET: Duration = Duration::from_secs(1);

/// What to do after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Start a new generation after this delay.
    RestartAfter(Duration),
    /// Too many crashes in the window: stop trying.
    Fail,
}

/// Crash memory of one slot.
#[derive(Debug, Default)]
pub(crate) struct CrashHistory {
    crashes: VecDeque<Instant>,
    consecutive: u32,
}

impl CrashHistory {
    /// Records a crash at `now` of a process that had been ready since `ready_since`.
    pub(crate) fn record(
        &mut self,
        now: Instant,
        ready_since: Option<Instant>,
        max_restarts: u32,
        window: Duration,
    ) -> Verdict {
        if ready_since.is_some_and(|since| now.saturating_duration_since(since) >= HEALTHY_RESET) {
            self.consecutive = 0;
        }
        self.crashes.push_back(now);
        while self
            .crashes
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > window)
        {
            self.crashes.pop_front();
        }
        if self.crashes.len() > max_restarts as usize {
            return Verdict::Fail;
        }
        let delay = BACKOFF_BASE
            .saturating_mul(1u32 << self.consecutive.min(16))
            .min(BACKOFF_CAP);
        self.consecutive = self.consecutive.saturating_add(1);
        Verdict::RestartAfter(delay)
    }

    /// Forgets everything (a `failed` slot revived by an operator).
    pub(crate) fn clear(&mut self) {
        self.crashes.clear();
        self.consecutive = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    #[test]
    fn backoff_doubles_from_100ms_to_a_10s_cap() {
        let mut history = CrashHistory::default();
        let t0 = Instant::now();
        let delays: Vec<Verdict> = (0..10)
            .map(|i| history.record(t0 + Duration::from_secs(i * 100), None, 100, WINDOW))
            .collect();
        let ms = |v: Verdict| match v {
            Verdict::RestartAfter(d) => d.as_millis(),
            Verdict::Fail => panic!("unexpected fail"),
        };
        let got: Vec<u128> = delays.into_iter().map(ms).collect();
        assert_eq!(
            got,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
    }

    #[test]
    fn a_healthy_second_resets_the_backoff() {
        let mut history = CrashHistory::default();
        let t0 = Instant::now();
        for i in 0..4 {
            history.record(t0 + Duration::from_millis(i), None, 100, WINDOW);
        }
        let ready = t0 + Duration::from_secs(1);
        let early = history.record(ready + HEALTHY_RESET / 2, Some(ready), 100, WINDOW);
        assert_eq!(early, Verdict::RestartAfter(BACKOFF_BASE * 16));
        let verdict = history.record(ready + HEALTHY_RESET, Some(ready), 100, WINDOW);
        assert_eq!(verdict, Verdict::RestartAfter(BACKOFF_BASE));
    }

    #[test]
    fn more_than_max_restarts_in_the_window_fails_the_slot() {
        let mut history = CrashHistory::default();
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(matches!(
                history.record(t0 + Duration::from_secs(i), None, 3, WINDOW),
                Verdict::RestartAfter(_)
            ));
        }
        assert_eq!(
            history.record(t0 + Duration::from_secs(3), None, 3, WINDOW),
            Verdict::Fail
        );
    }

    #[test]
    fn crashes_older_than_the_window_are_forgotten() {
        let mut history = CrashHistory::default();
        let t0 = Instant::now();
        for i in 0..3 {
            history.record(t0 + Duration::from_secs(i), None, 3, WINDOW);
        }
        let later = t0 + WINDOW + Duration::from_secs(10);
        assert!(matches!(
            history.record(later, None, 3, WINDOW),
            Verdict::RestartAfter(_)
        ));
    }
}
