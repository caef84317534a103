//! The host side of the primary: the real processes, their IPC, and the steering maps,
//! behind the [`Io`] the core decides through.

use super::output::{OutputReader, Tag};
use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Poll, Token};

use super::WorkerProgram;
use super::core::{EnterError, Io, ListenerError, SpawnError, Spawned, WorkerId};
use super::group::{self, Group};
use super::process::{
    LEFTOVER_GRACE, Leftovers, ListenerRef, Process, RelayBudget, ResidentMemory, group_alive,
    signal_group,
};
use super::spawn::{self, LISTEN_FD, SpawnSpec};
use crate::baseline::Baseline;
use crate::config::Config;
use crate::ipc::{Channel, Framing, Message};
use crate::logging::{ENV_LOG_FORMAT, ENV_LOG_LEVEL};
use crate::steering::{LoadShare, Steering, SteeringError, SwitchError};
use crate::sys::borrow;
use crate::worker::env;

/// fd number of the IPC socket in re-executed workers.
const IPC_FD_BUILTIN: i32 = 3;
/// How soon an undecided ownership probe is looked at again.
const PROBE_RECHECK: Duration = Duration::from_millis(50);
/// fd number of the IPC socket in external workers: right after their listeners' sockets
/// (fds 3, 4, ... in the listeners' order), so 4 with one listener.
pub(crate) fn ipc_fd_external(listeners: usize) -> i32 {
    LISTEN_FD + listeners as i32
}

/// fd number of an external worker's load record (`least-loaded`), `STEER_LOAD_FD`: right
/// after its IPC socket, so 5 with one listener.
pub(crate) fn load_fd_external(listeners: usize) -> i32 {
    ipc_fd_external(listeners) + 1
}

/// First token of worker fds: `BASE + 3*id` (exit), `+ 1` (IPC) and `+ 2` (the exec
/// report). Worker ids are never reused, so a late event for a gone worker names nobody.
pub(crate) const WORKER_TOKEN_BASE: usize = 16;

/// How often leftovers of a worker's group are looked for, besides SIGCHLD.
const LEFTOVER_POLL: Duration = Duration::from_millis(50);

/// Which of a worker's fds an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WorkerFd {
    /// The pidfd: the process exited.
    Exit,
    /// The IPC socket: messages (or end-of-file).
    Ipc,
    /// The exec-report pipe: end-of-file once `execve` succeeded, a report if it failed.
    Exec,
}

/// The poll token of one of a worker's fds.
pub(crate) fn worker_token(id: WorkerId, fd: WorkerFd) -> Token {
    let base = WORKER_TOKEN_BASE + 3 * id.0 as usize;
    Token(
        base + match fd {
            WorkerFd::Exit => 0,
            WorkerFd::Ipc => 1,
            WorkerFd::Exec => 2,
        },
    )
}

/// The poll token of the stall events of listener group `i` is `STALL_TOKEN_BASE + i`.
pub(crate) const STALL_TOKEN_BASE: usize = 1 << 39;

/// The worker and fd a token names.
pub(crate) fn decode_worker_token(token: Token) -> Option<(WorkerId, WorkerFd)> {
    let n = token.0.checked_sub(WORKER_TOKEN_BASE)?;
    let kind = match n % 3 {
        0 => WorkerFd::Exit,
        1 => WorkerFd::Ipc,
        _ => WorkerFd::Exec,
    };
    Some((WorkerId((n / 3) as u64), kind))
}

/// Why this primary's program could not be put back on the port's group
/// ([`Host::reassert_steering`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReassertError {
    /// No serving worker was left to attach the program through.
    #[error("no serving worker")]
    NoServingWorker,
    /// The listener of the last serving worker tried could not be borrowed.
    #[error(transparent)]
    Borrow(ListenerError),
    /// Attaching the program (or, under `kernel`, detaching the successor's) failed.
    #[error(transparent)]
    Steering(#[from] SteeringError),
}

