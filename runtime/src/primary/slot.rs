//! The slot table: one [`Slot`] per steering index, each with the worker processes that
//! currently belong to it.
//!
//! A slot's life: `starting -> ready -> draining -> (exited) -> backoff -> starting`, plus
//! `failed`. During a replacement a slot briefly has two processes: the `incoming` new
//! generation, which takes the slot once it is ready, and the old one, which then drains.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::restart::CrashHistory;
use super::spawn::ExitStatus;
use crate::ipc::{Channel, Counters};

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Spawned; has not registered and reported ready yet.
    Starting,
    /// In steering, serving.
    Ready,
    /// Out of steering, finishing in-flight work before it exits.
    Draining,
}

/// A slot's state as `/status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

/// One worker process.
#[derive(Debug)]
pub(crate) struct Process {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub channel: Channel,
    pub generation: u64,
    pub started: Instant,
    pub phase: Phase,
    pub ready_since: Option<Instant>,
    /// Starting: the register deadline. Draining: when it gets SIGKILL.
    pub deadline: Option<Instant>,
    /// The socket received with `register`, held until the worker reports ready.
    pub registered_fd: Option<OwnedFd>,
    pub counters: Counters,
    /// The last time anything arrived from it on IPC.
    pub last_heard: Instant,
    /// It has sent at least one protocol message (external programs may never).
    pub speaks_ipc: bool,
    /// It has answered at least one ping, so silence means it is stuck. A worker that
    /// never answers is supervised for liveness only.
    pub answers_pings: bool,
    /// Declared hung: out of steering, its listener shut down, being replaced.
    pub hung: bool,
    /// Its resident memory passed `--max-memory`; a replacement was asked for.
    pub over_memory: bool,
    /// Inode of its listening socket (to find it again in `/proc/<pid>/fd` if it hangs).
    pub listener_inode: Option<u64>,
    /// Its `/proc/<pid>/statm`, kept open to read resident memory without allocating.
    pub memory: Option<super::health::ResidentMemory>,
    /// SIGKILL already sent.
    pub killed: bool,
}

impl Process {
    pub(crate) fn new(
        pid: i32,
        pidfd: OwnedFd,
        channel: Channel,
        generation: u64,
        now: Instant,
    ) -> Process {
        Process {
            pid,
            pidfd,
            channel,
            generation,
            started: now,
            phase: Phase::Starting,
            ready_since: None,
            deadline: None,
            registered_fd: None,
            counters: Counters::default(),
            last_heard: now,
            speaks_ipc: false,
            answers_pings: false,
            hung: false,
            over_memory: false,
            listener_inode: None,
            memory: super::health::ResidentMemory::open(pid),
            killed: false,
        }
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

/// One steering index and its processes.
#[derive(Debug)]
pub(crate) struct Slot {
    pub index: usize,
    pub current: Option<Process>,
    pub incoming: Option<Process>,
    pub retiring: Vec<Process>,
    /// Generation of the newest process started.
    pub generation: u64,
    /// Crash restarts so far.
    pub restarts: u32,
    pub crashes: CrashHistory,
    /// Backoff: no process until then.
    pub next_start: Option<Instant>,
    pub failed: bool,
    pub last_exit: Option<ExitStatus>,
    /// `accepted` of processes that have exited, so the slot's count only grows.
    pub accepted_before: u64,
    /// A replacement was asked for (rolling restart, malformed IPC, hung).
    pub replace_wanted: bool,
}

impl Slot {
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
            replace_wanted: false,
        }
    }

    /// The state `/status` reports.
    pub(crate) fn state(&self) -> SlotState {
        if self.failed {
            return SlotState::Failed;
        }
        match (&self.current, &self.incoming) {
            (Some(p), _) if p.phase == Phase::Ready && p.hung => SlotState::Hung,
            (Some(p), _) if p.phase == Phase::Ready => SlotState::Ready,
            (Some(p), _) if p.phase == Phase::Draining => SlotState::Draining,
            (Some(_), _) | (None, Some(_)) => SlotState::Starting,
            (None, None) if self.next_start.is_some() => SlotState::Backoff,
            (None, None) if !self.retiring.is_empty() => SlotState::Draining,
            (None, None) => SlotState::Stopped,
        }
    }

    /// Every process of the slot.
    pub(crate) fn processes(&self) -> impl Iterator<Item = &Process> {
        self.current
            .iter()
            .chain(self.incoming.iter())
            .chain(self.retiring.iter())
    }

    /// Every process of the slot, mutably.
    pub(crate) fn processes_mut(&mut self) -> impl Iterator<Item = &mut Process> {
        self.current
            .iter_mut()
            .chain(self.incoming.iter_mut())
            .chain(self.retiring.iter_mut())
    }

    /// Finds a process by pid.
    pub(crate) fn find_mut(&mut self, pid: i32) -> Option<(Role, &mut Process)> {
        if let Some(p) = self.current.as_mut().filter(|p| p.pid == pid) {
            return Some((Role::Current, p));
        }
        if let Some(p) = self.incoming.as_mut().filter(|p| p.pid == pid) {
            return Some((Role::Incoming, p));
        }
        self.retiring
            .iter_mut()
            .find(|p| p.pid == pid)
            .map(|p| (Role::Retiring, p))
    }

    /// Removes a process by pid and says which role it had.
    pub(crate) fn remove(&mut self, pid: i32) -> Option<(Role, Process)> {
        if self.current.as_ref().is_some_and(|p| p.pid == pid) {
            return self.current.take().map(|p| (Role::Current, p));
        }
        if self.incoming.as_ref().is_some_and(|p| p.pid == pid) {
            return self.incoming.take().map(|p| (Role::Incoming, p));
        }
        let i = self.retiring.iter().position(|p| p.pid == pid)?;
        Some((Role::Retiring, self.retiring.swap_remove(i)))
    }

    /// Connections accepted by every generation of this slot.
    pub(crate) fn accepted(&self) -> u64 {
        self.accepted_before + self.processes().map(|p| p.counters.accepted).sum::<u64>()
    }

    /// Milliseconds until the backoff ends, if in backoff.
    pub(crate) fn next_restart_in(&self, now: Instant) -> Option<Duration> {
        self.next_start.map(|t| t.saturating_duration_since(now))
    }
}
