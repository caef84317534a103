//! What a listening loop does when `accept` fails for more than a passing reason, typically
//! because the process or the system is out of file descriptors or memory: pause accepting
//! for a moment, and say so once per interval, instead of retrying at once.
//!
//! Retrying at once is a busy loop: the connection stays queued, the listener stays
//! readable, and every `accept` fails again, so the loop burns a CPU and writes a log line
//! per attempt while nothing is served. nginx pauses its accept events for
//! `accept_mutex_delay` (500 ms) in that case (`ngx_event_accept.c`); Steer's loops pause
//! for [`ACCEPT_PAUSE`]. What is queued stays in the kernel's accept queue meanwhile, and is
//! taken as soon as a descriptor is free again.

use std::io;
use std::time::{Duration, Instant};

/// How long accepting stops after `accept` failed (out of descriptors or memory).
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// At most one warning about running out per this interval; the ones in between are counted.
pub const WARNING_INTERVAL: Duration = Duration::from_secs(5);

/// Whether an `accept` error means "out of descriptors or memory": `EMFILE`, `ENFILE`,
/// `ENOBUFS`, `ENOMEM`. These clear when something else closes, not by retrying.
pub fn is_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The pause state of one listening loop.
#[derive(Debug, Default)]
pub struct AcceptPause {
    until: Option<Instant>,
    last_warning: Option<Instant>,
    suppressed: u64,
}

impl AcceptPause {
    /// Whether accepting is paused at `now`.
    pub fn is_paused(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// When accepting resumes, if it is paused.
    pub fn resumes_at(&self) -> Option<Instant> {
        self.until
    }

    /// Records a failed `accept` at `now`: pauses for [`ACCEPT_PAUSE`] and logs one warning
    /// per [`WARNING_INTERVAL`] for `what` (e.g. "the status listener"), with the number of
    /// failures since the last one.
    pub fn failed(&mut self, now: Instant, what: &str, error: &io::Error) {
        self.until = Some(now + ACCEPT_PAUSE);
        self.suppressed += 1;
        if self
            .last_warning
            .is_some_and(|last| now.saturating_duration_since(last) < WARNING_INTERVAL)
        {
            return;
        }
        tracing::warn!(
            failures = self.suppressed,
            "{what}: accept failed: {error}; accepting pauses for {} ms at a time (one warning per {} s)",
            ACCEPT_PAUSE.as_millis(),
            WARNING_INTERVAL.as_secs()
        );
        self.last_warning = Some(now);
        self.suppressed = 0;
    }

    /// Forgets a pause that is over, so [`AcceptPause::resumes_at`] stops asking for a wakeup.
    pub fn expire(&mut self, now: Instant) {
        if self.until.is_some_and(|until| now >= until) {
            self.until = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_pauses_and_warns_once_per_interval() {
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(is_exhaustion(&emfile));
        assert!(!is_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
        let start = Instant::now();
        let mut pause = AcceptPause::default();
        assert!(!pause.is_paused(start));
        pause.failed(start, "test", &emfile);
        assert!(pause.is_paused(start + ACCEPT_PAUSE / 2));
        assert!(!pause.is_paused(start + ACCEPT_PAUSE));
        assert_eq!(pause.last_warning, Some(start));
        let later = start + ACCEPT_PAUSE;
        pause.failed(later, "test", &emfile);
        assert_eq!(pause.last_warning, Some(start), "no second warning yet");
        assert_eq!(pause.suppressed, 1);
        let next = start + WARNING_INTERVAL;
        pause.failed(next, "test", &emfile);
        assert_eq!(pause.last_warning, Some(next));
        assert_eq!(pause.suppressed, 0);
        pause.expire(next + ACCEPT_PAUSE);
        assert_eq!(pause.resumes_at(), None);
    }
}