/// Processes, steering and what spawning needs.
pub(crate) struct Host {
    /// The configuration workers are started with.
    pub config: Config,
    /// What the workers run.
    pub program: WorkerProgram,
    /// This executable, for re-executed workers. Resolved by path at every spawn, so a
    /// binary replaced on disk is picked up by the next rolling restart.
    pub exe: PathBuf,
    /// This process's arguments, for library workers.
    pub args: Vec<OsString>,
    /// The event loop's poll (workers' fds are registered here).
    pub poll: Poll,
    /// One `SO_REUSEPORT` group per listener, in the listeners' order, each with its
    /// steering.
    pub groups: Vec<Group>,
    /// The `shared`/`userspace` baseline's socket and state, if one runs.
    pub baseline: Option<Baseline>,
    /// Every live worker process.
    pub procs: HashMap<WorkerId, Process>,
    /// Groups whose leader exited, still being waited for.
    pub leftovers: Vec<Leftovers>,
    /// The open-file limit this primary started with: what workers get by default.
    pub inherited_nofile: Option<(u64, u64)>,
    /// When steering's checks are next looked at: the next round, or sooner while the
    /// ownership probe of this round is undecided.
    pub next_steering_check: Instant,
    /// When the next round of steering's per-interval checks is due (program ownership,
    /// load records, foreign listeners).
    pub next_steering_round: Instant,
    /// Reads and tags workers' stdout and stderr (none with `--worker-output inherit`).
    pub output: Option<OutputReader>,
    /// Draining workers that still keep UDP flows: told to drain once their flows are idle
    /// (or their share of the shutdown timeout is up) and their sockets have left
    /// steering ([`Host::tend_holds`]).
    pub holds: std::collections::BTreeMap<WorkerId, FlowHold>,
    /// This primary handed over to a successor: its workers drain as in a rolling restart
    /// (their UDP flows held), not as in a stop.
    pub handed_over: bool,
}

/// A draining worker whose UDP sockets keep their flows for now.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FlowHold {
    /// Its sockets leave steering by then at the latest.
    release_by: Instant,
    /// When they left: it is told to drain [`RELEASE_GRACE`] later.
    released_at: Option<Instant>,
}

/// Between taking a worker's UDP sockets out of `SOCKETS` and telling it to drain: a
/// program run that picked one of them just before has queued its datagram long before
/// this, so the worker's last read finds it.
const RELEASE_GRACE: Duration = Duration::from_millis(20);

/// How often held flows are looked at.
const HOLD_POLL: Duration = Duration::from_millis(50);

/// How often the loop looks whether a slot's live set is published, while one waits.
const PUBLISH_POLL: Duration = Duration::from_millis(5);

/// The part of the shutdown timeout a draining worker keeps its UDP flows: all but a
/// fifth of it (at most 5 s), which is left for its last read and its TCP connections.
fn hold_share(shutdown_timeout: Duration) -> Duration {
    shutdown_timeout.saturating_sub((shutdown_timeout / 5).min(Duration::from_secs(5)))
}

impl Host {
    /// The process `id`, if it still runs.
    pub(crate) fn process(&mut self, id: WorkerId) -> Option<&mut Process> {
        self.procs.get_mut(&id)
    }

    /// Stops reading a worker's IPC (after a violation, or at end-of-file).
    pub(crate) fn unwatch_ipc(&mut self, id: WorkerId) {
        if let Some(process) = self.procs.get_mut(&id)
            && process.ipc_watched
        {
            process.ipc_watched = false;
            let fd = process.channel.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        }
    }

