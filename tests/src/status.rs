//! Reading the `GET /status` JSON of a primary.
//!
//! The document (DESIGN.md) is, at least:
//!
//! ```json
//! {"primary": {"pid": 1, "uptime_s": 2.5, "balance": "round-robin", "listen": "127.0.0.1:8000"},
//!  "workers": [{"slot": 0, "pid": 2, "generation": 1, "state": "ready", "uptime_s": 2.4,
//!               "restarts": 0, "accepted": 10, "rss_bytes": 4096000}],
//!  "totals": {"workers": 1, "restarts": 0, "accepted": 10}}
//! ```
//!
//! Functions here take the raw [`Value`] so they fit [`Cluster::wait_until`]
//! (`cluster.wait_until("all ready", timeout, all_ready)`), and panic with the document when
//! it breaks the contract (a worker without `slot` or `state`).
//!
//! [`Cluster::wait_until`]: crate::Cluster::wait_until

use std::fmt;

use serde_json::Value;

/// The state of a slot, as `/status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SlotState {
    /// Spawned, not registered yet.
    Starting,
    /// Registered and in steering.
    Ready,
    /// Stopped answering heartbeats: out of steering, a replacement is coming.
    Hung,
    /// Out of steering, finishing its queue and in-flight work.
    Draining,
    /// Exited; waiting before the next start.
    Backoff,
    /// Crashed too often in the restart window; not restarted.
    Failed,
    /// A state this harness does not know (kept verbatim).
    Other(String),
}

impl SlotState {
    /// Parses the `state` string.
    pub fn parse(state: &str) -> SlotState {
        match state {
            "starting" => SlotState::Starting,
            "ready" => SlotState::Ready,
            "hung" => SlotState::Hung,
            "draining" => SlotState::Draining,
            "backoff" => SlotState::Backoff,
            "failed" => SlotState::Failed,
            other => SlotState::Other(other.to_owned()),
        }
    }

    /// The `state` string.
    pub fn as_str(&self) -> &str {
        match self {
            SlotState::Starting => "starting",
            SlotState::Ready => "ready",
            SlotState::Hung => "hung",
            SlotState::Draining => "draining",
            SlotState::Backoff => "backoff",
            SlotState::Failed => "failed",
            SlotState::Other(other) => other,
        }
    }
}

/// The `state` string.
impl fmt::Display for SlotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of `workers[]`. Numeric fields missing from the document read as 0.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerStatus {
    /// Stable slot index, `0..N`.
    pub slot: usize,
    /// The worker process, `None` when the slot has none (backoff, failed).
    pub pid: Option<u32>,
    /// Grows with each replacement of the slot's process.
    pub generation: u64,
    /// Lifecycle state.
    pub state: SlotState,
    /// Seconds since this generation started.
    pub uptime_s: f64,
    /// Restarts of this slot so far.
    pub restarts: u64,
    /// Connections steered to (or accepted by) this slot.
    pub accepted: u64,
    /// Resident memory of the worker.
    pub rss_bytes: u64,
    /// The whole entry, for fields this struct does not name.
    pub raw: Value,
}

impl WorkerStatus {
    /// Reads one `workers[]` entry.
    ///
    /// # Panics
    ///
    /// If `slot` or `state` is missing or of the wrong type.
    pub fn from_value(entry: &Value) -> WorkerStatus {
        let slot = entry["slot"]
            .as_u64()
            .and_then(|slot| usize::try_from(slot).ok())
            .unwrap_or_else(|| panic!("/status worker without a numeric `slot`: {entry}"));
        let state = entry["state"]
            .as_str()
            .unwrap_or_else(|| panic!("/status worker without a string `state`: {entry}"));
        WorkerStatus {
            slot,
            pid: pid_of(entry),
            generation: entry["generation"].as_u64().unwrap_or_default(),
            state: SlotState::parse(state),
            uptime_s: entry["uptime_s"].as_f64().unwrap_or_default(),
            restarts: entry["restarts"].as_u64().unwrap_or_default(),
            accepted: entry["accepted"].as_u64().unwrap_or_default(),
            rss_bytes: entry["rss_bytes"].as_u64().unwrap_or_default(),
            raw: entry.clone(),
        }
    }
}

