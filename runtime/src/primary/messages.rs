//! Messages from workers: registration, readiness, heartbeats, and user messages to relay.
//! Nothing a worker sends can crash the primary: a protocol violation replaces the worker.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;

use mio::unix::SourceFd;

use super::Control;
use super::slot::{Phase, Role};
use super::supervisor::Supervisor;
use crate::baseline::Baseline;
use crate::ipc::{IpcError, Message, Received, Recipient};

/// Most messages read from one worker per wakeup, so a chatty worker cannot starve the
/// loop (the rest wait for the next wakeup; the socket stays readable).
const MAX_MESSAGES_PER_WAKEUP: usize = 64;

impl Supervisor {
    /// The worker's IPC socket is readable.
    pub(super) fn on_ipc(&mut self, pid: i32) {
        let Some(&index) = self.pid_slot.get(&pid) else {
            return;
        };
        let mut batch = Vec::new();
        {
            let Some((_, process)) = self.slots[index].find_mut(pid) else {
                return;
            };
            for _ in 0..MAX_MESSAGES_PER_WAKEUP {
                match process.channel.recv() {
                    Ok(Some(received)) => batch.push(Ok(received)),
                    Ok(None) => break,
                    Err(err) => {
                        batch.push(Err(err));
                        break;
                    }
                }
            }
        }
        let more = batch.len() == MAX_MESSAGES_PER_WAKEUP;
        for item in batch {
            match item {
                Ok(received) => {
                    if let Err(violation) = self.on_message(index, pid, received) {
                        self.protocol_violation(index, pid, &violation);
                        return;
                    }
                }
                Err(IpcError::Closed) => {
                    // The worker closed its end (exiting, or an external program that does
                    // not speak the protocol): stop watching; its exit comes on the pidfd.
                    self.unwatch_ipc(index, pid);
                    return;
                }
                Err(err) => {
                    self.protocol_violation(index, pid, &err.to_string());
                    return;
                }
            }
        }
        if more && !self.pending_ipc.contains(&pid) {
            // Edge-triggered: what is left raises no new event. Serve it after the next
            // poll, so one chatty worker cannot starve signals, exits or other workers.
            self.pending_ipc.push(pid);
        }
    }

    fn on_message(&mut self, index: usize, pid: i32, received: Received) -> Result<(), String> {
        let now = Instant::now();
        let external = matches!(self.program, super::WorkerProgram::External(_));
        let expected = self.listen;
        let Some((_, process)) = self.slots[index].find_mut(pid) else {
            return Ok(());
        };
        process.last_heard = now;
        process.speaks_ipc = true;
        match received.message {
            Message::Register { .. } => {
                let fd = received.fd.ok_or("register without a socket attached")?;
                if external {
                    return Err(
                        "an external worker may not register a socket; it was given fd 3".into(),
                    );
                }
                if process.phase != Phase::Starting || process.registered_fd.is_some() {
                    return Err("register sent twice".into());
                }
                crate::listener::verify(&fd, expected)
                    .map_err(|e| format!("rejected registration: {e}"))?;
                process.registered_fd = Some(fd);
                let sent = match self.steering.load_record(index, process.generation as u32) {
                    Some(Ok((record, load))) => process
                        .channel
                        .send_with_fd(&Message::Registered { load: Some(load) }, record.as_fd()),
                    Some(Err(err)) => {
                        tracing::warn!(slot = index, "worker will not publish its load: {err}");
                        process.channel.send(&Message::Registered { load: None })
                    }
                    None => process.channel.send(&Message::Registered { load: None }),
                };
                sent.map_err(|e| format!("cannot confirm registration: {e}"))?;
                tracing::info!(
                    slot = index,
                    pid,
                    generation = process.generation,
                    "worker registered its socket"
                );
            }
            Message::Ready => {
                if received.fd.is_some() {
                    return Err("unexpected fd beside ready".into());
                }
                if !external
                    && self
                        .baseline
                        .as_ref()
                        .is_none_or(Baseline::workers_register)
                    && process.registered_fd.is_none()
                    && process.phase == Phase::Starting
                {
                    return Err("ready before register".into());
                }
                self.become_ready(index, pid, now);
            }
            Message::Pong { counters, .. } => {
                process.counters = counters;
                process.answers_pings = true;
            }
            Message::User { to, data, .. } => {
                self.route_user_message(index, to.unwrap_or(Recipient::Primary), data)
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

    /// Relays a worker's user message, or hands it to the primary's hook.
    fn route_user_message(&mut self, from: usize, to: Recipient, data: serde_json::Value) {
        match to {
            Recipient::Primary => {
                let Some(hook) = self.hooks.on_message.as_mut() else {
                    tracing::debug!(slot = from, "user message with no primary hook: {data}");
                    return;
                };
                let mut control = Control {
                    outbox: Vec::new(),
                    workers: self.slots.len(),
                };
                hook(&mut control, from, data);
                for (target, data) in control.outbox {
                    self.deliver(None, target, data);
                }
            }
            Recipient::All => self.deliver(Some(from), None, data),
            Recipient::Slot(slot) => self.deliver(Some(from), Some(slot), data),
        }
    }

    /// Sends a user message to one slot's serving process, or to every slot's but the
    /// sender's.
    pub(crate) fn deliver(
        &mut self,
        from: Option<usize>,
        to: Option<usize>,
        data: serde_json::Value,
    ) {
        let message = Message::User {
            to: None,
            from,
            data,
        };
        for slot in &self.slots {
            if to.is_some_and(|t| t != slot.index) || (to.is_none() && from == Some(slot.index)) {
                continue;
            }
            if let Some(process) = slot.current.as_ref().filter(|p| p.phase == Phase::Ready)
                && let Err(err) = process.channel.send(&message)
            {
                tracing::warn!(slot = slot.index, "cannot deliver user message: {err}");
            }
        }
    }

    /// A worker broke the protocol: log it and replace it. Its IPC is no longer read.
    fn protocol_violation(&mut self, index: usize, pid: i32, what: &str) {
        tracing::warn!(
            slot = index,
            pid,
            "IPC protocol violation: {what}; replacing the worker"
        );
        self.unwatch_ipc(index, pid);
        let now = Instant::now();
        let Some((role, process)) = self.slots[index].find_mut(pid) else {
            return;
        };
        // Its IPC is no longer read, so its silence from now on means nothing.
        process.answers_pings = false;
        match (role, process.phase) {
            // Serving: start a replacement first; this one drains when it is ready.
            (Role::Current, Phase::Ready) => self.slots[index].replace_wanted = true,
            // Not serving yet, or already leaving: it has no queue worth keeping.
            _ => Self::kill(process, "protocol violation"),
        }
        let _ = now;
    }

    fn unwatch_ipc(&mut self, index: usize, pid: i32) {
        if let Some((_, process)) = self.slots[index].find_mut(pid) {
            let fd = process.channel.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        }
    }
}
