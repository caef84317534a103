//! Messages from workers: registration, readiness, heartbeats, and user messages to relay.
//! Nothing a worker sends can crash the primary or flood it: a protocol violation counts
//! as a crash of that worker, and what it relays to others is budgeted.

use std::os::fd::AsFd;
use std::time::Instant;

use super::Control;
use super::core::{Registration, WorkerId};
use super::process::ListenerRef;
use super::supervisor::Supervisor;
use crate::ipc::{Encoded, IpcError, Message, Payload, Received, Recipient};

/// Most messages read from one worker per wakeup, so a chatty worker cannot starve the
/// loop (the rest wait for the next turn; the socket stays readable).
const MAX_MESSAGES_PER_WAKEUP: usize = 64;

impl Supervisor {
    /// The worker's IPC socket is readable (or has more than one turn read).
    pub(super) fn on_ipc(&mut self, id: WorkerId) {
        // A stream channel is also watched for writability: what waits in its output
        // buffer goes out now. A peer that is gone shows on the read side below.
        if let Some(process) = self.host.process(id) {
            let _gone = process.channel.flush();
            process.resend_ping();
        }
        for _ in 0..MAX_MESSAGES_PER_WAKEUP {
            let Some(process) = self.host.process(id).filter(|p| p.ipc_watched) else {
                return;
            };
            let received = process.channel.recv();
            let index = process.slot;
            match received {
                Ok(Some(received)) => {
                    if let Err(violation) = self.on_message(index, id, received) {
                        self.violation(index, id, &violation);
                        return;
                    }
                }
                Ok(None) => return,
                Err(IpcError::Closed) => {
                    // The worker closed its end (exiting, or an external program that does
                    // not speak the protocol): its exit comes on the pidfd.
                    self.host.unwatch_ipc(id);
                    return;
                }
                Err(err) if !err.is_violation() => {
                    // This process is out of fds (or the socket failed): not the worker's
                    // fault, never a protocol violation. The next message may need none.
                    tracing::warn!(slot = index, "reading a worker's IPC: {err}");
                    if !matches!(err, IpcError::FdsExhausted) {
                        return;
                    }
                }
                Err(err) => {
                    self.violation(index, id, &err.to_string());
                    return;
                }
            }
        }
        if !self.pending_ipc.contains(&id) {
            // Edge-triggered: what is left raises no new event. Serve it after the next
            // poll, so one chatty worker cannot starve signals, exits or other workers.
            self.pending_ipc.push(id);
        }
    }

    fn violation(&mut self, index: usize, id: WorkerId, what: &str) {
        self.host.unwatch_ipc(id);
        self.core
            .violation(&mut self.host, index, id, what, Instant::now());
    }

    fn on_message(&mut self, index: usize, id: WorkerId, received: Received) -> Result<(), String> {
        let now = Instant::now();
        let Received { message, fd } = received;
        match message {
            Message::Register {
                fd: number,
                listener: place,
                ..
            } => {
                let socket = fd.ok_or("register without a socket attached")?;
                let place = place.unwrap_or(0) as usize;
                let listener = self
                    .host
                    .groups
                    .get(place)
                    .map(|g| g.listener.clone())
                    .ok_or_else(|| format!("register for listener {place}, which is not one"))?;
                let Some(process) = self.host.procs.get(&id) else {
                    return Ok(());
                };
                // One socket per listener, in order: the last one completes the
                // registration, which the core judges once.
                if process
                    .sockets
                    .get(..place)
                    .is_some_and(|before| before.iter().any(Option::is_none))
                    || process.sockets.get(place).is_some_and(Option::is_some)
                {
                    return Err(format!(
                        "register for listener {place} ({:?}) out of order or twice",
                        listener.name
                    ));
                }
                let complete = place + 1 == self.host.groups.len();
                if complete {
                    match self.core.registered(index, id)? {
                        Registration::Ignored => return Ok(()),
                        Registration::Accepted => {}
                    }
                } else if !self.core.worker(index, id).is_some_and(|w| {
                    matches!(
                        w.stage(),
                        super::core::Stage::Starting {
                            registered: false,
                            ..
                        }
                    ) && !w.draining()
                }) {
                    // Not starting any more (or drained): nothing of it enters steering.
                    return Ok(());
                }
                crate::listener::verify_for(socket.as_fd(), &listener).map_err(|e| {
                    format!("rejected registration of listener {:?}: {e}", listener.name)
                })?;
                let found = crate::sys::fd::inode(socket.as_fd())
                    .ok()
                    .zip(number)
                    .map(|(inode, fd)| ListenerRef { inode, fd });
                let Some(process) = self.host.procs.get_mut(&id) else {
                    return Ok(());
                };
                process.listeners[place] = found;
                process.sockets[place] = Some(socket);
                if !complete {
                    return Ok(());
                }
                let generation = self
                    .core
                    .worker(index, id)
                    .map_or(0, |w| w.generation as u32);
                let share = self.host.load_record(index, generation);
                let Some(process) = self.host.procs.get_mut(&id) else {
                    return Ok(());
                };
                let sent = match share {
                    Some(Ok((record, load))) => process
                        .channel
                        .send_with_fd(&Message::Registered { load: Some(load) }, record.as_fd()),
                    Some(Err(err)) => {
                        tracing::warn!(
                            slot = index,
                            "worker will not publish its load: {}",
                            crate::errors::error_chain(&err)
                        );
                        process.channel.send(&Message::Registered { load: None })
                    }
                    None => process.channel.send(&Message::Registered { load: None }),
                };
                sent.map_err(|e| format!("cannot confirm registration: {e}"))?;
                tracing::info!(
                    slot = index,
                    pid = process.pid,
                    generation,
                    "worker registered its socket"
                );
            }
            Message::Ready { heartbeats } => {
                if fd.is_some() {
                    return Err("unexpected fd beside ready".into());
                }
                self.core
                    .ready(&mut self.host, index, id, heartbeats, now)?;
            }
            Message::Pong { seq, counters } => {
                if fd.is_some() {
                    return Err("unexpected fd beside pong".into());
                }
                self.core.pong(&mut self.host, index, id, seq, counters)?;
            }
            Message::User { to, data, .. } => {
                if fd.is_some() {
                    return Err("unexpected fd beside a user message".into());
                }
                self.core.spoke(index, id);
                self.route_user_message(index, id, to.unwrap_or(Recipient::Primary), data, now);
            }
            other @ (Message::Registered { .. }
            | Message::Ping { .. }
            | Message::Drain
            | Message::Connection) => {
                return Err(format!("a worker may not send {other:?}"));
            }
        }
        Ok(())
    }