/// Every `workers[]` entry, in document order.
///
/// # Panics
///
/// If `workers` is not an array, or an entry breaks the contract (see
/// [`WorkerStatus::from_value`]).
pub fn workers(status: &Value) -> Vec<WorkerStatus> {
    status["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("/status has no `workers` array: {status}"))
        .iter()
        .map(WorkerStatus::from_value)
        .collect()
}

/// The entry of `slot`.
///
/// # Panics
///
/// If there is none, or as [`workers`].
pub fn worker(status: &Value, slot: usize) -> WorkerStatus {
    workers(status)
        .into_iter()
        .find(|worker| worker.slot == slot)
        .unwrap_or_else(|| panic!("/status has no worker in slot {slot}: {status}"))
}

/// Whether there is at least one worker and every worker is `ready` with a pid.
pub fn all_ready(status: &Value) -> bool {
    let workers = workers(status);
    !workers.is_empty()
        && workers
            .iter()
            .all(|worker| worker.state == SlotState::Ready && worker.pid.is_some())
}

/// How many workers are in `state`.
pub fn count_in_state(status: &Value, state: &SlotState) -> usize {
    workers(status)
        .iter()
        .filter(|worker| worker.state == *state)
        .count()
}

/// `(slot, pid)` of every worker that has a process, in document order.
pub fn worker_pids(status: &Value) -> Vec<(usize, u32)> {
    workers(status)
        .into_iter()
        .filter_map(|worker| Some((worker.slot, worker.pid?)))
        .collect()
}

/// Every pid in `workers[]`, without checking the rest of the contract (never panics).
pub(crate) fn pids_leniently(status: &Value) -> Vec<u32> {
    status["workers"]
        .as_array()
        .map(|workers| workers.iter().filter_map(pid_of).collect())
        .unwrap_or_default()
}

/// `primary.pid`.
pub fn primary_pid(status: &Value) -> Option<u32> {
    pid_of(&status["primary"])
}

/// `primary.balance`: the policy in effect (`auto` resolved).
pub fn balance(status: &Value) -> Option<&str> {
    status["primary"]["balance"].as_str()
}

/// `totals.<field>` (`workers`, `restarts`, `accepted`), 0 if absent.
pub fn total(status: &Value, field: &str) -> u64 {
    status["totals"][field].as_u64().unwrap_or_default()
}

fn pid_of(entry: &Value) -> Option<u32> {
    entry["pid"]
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sample(states: &[(&str, Option<u32>)]) -> Value {
        let workers: Vec<Value> = states
            .iter()
            .enumerate()
            .map(|(slot, (state, pid))| {
                json!({"slot": slot, "pid": pid, "generation": slot + 1, "state": state,
                       "uptime_s": 1.5, "restarts": 0, "accepted": 3, "rss_bytes": 4096})
            })
            .collect();
        json!({
            "primary": {"pid": 10, "uptime_s": 2.0, "balance": "kernel", "listen": "127.0.0.1:1"},
            "workers": workers,
            "totals": {"workers": states.len(), "restarts": 4, "accepted": 3 * states.len()},
        })
    }

    #[test]
    fn all_ready_needs_every_worker_ready_with_a_pid() {
        assert!(all_ready(&sample(&[
            ("ready", Some(11)),
            ("ready", Some(12))
        ])));
        assert!(!all_ready(&sample(&[
            ("ready", Some(11)),
            ("starting", Some(12))
        ])));
        assert!(!all_ready(&sample(&[("ready", None)])));
        assert!(
            !all_ready(&sample(&[])),
            "no workers is not a ready cluster"
        );
    }

    #[test]
    fn reads_workers_and_totals() {
        let status = sample(&[("ready", Some(11)), ("backoff", None), ("failed", None)]);
        assert_eq!(worker_pids(&status), vec![(0, 11)]);
        assert_eq!(count_in_state(&status, &SlotState::Failed), 1);
        let slot1 = worker(&status, 1);
        assert_eq!(slot1.state, SlotState::Backoff);
        assert_eq!(slot1.pid, None);
        assert_eq!(slot1.generation, 2);
        assert_eq!(slot1.accepted, 3);
        assert_eq!(primary_pid(&status), Some(10));
        assert_eq!(balance(&status), Some("kernel"));
        assert_eq!(total(&status, "restarts"), 4);
        assert_eq!(total(&status, "nonexistent"), 0);
    }

    #[test]
    fn unknown_states_are_kept() {
        let state = SlotState::parse("hibernating");
        assert_eq!(state, SlotState::Other("hibernating".into()));
        assert_eq!(state.to_string(), "hibernating");
        for known in ["starting", "ready", "draining", "backoff", "failed"] {
            assert_eq!(SlotState::parse(known).as_str(), known);
        }
    }

    #[test]
    #[should_panic(expected = "without a string `state`")]
    fn a_worker_without_state_breaks_the_contract() {
        workers(&json!({"workers": [{"slot": 0, "pid": 1}]}));
    }

    #[test]
    fn lenient_pids_ignore_malformed_documents() {
        assert!(pids_leniently(&json!({"workers": "nope"})).is_empty());
        assert_eq!(
            pids_leniently(&json!({"workers": [{"pid": 5}, {"pid": null}, {}]})),
            vec![5]
        );
    }
}
