//! The slot table: one [`Slot`] per steering index, each with the worker processes that
//! belong to it now.
//!
//! A slot is `ready` exactly when its current worker's socket is in the steering maps.
//! This module owns that invariant: a worker's [`Stage`] is private, and the only way into
//! [`Stage::Serving`] is [`Slot::seat`], which puts the socket into steering first; every
//! way out of it ([`Slot::hang`], [`Slot::drain`], [`Slot::remove`]) takes the slot out of
//! steering in the same step, or hands the seat straight to a replacement.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::heartbeat::Heartbeat;
use super::restart::CrashHistory;
use super::{EnterError, Io, Spawned, WorkerId};
use crate::ipc::Counters;

/// Where one worker process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Spawned, not serving yet; killed if it has not become ready by `deadline`.
    Starting {
        /// The start timeout.
        deadline: Instant,
        /// Its socket arrived with `register` (built-in and library workers).
        registered: bool,
    },
    /// In steering: the only stage that is.
    Serving,
    /// Declared hung: out of steering, its listener shut down, a replacement coming.
    Hung,
    /// Out of steering, finishing what it has; SIGKILL at `deadline`.
    Draining {
        /// The shutdown timeout.
        deadline: Instant,
    },
}

/// Why a slot's serving worker is being replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replacement {
    /// A rolling restart (SIGUSR2, SIGHUP).
    Roll,
    /// Its resident memory passed `max-memory`.
    Memory,
    /// It broke the IPC protocol (counted as a crash).
    Violation,
    /// Declared hung.
    Hung,
    /// Silent among a silent majority: kept in steering while a replacement starts, and
    /// kept for good if it answers before the replacement is ready.
    Silent,
}

/// A slot's state as `/status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// A process is starting and none serves yet.
    Starting,
    /// A process serves.
    Ready,
    /// The serving process stopped answering heartbeats: it is out of steering and a
    /// replacement is on its way.
    Hung,
    /// The slot's process is draining and no replacement will come (shutdown).
    Draining,
    /// Waiting out a backoff delay before the next start.
    Backoff,
    /// Crashed too often; not restarted until revived.
    Failed,
    /// No process and none scheduled (after shutdown).
    Stopped,
}

impl SlotState {
    /// The name `/status` and `/metrics` use.
    pub fn name(self) -> &'static str {
        match self {
            SlotState::Starting => "starting",
            SlotState::Ready => "ready",
            SlotState::Hung => "hung",
            SlotState::Draining => "draining",
            SlotState::Backoff => "backoff",
            SlotState::Failed => "failed",
            SlotState::Stopped => "stopped",
        }
    }
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitStatus {
    /// `exit(code)`.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Gone, but its status could not be had (someone else reaped it, or SIGCHLD was
    /// ignored when it exited).
    Unknown,
}

impl ExitStatus {
    /// `exit 0`.
    pub(crate) fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal(sig) => {
                let name =
                    nix::sys::signal::Signal::try_from(*sig).map_or("unknown", |s| s.as_str());
                write!(f, "signal {sig} ({name})")
            }
            ExitStatus::Unknown => write!(f, "exited, status unknown"),
        }
    }
}

/// One worker process as the core sees it: no fds, only facts and deadlines.
#[derive(Debug)]
pub(crate) struct Worker {
    /// Unique over the primary's life (`STEER_WORKER_ID`).
    pub id: WorkerId,
    /// Its pid, for log lines and `/status`.
    pub pid: i32,
    /// The slot's generation it was started as.
    pub generation: u64,
    /// When it was spawned.
    pub started: Instant,
    stage: Stage,
    /// When it entered steering.
    pub ready_since: Option<Instant>,
    /// It must send `register` (with its socket) before `ready`.
    pub(crate) registers: bool,
    /// Its socket was made by the primary and listens already (an external program).
    pub(crate) listening: bool,
    /// SIGKILL already sent.
    pub killed: bool,
    /// Its end is already counted (a protocol violation counts as a crash when it
    /// happens): its exit is not counted again.
    accounted: bool,
    /// Pings owed and signs of life.
    pub heartbeat: Heartbeat,
    /// What it reported in its last pong.
    pub counters: Counters,
    /// Its resident memory passed `max-memory`; a replacement was asked for.
    pub over_memory: bool,
    /// It answered again after it was declared hung (logged once).
    pub woke: bool,
}

