//! The primary's decisions, apart from its I/O.
//!
//! [`Core`] holds the slot table, the cluster's phase, the rolling restart and the
//! heartbeat clock. It takes events (a worker registered, became ready, answered a ping,
//! broke the protocol, exited; a signal; the time) and acts through [`Io`], the host's
//! processes, IPC and steering maps. It never makes a system call itself, so every
//! decision (health verdicts, restart backoff, roll steps, shutdown) is tested here with a
//! recording [`Io`] and a clock the test moves (see `tests.rs`), the way quinn-proto's
//! state machines are tested without sockets.
//!
//! The invariant "a slot is `ready` exactly when its socket is in the steering maps" is
//! owned by [`slot`]: see [`Slot::seat`].

mod error;
mod heartbeat;
mod restart;
mod roll;
mod slot;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

pub(crate) use error::{EnterError, ListenerError, SpawnError};
/// How long a process counted ready when it ran (an external program that never says
/// `ready`) must stay up before its start counts as working: a new primary takes over only
/// then, and one that exits sooner is a failed start. Long enough for an interpreter that
/// exits at start on a loaded host (1.4 s was seen in CI).
pub(crate) const SETTLE: Duration = Duration::from_secs(3);
use restart::Verdict;
use roll::Roll;
pub use slot::SlotState;
pub(crate) use slot::{ExitStatus, Registration, Replacement, Role, Slot, Stage, Worker};

use crate::config::Config;
use crate::ipc::Counters;

/// A worker process, unique over the primary's life (`STEER_WORKER_ID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct WorkerId(pub u64);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What a spawn produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spawned {
    /// The child's pid.
    pub pid: i32,
    /// Its listening socket was made by the primary and already listens (an external
    /// program on fd 3): it is ready as soon as it runs.
    pub listening: bool,
    /// It must send `register` with a socket of its own before `ready` (built-in and
    /// library workers, except under the `userspace` baseline, where they have none).
    pub registers: bool,
}

/// How many times in a row a slot's new process may fail to start (exit, break the
/// protocol or miss `--start-timeout` before it is ready) before a rolling restart gives
/// up on it, and a successor primary gives up its upgrade. With the defaults a roll onto a
/// release that never becomes ready ends within `3 x start-timeout + 0.3 s` (30.3 s).
pub(crate) const START_ATTEMPTS: u32 = 3;

/// A process that ended, or never started, without being asked to.
#[derive(Debug)]
enum Crash {
    /// It exited (or was killed by the primary while starting: `start_timed_out`).
    /// `ready_at_exec`: it was counted ready when it ran, without a word of its own.
    Exited {
        status: ExitStatus,
        ready_since: Option<Instant>,
        start_timed_out: bool,
        ready_at_exec: bool,
    },
    /// It broke the IPC protocol.
    Violation {
        serving: bool,
        ready_since: Option<Instant>,
    },
    /// It could not be spawned.
    NotSpawned(SpawnError),
}

impl Crash {
    fn ready_since(&self) -> Option<Instant> {
        match self {
            Crash::Exited { ready_since, .. } | Crash::Violation { ready_since, .. } => {
                *ready_since
            }
            Crash::NotSpawned(_) => None,
        }
    }

    /// Why a start failed, for the log, `/status` and systemd.
    fn describe(&self, start_timeout: Duration) -> String {
        match self {
            Crash::Exited {
                start_timed_out: true,
                ..
            } => format!(
                "not ready within {}",
                humantime::format_duration(start_timeout)
            ),
            Crash::Exited {
                status,
                ready_since: Some(_),
                ..
            } => format!("exited right after it started: {status}"),
            Crash::Exited { status, .. } => format!("exited before ready: {status}"),
            Crash::Violation { .. } => "broke the IPC protocol before ready".to_owned(),
            Crash::NotSpawned(err) => {
                format!("cannot be started: {}", crate::errors::error_chain(err))
            }
        }
    }
}

/// A rolling restart that gave up on a slot (see [`START_ATTEMPTS`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RollAbandoned {
    /// The slot whose new worker could not start.
    pub slot: usize,
    /// How its last attempt ended.
    pub reason: String,
}

/// What the core asks of the host. Every method is one action on one process or on the
/// steering maps; none blocks. What can fail says why with a typed error ([`SpawnError`],
/// [`EnterError`], [`ListenerError`]), which the core logs whole.
pub(crate) trait Io {
    /// Starts a process for `slot` as `generation`, known as `id` from now on.
    fn spawn(&mut self, slot: usize, generation: u64, id: WorkerId) -> Result<Spawned, SpawnError>;
    /// Puts the worker's socket into steering at `slot`, replacing whatever was there.
    fn enter_steering(
        &mut self,
        slot: usize,
        id: WorkerId,
        generation: u64,
    ) -> Result<(), EnterError>;
    /// Takes `slot` out of steering.
    fn leave_steering(&mut self, slot: usize);
    /// Asks the worker to stop accepting, finish and exit: the `drain` message, and
    /// SIGTERM to an external worker's process group.
    fn drain(&mut self, id: WorkerId);
    /// Repeats the `drain` message (it may have been lost to a full socket).
    fn repeat_drain(&mut self, id: WorkerId);
    /// SIGKILL to the worker's process group.
    fn kill(&mut self, id: WorkerId);
    /// Sends `ping` with `seq`.
    fn ping(&mut self, id: WorkerId, seq: u64);
    /// Shuts the worker's listening socket down from outside, so its queue migrates.
    fn shut_down_listener(&mut self, id: WorkerId) -> Result<(), ListenerError>;
    /// The steering maps are built over `slots` configured slots from now on (the `hash`
    /// table, the `cpu` mapping).
    fn resize_steering(&mut self, slots: usize);
    /// The worker's resident memory in bytes.
    fn resident_bytes(&mut self, id: WorkerId) -> Option<u64>;
}