    /// A worker's main process exited: its group's leftovers are dealt with, it is
    /// reaped, and its fds are closed. `drain_deadline` is when a draining worker's
    /// children must be done; a crashed worker's group is killed at once.
    pub(crate) fn bury(
        &mut self,
        id: WorkerId,
        drain_deadline: Option<Instant>,
        now: Instant,
    ) -> Option<(usize, super::core::ExitStatus)> {
        let mut process = self.procs.remove(&id)?;
        self.holds.remove(&id);
        let pgid = process.pid;
        if drain_deadline.is_none() {
            // While the leader is unreaped its number names only its group.
            let _ = signal_group(pgid, libc::SIGKILL);
        }
        let status = process
            .try_reap()
            .unwrap_or(super::core::ExitStatus::Unknown);
        if let Some(reason) = process.exec_failure() {
            tracing::error!(
                slot = process.slot,
                pid = process.pid,
                "cannot start worker {}: {reason}",
                process.program_name()
            );
        }
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut SourceFd(&process.pidfd.as_raw_fd()));
        if let Some(pipe) = &process.exec_report {
            let _ = registry.deregister(&mut SourceFd(&pipe.as_raw_fd()));
        }
        if process.ipc_watched {
            let _ = registry.deregister(&mut SourceFd(&process.channel.as_raw_fd()));
        }
        if group_alive(pgid) {
            let (deadline, killed) = match drain_deadline {
                Some(deadline) => (deadline.max(now), false),
                None => (now + LEFTOVER_GRACE, true),
            };
            self.leftovers.push(Leftovers {
                pgid,
                slot: process.slot,
                deadline,
                killed,
            });
        }
        Some((process.slot, status))
    }

    /// The exec-report pipe is readable: `Some(true)` once `execve` succeeded (end of
    /// file), `Some(false)` if it failed (the reason is logged; the exit follows), `None`
    /// if there is nothing to tell yet.
    pub(crate) fn exec_outcome(&mut self, id: WorkerId) -> Option<bool> {
        use std::io::Read;
        let process = self.procs.get_mut(&id)?;
        let pipe = process.exec_report.as_mut()?;
        let mut report = [0u8; 8];
        let outcome = match pipe.read(&mut report) {
            Ok(0) => true,
            Ok(8) => {
                tracing::error!(
                    slot = process.slot,
                    pid = process.pid,
                    "cannot start worker {}: {}",
                    process.program_name(),
                    spawn::describe_exec_report(report)
                );
                false
            }
            Ok(_) => false,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(_) => false,
        };
        if let Some(pipe) = process.exec_report.take() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&pipe.as_raw_fd()));
        }
        Some(outcome)
    }

    /// Switches the steering policy of the running cluster, if the program allows it
    /// without restarting workers.
    pub(crate) fn switch_policy(
        &mut self,
        wanted: crate::config::Balance,
    ) -> Result<(), SwitchError> {
        for group in &mut self.groups {
            group.steering.switch_policy(wanted)?;
        }
        Ok(())
    }

    /// The policy in force (the same in every group).
    pub(crate) fn policy(&self) -> crate::config::Balance {
        self.groups
            .first()
            .map_or(crate::config::Balance::Kernel, |g| g.steering.policy())
    }

    /// Whether Steer's program steers the groups.
    pub(crate) fn is_ebpf(&self) -> bool {
        self.groups.first().is_some_and(|g| g.steering.is_ebpf())
    }

    /// A fresh load record for the worker of `slot`/`generation` (`least-loaded` only),
    /// placed in every group's `LOADS` when the worker serves: the worker's load is one,
    /// whichever listener a connection came in on. The fd is for the worker to map.
    pub(crate) fn load_record(
        &mut self,
        slot: usize,
        generation: u32,
    ) -> Option<Result<(OwnedFd, LoadShare), SteeringError>> {
        let (first, rest) = self.groups.split_first_mut()?;
        let made = first.steering.load_record(slot, generation)?;
        Some(made.map(|(fd, share, record)| {
            for group in rest {
                group.steering.adopt_record(slot, generation, &record);
            }
            (fd, share)
        }))
    }

    /// Attaches this primary's program to every group again, each through its socket of
    /// one of `serving` (a successor that failed may have attached its own).
    pub(crate) fn reassert_steering(&mut self, serving: &[WorkerId]) -> Result<(), ReassertError> {
        let mut result = Ok(());
        for (index, group) in self.groups.iter_mut().enumerate() {
            if matches!(group.steering, Steering::Baseline(_)) {
                continue;
            }
            let mut last = Err(ReassertError::NoServingWorker);
            for id in serving {
                let Some(process) = self.procs.get(id) else {
                    continue;
                };
                match process.borrow_socket(index) {
                    Ok(socket) => {
                        last = group
                            .steering
                            .reattach_through(socket.as_fd())
                            .map_err(ReassertError::from);
                        break;
                    }
                    Err(err) => last = Err(ReassertError::Borrow(err)),
                }
            }
            if last.is_err() && result.is_ok() {
                result = last;
            }
        }
        result
    }

    /// Forgets groups that are gone, kills those past their deadline.
    pub(crate) fn tend_leftovers(&mut self, now: Instant) {
        self.leftovers.retain_mut(|left| {
            if !group_alive(left.pgid) {
                return false;
            }
            if now < left.deadline {
                return true;
            }
            if left.killed {
                tracing::warn!(
                    slot = left.slot,
                    pgid = left.pgid,
                    "processes of a worker's group are still there after SIGKILL; no longer waiting for them"
                );
                return false;
            }
            tracing::warn!(
                slot = left.slot,
                pgid = left.pgid,
                "what is left of a drained worker's process group is still running; killing it"
            );
            let _ = signal_group(left.pgid, libc::SIGKILL);
            left.killed = true;
            left.deadline = now + LEFTOVER_GRACE;
            true
        });
    }

    /// When leftovers, held flows, or steering's checks, need looking at again.
    pub(crate) fn next_wake(&self, now: Instant) -> Option<Instant> {
        let leftovers = self
            .leftovers
            .iter()
            .map(|left| left.deadline.min(now + LEFTOVER_POLL));
        let holds = self.holds.values().map(|hold| match hold.released_at {
            Some(at) => at + RELEASE_GRACE,
            None => hold.release_by.min(now + HOLD_POLL),
        });
        let publishing = self
            .groups
            .iter()
            .any(|g| g.steering.publishing())
            .then_some(now + PUBLISH_POLL);
        Some(
            leftovers
                .chain(holds)
                .chain(publishing)
                .fold(self.next_steering_check, Instant::min),
        )
    }

    /// Whether new connections and flows reach `slot` on every listener (see
    /// [`Steering::in_steering`]).
    pub(crate) fn in_steering(&self, slot: usize) -> bool {
        self.groups.iter().all(|g| g.steering.in_steering(slot))
    }

    /// Tells the worker to drain: the `drain` message, and SIGTERM to an external
    /// worker's process group.
    fn send_drain(&mut self, id: WorkerId) {
        let Some(process) = self.procs.get_mut(&id) else {
            return;
        };
        let _not_listening = process.channel.send(&Message::Drain);
        if process.external
            && let Err(err) = process.signal_group(libc::SIGTERM)
        {
            // Without it the worker drains only at the SIGKILL deadline (a worker of
            // another user needs CAP_KILL).
            tracing::warn!(
                slot = process.slot,
                pid = process.pid,
                "SIGTERM failed: {err}{}",
                if err.raw_os_error() == Some(libc::EPERM) {
                    " (the primary needs CAP_KILL to signal a worker of another user)"
                } else {
                    ""
                }
            );
        }
    }

    /// Once per loop turn: each held worker whose flows are idle (or whose share of the
    /// shutdown timeout is up, or whose cluster is stopping: no slot serves any more)
    /// has its UDP sockets taken out of steering; [`RELEASE_GRACE`] later it is told to
    /// drain, and reads what is queued on them before it exits.
    pub(crate) fn tend_holds(&mut self, now: Instant) {
        if self.holds.is_empty() {
            return;
        }
        let stopping = !self.handed_over
            && self
                .groups
                .iter()
                .filter(|g| g.steering.tracks_flows())
                .all(|g| g.steering.serving() == 0);
        let mut drain = Vec::new();
        for (&id, hold) in &mut self.holds {
            let Some(process) = self.procs.get(&id) else {
                continue;
            };
            let (slot, generation) = (process.slot, process.generation);
            if hold.released_at.is_none() {
                let idle = self
                    .groups
                    .iter()
                    .all(|g| g.steering.flows_idle(slot, generation));
                if !(idle || stopping || now >= hold.release_by) {
                    continue;
                }
                for group in &mut self.groups {
                    if let Err(err) = group.steering.release_flows(slot, generation) {
                        tracing::warn!(
                            slot,
                            listener = %group.listener.name,
                            "cannot take a draining worker's socket out of steering: {}",
                            crate::errors::error_chain(&err)
                        );
                    }
                }
                tracing::debug!(slot, generation, idle, "UDP flows released");
                hold.released_at = Some(now);
            }
            if hold.released_at.is_some_and(|at| now >= at + RELEASE_GRACE) {
                drain.push(id);
            }
        }
        for id in drain {
            self.holds.remove(&id);
            self.send_drain(id);
        }
    }

    /// Once per loop turn, before the loop sleeps: publishes what this turn changed in the
    /// live set. Once per health interval: makes sure the program deciding for the group is
    /// Steer's (unless `own_group` is false: a successor primary is taking it over; a
    /// takeover is logged and counted by steering), settles the load records, and (when
    /// `alone`: no other primary of this cluster runs, whose workers would look foreign)
    /// surveys the port for foreign listeners.
    pub(crate) fn tend_steering(&mut self, now: Instant, own_group: bool, alone: bool) {
        self.tend_holds(now);
        self.watch_stall_events();
        if now >= self.next_steering_check {
            let round = now >= self.next_steering_round;
            if round && alone {
                self.survey_port();
            }
            for group in &mut self.groups {
                if own_group
                    && (round || group.steering.probe_in_flight())
                    && let Err(err) = group.steering.ensure_program(
                        &group.listener,
                        self.config.health_interval,
                        &group.port.shadowed(),
                    )
                {
                    tracing::warn!(
                        listener = %group.listener.name,
                        "cannot check who decides for the listener's group: {}",
                        crate::errors::error_chain(&err)
                    );
                }
            }
            let quick_look = self.groups.iter().any(|g| g.steering.wants_quick_look());
            if round || quick_look {
                self.reconcile_load();
            }
            if round {
                self.next_steering_round = now + self.config.health_interval;
                if let Err(err) = group::each(&mut self.groups, Steering::survey_clients) {
                    tracing::warn!(
                        "cannot read the per-client limit's tables: {}",
                        crate::errors::error_chain(&err)
                    );
                }
            }
            // An undecided probe (a busy host) is looked at again soon, not a whole
            // interval later.
            self.next_steering_check = if self.groups.iter().any(|g| g.steering.probe_in_flight()) {
                now + PROBE_RECHECK
            } else {
                self.next_steering_round
            };
            // A suspect or stalled worker that does not publish its accepts is judged from
            // its accept queue, read again soon.
            if self.groups.iter().any(|g| g.steering.wants_quick_look()) {
                self.next_steering_check = self
                    .next_steering_check
                    .min(now + crate::steering::stalls::QUICK_LOOK);
            }
        }
        if let Err(err) = group::each(&mut self.groups, Steering::flush) {
            tracing::warn!(
                "cannot publish the live set: {}",
                crate::errors::error_chain(&err)
            );
        }
    }

    /// Registers each group's stall events with the poll, once per program (a policy
    /// switch may load one).
    fn watch_stall_events(&mut self) {
        let registry = self.poll.registry();
        for (i, group) in self.groups.iter_mut().enumerate() {
            let Some(fd) = group.steering.unwatched_stall_events() else {
                continue;
            };
            let raw = AsRawFd::as_raw_fd(&fd);
            if let Err(err) = registry.register(
                &mut SourceFd(&raw),
                Token(STALL_TOKEN_BASE + i),
                Interest::READABLE,
            ) {
                tracing::warn!(
                    listener = %group.listener.name,
                    "cannot watch the program's stall events (a stall made of SYNs that never \
                     became connections then lasts until the next health interval): {err}"
                );
            }
        }
    }

    /// The program started judging a slot of group `group` stalled: settle the load
    /// records against the real accept queues in this turn, not at the next health
    /// interval. A real stall stays (its queue is real); one made of SYNs that never
    /// became connections ends.
    pub(crate) fn on_stall_events(&mut self, group: usize, now: Instant) {
        if let Some(g) = self.groups.get_mut(group)
            && g.steering.take_stall_events()
        {
            self.next_steering_check = self.next_steering_check.min(now);
        }
    }

    /// `least-loaded`: settles every serving worker's load record against the real accept
    /// queues of its TCP listeners, summed (a record is per worker, not per listener).
    fn reconcile_load(&mut self) {
        let mut queued: std::collections::BTreeMap<u32, u64> = Default::default();
        for group in self.groups.iter_mut().filter(|g| g.is_tcp()) {
            match group.steering.queued_per_slot(group.listener.addr) {
                Ok(lengths) => {
                    for (slot, n) in lengths {
                        *queued.entry(slot).or_default() += n;
                    }
                }
                Err(err) => {
                    tracing::warn!(
                        listener = %group.listener.name,
                        "cannot settle the load records: {}",
                        crate::errors::error_chain(&err)
                    );
                    return;
                }
            }
        }
        if let Some(first) = self.groups.first_mut() {
            first.steering.settle_load(&queued);
        }
    }

    /// Lists the port's listeners and reports those that are not this cluster's: not a
    /// worker's registered socket, nor held by a worker that has not registered one yet,
    /// nor by the primary itself (the baselines' socket, a status listener on the port).
    /// A socket that such a worker may hold, but whose fds cannot be read (it switched to
    /// another `--user` and the primary lacks `CAP_SYS_PTRACE`), is not judged this time:
    /// the worker registers it within its start.
    fn survey_port(&mut self) {
        let registered: Vec<u64> = self
            .procs
            .values()
            .flat_map(|p| p.listeners.iter().flatten().map(|l| l.inode))
            .collect();
        let holders: Vec<i32> = std::iter::once(std::process::id() as i32)
            .chain(
                self.procs
                    .values()
                    .filter(|p| p.listeners.iter().any(Option::is_none))
                    .map(|p| p.pid),
            )
            .collect();
        let ours = |inode: u64| {
            registered.contains(&inode)
                || holders
                    .iter()
                    .any(|&pid| match borrow::find_socket(pid, inode) {
                        Ok(_) => true,
                        Err(err) => err.is_permission_denied(),
                    })
        };
        // `sock_diag` lists TCP listeners; a UDP group has no foreign-listener survey yet.
        for group in self.groups.iter_mut().filter(|g| g.is_tcp()) {
            if let Err(err) = group.port.survey(group.listener.addr, &ours) {
                tracing::debug!("cannot list the port's listeners: {err}");
            }
        }
    }

    /// Builds the spawn for this slot's program and starts it.
    fn spawn_process(
        &mut self,
        slot: usize,
        generation: u64,
        id: WorkerId,
    ) -> std::io::Result<(Process, bool)> {
        // External workers get newline-delimited JSON on a stream, which Node's
        // `process.send` speaks (it cannot open a SOCK_SEQPACKET fd); the others pass fds.
        let (primary_end, worker_end) = match &self.program {
            WorkerProgram::External(_) => Channel::stream_pair()?,
            _ => Channel::pair()?,
        };
        primary_end.set_nonblocking(true)?;
        let mut vars: Vec<(OsString, OsString)> = vec![
            (env::SLOT.into(), slot.to_string().into()),
            // PM2's name for the slot, which Node apps written for PM2 read.
            (env::NODE_APP_INSTANCE.into(), slot.to_string().into()),
            (env::GENERATION.into(), generation.to_string().into()),
            (env::ID.into(), id.0.to_string().into()),
            (
                ENV_LOG_FORMAT.into(),
                log_format_name(self.config.log_format).into(),
            ),
            (
                ENV_LOG_LEVEL.into(),
                self.config.verbosity.to_string().into(),
            ),
        ];
        if self
            .groups
            .iter()
            .any(|g| g.listener.protocol == crate::config::Protocol::Quic)
        {
            let quic = crate::quic::worker_env(slot, generation);
            vars.extend(quic.into_iter().map(|(k, v)| (k.into(), v.into())));
        }
        let external = matches!(self.program, WorkerProgram::External(_));
        let listeners = self.groups.len();
        let (program, argv, fds, own_sockets, registers) = match &self.program {
            WorkerProgram::External(command) => {
                // One socket per listener at fds 3, 4, ...: the `shared` baseline's
                // socket (its one TCP listener), else the child's own.
                let mut fds = Vec::with_capacity(listeners + 2);
                let mut copies = Vec::with_capacity(listeners);
                for (index, group) in self.groups.iter().enumerate() {
                    let socket = match self.baseline.as_ref().and_then(|b| b.external_socket()) {
                        Some(shared) => shared?,
                        None => OwnedFd::from(crate::listener::bind_for(
                            &group.listener,
                            self.config.udp_receive_buffer,
                        )?),
                    };
                    copies.push(Some(socket.try_clone()?));
                    fds.push((socket, LISTEN_FD + index as i32));
                }
                let ipc_fd = ipc_fd_external(listeners);
                let load_fd = load_fd_external(listeners);
                let names: Vec<&str> = self
                    .groups
                    .iter()
                    .map(|g| g.listener.name.as_str())
                    .collect();
                vars.push((env::IPC_FD.into(), ipc_fd.to_string().into()));
                vars.push(("NODE_CHANNEL_FD".into(), ipc_fd.to_string().into()));
                vars.push(("NODE_CHANNEL_SERIALIZATION_MODE".into(), "json".into()));
                vars.push(("LISTEN_FDS".into(), listeners.to_string().into()));
                vars.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
                let first = command.first().map(OsString::from).unwrap_or_default();
                let program = spawn::resolve_program(&first)?;
                let argv = command.iter().map(OsString::from).collect();
                fds.push((OwnedFd::from(worker_end), ipc_fd));
                // An external worker does not register, so its load record is placed at
                // spawn, like its sockets.
                match self.load_record(slot, generation as u32) {
                    Some(Ok((record, _share))) => {
                        vars.push((env::LOAD_FD.into(), load_fd.to_string().into()));
                        vars.push((
                            env::LOAD_LAYOUT.into(),
                            crate::steering::load::LAYOUT.into(),
                        ));
                        fds.push((record, load_fd));
                    }
                    Some(Err(err)) => {
                        tracing::warn!(
                            slot,
                            "worker will not publish its load: {}",
                            crate::errors::error_chain(&err)
                        );
                    }
                    None => {}
                }
                (program, argv, fds, Some(copies), false)
            }
            builtin => {
                let role = if *builtin == WorkerProgram::Demo {
                    env::ROLE_DEMO
                } else {
                    env::ROLE_LIBRARY
                };
                vars.push((env::ROLE.into(), role.into()));
                vars.push((env::IPC_FD.into(), IPC_FD_BUILTIN.to_string().into()));
                let listed: Vec<String> =
                    self.groups.iter().map(|g| g.listener.to_string()).collect();
                vars.push((env::LISTENERS.into(), listed.join("\n").into()));
                vars.push((
                    env::UDP_RECEIVE_BUFFER.into(),
                    self.config.udp_receive_buffer.to_string().into(),
                ));
                if self.config.demo_faults {
                    vars.push((env::DEMO_FAULTS.into(), "1".into()));
                }
                let (name, timeouts) = crate::demo::timeouts_env(&self.config);
                vars.push((name.into(), timeouts.into()));
                if let (Some(cert), Some(key)) = (&self.config.tls_cert, &self.config.tls_key) {
                    vars.extend(crate::demo::tls_env(cert, key));
                }
                if let Some(credentials) = &self.config.credentials {
                    let switch = crate::privileges::env_for(credentials);
                    vars.extend(switch.map(|(k, v)| (k.into(), v.into())));
                }
                let argv0 = self.args.first().cloned().unwrap_or_else(|| "steer".into());
                let argv = if *builtin == WorkerProgram::Demo {
                    vec![argv0, "worker".into(), slot.to_string().into()]
                } else {
                    self.args.clone()
                };
                let mut fds = vec![(OwnedFd::from(worker_end), IPC_FD_BUILTIN)];
                let mut registers = true;
                if let Some(baseline) = &self.baseline {
                    let inheritance = baseline.worker_inheritance()?;
                    vars.extend(inheritance.env);
                    fds.extend(inheritance.fds);
                    registers = baseline.workers_register();
                }
                (self.exe.clone(), argv, fds, None, registers)
            }
        };
        let listen_pid = own_sockets.is_some();
        let mut fds = fds;
        let pipes = match &self.output {
            Some(_) => {
                let pipes = OutputReader::pipes()?;
                fds.push((pipes.stdout.try_clone()?, 1));
                fds.push((pipes.stderr.try_clone()?, 2));
                Some(pipes)
            }
            None => None,
        };
        let child = spawn::spawn(SpawnSpec {
            program,
            argv,
            env: vars,
            env_remove: env::ALL,
            fds,
            listen_pid,
            cpu: self
                .config
                .cpu_affinity
                .then(|| crate::steering::cpu_for_slot(slot, &crate::steering::allowed_cpus()))
                .flatten()
                .map(|cpu| cpu as usize),
            limits: spawn::ChildLimits::for_worker(&self.config, external, self.inherited_nofile),
        })?;
        if let (Some(output), Some(pipes)) = (&self.output, pipes) {
            output.watch(
                pipes,
                Tag {
                    slot,
                    pid: child.pid,
                    generation,
                },
            );
        }
        let now = Instant::now();
        let (sockets, listener_refs) = match own_sockets {
            Some(sockets) => {
                let refs = sockets
                    .iter()
                    .enumerate()
                    .map(|(index, socket)| {
                        Some(ListenerRef {
                            inode: crate::sys::fd::inode(socket.as_ref()?.as_fd()).ok()?,
                            fd: LISTEN_FD + index as i32,
                        })
                    })
                    .collect();
                (sockets, refs)
            }
            None => (
                std::iter::repeat_with(|| None).take(listeners).collect(),
                vec![None; listeners],
            ),
        };
        let process = Process {
            id,
            slot,
            generation,
            pid: child.pid,
            pidfd: child.pidfd,
            channel: primary_end,
            sockets,
            listeners: listener_refs,
            memory: ResidentMemory::open(child.pid),
            exec_report: Some(child.exec_report),
            program: child.program,
            external,
            ipc_watched: true,
            budget: RelayBudget::new(now),
            unsent_ping: None,
        };
        Ok((process, registers))
    }
}