impl Worker {
    /// A process just spawned.
    pub(crate) fn new(
        id: WorkerId,
        spawned: Spawned,
        generation: u64,
        now: Instant,
        start_timeout: Duration,
    ) -> Worker {
        Worker {
            id,
            pid: spawned.pid,
            generation,
            started: now,
            stage: Stage::Starting {
                deadline: now + start_timeout,
                registered: false,
            },
            ready_since: None,
            registers: spawned.registers,
            listening: spawned.listening,
            killed: false,
            accounted: false,
            heartbeat: Heartbeat::default(),
            counters: Counters::default(),
            over_memory: false,
            woke: false,
        }
    }

    /// Where it is.
    pub(crate) fn stage(&self) -> Stage {
        self.stage
    }

    /// In steering now.
    pub(crate) fn serving(&self) -> bool {
        self.stage == Stage::Serving
    }

    /// Draining.
    pub(crate) fn draining(&self) -> bool {
        matches!(self.stage, Stage::Draining { .. })
    }

    /// The start or drain deadline still ahead of it (none once killed).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        if self.killed {
            return None;
        }
        match self.stage {
            Stage::Starting { deadline, .. } | Stage::Draining { deadline } => Some(deadline),
            Stage::Serving | Stage::Hung => None,
        }
    }

    /// Counted ready as soon as it ran: its socket was made by the primary and it sends
    /// no `register` (an external program), so nothing it said made it ready.
    pub(crate) fn ready_at_exec(&self) -> bool {
        self.listening && !self.registers
    }

    /// Whether it has sent `register`, or needs none.
    pub(crate) fn may_become_ready(&self) -> bool {
        match self.stage {
            Stage::Starting { registered, .. } => registered || !self.registers,
            _ => false,
        }
    }

    /// A silent worker whose silence blames it: watched, overdue, still serving.
    pub(crate) fn overdue(&self, now: Instant, timeout: Duration) -> bool {
        self.serving() && !self.killed && self.heartbeat.overdue(now, timeout)
    }

    /// Marks its end as counted already; its exit will not be another crash.
    pub(crate) fn account(&mut self) {
        self.accounted = true;
    }

    /// Whether its exit is part of a plan (draining, or already counted), not a crash.
    pub(crate) fn exit_expected(&self) -> bool {
        self.draining() || self.accounted
    }
}

/// Which process of a slot an event concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The slot's serving (or only) process.
    Current,
    /// A replacement that has not taken over yet.
    Incoming,
    /// An old generation draining.
    Retiring,
}

/// What [`Slot::register`] made of a `register` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Registration {
    /// The socket is kept until the worker is ready.
    Accepted,
    /// The worker is already on its way out (drained or killed while starting): its socket
    /// is closed, and that is no fault of the worker.
    Ignored,
}

/// Why [`Slot::seat`] left everything as it was.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SeatError {
    /// The worker is not this slot's starting current worker or replacement.
    #[error("not a starting worker of this slot")]
    NotStarting,
    /// The host could not put its socket into steering.
    #[error(transparent)]
    Enter(#[from] EnterError),
}

/// One steering index and its processes.
#[derive(Debug)]
pub(crate) struct Slot {
    /// The steering index.
    pub index: usize,
    /// The serving (or only) process.
    pub current: Option<Worker>,
    /// A replacement starting.
    pub incoming: Option<Worker>,
    /// Old generations draining.
    pub retiring: Vec<Worker>,
    /// Generation of the newest process started.
    pub generation: u64,
    /// Crash restarts so far (protocol violations included).
    pub restarts: u32,
    /// Crash memory for backoff and `failed`.
    pub crashes: CrashHistory,
    /// No process before then: a backoff delay, or a replacement's delay.
    pub next_start: Option<Instant>,
    /// Crashed too often; not restarted until revived.
    pub failed: bool,
    /// How its last unexpected exit ended.
    pub last_exit: Option<ExitStatus>,
    /// `accepted` of processes that have exited, so the slot's count only grows.
    pub accepted_before: u64,
    /// User messages from this slot's workers that were not relayed (rate limit, or the
    /// receiver could not take them).
    pub messages_dropped: u64,
    /// Why a replacement of the serving process is wanted, if one is.
    pub replacement: Option<Replacement>,
    /// Being removed by a resize: nothing starts here; once its processes are gone the
    /// slot leaves the table.
    pub retired: bool,
    /// A worker of this slot whose socket the primary made (an external program) has said
    /// `ready`: its successors count as ready only once they say it too, so the old
    /// generation keeps serving while a new one boots (PM2's `wait_ready`).
    pub says_ready: bool,
    /// Processes in a row that ended before they were ready (see
    /// [`super::START_ATTEMPTS`]); 0 once one is ready, and when a roll begins.
    pub failed_starts: u32,
    /// How the last of them ended.
    pub last_start_failure: Option<String>,
}

