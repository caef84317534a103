//! What a load run saw: counts, errors by kind, per-worker split, latency histogram.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::Mode;

/// Largest latency the histogram records, in microseconds (longer ones are clamped).
const MAX_LATENCY_US: u64 = 60_000_000;

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `connect` was refused (`ECONNREFUSED`): nothing listened.
    Refused,
    /// The connection was reset or closed before the response was complete.
    Reset,
    /// No complete response within the timeout.
    Timeout,
    /// A complete response with a status other than 200.
    BadStatus,
    /// Anything else (a malformed response, no local port left, ..).
    Other,
}

impl ErrorKind {
    /// Classifies an I/O error from connect, write or read.
    pub fn of(err: &io::Error) -> ErrorKind {
        match err.kind() {
            io::ErrorKind::ConnectionRefused => ErrorKind::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => ErrorKind::Reset,
            io::ErrorKind::TimedOut => ErrorKind::Timeout,
            _ => ErrorKind::Other,
        }
    }
}

/// Failed requests by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Errors {
    /// Connection refused.
    pub refused: u64,
    /// Reset or closed before a complete response.
    pub reset: u64,
    /// No complete response in time.
    pub timeout: u64,
    /// A status other than 200.
    pub bad_status: u64,
    /// Anything else.
    pub other: u64,
}

impl Errors {
    /// All failed requests.
    pub fn total(&self) -> u64 {
        self.refused + self.reset + self.timeout + self.bad_status + self.other
    }

    fn add(&mut self, kind: ErrorKind) {
        match kind {
            ErrorKind::Refused => self.refused += 1,
            ErrorKind::Reset => self.reset += 1,
            ErrorKind::Timeout => self.timeout += 1,
            ErrorKind::BadStatus => self.bad_status += 1,
            ErrorKind::Other => self.other += 1,
        }
    }

    fn merge(&mut self, other: &Errors) {
        self.refused += other.refused;
        self.reset += other.reset;
        self.timeout += other.timeout;
        self.bad_status += other.bad_status;
        self.other += other.other;
    }
}

/// Latency percentiles of successful requests, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest.
    pub max_us: u64,
    /// Mean.
    pub mean_us: f64,
}

impl Latency {
    /// The percentiles of `histogram` (microseconds).
    pub fn of(histogram: &Histogram<u64>) -> Latency {
        Latency {
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
            mean_us: histogram.mean(),
        }
    }
}

/// `count` over `seconds`, or 0 for a run of no length.
pub fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// How evenly requests spread over the workers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fairness {
    /// Busiest worker's count over the idlest's (infinite if one got nothing).
    pub max_over_min: f64,
    /// Coefficient of variation: standard deviation over mean of the counts.
    pub cv: f64,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// How connections were used.
    pub mode: Mode,
    /// Concurrent connections or lanes.
    pub connections: usize,
    /// Wall-clock length of the run, seconds.
    pub elapsed_s: f64,
    /// Requests answered 200.
    pub ok: u64,
    /// Successful requests per second.
    pub rate: f64,
    /// Failed requests by kind.
    pub errors: Errors,
    /// Successful requests per `X-Steer-Worker` value (`?` when absent).
    pub per_worker: BTreeMap<String, u64>,
    /// With a [`LoadSpec::phase`](super::LoadSpec::phase) counter: successful requests per
    /// phase they started in, per worker.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub per_phase: BTreeMap<u64, BTreeMap<String, u64>>,
    /// Latency of successful requests.
    pub latency: Latency,
    #[serde(skip)]
    histogram: Histogram<u64>,
}

impl LoadReport {
    /// A report with nothing counted yet.
    pub fn empty(mode: Mode, connections: usize) -> LoadReport {
        LoadReport {
            mode,
            connections,
            elapsed_s: 0.0,
            ok: 0,
            rate: 0.0,
            errors: Errors::default(),
            per_worker: BTreeMap::new(),
            per_phase: BTreeMap::new(),
            latency: Latency::default(),
            histogram: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("constant histogram bounds are valid"),
        }
    }

    /// Counts a complete response to a request started in `phase`; one that does not
    /// count (`counted` false: the run was over when it arrived) is ignored.
    pub fn succeed_or_fail(
        &mut self,
        status: u16,
        worker: Option<String>,
        latency: Duration,
        phase: Option<u64>,
        counted: bool,
    ) {
        if !counted {
            return;
        }
        if status != 200 {
            self.errors.add(ErrorKind::BadStatus);
            return;
        }
        self.ok += 1;
        let worker = worker.unwrap_or_else(|| "?".into());
        if let Some(phase) = phase {
            *self
                .per_phase
                .entry(phase)
                .or_default()
                .entry(worker.clone())
                .or_insert(0) += 1;
        }
        *self.per_worker.entry(worker).or_insert(0) += 1;
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.histogram
            .saturating_record(us.clamp(1, MAX_LATENCY_US));
    }