impl Io for Host {
    fn spawn(&mut self, slot: usize, generation: u64, id: WorkerId) -> Result<Spawned, SpawnError> {
        let (process, registers) = self
            .spawn_process(slot, generation, id)
            .map_err(SpawnError::Start)?;
        let registry = self.poll.registry();
        let watch = registry
            .register(
                &mut SourceFd(&process.pidfd.as_raw_fd()),
                worker_token(id, WorkerFd::Exit),
                Interest::READABLE,
            )
            .and_then(|()| {
                // A stream channel buffers what the socket does not take; it is flushed
                // when the socket becomes writable.
                let interest = match process.channel.framing() {
                    Framing::Lines => Interest::READABLE | Interest::WRITABLE,
                    Framing::Datagram => Interest::READABLE,
                };
                registry.register(
                    &mut SourceFd(&process.channel.as_raw_fd()),
                    worker_token(id, WorkerFd::Ipc),
                    interest,
                )
            })
            .and_then(|()| match &process.exec_report {
                Some(pipe) => registry.register(
                    &mut SourceFd(&pipe.as_raw_fd()),
                    worker_token(id, WorkerFd::Exec),
                    Interest::READABLE,
                ),
                None => Ok(()),
            });
        if let Err(err) = watch {
            // Without its pidfd in the loop its exit would never be seen.
            let _ = signal_group(process.pid, libc::SIGKILL);
            let _ = registry.deregister(&mut SourceFd(&process.pidfd.as_raw_fd()));
            let _ = registry.deregister(&mut SourceFd(&process.channel.as_raw_fd()));
            spawn::kill_and_reap(process.pid);
            return Err(SpawnError::Watch(err));
        }
        let spawned = Spawned {
            pid: process.pid,
            listening: process.has_every_socket(),
            registers,
        };
        self.procs.insert(id, process);
        Ok(spawned)
    }

