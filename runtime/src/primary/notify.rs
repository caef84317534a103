//! Telling systemd what the cluster is doing (see [`crate::systemd`]).

use super::slot::SlotState;
use super::supervisor::{ClusterPhase, Supervisor};
use crate::systemd::{ClusterState, Phase};

impl Supervisor {
    /// Hands the current state to the notifier, which sends what changed. Called on every
    /// turn of the loop; cheap when `NOTIFY_SOCKET` is unset.
    pub(super) fn notify_service_manager(&mut self) {
        if !self.notifier.enabled() {
            return;
        }
        let phase = match (self.phase, &self.roll) {
            (ClusterPhase::Stopping { .. }, _) => Phase::Stopping,
            (ClusterPhase::Running, Some(_)) => Phase::Reloading,
            (ClusterPhase::Running, None) => Phase::Running,
        };
        let ready = self
            .slots
            .iter()
            .filter(|s| s.state() == SlotState::Ready)
            .count();
        self.notifier.observe(ClusterState {
            ready,
            slots: self.slots.len(),
            phase,
        });
    }
}
