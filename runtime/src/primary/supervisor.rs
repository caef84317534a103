//! The supervisor: the primary's event loop around the [`Core`].
//!
//! One thread, one `mio` poll: signals (through signal-hook's pipe), worker exits (one
//! pidfd each), worker messages (one IPC socket each) and status requests. Each turn reads
//! the events, hands them to the core, lets the core act through the [`Host`], and sleeps
//! until the next event or the core's next deadline.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use signal_hook_mio::v1_0::Signals;

use super::core::{Core, Phase, Settings, WorkerId};
use super::host::{Host, WorkerFd, decode_worker_token};
use super::pidfile::PidFile;
use super::signals::{self, Action};
use super::{Hooks, WorkerProgram};
use crate::baseline::Baseline;
use crate::config::{Balance, Config, Settings as ConfigSettings};
use crate::status::server::{CLIENT_TOKEN_BASE, StatusServer};
use crate::steering::{self, MigrateReq, Steering};

const SIGNAL_TOKEN: Token = Token(0);
const STATUS_TOKEN: Token = Token(1);
/// The `userspace` baseline's listening socket (below the status clients' tokens, far
/// above any worker's).
pub(super) const BASELINE_TOKEN: Token = Token(CLIENT_TOKEN_BASE - 1);

/// Longest the loop sleeps while status clients are connected, so they are expired.
const STATUS_SLEEP: Duration = Duration::from_secs(1);

/// Why the primary could not start, for the operator.
pub(crate) type StartError = String;

/// The primary.
pub(crate) struct Supervisor {
    pub(super) core: Core,
    pub(super) host: Host,
    pub(super) hooks: Hooks,
    signals: Signals,
    pub(super) status: Option<StatusServer>,
    /// A bound (never listening) `SO_REUSEPORT` socket on the cluster address: it resolves
    /// port 0 and keeps the port Steer's while all workers restart. It receives nothing.
    _reservation: socket2::Socket,
    pub(super) started: Instant,
    /// Workers whose IPC had more queued than one wakeup reads.
    pub(super) pending_ipc: Vec<WorkerId>,
    /// Per slot: when its dropped user messages were last reported, and how many since.
    pub(super) drop_reports: Vec<(Instant, u64)>,
    /// systemd's `NOTIFY_SOCKET`, told about readiness, reloads and stopping.
    pub(super) notifier: crate::systemd::Notifier,
    pid_file: Option<PidFile>,
    /// Children this process had before it became a primary (a library host's own): never
    /// reaped by the primary.
    foreign_children: BTreeSet<i32>,
}

impl Supervisor {
    /// Checks the configuration against the machine and sets everything up; no worker is
    /// started yet.
    pub(crate) fn start(
        config: Config,
        program: WorkerProgram,
        hooks: Hooks,
        pid_file: Option<PidFile>,
        inherited_nofile: Option<(u64, u64)>,
    ) -> Result<Supervisor, StartError> {
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
        let mut signals = signals::open().map_err(|e| format!("cannot catch signals: {e}"))?;
        poll.registry()
            .register(&mut signals, SIGNAL_TOKEN, Interest::READABLE)
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
        let mut pid_file = pid_file;
        if let Some(file) = pid_file.as_mut() {
            file.write_pid()
                .map_err(|e| format!("cannot write --pid-file {}: {e}", file.path().display()))?;
        }
        become_subreaper();
        let now = Instant::now();
        let slots = config.workers;
        Ok(Supervisor {
            core: Core::new(Settings::of(&config), slots, now),
            host: Host {
                config,
                program,
                exe,
                args: std::env::args_os().collect::<Vec<OsString>>(),
                poll,
                steering,
                baseline,
                listen,
                procs: Default::default(),
                leftovers: Vec::new(),
                inherited_nofile,
            },
            hooks,
            signals,
            status,
            _reservation: reservation,
            started: now,
            pending_ipc: Vec::new(),
            drop_reports: vec![(now, 0); slots],
            notifier: crate::systemd::Notifier::from_env(),
            pid_file,
            foreign_children: own_children(),
        })
    }