    fn enter_steering(
        &mut self,
        slot: usize,
        id: WorkerId,
        generation: u64,
    ) -> Result<(), EnterError> {
        let process = self.procs.get_mut(&id).ok_or(EnterError::Gone)?;
        if !process.has_every_socket() {
            // The baselines' workers have no socket of their own to steer to.
            return match self.baseline {
                Some(_) => Ok(()),
                None => Err(EnterError::NoSocket),
            };
        }
        for (index, group) in self.groups.iter_mut().enumerate() {
            let Some(fd) = process.sockets[index].take() else {
                continue;
            };
            let entered = group.steering.activate(
                slot,
                generation as u32,
                fd,
                process.pid,
                process.pidfd.as_fd(),
                process.listeners[index].map(|listener| listener.fd),
            );
            if let Err(err) = entered {
                // All of its sockets or none: the groups it entered already let it go.
                for earlier in &mut self.groups[..index] {
                    let _ = earlier.steering.deactivate(slot);
                }
                return Err(err.into());
            }
        }
        Ok(())
    }

    fn leave_steering(&mut self, slot: usize) {
        if let Err(err) = group::each(&mut self.groups, |s| s.deactivate(slot)) {
            tracing::warn!(
                slot,
                "cannot take the slot out of steering: {}",
                crate::errors::error_chain(&err)
            );
        }
    }