/// The settings the core decides with (the rest of [`Config`] belongs to the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settings {
    /// Heartbeat period.
    pub health_interval: Duration,
    /// A watched worker owing a ping this long is hung.
    pub health_timeout: Duration,
    /// A worker not ready by then is killed.
    pub start_timeout: Duration,
    /// A draining worker is killed after this.
    pub shutdown_timeout: Duration,
    /// Crashes allowed per `restart_window`.
    pub max_restarts: u32,
    /// The window `max_restarts` counts over.
    pub restart_window: Duration,
    /// A serving worker over this many resident bytes is replaced.
    pub max_memory: Option<u64>,
}

impl Settings {
    /// The core's part of `config`.
    pub(crate) fn of(config: &Config) -> Settings {
        Settings {
            health_interval: config.health_interval,
            health_timeout: config.health_timeout,
            start_timeout: config.start_timeout,
            shutdown_timeout: config.shutdown_timeout,
            max_restarts: config.max_restarts,
            restart_window: config.restart_window,
            max_memory: config.max_memory,
        }
    }

    /// How late the loop may wake before the primary excuses the lateness: below this it
    /// is ordinary scheduling jitter, which `health-timeout >= 2 x health-interval` already
    /// absorbs, and excusing it would only delay the verdict on a worker that is hung.
    fn excused_lateness(&self) -> Duration {
        (self.health_interval / 4).max(Duration::from_millis(50))
    }

    /// How late the loop may wake before the primary also reports itself stalled.
    fn stall(&self) -> Duration {
        self.health_interval.max(Duration::from_millis(250))
    }
}

/// Whether the cluster is serving or going away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Normal operation.
    Running,
    /// Draining for exit; SIGKILL for what is left at `deadline`.
    Stopping {
        /// The shutdown timeout.
        deadline: Instant,
        /// SIGKILL already sent to everything.
        killed: bool,
    },
}

/// The primary's state and decisions.
#[derive(Debug)]
pub(crate) struct Core {
    settings: Settings,
    slots: Vec<Slot>,
    phase: Phase,
    roll: Option<Roll>,
    next_ping: Instant,
    ping_seq: u64,
    next_id: u64,
    /// The wake-up last handed to the loop: waking much later means the primary stalled.
    expected_wake: Option<Instant>,
    /// How many times the primary found itself stalled.
    stalls: u64,
    /// Slots the cluster is configured for: the first `configured` of `slots`; the rest
    /// are being removed by a resize.
    configured: usize,
    /// Slots were added: steering grows to `configured` once they are all ready, so a
    /// client whose hash moves to a new slot moves once, when it can be served there.
    growing: bool,
    /// The last rolling restart gave up (cleared when another one begins).
    roll_abandoned: Option<RollAbandoned>,
}

impl Core {
    /// A cluster of `slots` empty slots; [`Core::start`] schedules their first workers.
    pub(crate) fn new(settings: Settings, slots: usize, now: Instant) -> Core {
        Core {
            settings,
            slots: (0..slots).map(Slot::new).collect(),
            phase: Phase::Running,
            roll: None,
            next_ping: now + settings.health_interval,
            ping_seq: 0,
            next_id: 1,
            expected_wake: None,
            stalls: 0,
            configured: slots,
            growing: false,
            roll_abandoned: None,
        }
    }

    /// Slots the cluster is configured for now.
    pub(crate) fn configured(&self) -> usize {
        self.configured
    }

    /// Schedules every slot's first worker for now.
    pub(crate) fn start(&mut self, now: Instant) {
        for slot in &mut self.slots {
            slot.next_start = Some(now);
        }
    }

    /// The slots.
    pub(crate) fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The phase.
    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether a rolling restart is under way.
    pub(crate) fn rolling(&self) -> bool {
        self.roll.is_some()
    }

    /// The last rolling restart, if it gave up on a slot.
    pub(crate) fn roll_abandoned(&self) -> Option<&RollAbandoned> {
        self.roll_abandoned.as_ref()
    }

    /// A successor primary learns from its predecessor that the workers of `index` say
    /// `ready`: its own count as ready only once they say it too (see
    /// [`Slot::says_ready`]).
    /// A successor's slot `index` goes on from `generation`, its predecessor's: its first
    /// worker is `generation + 1`, so that a predecessor's worker still holding UDP flows
    /// keeps its place in the shared `SOCKETS` (indexed by slot and generation).
    pub(crate) fn continue_from(&mut self, index: usize, generation: u64) {
        if let Some(slot) = self.slots.get_mut(index) {
            slot.generation = slot.generation.max(generation);
        }
    }

    pub(crate) fn expect_ready_word(&mut self, index: usize) {
        if let Some(slot) = self.slots.get_mut(index) {
            slot.says_ready = true;
        }
    }