    /// Runs the event loop until the cluster has stopped. Exit status 0 after a clean stop,
    /// 1 if the loop itself failed (the workers are killed then: nobody would supervise
    /// them).
    pub(crate) fn run(mut self) -> ExitCode {
        let status_addr = self.status.as_ref().and_then(|s| s.local_addr().ok());
        tracing::info!(
            pid = std::process::id(),
            listen = %self.host.listen,
            workers = self.core.slots().len(),
            balance = %self.host.steering.policy(),
            status = ?status_addr,
            "primary started"
        );
        self.core.start(Instant::now());
        let mut events = Events::with_capacity(256);
        let code = loop {
            let now = Instant::now();
            // What suspects have said may clear them: read it before they are judged.
            for id in self.core.suspects(now) {
                self.on_ipc(id);
            }
            self.core.tick(&mut self.host, now);
            self.host.tend_leftovers(now);
            self.after_turn(now);
            if self.finished() {
                break ExitCode::SUCCESS;
            }
            let timeout = if self.pending_ipc.is_empty() {
                self.next_wake(now).saturating_duration_since(now)
            } else {
                Duration::ZERO
            };
            if let Err(err) = self.host.poll.poll(&mut events, Some(timeout))
                && err.kind() != std::io::ErrorKind::Interrupted
            {
                tracing::error!("the event loop failed: {err}; killing every worker");
                self.core.kill_all(&mut self.host);
                break ExitCode::from(crate::cli::EXIT_FAILURE);
            }
            for event in &events {
                self.dispatch(event.token());
            }
            for id in std::mem::take(&mut self.pending_ipc) {
                self.on_ipc(id);
            }
        };
        self.reap_orphans(true);
        if let Some(file) = self.pid_file.take() {
            file.remove();
        }
        tracing::info!("primary stopped");
        code
    }

    /// The earliest moment anything is due: the core's, the host's and the listeners'.
    fn next_wake(&mut self, now: Instant) -> Instant {
        let mut at = self.core.next_wake(now);
        if let Some(t) = self.host.next_wake(now) {
            at = at.min(t);
        }
        if self.status.as_ref().is_some_and(StatusServer::has_clients) {
            at = at.min(now + STATUS_SLEEP);
        }
        if let Some(retry) = self.baseline_wakeup(now) {
            at = at.min(retry);
        }
        at
    }

    /// Housekeeping after the core's turn: status clients, the baseline, systemd.
    fn after_turn(&mut self, now: Instant) {
        if self.baseline_wakeup(now).is_some_and(|at| at <= now) {
            self.hand_off();
        }
        if let Some(status) = self.status.as_mut() {
            status.expire(self.host.poll.registry(), now);
        }
        self.notify_service_manager();
    }

    /// Stopped, and nothing of any worker's group is left.
    fn finished(&self) -> bool {
        self.core.finished() && self.host.leftovers.is_empty()
    }

    fn dispatch(&mut self, token: Token) {
        match token {
            SIGNAL_TOKEN => self.read_signals(),
            STATUS_TOKEN => {
                if let Some(status) = self.status.as_mut() {
                    status.accept(self.host.poll.registry());
                }
            }
            BASELINE_TOKEN => self.hand_off(),
            Token(n) if n >= CLIENT_TOKEN_BASE => {
                if let Some(mut status) = self.status.take() {
                    status
                        .on_client_event(self.host.poll.registry(), token, |path| self.reply(path));
                    self.status = Some(status);
                }
            }
            _ => match decode_worker_token(token) {
                Some((id, WorkerFd::Exit)) => self.on_exit(id),
                Some((id, WorkerFd::Ipc)) => self.on_ipc(id),
                Some((id, WorkerFd::Exec)) => self.on_exec(id),
                None => {}
            },
        }
    }

    fn read_signals(&mut self) {
        let received: Vec<i32> = self.signals.pending().collect();
        for signal in received {
            if let Some(action) = signals::action(signal) {
                self.on_action(action);
            }
        }
    }

    fn on_action(&mut self, action: Action) {
        let now = Instant::now();
        match action {
            Action::Stop => match self.core.phase() {
                Phase::Running => {
                    self.close_baseline();
                    self.core.stop(&mut self.host, now);
                }
                Phase::Stopping { .. } => {
                    tracing::warn!("second stop signal: killing every worker now");
                    self.core.kill_all(&mut self.host);
                }
            },
            Action::RollingRestart => self.core.begin_roll("SIGUSR2"),
            Action::Reload => self.reload(now),
            Action::Child => self.on_child_signal(),
        }
    }

