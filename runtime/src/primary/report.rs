//! What the supervisor tells the status listener thread: readiness and status documents.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Instant;

use super::core::{Phase as CorePhase, SlotState};
use super::supervisor::Supervisor;
use crate::status::{
    ClientLimitsStatus, ListenerRefusals, ListenerStatus, Phase, PrimaryStatus, Readiness,
    RefusedPrefix, RollAbandonedStatus, StatusDocument, SteeringStatus, Totals, WorkerStatus,
};
use crate::sys::memory::rss_bytes;

impl Supervisor {
    /// Keeps the status listener thread current: the readiness and a stamp of the slots'
    /// states on every turn of the loop (two atomic stores), a document only when a client
    /// waits for one.
    pub(super) fn publish_status(&self) {
        let Some(status) = &self.status else {
            return;
        };
        let stamp = self.stamp();
        status.set_readiness(self.readiness(), stamp);
        if status.document_wanted() {
            status.publish(self.snapshot(), stamp);
        }
    }

    /// Changes whenever a slot's state, process or restart count or the phase does: a
    /// document rendered under another stamp is out of date beyond its counters.
    fn stamp(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.readiness().phase.as_str().hash(&mut hasher);
        for slot in self.core.slots() {
            self.state_of(slot).hash(&mut hasher);
            slot.shown()
                .map(|w| (w.pid, w.generation))
                .hash(&mut hasher);
            (slot.restarts, slot.retiring.len()).hash(&mut hasher);
        }
        hasher.finish()
    }

    /// A slot's state as reported: a slot whose worker is ready is still `starting` until
    /// new connections and flows reach it on every listener (until the program reads a
    /// live set that holds it). Whoever reads `ready` may send at once.
    pub(super) fn state_of(&self, slot: &super::core::Slot) -> SlotState {
        match slot.state() {
            SlotState::Ready if !self.host.in_steering(slot.index) => SlotState::Starting,
            state => state,
        }
    }

    /// What `/ready` answers from.
    fn readiness(&self) -> Readiness {
        Readiness {
            ready: self
                .core
                .slots()
                .iter()
                .filter(|slot| self.state_of(slot) == SlotState::Ready)
                .count(),
            workers: self.core.configured(),
            phase: match (self.core.phase(), self.core.rolling()) {
                (CorePhase::Stopping { .. }, _) => Phase::Stopping,
                (CorePhase::Running, _) if self.upgrading() => Phase::Upgrading,
                (CorePhase::Running, true) => Phase::Rolling,
                (CorePhase::Running, false) => Phase::Running,
            },
            handed_over: self.handed_over(),
        }
    }

