//! The supervisor's side of the baselines: handing accepted connections to ready workers
//! (`userspace`), and closing the baseline's socket at shutdown.

use std::time::Instant;

use mio::unix::SourceFd;
use smallvec::SmallVec;

use super::supervisor::Supervisor;
use crate::baseline::{Baseline, Target};

impl Supervisor {
    /// The `userspace` listener is readable (or a retry is due): accept and hand out,
    /// round-robin over the slots whose serving process is ready.
    pub(super) fn hand_off(&mut self) {
        let Some(handoff) = self.host.baseline.as_mut().and_then(Baseline::handoff) else {
            return;
        };
        let procs = &self.host.procs;
        // Built on every wakeup, which at low load is every connection: on the stack.
        let targets: SmallVec<[Target<'_>; 64]> = self
            .core
            .slots()
            .iter()
            .filter_map(|slot| {
                let worker = slot.current.as_ref().filter(|w| w.serving() && !w.killed)?;
                Some(Target {
                    slot: slot.index,
                    channel: &procs.get(&worker.id)?.channel,
                })
            })
            .collect();
        handoff.hand_off(&targets);
    }

    /// When the hand-off must run again without an event (accept budget used up, or a
    /// connection waiting for a worker that can take it).
    pub(super) fn baseline_wakeup(&self, now: Instant) -> Option<Instant> {
        match self.host.baseline.as_ref()? {
            Baseline::Userspace(handoff) => handoff.retry_at(now),
            Baseline::Shared { .. } => None,
        }
    }

    /// Shutdown: the primary stops accepting (`userspace`) and drops its copy of the shared
    /// socket, which closes when the last draining worker closes its own.
    pub(super) fn close_baseline(&mut self) {
        if let Some(Baseline::Userspace(handoff)) = &self.host.baseline {
            let fd = handoff.listener_fd();
            let _ = self.host.poll.registry().deregister(&mut SourceFd(&fd));
        }
        self.host.baseline = None;
    }
}
