//! The supervisor's answers to the status listener.

use std::time::Instant;

use super::core::Phase;
use super::supervisor::Supervisor;
use crate::status::server::Reply;
use crate::status::{
    PrimaryStatus, StatusDocument, SteeringStatus, Totals, WorkerStatus, rss_bytes,
};

impl Supervisor {
    /// Builds the response to a status request path.
    pub(super) fn reply(&self, path: &str) -> Reply {
        match path {
            "/status" => Reply {
                status: 200,
                content_type: "application/json",
                body: serde_json::to_string_pretty(&self.snapshot()).unwrap_or_default() + "\n",
            },
            "/metrics" => Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                body: crate::status::render_metrics(&self.snapshot()),
            },
            "/ready" if self.handed_over() => Reply {
                // A request this primary took just before it handed over: the cluster at
                // this address is its successor now, which is ready (that is why this one
                // handed over).
                status: 200,
                content_type: "text/plain",
                body: "ready (handed over to the new primary)\n".into(),
            },
            "/ready" => {
                // For load balancers and Kubernetes probes: serving now, and staying.
                let doc = self.snapshot();
                let ready = doc.primary.phase != "stopping" && doc.totals.ready > 0;
                Reply {
                    status: if ready { 200 } else { 503 },
                    content_type: "text/plain",
                    body: format!(
                        "{} ({} of {} workers ready, {})\n",
                        if ready { "ready" } else { "not ready" },
                        doc.totals.ready,
                        doc.totals.workers,
                        doc.primary.phase
                    ),
                }
            }
            _ => Reply {
                status: 404,
                content_type: "text/plain",
                body: "try /status, /metrics or /ready\n".into(),
            },
        }
    }

    /// The `/status` document as of now.
    pub(super) fn snapshot(&self) -> StatusDocument {
        let now = Instant::now();
        let slots = self.core.slots();
        let counters = match self.host.steering.counters(slots.len()) {
            Some(Ok(counters)) => Some(counters),
            Some(Err(err)) => {
                tracing::warn!("cannot read the steering counters: {err}");
                None
            }
            None => None,
        };
        let workers: Vec<WorkerStatus> = slots
            .iter()
            .map(|slot| {
                let worker = slot.shown();
                let process = worker.and_then(|w| self.host.procs.get(&w.id));
                WorkerStatus {
                    slot: slot.index,
                    pid: worker.map(|w| w.pid),
                    generation: worker.map_or(slot.generation, |w| w.generation),
                    state: slot.state().name().to_owned(),
                    uptime_s: worker.map(|w| now.saturating_duration_since(w.started).as_secs()),
                    restarts: slot.restarts,
                    // What the program steered here (kernel-side, exact), else what the
                    // workers reported accepting.
                    accepted: counters
                        .as_ref()
                        .and_then(|c| c.selections.get(slot.index).copied())
                        .unwrap_or_else(|| slot.accepted()),
                    active: worker.map_or(0, |w| w.counters.active),
                    requests: worker.map_or(0, |w| w.counters.requests),
                    rss_bytes: process.and_then(|p| p.memory.as_ref()?.bytes()),
                    last_exit: slot.last_exit.map(|s| s.to_string()),
                    next_restart_in_ms: slot.next_restart_in(now).map(|d| d.as_millis() as u64),
                    health_ms: worker
                        .and_then(|w| w.heartbeat.owed(now))
                        .map(|age| age.as_millis() as u64),
                    draining: slot.retiring.len(),
                    messages_dropped: slot.messages_dropped,
                }
            })
            .collect();
        let totals = Totals {
            workers: self.core.configured(),
            ready: workers.iter().filter(|w| w.state == "ready").count(),
            restarts: workers
                .iter()
                .fold(0u64, |sum, w| sum.saturating_add(u64::from(w.restarts))),
            accepted: workers
                .iter()
                .fold(0u64, |sum, w| sum.saturating_add(w.accepted)),
        };
        let phase = match (self.core.phase(), self.core.rolling()) {
            (Phase::Stopping { .. }, _) => "stopping",
            (Phase::Running, _) if self.upgrading() => "upgrading",
            (Phase::Running, true) => "rolling",
            (Phase::Running, false) => "running",
        };
        StatusDocument {
            primary: PrimaryStatus {
                pid: std::process::id(),
                uptime_s: now.saturating_duration_since(self.started).as_secs(),
                balance: self.host.steering.policy().to_string(),
                listen: self.host.listen.to_string(),
                phase: phase.into(),
                rss_bytes: rss_bytes(std::process::id()),
                log_lines_dropped: crate::logging::dropped_lines(),
                stalls: self.core.stalls(),
            },
            workers,
            totals,
            steering: counters.map(|c| SteeringStatus {
                policy: c.policy.to_string(),
                selections: c.selections,
                fallbacks: c.fallbacks,
                drops: c.drops,
                migrations: c.migrations,
            }),
        }
    }
}