    /// The `/status` document as of now.
    pub(super) fn snapshot(&self) -> StatusDocument {
        let now = Instant::now();
        let slots = self.core.slots();
        let per_group: Vec<Option<crate::steering::SteeringCounters>> = self
            .host
            .groups
            .iter()
            .map(|group| match group.steering.counters(slots.len()) {
                Some(Ok(counters)) => Some(counters),
                Some(Err(err)) => {
                    tracing::warn!(
                        listener = %group.listener.name,
                        "cannot read the steering counters: {}",
                        crate::errors::error_chain(&err)
                    );
                    None
                }
                None => None,
            })
            .collect();
        let counters = per_group
            .iter()
            .flatten()
            .cloned()
            .reduce(|sum, c| sum.plus(&c));
        let listeners = self
            .host
            .groups
            .iter()
            .zip(&per_group)
            .map(|(group, counted)| ListenerStatus {
                name: group.listener.name.clone(),
                protocol: group.listener.protocol.to_string(),
                address: group.listener.addr.to_string(),
                steered: counted.as_ref().map(|c| c.selections.iter().sum()),
                drops: counted.as_ref().map_or(0, |c| c.drops),
                refusals: counted.as_ref().map_or(0, |c| c.client_refusals),
                takeovers: counted.as_ref().map_or(0, |c| c.takeovers),
                flows: counted
                    .as_ref()
                    .filter(|_| group.steering.tracks_flows())
                    .map(|c| crate::status::FlowCounts {
                        hits: c.flow_hits,
                        inserts: c.flow_inserts,
                        moves: c.flow_moves,
                    }),
                quic: counted
                    .as_ref()
                    .filter(|_| group.steering.is_quic())
                    .map(|c| crate::status::QuicCounts {
                        steered: c.quic_steered,
                        malformed: c.quic_malformed,
                    }),
            })
            .collect();
        let workers: Vec<WorkerStatus> = slots
            .iter()
            .map(|slot| {
                let worker = slot.shown();
                let process = worker.and_then(|w| self.host.procs.get(&w.id));
                // Only a worker that answers pings reports counters (with its pongs): for
                // one that never does, a 0 would be a guess, so nothing is shown.
                let reporting = worker.filter(|w| w.heartbeat.watched);
                let counted = counters.is_some()
                    || slot.accepted_before > 0
                    || slot.workers().any(|w| w.heartbeat.watched);
                WorkerStatus {
                    slot: slot.index,
                    pid: worker.map(|w| w.pid),
                    generation: worker.map_or(slot.generation, |w| w.generation),
                    state: self.state_of(slot).name().to_owned(),
                    uptime_s: worker.map(|w| now.saturating_duration_since(w.started).as_secs()),
                    restarts: slot.restarts,
                    // What the program steered here (kernel-side, exact), else what the
                    // workers reported accepting.
                    accepted: counters
                        .as_ref()
                        .and_then(|c| c.selections.get(slot.index).copied())
                        .or_else(|| counted.then(|| slot.accepted())),
                    active: reporting.map(|w| w.counters.active),
                    requests: reporting.map(|w| w.counters.requests),
                    rss_bytes: process.and_then(|p| p.memory.as_ref()?.bytes()),
                    last_exit: slot.last_exit.map(|s| s.to_string()),
                    next_restart_in_ms: slot.next_restart_in(now).map(|d| d.as_millis() as u64),
                    health_ms: worker
                        .and_then(|w| w.heartbeat.owed(now))
                        .map(|age| age.as_millis() as u64),
                    draining: slot.retiring.len(),
                    messages_dropped: slot.messages_dropped,
                    output_dropped: self
                        .host
                        .output
                        .as_ref()
                        .map_or(0, |o| o.dropped(slot.index)),
                    stalled: counters
                        .as_ref()
                        .and_then(|c| c.stalled.get(slot.index).copied())
                        .unwrap_or(false),
                    stalls: counters
                        .as_ref()
                        .and_then(|c| c.stalls.get(slot.index).copied())
                        .unwrap_or(0),
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
                .fold(0u64, |sum, w| sum.saturating_add(w.accepted.unwrap_or(0))),
        };
        let phase = self.readiness().phase.as_str();
        StatusDocument {
            primary: PrimaryStatus {
                pid: std::process::id(),
                uptime_s: now.saturating_duration_since(self.started).as_secs(),
                balance: self.host.policy().to_string(),
                listen: self
                    .host
                    .groups
                    .first()
                    .map(|g| g.listener.addr.to_string())
                    .unwrap_or_default(),
                phase: phase.into(),
                rss_bytes: rss_bytes(std::process::id()),
                log_lines_dropped: crate::logging::dropped_lines(),
                stalls: self.core.stalls(),
                roll_abandoned: self.core.roll_abandoned().map(|r| RollAbandonedStatus {
                    slot: r.slot,
                    reason: r.reason.clone(),
                }),
                foreign_listeners: self
                    .host
                    .groups
                    .iter()
                    .map(|g| g.port.foreign().len() as u64)
                    .sum(),
                foreign_listener_addresses: self
                    .host
                    .groups
                    .iter()
                    .flat_map(|g| g.port.foreign())
                    .map(|f| f.listener.address.to_string())
                    .collect(),
            },
            workers,
            totals,
            client_limits: self.client_limits_status(&per_group),
            listeners,
            steering: counters.map(|c| SteeringStatus {
                policy: c.policy.to_string(),
                selections: c.selections,
                fallbacks: c.fallbacks,
                drops: c.drops,
                migrations: c.migrations,
                takeovers: c.takeovers,
                turns_lost: c.turns_lost,
            }),
        }
    }

    /// The per-client limit's part of `/status`; `None` without a limit.
    fn client_limits_status(
        &self,
        per_group: &[Option<crate::steering::SteeringCounters>],
    ) -> Option<ClientLimitsStatus> {
        let limits = &self.host.config.client_limits;
        let rate = limits.rate?;
        let view = self.host.groups.first()?.steering.client_view()?;
        let inserts = per_group.iter().flatten().map(|c| c.client_inserts).sum();
        Some(ClientLimitsStatus {
            rate: rate.to_string(),
            burst: limits.burst,
            refused: self
                .host
                .groups
                .iter()
                .zip(per_group)
                .filter(|(g, _)| g.is_tcp())
                .map(|(group, counted)| ListenerRefusals {
                    listener: group.listener.addr.to_string(),
                    refused: counted.as_ref().map_or(0, |c| c.client_refusals),
                })
                .collect(),
            clients_tracked: view.tracked,
            table_size: u64::from(limits.table_size),
            inserts,
            evictions: inserts.saturating_sub(view.tracked),
            top_refused: view
                .top
                .iter()
                .map(|(prefix, refused)| RefusedPrefix {
                    prefix: prefix.clone(),
                    refused: *refused,
                })
                .collect(),
        })
    }
}
