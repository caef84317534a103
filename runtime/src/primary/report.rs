//! The supervisor's answers to the status listener.

use std::time::Instant;

use super::supervisor::{ClusterPhase, Supervisor};
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
        let counters = match self.steering.counters(self.slots.len()) {
            Some(Ok(counters)) => Some(counters),
            Some(Err(err)) => {
                tracing::warn!("cannot read the steering counters: {err}");
                None
            }
            None => None,
        };
        let workers: Vec<WorkerStatus> = self
            .slots
            .iter()
            .map(|slot| {
                let process = slot.current.as_ref().or(slot.incoming.as_ref());
                WorkerStatus {
                    slot: slot.index,
                    pid: process.map(|p| p.pid),
                    generation: process.map_or(slot.generation, |p| p.generation),
                    state: serde_json::to_value(slot.state())
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    uptime_s: process.map(|p| now.saturating_duration_since(p.started).as_secs()),
                    restarts: slot.restarts,
                    // What the program steered here (kernel-side, exact), else what the
                    // workers reported accepting.
                    accepted: counters
                        .as_ref()
                        .and_then(|c| c.selections.get(slot.index).copied())
                        .unwrap_or_else(|| slot.accepted()),
                    active: process.map_or(0, |p| p.counters.active),
                    requests: process.map_or(0, |p| p.counters.requests),
                    rss_bytes: process.and_then(|p| p.memory.as_ref()?.bytes()),
                    last_exit: slot.last_exit.map(|s| s.to_string()),
                    next_restart_in_ms: slot.next_restart_in(now).map(|d| d.as_millis() as u64),
                    health_ms: process
                        .filter(|p| p.speaks_ipc)
                        .map(|p| now.saturating_duration_since(p.last_heard).as_millis() as u64),
                    draining: slot.retiring.len(),
                }
            })
            .collect();
        let totals = Totals {
            workers: workers.len(),
            ready: workers.iter().filter(|w| w.state == "ready").count(),
            restarts: workers.iter().map(|w| u64::from(w.restarts)).sum(),
            accepted: workers.iter().map(|w| w.accepted).sum(),
        };
        let phase = match (self.phase, &self.roll) {
            (ClusterPhase::Stopping { .. }, _) => "stopping",
            (ClusterPhase::Running, Some(_)) => "rolling",
            (ClusterPhase::Running, None) => "running",
        };
        StatusDocument {
            primary: PrimaryStatus {
                pid: std::process::id(),
                uptime_s: now.saturating_duration_since(self.started).as_secs(),
                balance: self.steering.policy().to_string(),
                listen: self.listen.to_string(),
                phase: phase.into(),
                rss_bytes: rss_bytes(std::process::id()),
            },
            workers,
            totals,
            steering: counters.map(|c| SteeringStatus {
                policy: c.policy.to_string(),
                selections: c.selections,
                fallbacks: c.fallbacks,
                drops: c.drops,
                migrations: c.migrations,
                takeovers: c.takeovers,
            }),
        }
    }
}
