//! The supervisor: the primary's state and its event loop.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signalfd::SignalFd;

use super::signals::{self, Action};
use super::slot::Slot;
use super::{Hooks, WorkerProgram};
use crate::baseline::Baseline;
use crate::config::{Balance, Config, Settings};
use crate::status::server::{CLIENT_TOKEN_BASE, StatusServer};
use crate::steering::{self, MigrateReq, Steering};

const SIGNAL_TOKEN: Token = Token(0);
const STATUS_TOKEN: Token = Token(1);
/// The `userspace` baseline's listening socket (below the status clients' tokens, far
/// above any worker's).
const BASELINE_TOKEN: Token = Token(CLIENT_TOKEN_BASE - 1);
/// Worker tokens are derived from the pid: `2 + 2*pid` (exit) and `3 + 2*pid` (IPC). Pids
/// are unique among unreaped children, and a child's fds are closed right after it is
/// reaped, in the same event, so a later event for a stale token finds no process.
const WORKER_TOKEN_BASE: usize = 2;

/// Longest the loop sleeps without a deadline, so clock-based checks never starve.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Which of a worker's fds an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WorkerFd {
    /// The pidfd: the process exited.
    Exit,
    /// The IPC socket: messages (or end-of-file).
    Ipc,
}

pub(super) fn worker_token(pid: i32, fd: WorkerFd) -> Token {
    let base = WORKER_TOKEN_BASE + 2 * pid.unsigned_abs() as usize;
    Token(if fd == WorkerFd::Exit { base } else { base + 1 })
}

fn decode_worker_token(token: Token) -> Option<(i32, WorkerFd)> {
    let n = token.0.checked_sub(WORKER_TOKEN_BASE)?;
    let pid = i32::try_from(n / 2).ok()?;
    Some((
        pid,
        if n % 2 == 0 {
            WorkerFd::Exit
        } else {
            WorkerFd::Ipc
        },
    ))
}

/// Whether the cluster is serving or going away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClusterPhase {
    /// Normal operation.
    Running,
    /// Draining for exit; SIGKILL for what is left at `deadline`.
    Stopping { deadline: Instant, killed: bool },
}

/// A rolling restart in progress: slots still to replace, and the one being replaced.
#[derive(Debug, Default)]
pub(super) struct Roll {
    pub queue: VecDeque<usize>,
    pub current: Option<usize>,
    /// Another SIGUSR2 arrived meanwhile: roll again when this one ends.
    pub again: bool,
}

/// The primary.
pub(crate) struct Supervisor {
    pub(super) config: Config,
    pub(super) program: WorkerProgram,
    /// This executable, for re-executed workers. Resolved by path at every spawn, so a
    /// binary replaced on disk is picked up by the next rolling restart.
    pub(super) exe: PathBuf,
    pub(super) args: Vec<OsString>,
    pub(super) hooks: Hooks,
    pub(super) poll: Poll,
    signals: SignalFd,
    pub(super) status: Option<StatusServer>,
    pub(super) steering: Steering,
    /// The `shared`/`userspace` baseline's listening socket and state, if one runs.
    pub(super) baseline: Option<Baseline>,
    /// A bound (never listening) `SO_REUSEPORT` socket on the cluster address: it resolves
    /// port 0 and keeps the port Steer's while all workers restart. It receives nothing.
    _reservation: socket2::Socket,
    pub(super) listen: SocketAddr,
    pub(super) slots: Vec<Slot>,
    /// Slot of every live child, by pid.
    pub(super) pid_slot: HashMap<i32, usize>,
    pub(super) next_worker_id: u64,
    pub(super) started: Instant,
    pub(super) phase: ClusterPhase,
    pub(super) roll: Option<Roll>,
    pub(super) next_ping: Instant,
    pub(super) ping_seq: u64,
    /// Workers whose IPC had more queued than one wakeup reads.
    pub(super) pending_ipc: Vec<i32>,
    /// systemd's `NOTIFY_SOCKET`, told about readiness, reloads and stopping.
    pub(super) notifier: crate::systemd::Notifier,
}