    /// A worker's pidfd is readable: it exited.
    pub(super) fn on_exit(&mut self, id: WorkerId) {
        let Some(index) = self.host.procs.get(&id).map(|p| p.slot) else {
            return;
        };
        // Still a zombie here, so its group's number cannot have been reused.
        let drain_deadline = self.core.worker(index, id).and_then(|w| match w.stage() {
            super::core::Stage::Draining { deadline } => Some(deadline),
            _ => None,
        });
        let now = Instant::now();
        let Some((index, status)) = self.host.bury(id, drain_deadline, now) else {
            return;
        };
        self.pending_ipc.retain(|pending| *pending != id);
        self.core.exited(&mut self.host, index, id, status, now);
    }

    /// A worker's exec-report pipe is readable: its `execve` succeeded or failed.
    fn on_exec(&mut self, id: WorkerId) {
        let Some(index) = self.host.procs.get(&id).map(|p| p.slot) else {
            return;
        };
        if self.host.exec_outcome(id) == Some(true) {
            self.core
                .executed(&mut self.host, index, id, Instant::now());
        }
    }

    /// SIGCHLD: exits of workers are handled as their pidfds report them; what is left are
    /// orphans of workers' trees, inherited because the primary is a subreaper.
    fn on_child_signal(&mut self) {
        let ids: Vec<WorkerId> = self
            .host
            .procs
            .values()
            .filter(|p| p.has_exited())
            .map(|p| p.id)
            .collect();
        for id in ids {
            self.on_exit(id);
        }
        self.reap_orphans(false);
    }

    /// Reaps every exited child that is not a worker (nor the library host's own). At the
    /// end (`last`), kills those still alive first (a process that left its worker's group,
    /// such as a daemon, and was re-parented here) and waits a moment for them.
    fn reap_orphans(&mut self, last: bool) {
        let workers: BTreeSet<i32> = self.host.procs.values().map(|p| p.pid).collect();
        let mut orphans: Vec<i32> = own_children()
            .into_iter()
            .filter(|pid| !workers.contains(pid) && !self.foreign_children.contains(pid))
            .collect();
        if last && !orphans.is_empty() {
            tracing::info!(
                count = orphans.len(),
                "killing processes that left their worker's group"
            );
            for &pid in &orphans {
                // SAFETY: our own unreaped child; its pid cannot have been reused.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + super::process::LEFTOVER_GRACE;
        loop {
            orphans.retain(|&pid| {
                let mut status = 0;
                // SAFETY: waitpid on our own child.
                unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) == 0 }
            });
            if !last || orphans.is_empty() || Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGHUP: re-read the config file, apply what can change live, warn by name about
    /// every key that cannot, revive failed slots, then roll.
    fn reload(&mut self, now: Instant) {
        if self.core.phase() != Phase::Running {
            tracing::info!("SIGHUP ignored: the cluster is stopping");
            return;
        }
        let config = &self.host.config;
        if let Some(path) = config.config_file.clone() {
            // Flags given at start keep winning over the file, as they did then.
            let overrides = config.overrides.clone();
            let loaded = ConfigSettings::from_file(&path)
                .and_then(|file| overrides.overlay(file).into_config());
            match loaded {
                Ok(mut new) => {
                    for key in crate::config::keys_needing_restart(config, &new) {
                        tracing::warn!(
                            "SIGHUP: `{key}` changed in {}; it takes effect only on a full restart, and keeps its running value",
                            path.display()
                        );
                    }
                    new.keep_unreloadable(config);
                    if let (WorkerProgram::External(_), Some(command)) =
                        (&self.host.program, &new.command)
                    {
                        self.host.program = WorkerProgram::External(command.clone());
                    }
                    self.host.config = new;
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
        self.core.reload(Settings::of(&self.host.config), now);
    }
}

/// Orphans of workers' trees (a worker that forked and exited, a daemonizing app) are
/// re-parented to the primary instead of init, so they are known, killed with the
/// cluster and reaped (`PR_SET_CHILD_SUBREAPER`).
fn become_subreaper() {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        tracing::warn!(
            "cannot become a subreaper ({}): processes a worker leaves behind go to init",
            std::io::Error::last_os_error()
        );
    }
}

/// This process's children, from `/proc/self/task/*/children`.
fn own_children() -> BTreeSet<i32> {
    let mut children = BTreeSet::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return children;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            children.extend(
                text.split_whitespace()
                    .filter_map(|pid| pid.parse::<i32>().ok()),
            );
        }
    }
    children
}