    fn drain(&mut self, id: WorkerId) {
        let Some(process) = self.procs.get_mut(&id) else {
            return;
        };
        process.sockets.iter_mut().for_each(|s| *s = None);
        // A worker with UDP flows keeps them (and is not told yet): see `tend_holds`.
        if self.groups.iter().any(|g| g.steering.tracks_flows()) {
            let now = Instant::now();
            self.holds.insert(
                id,
                FlowHold {
                    release_by: now + hold_share(self.config.shutdown_timeout),
                    released_at: None,
                },
            );
            self.tend_holds(now);
            return;
        }
        self.send_drain(id);
    }

    fn repeat_drain(&mut self, id: WorkerId) {
        if self.holds.contains_key(&id) {
            return;
        }
        if let Some(process) = self.procs.get(&id) {
            let _full_or_gone = process.channel.send(&Message::Drain);
        }
    }

    fn kill(&mut self, id: WorkerId) {
        if let Some(process) = self.procs.get(&id)
            && let Err(err) = process.signal_group(libc::SIGKILL)
        {
            tracing::debug!(pid = process.pid, "SIGKILL failed: {err}");
        }
    }

    fn ping(&mut self, id: WorkerId, seq: u64) {
        if let Some(process) = self.procs.get_mut(&id) {
            // A full socket keeps the ping to send again first (a flooded worker that reads
            // must hear it); a worker that reads nothing cannot answer either, and the
            // verdict comes from the missing pong, not from here.
            process.ping(seq);
        }
    }

    fn shut_down_listener(&mut self, id: WorkerId) -> Result<(), ListenerError> {
        let process = self.procs.get(&id).ok_or(ListenerError::Gone)?;
        let tcp: Vec<bool> = self.groups.iter().map(Group::is_tcp).collect();
        process.shut_down_listeners(&tcp)
    }

    fn resize_steering(&mut self, slots: usize) {
        if let Err(err) = group::each(&mut self.groups, |s| s.resize(slots as u32)) {
            tracing::warn!(
                slots,
                "cannot rebuild steering for {slots} slots: {}",
                crate::errors::error_chain(&err)
            );
        }
    }

    fn resident_bytes(&mut self, id: WorkerId) -> Option<u64> {
        self.procs.get(&id)?.memory.as_ref()?.bytes()
    }
}

fn log_format_name(format: crate::config::LogFormat) -> &'static str {
    match format {
        crate::config::LogFormat::Text => "text",
        crate::config::LogFormat::Json => "json",
    }
}