impl Supervisor {
    /// Checks the configuration against the machine and sets everything up; no worker is
    /// started yet. The error is a message for the operator.
    pub(crate) fn start(
        config: Config,
        program: WorkerProgram,
        hooks: Hooks,
    ) -> Result<Supervisor, String> {
        let steering = Steering::new(config.balance, config.workers as u32)
            .map_err(|err| format!("--balance {}: {err}", config.balance))?;
        let reservation = crate::listener::bind_reuseport(config.listen, false)
            .map_err(|err| crate::listener::explain_bind_error(config.listen, &err))?;
        let listen = reservation
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| format!("cannot read the bound address of {}", config.listen))?;
        let baseline = Baseline::open(config.balance, listen, &program)
            .map_err(|err| format!("--balance {}: {err}", config.balance))?;
        if steering.policy() == Balance::Kernel && config.tcp_migrate_req {
            match steering::ensure_tcp_migrate_req() {
                MigrateReq::AlreadyOn => {}
                MigrateReq::TurnedOn => tracing::info!(
                    "set net.ipv4.tcp_migrate_req=1 in this network namespace, so connections queued on a closing worker move to another one instead of being reset"
                ),
                MigrateReq::Unavailable(reason) => tracing::warn!(
                    "{reason}: connections queued on a worker that exits will be reset (run as root, or set the sysctl yourself)"
                ),
            }
        }
        let poll = Poll::new().map_err(|e| format!("cannot create the event loop: {e}"))?;
        let signals = signals::open().map_err(|e| format!("cannot open a signalfd: {e}"))?;
        poll.registry()
            .register(
                &mut SourceFd(&signals.as_raw_fd()),
                SIGNAL_TOKEN,
                Interest::READABLE,
            )
            .map_err(|e| format!("cannot watch signals: {e}"))?;
        if let Some(baseline) = &baseline {
            baseline
                .register(poll.registry(), BASELINE_TOKEN)
                .map_err(|e| format!("cannot watch the baseline's listening socket: {e}"))?;
        }
        let status = match config.status {
            Some(addr) => {
                let mut server = StatusServer::bind(addr).map_err(|e| {
                    format!("cannot bind the status listener {addr}: {e} (choose another --status)")
                })?;
                server
                    .register(poll.registry(), STATUS_TOKEN)
                    .map_err(|e| format!("cannot watch the status listener: {e}"))?;
                Some(server)
            }
            None => None,
        };
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this executable to start workers: {e}"))?;
        if let Some(path) = &config.pid_file {
            std::fs::write(path, format!("{}\n", std::process::id()))
                .map_err(|e| format!("cannot write --pid-file {}: {e}", path.display()))?;
        }
        let now = Instant::now();
        let slots = (0..config.workers).map(Slot::new).collect();
        Ok(Supervisor {
            next_ping: now + config.health_interval,
            config,
            program,
            exe,
            args: std::env::args_os().collect(),
            hooks,
            poll,
            signals,
            status,
            steering,
            baseline,
            _reservation: reservation,
            listen,
            slots,
            pid_slot: HashMap::new(),
            next_worker_id: 1,
            started: now,
            phase: ClusterPhase::Running,
            roll: None,
            ping_seq: 0,
            pending_ipc: Vec::new(),
            notifier: crate::systemd::Notifier::from_env(),
        })
    }

    /// Runs the event loop until the cluster has stopped.
    pub(crate) fn run(mut self) -> ExitCode {
        let status_addr = self.status.as_ref().and_then(|s| s.local_addr().ok());
        tracing::info!(
            pid = std::process::id(),
            listen = %self.listen,
            workers = self.slots.len(),
            balance = %self.steering.policy(),
            status = ?status_addr,
            "primary started"
        );
        let now = Instant::now();
        for slot in &mut self.slots {
            slot.next_start = Some(now);
        }
        let mut events = Events::with_capacity(256);
        loop {
            self.tick(Instant::now());
            if self.finished() {
                break;
            }
            let now = Instant::now();
            let timeout = if self.pending_ipc.is_empty() {
                self.next_wakeup(now)
                    .saturating_duration_since(now)
                    .min(MAX_SLEEP)
            } else {
                Duration::ZERO
            };
            if let Err(err) = self.poll.poll(&mut events, Some(timeout))
                && err.kind() != std::io::ErrorKind::Interrupted
            {
                tracing::error!("event loop failed: {err}");
                break;
            }
            for event in &events {
                self.dispatch(event.token());
            }
            for pid in std::mem::take(&mut self.pending_ipc) {
                self.on_ipc(pid);
            }
            // Whatever this turn changed in the live set is published once.
            if let Err(err) = self.steering.flush() {
                tracing::warn!("cannot publish the live set: {err}");
            }
        }
        if let Some(path) = &self.config.pid_file {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("primary stopped");
        ExitCode::SUCCESS
    }

    fn dispatch(&mut self, token: Token) {
        match token {
            SIGNAL_TOKEN => self.read_signals(),
            STATUS_TOKEN => {
                if let Some(status) = self.status.as_mut() {
                    status.accept(self.poll.registry());
                }
            }
            BASELINE_TOKEN => self.hand_off(),
            Token(n) if n >= CLIENT_TOKEN_BASE => {
                if let Some(mut status) = self.status.take() {
                    status.on_client_event(self.poll.registry(), token, |path| self.reply(path));
                    self.status = Some(status);
                }
            }
            _ => match decode_worker_token(token) {
                Some((pid, WorkerFd::Exit)) => self.on_exit(pid),
                Some((pid, WorkerFd::Ipc)) => self.on_ipc(pid),
                None => {}
            },
        }
    }

    fn read_signals(&mut self) {
        loop {
            match self.signals.read_signal() {
                Ok(Some(info)) => match signals::action(info.ssi_signo) {
                    Some(action) => self.on_action(action),
                    None => continue,
                },
                Ok(None) => return,
                Err(err) => {
                    tracing::error!("reading the signalfd failed: {err}");
                    return;
                }
            }
        }
    }

    fn on_action(&mut self, action: Action) {
        match action {
            Action::Stop => match self.phase {
                ClusterPhase::Running => self.begin_stop(),
                ClusterPhase::Stopping { .. } => {
                    tracing::warn!("second stop signal: killing every worker now");
                    self.kill_all();
                }
            },
            Action::RollingRestart => self.begin_roll("SIGUSR2"),
            Action::Reload => self.reload(),
        }
    }

    /// Periodic work: starts, deadlines, heartbeats, rolling-restart progress.
    fn tick(&mut self, now: Instant) {
        if let ClusterPhase::Stopping {
            deadline,
            killed: false,
        } = self.phase
            && now >= deadline
        {
            tracing::warn!(
                "shutdown timeout ({}) reached: killing the workers still draining",
                humantime::format_duration(self.config.shutdown_timeout)
            );
            self.kill_all();
        }
        for index in 0..self.slots.len() {
            self.tick_slot(index, now);
        }
        if now >= self.next_ping {
            self.send_pings(now);
            self.next_ping = now + self.config.health_interval;
        } else {
            self.check_health(now);
        }
        self.advance_roll();
        if self.baseline_wakeup(now).is_some_and(|at| at <= now) {
            self.hand_off();
        }
        if let Some(status) = self.status.as_mut() {
            status.expire(self.poll.registry(), now);
        }
        self.notify_service_manager();
    }

    /// The earliest moment `tick` has something to do.
    fn next_wakeup(&self, now: Instant) -> Instant {
        let mut at = self.next_ping;
        if let Some(t) = self.next_health_deadline() {
            // Just past the deadline: silence must be longer than the timeout.
            at = at.min(t + Duration::from_millis(1));
        }
        if let ClusterPhase::Stopping {
            deadline,
            killed: false,
        } = self.phase
        {
            at = at.min(deadline);
        }
        for slot in &self.slots {
            if let Some(t) = slot.next_start {
                at = at.min(t);
            }
            for process in slot.processes() {
                if let Some(t) = process.deadline
                    && !process.killed
                {
                    at = at.min(t);
                }
            }
        }
        if self.status.as_ref().is_some_and(StatusServer::has_clients) {
            at = at.min(now + MAX_SLEEP);
        }
        if let Some(retry) = self.baseline_wakeup(now) {
            at = at.min(retry);
        }
        at
    }

    fn finished(&self) -> bool {
        matches!(self.phase, ClusterPhase::Stopping { .. })
            && self.slots.iter().all(|s| s.processes().next().is_none())
    }

    /// SIGTERM/SIGINT: drain everything, exit when the last worker is gone.
    fn begin_stop(&mut self) {
        tracing::info!(
            "stopping: draining every worker (SIGKILL after {})",
            humantime::format_duration(self.config.shutdown_timeout)
        );
        let now = Instant::now();
        self.phase = ClusterPhase::Stopping {
            deadline: now + self.config.shutdown_timeout,
            killed: false,
        };
        self.roll = None;
        self.close_baseline();
        for index in 0..self.slots.len() {
            let slot = &mut self.slots[index];
            slot.next_start = None;
            slot.replace_wanted = false;
            self.leave_steering(index);
            let slot = &mut self.slots[index];
            let mut draining: Vec<_> = slot
                .current
                .take()
                .into_iter()
                .chain(slot.incoming.take())
                .collect();
            for process in &mut draining {
                Self::drain(
                    &self.program,
                    index,
                    process,
                    now,
                    self.config.shutdown_timeout,
                );
            }
            self.slots[index].retiring.extend(draining);
        }
    }

    fn kill_all(&mut self) {
        if let ClusterPhase::Stopping { deadline, .. } = self.phase {
            self.phase = ClusterPhase::Stopping {
                deadline,
                killed: true,
            };
        }
        for slot in &mut self.slots {
            for process in slot.processes_mut() {
                Self::kill(process, "shutdown");
            }
        }
    }

    /// SIGUSR2: replace every ready slot, one at a time.
    pub(super) fn begin_roll(&mut self, why: &str) {
        if !matches!(self.phase, ClusterPhase::Running) {
            return;
        }
        if let Some(roll) = self.roll.as_mut() {
            tracing::info!("{why}: a rolling restart is under way; another follows it");
            roll.again = true;
            return;
        }
        tracing::info!("{why}: rolling restart of {} slots", self.slots.len());
        self.roll = Some(Roll {
            queue: (0..self.slots.len()).collect(),
            current: None,
            again: false,
        });
    }

    fn advance_roll(&mut self) {
        let Some(roll) = self.roll.as_mut() else {
            return;
        };
        if let Some(index) = roll.current {
            let slot = &self.slots[index];
            if !slot.failed && (slot.replace_wanted || slot.incoming.is_some()) {
                return;
            }
            roll.current = None;
        }
        while let Some(index) = roll.queue.pop_front() {
            let slot = &mut self.slots[index];
            if slot.failed || slot.current.is_none() {
                // Nothing serves here; a restart or revival will start the new code anyway.
                continue;
            }
            slot.replace_wanted = true;
            roll.current = Some(index);
            return;
        }
        if roll.again {
            roll.again = false;
            roll.queue = (0..self.slots.len()).collect();
        } else {
            tracing::info!("rolling restart complete");
            self.roll = None;
        }
    }

    /// SIGHUP: re-read the config file, apply what can change live, revive failed slots,
    /// then roll so every worker runs with the new settings.
    fn reload(&mut self) {
        if self.phase != ClusterPhase::Running {
            tracing::info!("SIGHUP ignored: the cluster is stopping");
            return;
        }
        if let Some(path) = self.config.config_file.clone() {
            // Flags given at start keep winning over the file, as they did then.
            let overrides = self.config.overrides.clone();
            match Settings::from_file(&path).and_then(|file| overrides.overlay(file).into_config())
            {
                Ok(mut new) => {
                    for (what, changed) in [
                        ("listen", new.listen != self.config.listen),
                        ("workers", new.workers != self.config.workers),
                        ("balance", new.balance != self.config.balance),
                        ("status", new.status != self.config.status),
                    ] {
                        if changed {
                            tracing::warn!(
                                "SIGHUP: `{what}` changed in {}; it takes effect only on a full restart",
                                path.display()
                            );
                        }
                    }
                    new.listen = self.config.listen;
                    new.workers = self.config.workers;
                    new.balance = self.config.balance;
                    // Pinning belongs with the policy (`cpu` implies it): it stays as started.
                    new.cpu_affinity = self.config.cpu_affinity;
                    new.status = self.config.status;
                    new.verbosity = self.config.verbosity;
                    new.config_file = self.config.config_file.clone();
                    new.pid_file = self.config.pid_file.clone();
                    new.overrides = self.config.overrides.clone();
                    if let (WorkerProgram::External(_), Some(command)) =
                        (&self.program, &new.command)
                    {
                        self.program = WorkerProgram::External(command.clone());
                    }
                    self.config = new;
                    tracing::info!("SIGHUP: reloaded {}", path.display());
                }
                Err(err) => {
                    tracing::error!(
                        "SIGHUP: keeping the running configuration: {}",
                        crate::error_chain(&err)
                    );
                    return;
                }
            }
        }
        let now = Instant::now();
        for slot in &mut self.slots {
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
