//! Telling systemd what the cluster is doing (see [`crate::systemd`]).

use super::core::{Phase, SlotState};
use super::supervisor::Supervisor;
use crate::systemd::{ClusterState, Phase as NotifyPhase};

impl Supervisor {
    /// Hands the current state to the notifier, which sends what changed (and retries what
    /// systemd could not take yet). Called on every turn of the loop; cheap when
    /// `NOTIFY_SOCKET` is unset.
    pub(super) fn notify_service_manager(&mut self) {
        if !self.notifier.enabled() {
            return;
        }
        let phase = match (self.core.phase(), self.core.rolling() || self.upgrading()) {
            (Phase::Stopping { .. }, _) => NotifyPhase::Stopping,
            (Phase::Running, true) => NotifyPhase::Reloading,
            (Phase::Running, false) => NotifyPhase::Running,
        };
        let slots = self.core.slots();
        let ready = slots
            .iter()
            .filter(|s| self.state_of(s) == SlotState::Ready)
            .count();
        self.notifier.observe(ClusterState {
            ready,
            slots: slots.len(),
            phase,
            roll_abandoned: self.core.roll_abandoned().map(|r| r.slot),
        });
    }
}