    /// The settings in force.
    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// How many times the primary noticed it had stalled (and blamed nobody).
    pub(crate) fn stalls(&self) -> u64 {
        self.stalls
    }

    /// The worker `id`.
    pub(crate) fn worker(&self, index: usize, id: WorkerId) -> Option<&Worker> {
        self.slots.get(index)?.find(id).map(|(_, w)| w)
    }

    /// Counts one dropped user message against `index`.
    pub(crate) fn count_dropped_message(&mut self, index: usize) {
        if let Some(slot) = self.slots.get_mut(index) {
            slot.messages_dropped = slot.messages_dropped.saturating_add(1);
        }
    }

    /// Serving processes whose heartbeat deadline has passed: the host reads what is
    /// pending on their IPC before [`Core::tick`] judges them.
    pub(crate) fn suspects(&self, now: Instant) -> Vec<WorkerId> {
        let timeout = self.settings.health_timeout;
        self.slots
            .iter()
            .filter_map(|slot| slot.current.as_ref())
            .filter(|w| w.overdue(now, timeout))
            .map(|w| w.id)
            .collect()
    }

    /// Whether the cluster has stopped: stopping, and no process left.
    pub(crate) fn finished(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. })
            && self.slots.iter().all(|s| s.workers().next().is_none())
    }

    /// Periodic work: stall detection, the shutdown deadline, roll steps, starts and
    /// deadlines, heartbeats and verdicts. Cheap when nothing is due; the host calls it on
    /// every turn of its loop, after reading the turn's events.
    pub(crate) fn tick(&mut self, io: &mut impl Io, now: Instant) {
        self.notice_stall(now);
        if let Phase::Stopping {
            deadline,
            killed: false,
        } = self.phase
            && now >= deadline
        {
            tracing::warn!(
                "shutdown timeout ({}) reached: killing the workers still draining",
                humantime::format_duration(self.settings.shutdown_timeout)
            );
            self.kill_all(io);
        }
        self.advance_roll();
        for index in 0..self.slots.len() {
            self.tick_slot(io, index, now);
        }
        if now >= self.next_ping {
            self.heartbeat_round(io, now);
            self.next_ping = now + self.settings.health_interval;
        }
        self.judge(io, now);
        self.advance_roll();
        for index in 0..self.slots.len() {
            self.tick_slot(io, index, now);
        }
        self.finish_resize(io);
    }

    /// The earliest moment [`Core::tick`] has something to do. The loop sleeps until
    /// then (or an event); waking much later than this is a stall of the primary.
    pub(crate) fn next_wake(&mut self, now: Instant) -> Instant {
        let timeout = self.settings.health_timeout;
        let mut at = self.next_ping;
        let running = self.phase == Phase::Running;
        if let Phase::Stopping {
            deadline,
            killed: false,
        } = self.phase
        {
            at = at.min(deadline);
        }
        for slot in &self.slots {
            if running
                && !slot.failed
                && !slot.retired
                && let Some(t) = slot.next_start
            {
                at = at.min(t);
            }
            for worker in slot.workers() {
                if let Some(t) = worker.deadline() {
                    at = at.min(t);
                }
            }
            if running
                && let Some(current) = slot.current.as_ref().filter(|w| w.serving())
                && let Some(t) = current.heartbeat.deadline(timeout)
            {
                // Just past the deadline: the silence must be longer than the timeout.
                at = at.min(t + Duration::from_millis(1));
            }
        }
        let at = at.max(now);
        self.expected_wake = Some(at);
        at
    }

    /// A loop that woke well after the moment it asked for was not running (stopped, or
    /// starved of CPU): whatever workers owe is excused by exactly that lateness, so
    /// nobody is blamed for time the primary did not run (a host that stalled stalled its
    /// workers too). A long stall is reported.
    fn notice_stall(&mut self, now: Instant) {
        let Some(expected) = self.expected_wake.take() else {
            return;
        };
        let late = now.saturating_duration_since(expected);
        if late < self.settings.excused_lateness() {
            return;
        }
        if late > self.settings.stall() {
            self.stalls += 1;
            tracing::warn!(
                late_ms = late.as_millis() as u64,
                "the primary's loop woke {} late (the primary was stopped or the host is \
                 overloaded): heartbeat deadlines move by as much; no worker is blamed",
                humantime::format_duration(Duration::from_millis(late.as_millis() as u64))
            );
        }
        for slot in &mut self.slots {
            for worker in slot.workers_mut() {
                worker.heartbeat.forgive(late, now);
            }
        }
    }

    // ---- starts, deadlines, replacements ----

    /// Starts, replaces or gives up on one slot's processes as its timers say.
    fn tick_slot(&mut self, io: &mut impl Io, index: usize, now: Instant) {
        let running = self.phase == Phase::Running;
        let slot = &mut self.slots[index];
        if running && !slot.failed && !slot.retired {
            let due = slot.next_start.is_none_or(|t| t <= now);
            let replaceable = slot
                .current
                .as_ref()
                .is_some_and(|w| matches!(w.stage(), Stage::Serving | Stage::Hung));
            if slot.current.is_none() && slot.incoming.is_none() && slot.next_start.is_some() && due
            {
                slot.next_start = None;
                slot.replacement = None;
                self.start_worker(io, index, Role::Current, now);
            } else if slot.replacement.is_some() && slot.incoming.is_none() && due && replaceable {
                slot.next_start = None;
                self.start_worker(io, index, Role::Incoming, now);
            }
        }
        let (start_timeout, shutdown_timeout) =
            (self.settings.start_timeout, self.settings.shutdown_timeout);
        for worker in self.slots[index].workers_mut() {
            let Some(deadline) = worker.deadline().filter(|&t| t <= now) else {
                continue;
            };
            match worker.stage() {
                Stage::Starting { .. } => tracing::warn!(
                    slot = index,
                    pid = worker.pid,
                    "worker was not ready within {}; killing it",
                    humantime::format_duration(start_timeout)
                ),
                _ => tracing::warn!(
                    slot = index,
                    pid = worker.pid,
                    "worker still draining after {}; killing it",
                    humantime::format_duration(
                        now.saturating_duration_since(deadline) + shutdown_timeout
                    )
                ),
            }
            worker.killed = true;
            io.kill(worker.id);
        }
    }

    /// Spawns the slot's next generation, as its process or as its replacement.
    fn start_worker(&mut self, io: &mut impl Io, index: usize, role: Role, now: Instant) {
        let slot = &mut self.slots[index];
        slot.generation += 1;
        let generation = slot.generation;
        let id = WorkerId(self.next_id);
        self.next_id += 1;
        match io.spawn(index, generation, id) {
            Ok(spawned) => {
                tracing::info!(
                    slot = index,
                    generation,
                    pid = spawned.pid,
                    replacing = (role == Role::Incoming),
                    "worker spawned"
                );
                let worker = Worker::new(id, spawned, generation, now, self.settings.start_timeout);
                self.slots[index].place(role, worker);
            }
            Err(err) => {
                tracing::error!(
                    slot = index,
                    generation,
                    "cannot start worker: {}",
                    crate::errors::error_chain(&err)
                );
                self.slots[index].last_exit = None;
                self.crash_verdict(io, index, role, Crash::NotSpawned(err), now);
            }
        }
    }

    /// The worker serves: into steering, and if it replaces an older generation, that one
    /// drains now.
    fn become_ready(&mut self, io: &mut impl Io, index: usize, id: WorkerId, now: Instant) {
        let drain_timeout = self.settings.shutdown_timeout;
        let slot = &mut self.slots[index];
        let Some((_, worker)) = slot.find(id) else {
            return;
        };
        let (pid, generation, started) = (worker.pid, worker.generation, worker.started);
        match slot.seat(io, id, now, drain_timeout) {
            Err(err) => {
                // Serving nothing: replace it (a fresh socket may work).
                tracing::error!(
                    slot = index,
                    generation,
                    pid,
                    "cannot put the worker into steering: {}",
                    crate::errors::error_chain(&err)
                );
                if let Some((_, worker)) = slot.find_mut(id) {
                    worker.killed = true;
                    io.kill(id);
                }
            }
            Ok(old) => {
                // Ready by its own word: the start worked. One counted ready when it ran
                // proves it only by staying up (see `crash_verdict`).
                let said_it = slot
                    .current
                    .as_ref()
                    .is_some_and(|w| w.id == id && (!w.ready_at_exec() || slot.says_ready));
                if said_it {
                    slot.failed_starts = 0;
                }
                tracing::info!(
                    slot = index,
                    generation,
                    pid,
                    startup_ms = now.saturating_duration_since(started).as_millis() as u64,
                    "worker ready"
                );
                let Some(old_id) = old else {
                    return;
                };
                // Had it answered since, its replacement would have been called off.
                let silent = slot.replacement == Some(Replacement::Silent);
                slot.replacement = None;
                let Some((_, old)) = slot.find_mut(old_id) else {
                    return;
                };
                tracing::info!(
                    slot = index,
                    pid = old.pid,
                    generation = old.generation,
                    "replaced; draining the old generation"
                );
                // Still silent when its replacement is ready: its queue moves to the
                // replacement now rather than when it is killed.
                if silent {
                    match io.shut_down_listener(old_id) {
                        Ok(()) => tracing::info!(
                            slot = index,
                            pid = old.pid,
                            "shut the silent worker's listener down; its queue moved to its replacement"
                        ),
                        Err(err) => tracing::warn!(
                            slot = index,
                            pid = old.pid,
                            "cannot shut the silent worker's listener down: {}",
                            crate::errors::error_chain(&err)
                        ),
                    }
                }
            }
        }
    }

    /// The crash verdict, shared by every way a process can fail: it exited unexpectedly,
    /// broke the protocol, or could not be started. Counts the crash against the slot's
    /// backoff and `max-restarts`, and against the replacement's start attempts in a roll.
    fn crash_verdict(
        &mut self,
        io: &mut impl Io,
        index: usize,
        role: Role,
        crash: Crash,
        now: Instant,
    ) {
        let (max, window) = (self.settings.max_restarts, self.settings.restart_window);
        let timeout = self.settings.shutdown_timeout;
        let slot = &mut self.slots[index];
        let ready_since = crash.ready_since();
        // A process counted ready when it ran, without saying so, that is gone within a
        // second never showed it could serve: as much a failed start as one that was
        // never ready.
        let never_served = ready_since.is_none()
            || matches!(
                crash,
                Crash::Exited {
                    ready_at_exec: true,
                    ..
                }
            ) && ready_since.is_some_and(|since| now.saturating_duration_since(since) < SETTLE);
        if !never_served {
            slot.failed_starts = 0;
        } else {
            slot.failed_starts = slot.failed_starts.saturating_add(1);
            slot.last_start_failure = Some(crash.describe(self.settings.start_timeout));
        }
        if role == Role::Incoming
            && slot.failed_starts >= START_ATTEMPTS
            && matches!(
                slot.replacement,
                Some(Replacement::Roll | Replacement::Memory)
            )
        {
            self.abandon_roll(index);
            return;
        }
        let slot = &mut self.slots[index];
        match slot.crashes.record(now, ready_since, max, window) {
            Verdict::Fail if role == Role::Incoming => {
                tracing::error!(
                    slot = index,
                    "replacement failed more than {max} times in {}; keeping the running generation",
                    humantime::format_duration(window)
                );
                slot.replacement = None;
            }
            Verdict::Fail => {
                tracing::error!(
                    slot = index,
                    "failed more than {max} times in {}: slot failed (revive with SIGHUP)",
                    humantime::format_duration(window)
                );
                slot.failed = true;
                slot.next_start = None;
                slot.replacement = None;
                slot.let_go(io, now, timeout);
            }
            Verdict::RestartAfter(delay) => {
                slot.restarts = slot.restarts.saturating_add(1);
                if slot.current.is_none() && slot.incoming.is_some() {
                    // The replacement already on its way takes over.
                    slot.current = slot.incoming.take();
                    slot.replacement = None;
                    tracing::info!(slot = index, "the replacement being started takes over");
                    return;
                }
                slot.next_start = Some(now + delay);
                let serving = matches!(crash, Crash::Violation { serving: true, .. });
                if serving {
                    // It keeps serving until its replacement is ready.
                    slot.replacement.get_or_insert(Replacement::Violation);
                }
                tracing::info!(
                    slot = index,
                    "{} in {} ms",
                    if serving {
                        "replacing it"
                    } else {
                        "restarting"
                    },
                    delay.as_millis()
                );
            }
        }
    }

    /// A roll's replacement for `index` failed to start [`START_ATTEMPTS`] times in a
    /// row: the new code cannot serve, so the roll ends here and every slot keeps its
    /// running generation (a broken release is not rolled onto the next slot).
    fn abandon_roll(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        slot.replacement = None;
        slot.next_start = None;
        let reason = slot
            .last_start_failure
            .clone()
            .unwrap_or_else(|| "it did not start".to_owned());
        tracing::error!(
            slot = index,
            attempts = START_ATTEMPTS,
            "rolling restart abandoned: slot {index}'s new worker failed to start \
             {START_ATTEMPTS} times in a row (last: {reason}); every slot keeps its running \
             generation"
        );
        self.roll = None;
        self.roll_abandoned = Some(RollAbandoned {
            slot: index,
            reason,
        });
    }

    // ---- events from workers ----

    /// The worker's `execve` succeeded. One whose socket the primary made and that already
    /// listens (an external program) is ready now: the kernel queues connections until it
    /// accepts. One that failed to exec never gets here: it exits, as a crash.
    pub(crate) fn executed(&mut self, io: &mut impl Io, index: usize, id: WorkerId, now: Instant) {
        let Some((_, worker)) = self.slots.get(index).and_then(|s| s.find(id)) else {
            return;
        };
        if worker.killed || !worker.may_become_ready() || self.phase != Phase::Running {
            return;
        }
        let waits_for_ready = self.slots[index].says_ready;
        if !worker.registers && worker.listening && !waits_for_ready {
            self.become_ready(io, index, id, now);
        }
    }

    /// A worker sent `register` with its socket (which the host has checked).
    pub(crate) fn registered(
        &mut self,
        index: usize,
        id: WorkerId,
    ) -> Result<Registration, String> {
        let Some(slot) = self.slots.get_mut(index) else {
            return Ok(Registration::Ignored);
        };
        if let Some((_, worker)) = slot.find_mut(id) {
            worker.heartbeat.spoke();
        }
        slot.register(id)
    }

    /// A worker sent `ready`, saying whether it answers pings from its serving loop.
    pub(crate) fn ready(
        &mut self,
        io: &mut impl Io,
        index: usize,
        id: WorkerId,
        heartbeats: bool,
        now: Instant,
    ) -> Result<(), String> {
        let running = self.phase == Phase::Running;
        let Some(slot) = self.slots.get_mut(index) else {
            return Ok(());
        };
        let Some((role, worker)) = slot.find_mut(id) else {
            return Ok(());
        };
        worker.heartbeat.spoke();
        if worker.killed || worker.draining() || role == Role::Retiring || !running {
            // On its way out (drained or killed while starting): not its fault.
            return Ok(());
        }
        if heartbeats {
            worker.heartbeat.watch();
        }
        let (stage, listening, may_become_ready) =
            (worker.stage(), worker.listening, worker.may_become_ready());
        if listening {
            slot.says_ready = true;
        }
        match stage {
            Stage::Starting { .. } if !may_become_ready => Err("ready before register".into()),
            Stage::Starting { .. } => {
                self.become_ready(io, index, id, now);
                self.ping_now(io, index, id, now);
                Ok(())
            }
            // An external worker, serving since it was spawned, now speaks the protocol.
            Stage::Serving => {
                self.ping_now(io, index, id, now);
                Ok(())
            }
            Stage::Hung | Stage::Draining { .. } => Ok(()),
        }
    }

    /// A worker answered ping `seq`. For a watched worker, this is the only sign of life.
    pub(crate) fn pong(
        &mut self,
        io: &mut impl Io,
        index: usize,
        id: WorkerId,
        seq: u64,
        counters: Counters,
    ) -> Result<(), String> {
        let Some(slot) = self.slots.get_mut(index) else {
            return Ok(());
        };
        let Some((role, worker)) = slot.find_mut(id) else {
            return Ok(());
        };
        worker.heartbeat.spoke();
        worker.heartbeat.answered(seq)?;
        worker.counters = counters;
        let (stage, pid, woke) = (worker.stage(), worker.pid, worker.woke);
        if role != Role::Current {
            return Ok(());
        }
        match (stage, slot.replacement) {
            (Stage::Serving, Some(Replacement::Silent)) => {
                // It was only slow: it keeps its place, and the replacement is not needed.
                tracing::info!(
                    slot = index,
                    pid,
                    "silent worker answered again before its replacement was ready: keeping it"
                );
                slot.replacement = None;
                if let Some(mut incoming) = slot.incoming.take() {
                    incoming.killed = true;
                    incoming.account();
                    io.kill(incoming.id);
                    slot.retiring.push(incoming);
                }
            }
            (Stage::Hung, _) if !woke => {
                // Its listener is shut down: it cannot take new connections again. It
                // finishes what it has once its replacement is ready.
                if let Some(current) = slot.current.as_mut() {
                    current.woke = true;
                }
                tracing::info!(
                    slot = index,
                    pid,
                    "worker declared hung answered again; its listener is shut down, so its \
                     replacement goes on and it drains once that is ready"
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// A worker sent something else (a user message): it speaks the protocol. For a
    /// watched worker this is no sign of life: only `pong` is.
    pub(crate) fn spoke(&mut self, index: usize, id: WorkerId) {
        if let Some((_, worker)) = self.slots.get_mut(index).and_then(|s| s.find_mut(id)) {
            worker.heartbeat.spoke();
        }
    }

    /// A worker broke the protocol. Its IPC is no longer read; it counts as a crash
    /// (backoff, `failed` after `max-restarts`). A serving one keeps serving until its
    /// replacement, started after the backoff delay, is ready.
    pub(crate) fn violation(
        &mut self,
        io: &mut impl Io,
        index: usize,
        id: WorkerId,
        what: &str,
        now: Instant,
    ) {
        let running = self.phase == Phase::Running;
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let Some((role, worker)) = slot.find_mut(id) else {
            return;
        };
        tracing::warn!(
            slot = index,
            pid = worker.pid,
            "IPC protocol violation: {what}; counted as a crash"
        );
        worker.heartbeat.deaf = true;
        if role == Role::Retiring || worker.draining() || worker.killed || !running {
            // Already leaving: it has no queue worth keeping.
            worker.killed = true;
            io.kill(id);
            return;
        }
        worker.account();
        let serving = worker.serving();
        let ready_since = worker.ready_since;
        if !serving {
            // Not serving yet: it has no queue worth keeping.
            worker.killed = true;
            io.kill(id);
        }
        let crash = Crash::Violation {
            serving,
            ready_since,
        };
        self.crash_verdict(io, index, role, crash, now);
    }

    /// A worker process exited (the host has reaped it).
    pub(crate) fn exited(
        &mut self,
        io: &mut impl Io,
        index: usize,
        id: WorkerId,
        status: ExitStatus,
        now: Instant,
    ) {
        let running = self.phase == Phase::Running;
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let Some((role, worker)) = slot.remove(io, id) else {
            return;
        };
        slot.accepted_before = slot
            .accepted_before
            .saturating_add(worker.counters.accepted);
        let (pid, generation) = (worker.pid, worker.generation);
        if worker.exit_expected() || !running {
            if status.success() || worker.killed {
                tracing::info!(slot = index, generation, pid, "worker exited: {status}");
            } else {
                tracing::warn!(
                    slot = index,
                    generation,
                    pid,
                    "worker exited while draining: {status}"
                );
            }
            return;
        }
        tracing::warn!(slot = index, generation, pid, "worker exited: {status}");
        slot.last_exit = Some(status);
        let crash = Crash::Exited {
            status,
            ready_since: worker.ready_since,
            start_timed_out: worker.killed && worker.ready_since.is_none(),
            ready_at_exec: worker.ready_at_exec() && !slot.says_ready,
        };
        self.crash_verdict(io, index, role, crash, now);
    }

    // ---- heartbeats and verdicts ----

    /// Pings one worker at once (it just became ready).
    fn ping_now(&mut self, io: &mut impl Io, index: usize, id: WorkerId, now: Instant) {
        self.ping_seq += 1;
        let seq = self.ping_seq;
        if let Some((_, worker)) = self.slots[index].find_mut(id)
            && !worker.heartbeat.deaf
        {
            io.ping(id, seq);
            worker.heartbeat.sent(seq, now);
        }
    }

    /// The heartbeat tick: pings every serving or draining worker that speaks the
    /// protocol, repeats drain requests, and checks the memory limit.
    fn heartbeat_round(&mut self, io: &mut impl Io, now: Instant) {
        self.ping_seq += 1;
        let seq = self.ping_seq;
        for slot in &mut self.slots {
            for worker in slot.workers_mut() {
                let beat = &worker.heartbeat;
                if !beat.speaks || beat.deaf || worker.killed {
                    continue;
                }
                match worker.stage() {
                    Stage::Serving | Stage::Hung => {}
                    Stage::Draining { .. } => io.repeat_drain(worker.id),
                    Stage::Starting { .. } => continue,
                }
                io.ping(worker.id, seq);
                worker.heartbeat.sent(seq, now);
            }
        }
        if let Some(limit) = self.settings.max_memory
            && self.phase == Phase::Running
        {
            for slot in &mut self.slots {
                let Some(worker) = slot.current.as_mut().filter(|w| w.serving()) else {
                    continue;
                };
                if worker.over_memory {
                    continue;
                }
                let Some(rss) = io.resident_bytes(worker.id) else {
                    continue;
                };
                if rss > limit {
                    worker.over_memory = true;
                    tracing::warn!(
                        slot = slot.index,
                        pid = worker.pid,
                        rss_bytes = rss,
                        limit_bytes = limit,
                        "worker passed --max-memory: replacing it gracefully"
                    );
                    slot.replacement.get_or_insert(Replacement::Memory);
                }
            }
        }
    }

    /// Declares hung every serving worker that owes a ping older than `health-timeout`.
    ///
    /// When most serving workers are silent together, the host (or this primary) is more
    /// likely stalled than most workers hung, and taking them out would leave the rest, or
    /// nobody, to serve everything. So a minority of silent workers is taken out at once;
    /// a majority (which includes the only worker of a one-worker cluster) stays in
    /// steering while replacements start, and each hands its queue over only if it is
    /// still silent when its replacement is ready.
    fn judge(&mut self, io: &mut impl Io, now: Instant) {
        if self.phase != Phase::Running {
            return;
        }
        let timeout = self.settings.health_timeout;
        let live = self
            .slots
            .iter()
            .filter(|s| s.current.as_ref().is_some_and(Worker::serving))
            .count();
        let silent: Vec<usize> = self
            .slots
            .iter()
            .filter(|s| s.current.as_ref().is_some_and(|w| w.overdue(now, timeout)))
            .map(|s| s.index)
            .collect();
        let minority = silent.len() * 2 <= live;
        for index in silent {
            let slot = &mut self.slots[index];
            if minority {
                Self::declare_hung(io, slot, timeout);
            } else if slot.replacement.is_none() {
                slot.replacement = Some(Replacement::Silent);
                tracing::warn!(
                    slot = index,
                    "worker has not answered heartbeats for {}, nor have most of the {live} \
                     serving: keeping it in steering while a replacement starts (host \
                     overloaded?)",
                    humantime::format_duration(timeout)
                );
            }
        }
    }

    /// Out of steering, its listener shut down so its queue migrates, a replacement wanted.
    fn declare_hung(io: &mut impl Io, slot: &mut Slot, timeout: Duration) {
        let index = slot.index;
        let Some(worker) = slot.current.as_ref() else {
            return;
        };
        let (id, pid) = (worker.id, worker.pid);
        tracing::warn!(
            slot = index,
            pid,
            generation = worker.generation,
            "worker has not answered heartbeats for {}: hung; taking it out of steering \
             and replacing it",
            humantime::format_duration(timeout)
        );
        // Out of the live set first, so the program never picks it for its own queue.
        slot.hang(io);
        match io.shut_down_listener(id) {
            Ok(()) => tracing::info!(
                slot = index,
                pid,
                "shut the hung worker's listener down; its queued connections moved to the \
                 live workers"
            ),
            Err(err) => tracing::warn!(
                slot = index,
                pid,
                "cannot shut the hung worker's listener down ({}); its queued \
                 connections wait for it to wake or die",
                crate::errors::error_chain(&err)
            ),
        }
        // A replacement for memory or a roll is now one for a hang (it starts at once).
        slot.replacement = Some(Replacement::Hung);
        slot.next_start = None;
    }

    // ---- operator actions ----

    /// SIGTERM/SIGINT: every worker leaves steering and drains; the cluster has stopped
    /// once the last one is gone ([`Core::finished`]).
    pub(crate) fn stop(&mut self, io: &mut impl Io, now: Instant) {
        let timeout = self.settings.shutdown_timeout;
        tracing::info!(
            "stopping: draining every worker (SIGKILL after {})",
            humantime::format_duration(timeout)
        );
        self.phase = Phase::Stopping {
            deadline: now + timeout,
            killed: false,
        };
        self.roll = None;
        for slot in &mut self.slots {
            slot.next_start = None;
            slot.replacement = None;
            let index = slot.index;
            let mut leaving: Vec<Worker> = slot
                .current
                .take()
                .into_iter()
                .chain(slot.incoming.take())
                .collect();
            for worker in &mut leaving {
                Slot::drain(index, worker, io, now, timeout);
            }
            slot.retiring.extend(leaving);
        }
    }

    /// SIGKILL to every process (a second stop signal, or the shutdown deadline).
    pub(crate) fn kill_all(&mut self, io: &mut impl Io) {
        if let Phase::Stopping { deadline, .. } = self.phase {
            self.phase = Phase::Stopping {
                deadline,
                killed: true,
            };
        }
        for slot in &mut self.slots {
            for worker in slot.workers_mut() {
                if !worker.killed {
                    worker.killed = true;
                    io.kill(worker.id);
                }
            }
        }
    }

    /// SIGUSR2 (or SIGHUP): replace every serving slot, one at a time. It starts in the
    /// same turn of the loop.
    pub(crate) fn begin_roll(&mut self, why: &str) {
        if self.phase != Phase::Running {
            return;
        }
        if let Some(roll) = self.roll.as_mut() {
            tracing::info!("{why}: a rolling restart is under way; another follows it");
            roll.again = true;
            return;
        }
        tracing::info!("{why}: rolling restart of {} slots", self.configured);
        self.roll = Some(Roll::over(self.configured));
        self.roll_abandoned = None;
        for slot in &mut self.slots {
            slot.failed_starts = 0;
        }
    }

    fn advance_roll(&mut self) {
        let Some(roll) = self.roll.as_mut() else {
            return;
        };
        if let Some(index) = roll.current {
            if let Some(slot) = self.slots.get(index)
                && !slot.failed
                && !slot.retired
                && (slot.replacement.is_some() || slot.incoming.is_some())
            {
                return;
            }
            roll.current = None;
        }
        while let Some(index) = roll.queue.pop_front() {
            let Some(slot) = self.slots.get_mut(index) else {
                continue;
            };
            if slot.failed || slot.retired || slot.current.is_none() {
                // Nothing serves here; a restart or revival starts the new code anyway.
                continue;
            }
            slot.replacement.get_or_insert(Replacement::Roll);
            roll.current = Some(index);
            return;
        }
        if roll.again {
            roll.again = false;
            roll.queue = (0..self.configured).collect();
        } else {
            tracing::info!("rolling restart complete");
            self.roll = None;
        }
    }

    /// Changes the number of slots (SIGHUP with a new `workers`, SIGTTIN, SIGTTOU) without
    /// touching any slot that stays. Added slots start at once, and steering grows to them
    /// once they are all ready. Removed slots, the highest first, leave steering at once
    /// and drain; steering shrinks at once, so only the clients of removed slots move.
    pub(crate) fn resize(&mut self, io: &mut impl Io, slots: usize, now: Instant, why: &str) {
        let slots = slots.clamp(1, steer_common::MAX_SLOTS as usize);
        if self.phase != Phase::Running || slots == self.configured {
            return;
        }
        tracing::info!("{why}: {} -> {slots} workers", self.configured);
        let timeout = self.settings.shutdown_timeout;
        if slots > self.configured {
            for index in self.configured..slots {
                match self.slots.get_mut(index) {
                    Some(slot) => {
                        // Still draining from an earlier shrink: it serves again.
                        slot.retired = false;
                        slot.failed = false;
                        slot.crashes.clear();
                        if slot.current.is_none() && slot.incoming.is_none() {
                            slot.next_start = Some(now);
                        }
                    }
                    None => {
                        let mut slot = Slot::new(index);
                        slot.next_start = Some(now);
                        self.slots.push(slot);
                    }
                }
            }
            self.configured = slots;
            self.growing = true;
            return;
        }
        for index in (slots..self.configured).rev() {
            let slot = &mut self.slots[index];
            slot.retired = true;
            slot.next_start = None;
            slot.replacement = None;
            slot.let_go(io, now, timeout);
        }
        self.configured = slots;
        self.growing = false;
        io.resize_steering(slots);
    }

    /// Grows steering once every added slot serves (or has failed), and forgets removed
    /// slots at the end of the table once their processes are gone.
    fn finish_resize(&mut self, io: &mut impl Io) {
        if self.growing
            && self.slots[..self.configured]
                .iter()
                .all(|s| s.failed || s.state() == SlotState::Ready)
        {
            self.growing = false;
            io.resize_steering(self.configured);
            tracing::info!("{} workers ready: steering spans them all", self.configured);
        }
        while self.slots.len() > self.configured
            && self
                .slots
                .last()
                .is_some_and(|s| s.retired && s.workers().next().is_none())
        {
            self.slots.pop();
        }
    }

    /// SIGHUP: the new settings apply to what happens next; `failed` slots are revived;
    /// then every worker is rolled so it runs with the new settings.
    pub(crate) fn reload(&mut self, settings: Settings, now: Instant) {
        if self.phase != Phase::Running {
            tracing::info!("SIGHUP ignored: the cluster is stopping");
            return;
        }
        if settings.health_interval != self.settings.health_interval {
            self.next_ping = self.next_ping.min(now + settings.health_interval);
        }
        self.settings = settings;
        for slot in self.slots.iter_mut().filter(|s| !s.retired) {
            if slot.failed {
                tracing::info!(slot = slot.index, "SIGHUP: reviving failed slot");
                slot.failed = false;
                slot.crashes.clear();
                slot.next_start = Some(now);
            }
        }
        self.begin_roll("SIGHUP");
    }
}