    /// Relays a worker's user message, or hands it to the primary's hook, within the
    /// worker's budget: a message to the hook costs what a relayed one does, so a hook that
    /// broadcasts what it gets fans out no more than a worker's own `"all"` would.
    fn route_user_message(
        &mut self,
        from: usize,
        id: WorkerId,
        to: Recipient,
        data: Payload,
        now: Instant,
    ) {
        if to == Recipient::Primary && self.hooks.on_message.is_none() {
            tracing::debug!(slot = from, "user message with no primary hook");
            return;
        }
        let size = data.get().len();
        let allowed = self
            .host
            .process(id)
            .is_some_and(|p| p.budget.take(size, now));
        if !allowed {
            self.dropped_message(from, now, "over its relay budget");
            return;
        }
        match to {
            Recipient::Primary => {
                let Some(hook) = self.hooks.on_message.as_mut() else {
                    return;
                };
                let mut control = Control {
                    outbox: Vec::new(),
                    workers: self.core.slots().len(),
                };
                hook(&mut control, from, data.to_value());
                for (target, data) in control.outbox {
                    // From the primary, to every worker the hook names (the sender too);
                    // what a receiver cannot take counts against the slot that caused it.
                    self.deliver(None, target, Payload::from(data), now, Some(from));
                }
            }
            Recipient::All => self.deliver(Some(from), None, data, now, Some(from)),
            Recipient::Slot(slot) => self.deliver(Some(from), Some(slot), data, now, Some(from)),
        }
    }

    /// Sends a user message to one slot's serving process, or to every slot's but the
    /// sender's, serialized once whatever the number of receivers. What a receiver cannot
    /// take now (its socket is full, or a ping waits to be sent there first) is dropped and
    /// counted against slot `charged`.
    pub(crate) fn deliver(
        &mut self,
        from: Option<usize>,
        to: Option<usize>,
        data: Payload,
        now: Instant,
        charged: Option<usize>,
    ) {
        let message = match Encoded::new(&Message::User {
            to: None,
            from,
            data,
        }) {
            Ok(message) => message,
            Err(err) => {
                tracing::warn!(?from, "cannot relay a user message: {err}");
                return;
            }
        };
        let mut undelivered = 0u64;
        for slot in self.core.slots() {
            if to.is_some_and(|t| t != slot.index) || (to.is_none() && from == Some(slot.index)) {
                continue;
            }
            // Only to a worker that speaks the protocol: one that never reads its socket
            // (Node without a `message` listener queues what it gets without bound).
            let Some(worker) = slot
                .current
                .as_ref()
                .filter(|w| w.serving() && w.heartbeat.speaks)
            else {
                continue;
            };
            // A ping that found the socket full goes first: a flood must not starve it.
            if let Some(process) = self.host.procs.get_mut(&worker.id)
                && (!process.resend_ping() || process.channel.send_encoded(&message).is_err())
            {
                undelivered += 1;
            }
        }
        if let Some(sender) = charged {
            for _ in 0..undelivered {
                self.dropped_message(sender, now, "a receiver could not take it");
            }
        }
    }

    /// Counts a dropped message; warns at most once per health interval per slot.
    fn dropped_message(&mut self, slot: usize, now: Instant, why: &str) {
        self.core.count_dropped_message(slot);
        let interval = self.core.settings().health_interval;
        if self.drop_reports.len() <= slot {
            self.drop_reports.resize(slot + 1, (now, 0));
        }
        let Some((reported, since)) = self.drop_reports.get_mut(slot) else {
            return;
        };
        *since += 1;
        if now.saturating_duration_since(*reported) >= interval {
            tracing::warn!(
                slot,
                dropped = *since,
                "dropped {} user message(s) from this slot since the last report ({why})",
                *since
            );
            *reported = now;
            *since = 0;
        }
    }
}