    /// Counts a failed request.
    pub fn fail(&mut self, kind: ErrorKind) {
        self.errors.add(kind);
    }

    /// Adds another thread's counts.
    pub fn merge(&mut self, other: LoadReport) {
        self.ok += other.ok;
        self.errors.merge(&other.errors);
        for (worker, count) in other.per_worker {
            *self.per_worker.entry(worker).or_insert(0) += count;
        }
        for (phase, workers) in other.per_phase {
            let mine = self.per_phase.entry(phase).or_default();
            for (worker, count) in workers {
                *mine.entry(worker).or_insert(0) += count;
            }
        }
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    /// Sets the run's length and derives the rate and percentiles.
    pub fn finish(&mut self, elapsed: Duration) {
        self.elapsed_s = elapsed.as_secs_f64();
        self.rate = per_second(self.ok, self.elapsed_s);
        self.latency = Latency::of(&self.histogram);
    }

    /// The latency histogram (microseconds), e.g. to merge runs.
    pub fn histogram(&self) -> &Histogram<u64> {
        &self.histogram
    }

    /// Spread of successful requests over `workers` workers; those that answered nothing
    /// count as 0.
    pub fn fairness(&self, workers: usize) -> Fairness {
        let mut counts: Vec<f64> = self.per_worker.values().map(|&c| c as f64).collect();
        counts.resize(counts.len().max(workers), 0.0);
        fairness_of(&counts)
    }
}

/// Max/min and coefficient of variation of `counts`.
pub fn fairness_of(counts: &[f64]) -> Fairness {
    if counts.is_empty() {
        return Fairness {
            max_over_min: f64::NAN,
            cv: f64::NAN,
        };
    }
    let max = counts.iter().copied().fold(f64::MIN, f64::max);
    let min = counts.iter().copied().fold(f64::MAX, f64::min);
    let mean = counts.iter().sum::<f64>() / counts.len() as f64;
    let variance = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / counts.len() as f64;
    Fairness {
        max_over_min: if min > 0.0 { max / min } else { f64::INFINITY },
        cv: if mean > 0.0 {
            variance.sqrt() / mean
        } else {
            f64::NAN
        },
    }
}

/// One line: rate, errors, percentiles, per-worker split.
impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.latency;
        let e = &self.errors;
        write!(
            f,
            "{} ok in {:.1}s = {:.0}/s; errors {} (refused {}, reset {}, timeout {}, bad status {}, other {}); \
             latency p50 {}us p90 {}us p99 {}us p99.9 {}us max {}us; per worker {:?}",
            self.ok,
            self.elapsed_s,
            self.rate,
            e.total(),
            e.refused,
            e.reset,
            e.timeout,
            e.bad_status,
            e.other,
            l.p50_us,
            l.p90_us,
            l.p99_us,
            l.p999_us,
            l.max_us,
            self.per_worker
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fairness_counts_silent_workers_as_zero() {
        let mut report = LoadReport::empty(Mode::Connect, 1);
        for _ in 0..30 {
            report.succeed_or_fail(
                200,
                Some("0".into()),
                Duration::from_micros(100),
                None,
                true,
            );
        }
        for _ in 0..10 {
            report.succeed_or_fail(
                200,
                Some("1".into()),
                Duration::from_micros(300),
                None,
                true,
            );
        }
        let two = report.fairness(2);
        assert!((two.max_over_min - 3.0).abs() < 1e-9);
        assert!((two.cv - 0.5).abs() < 1e-9, "{two:?}");
        assert!(report.fairness(3).max_over_min.is_infinite());
    }

    #[test]
    fn percentiles_errors_and_late_responses() {
        let mut report = LoadReport::empty(Mode::KeepAlive, 1);
        for us in 1..=1000 {
            report.succeed_or_fail(200, None, Duration::from_micros(us), None, true);
        }
        report.succeed_or_fail(500, None, Duration::from_micros(5), None, true);
        report.succeed_or_fail(200, None, Duration::from_secs(9), None, false);
        report.fail(ErrorKind::of(&io::ErrorKind::ConnectionRefused.into()));
        report.fail(ErrorKind::of(&io::ErrorKind::UnexpectedEof.into()));
        report.finish(Duration::from_secs(2));
        assert_eq!(report.ok, 1000);
        assert_eq!(report.rate, 500.0);
        assert_eq!(report.per_worker.get("?"), Some(&1000));
        assert_eq!(
            (
                report.errors.bad_status,
                report.errors.refused,
                report.errors.reset
            ),
            (1, 1, 1)
        );
        let l = report.latency;
        assert!((495..=505).contains(&l.p50_us), "{l:?}");
        assert!((985..=995).contains(&l.p99_us), "{l:?}");
        assert!(l.max_us >= 1000 && l.max_us < 1002, "{l:?}");
    }
}