impl Slot {
    /// An empty slot.
    pub(crate) fn new(index: usize) -> Slot {
        Slot {
            index,
            current: None,
            incoming: None,
            retiring: Vec::new(),
            generation: 0,
            restarts: 0,
            crashes: CrashHistory::default(),
            next_start: None,
            failed: false,
            last_exit: None,
            accepted_before: 0,
            messages_dropped: 0,
            replacement: None,
            retired: false,
            says_ready: false,
            failed_starts: 0,
            last_start_failure: None,
        }
    }

    /// The state `/status` reports.
    pub(crate) fn state(&self) -> SlotState {
        if self.retired {
            return if self.workers().next().is_some() {
                SlotState::Draining
            } else {
                SlotState::Stopped
            };
        }
        if self.failed {
            return SlotState::Failed;
        }
        match (&self.current, &self.incoming) {
            (Some(w), _) if w.stage == Stage::Serving => SlotState::Ready,
            (Some(w), _) if w.stage == Stage::Hung => SlotState::Hung,
            (Some(w), _) if w.draining() => SlotState::Draining,
            (Some(_), _) | (None, Some(_)) => SlotState::Starting,
            (None, None) if self.next_start.is_some() => SlotState::Backoff,
            (None, None) if !self.retiring.is_empty() => SlotState::Draining,
            (None, None) => SlotState::Stopped,
        }
    }

    /// Every process of the slot.
    pub(crate) fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.current
            .iter()
            .chain(self.incoming.iter())
            .chain(self.retiring.iter())
    }

    /// Every process of the slot, mutably.
    pub(crate) fn workers_mut(&mut self) -> impl Iterator<Item = &mut Worker> {
        self.current
            .iter_mut()
            .chain(self.incoming.iter_mut())
            .chain(self.retiring.iter_mut())
    }

    /// Finds a process.
    pub(crate) fn find(&self, id: WorkerId) -> Option<(Role, &Worker)> {
        if let Some(w) = self.current.as_ref().filter(|w| w.id == id) {
            return Some((Role::Current, w));
        }
        if let Some(w) = self.incoming.as_ref().filter(|w| w.id == id) {
            return Some((Role::Incoming, w));
        }
        self.retiring
            .iter()
            .find(|w| w.id == id)
            .map(|w| (Role::Retiring, w))
    }

    /// Finds a process, mutably.
    pub(crate) fn find_mut(&mut self, id: WorkerId) -> Option<(Role, &mut Worker)> {
        if let Some(w) = self.current.as_mut().filter(|w| w.id == id) {
            return Some((Role::Current, w));
        }
        if let Some(w) = self.incoming.as_mut().filter(|w| w.id == id) {
            return Some((Role::Incoming, w));
        }
        self.retiring
            .iter_mut()
            .find(|w| w.id == id)
            .map(|w| (Role::Retiring, w))
    }

    /// Connections accepted by every generation of this slot (saturating: a worker can
    /// report anything).
    pub(crate) fn accepted(&self) -> u64 {
        self.workers().fold(self.accepted_before, |sum, w| {
            sum.saturating_add(w.counters.accepted)
        })
    }

    /// How long until the backoff ends, if in backoff.
    pub(crate) fn next_restart_in(&self, now: Instant) -> Option<Duration> {
        self.next_start.map(|t| t.saturating_duration_since(now))
    }

    /// The process that serves or is about to: the current one, else the incoming one.
    pub(crate) fn shown(&self) -> Option<&Worker> {
        self.current.as_ref().or(self.incoming.as_ref())
    }

    /// Places a process just spawned.
    pub(crate) fn place(&mut self, role: Role, worker: Worker) {
        match role {
            Role::Incoming => self.incoming = Some(worker),
            Role::Current => self.current = Some(worker),
            Role::Retiring => self.retiring.push(worker),
        }
    }

    /// A `register` arrived with the worker's socket.
    pub(crate) fn register(&mut self, id: WorkerId) -> Result<Registration, String> {
        let Some((_, worker)) = self.find_mut(id) else {
            return Ok(Registration::Ignored);
        };
        if worker.killed || worker.draining() {
            return Ok(Registration::Ignored);
        }
        match &mut worker.stage {
            Stage::Starting { registered, .. } if !*registered && worker.registers => {
                *registered = true;
                Ok(Registration::Accepted)
            }
            Stage::Starting { .. } if !worker.registers => {
                Err("an external worker may not register a socket; it was given fd 3".into())
            }
            _ => Err("register sent twice".into()),
        }
    }

    /// Puts the worker `id` (the current one, or the incoming replacement) into steering.
    ///
    /// A replacement takes the seat in one step: its socket overwrites the old worker's
    /// entry, and the old worker is asked to drain (SIGKILL after `drain_timeout`) and
    /// moves to `retiring`; its id is returned. On failure nothing changed.
    pub(crate) fn seat(
        &mut self,
        io: &mut impl Io,
        id: WorkerId,
        now: Instant,
        drain_timeout: Duration,
    ) -> Result<Option<WorkerId>, SeatError> {
        let (role, generation) = match self.find(id) {
            Some((role @ (Role::Current | Role::Incoming), w)) if w.may_become_ready() => {
                (role, w.generation)
            }
            _ => return Err(SeatError::NotStarting),
        };
        io.enter_steering(self.index, id, generation)?;
        if role == Role::Current {
            if let Some(current) = self.current.as_mut() {
                current.stage = Stage::Serving;
                current.ready_since = Some(now);
            }
            return Ok(None);
        }
        let Some(mut incoming) = self.incoming.take() else {
            return Ok(None);
        };
        incoming.stage = Stage::Serving;
        incoming.ready_since = Some(now);
        let Some(mut old) = self.current.replace(incoming) else {
            return Ok(None);
        };
        // Its entry was just overwritten: it is out of steering already, so it must not
        // take the slot out again on its way out.
        if old.stage == Stage::Serving {
            old.stage = Stage::Hung;
        }
        Self::drain(self.index, &mut old, io, now, drain_timeout);
        let old_id = old.id;
        self.retiring.push(old);
        Ok(Some(old_id))
    }

    /// Declares the serving worker hung: out of steering, kept as `current` until its
    /// replacement is ready.
    pub(crate) fn hang(&mut self, io: &mut impl Io) {
        if let Some(current) = self.current.as_mut()
            && current.stage == Stage::Serving
        {
            io.leave_steering(self.index);
            current.stage = Stage::Hung;
        }
    }

    /// Asks `worker` to finish and exit, SIGKILL at `now + timeout`. A serving worker
    /// leaves steering first. Returns whether it was not draining already.
    pub(crate) fn drain(
        index: usize,
        worker: &mut Worker,
        io: &mut impl Io,
        now: Instant,
        timeout: Duration,
    ) -> bool {
        if worker.draining() {
            return false;
        }
        if worker.stage == Stage::Serving {
            io.leave_steering(index);
        }
        worker.stage = Stage::Draining {
            deadline: now + timeout,
        };
        io.drain(worker.id);
        true
    }

    /// Lets the slot's current and incoming processes go (it failed, or a resize removes
    /// it): one still starting is killed (it has no queue worth keeping, and its exit is
    /// no crash), the others drain (SIGKILL after `timeout`). They wait in `retiring`.
    pub(crate) fn let_go(&mut self, io: &mut impl Io, now: Instant, timeout: Duration) {
        let index = self.index;
        let mut leaving: Vec<Worker> = self
            .current
            .take()
            .into_iter()
            .chain(self.incoming.take())
            .collect();
        for worker in leaving.iter_mut().filter(|w| !w.killed) {
            if matches!(worker.stage, Stage::Starting { .. }) {
                worker.killed = true;
                worker.account();
                io.kill(worker.id);
            } else {
                Self::drain(index, worker, io, now, timeout);
            }
        }
        self.retiring.extend(leaving);
    }

    /// Removes an exited process; a serving one leaves steering first.
    pub(crate) fn remove(&mut self, io: &mut impl Io, id: WorkerId) -> Option<(Role, Worker)> {
        let (role, _) = self.find(id)?;
        let worker = match role {
            Role::Current => self.current.take(),
            Role::Incoming => self.incoming.take(),
            Role::Retiring => {
                let at = self.retiring.iter().position(|w| w.id == id)?;
                Some(self.retiring.swap_remove(at))
            }
        }?;
        if worker.stage == Stage::Serving {
            io.leave_steering(self.index);
        }
        Some((role, worker))
    }
}
