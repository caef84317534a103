//! The supervisor: the primary's event loop around the [`Core`].
//!
//! One thread, one `mio` poll: signals (counted by handlers that wake it through a
//! pipe), worker exits (one pidfd each), worker messages (one IPC socket each) and the
//! status thread's wakeups (it serves its clients itself; this loop stores its readiness
//! and builds a document when it asks). Each turn reads
//! the events, hands them to the core, lets the core act through the [`Host`], and sleeps
//! until the next event or the core's next deadline.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use std::os::fd::{AsFd, AsRawFd};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::core::{Core, Phase, SETTLE, START_ATTEMPTS, Settings, WorkerId};
use super::group::Group;
use super::host::{Host, WorkerFd, decode_worker_token};
use super::pidfile::PidFile;
use super::signals::{self, Action, Signals};
use super::upgrade::{Inheritance, Progress, Successor};
use super::{Hooks, WorkerProgram};
use crate::baseline::Baseline;
use crate::config::{Balance, Config, Settings as ConfigSettings};
use crate::status::StatusService;
use crate::steering::{self, MigrateReq, Steering};

const SIGNAL_TOKEN: Token = Token(0);
/// The status listener thread wants a fresh status document.
const STATUS_TOKEN: Token = Token(1);
/// A successor primary's pidfd (it exited).
const SUCCESSOR_EXIT_TOKEN: Token = Token(2);
/// A successor primary's `ready` pipe.
const SUCCESSOR_READY_TOKEN: Token = Token(3);
/// The predecessor's pidfd, in a successor (it has gone).
const PREDECESSOR_TOKEN: Token = Token(4);

/// How much longer than one worker's start timeout a successor primary may take to have
/// every slot ready.
const SUCCESSOR_GRACE: Duration = Duration::from_secs(5);
/// The `userspace` baseline's listening socket (far above any worker's).
pub(super) const BASELINE_TOKEN: Token = Token((1 << 40) - 1);

/// Why the primary could not start, for the operator.
pub(crate) type StartError = String;

/// The primary.
pub(crate) struct Supervisor {
    pub(super) core: Core,
    pub(super) host: Host,
    pub(super) hooks: Hooks,
    signals: Signals,
    pub(super) status: Option<StatusService>,
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
    /// A successor primary being started (SIGUSR1), or the one this primary handed over to.
    successor: Option<Successor>,
    /// This primary handed over to its successor and is draining its own workers.
    handed_over: bool,
    /// This primary is a successor: what its predecessor handed down.
    inheritance: Option<Inheritance>,
    /// As a successor, it has taken over (or its predecessor is gone).
    taken_over: bool,
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
        mut inheritance: Option<Inheritance>,
        mut signals: Signals,
    ) -> Result<Supervisor, StartError> {
        let mut groups = Vec::with_capacity(config.listeners.len());
        for listener in &config.listeners {
            let mut group = Group::open(
                listener.clone(),
                config.balance,
                config.workers as u32,
                &config.client_limits,
                config.udp_flows,
                inheritance.is_some(),
            )?;
            group
                .steering
                .set_avoid_stalls(config.avoid_stalls)
                .map_err(|err| {
                    format!(
                        "cannot write the program's configuration: {}",
                        crate::errors::error_chain(&err)
                    )
                })?;
            if inheritance.is_some() {
                // Each group switches from the old program to this one in one step, once
                // every slot of this primary is ready.
                group.steering.hold();
            }
            groups.push(group);
        }
        if config.listeners.iter().any(|l| l.protocol.is_datagram()) {
            crate::listener::warn_if_receive_buffer_capped(config.udp_receive_buffer);
        }
        let kernel = groups
            .first()
            .is_some_and(|g| g.steering.policy() == Balance::Kernel);
        let baseline = match groups.first() {
            Some(first) => Baseline::open(config.balance, first.listener.addr, &program)
                .map_err(|err| format!("--balance {}: {err}", config.balance))?,
            None => None,
        };
        if kernel && config.tcp_migrate_req {
            match steering::ensure_tcp_migrate_req() {
                MigrateReq::AlreadyOn => {}
                MigrateReq::TurnedOn => tracing::info!(
                    "set net.ipv4.tcp_migrate_req=1 in this network namespace, so connections queued on a closing worker move to another one instead of being reset"
                ),
                MigrateReq::Unavailable(err) => tracing::warn!(
                    "{}: connections queued on a worker that exits will be reset (run as root, or set the sysctl yourself)",
                    crate::errors::error_chain(&err)
                ),
            }
        }
        let poll = Poll::new().map_err(|e| format!("cannot create the event loop: {e}"))?;
        poll.registry()
            .register(&mut signals, SIGNAL_TOKEN, Interest::READABLE)
            .map_err(|e| format!("cannot watch signals: {e}"))?;
        if let Some(baseline) = &baseline {
            baseline
                .register(poll.registry(), BASELINE_TOKEN)
                .map_err(|e| format!("cannot watch the baseline's listening socket: {e}"))?;
        }
        let inherited_status = inheritance.as_mut().and_then(|i| i.status.take());
        let status = match config.status {
            Some(addr) => {
                let listener = match inherited_status {
                    Some(listener) if listener.local_addr().is_ok_and(|a| a == addr) => {
                        Ok(listener)
                    }
                    _ => StatusService::bind(addr),
                };
                // A successor answers only once it has taken over: until then the
                // predecessor, serving the same socket, speaks for the cluster (its
                // `/ready` is true; this one's would not be yet).
                let accepting = inheritance.is_none();
                let public = config.status_public;
                let server = listener
                    .and_then(|l| {
                        StatusService::start(l, poll.registry(), STATUS_TOKEN, accepting, public)
                    })
                    .map_err(|e| {
                        format!(
                            "cannot bind the status listener {addr}: {e} (choose another --status)"
                        )
                    })?;
                Some(server)
            }
            None => None,
        };
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this executable to start workers: {e}"))?;
        let mut pid_file = pid_file;
        // A successor writes its pid once it has taken over; until then the file names
        // the primary that serves.
        if let Some(file) = pid_file.as_mut().filter(|_| inheritance.is_none()) {
            file.write_pid()
                .map_err(|e| format!("cannot write --pid-file {}: {e}", file.path().display()))?;
        }
        let mut notifier = crate::systemd::Notifier::from_env();
        if let Some(inherited) = &inheritance {
            // The predecessor is the service's main process until it hands over.
            notifier.set_quiet(true);
            if let Some(pidfd) = &inherited.predecessor {
                poll.registry()
                    .register(
                        &mut SourceFd(&pidfd.as_raw_fd()),
                        PREDECESSOR_TOKEN,
                        Interest::READABLE,
                    )
                    .map_err(|e| format!("cannot watch the previous primary: {e}"))?;
            }
        }
        become_subreaper();
        let identifier = match &program {
            WorkerProgram::External(command) => command
                .first()
                .and_then(|c| std::path::Path::new(c).file_name())
                .map_or_else(|| "steer".to_owned(), |n| n.to_string_lossy().into_owned()),
            _ => "steer".to_owned(),
        };
        let output = super::output::OutputReader::start(
            config.worker_output,
            config.log_format,
            identifier,
            config.health_interval,
        )
        .map_err(|e| format!("cannot start the worker output reader: {e}"))?;
        let now = Instant::now();
        let slots = config.workers;
        let mut core = Core::new(Settings::of(&config), slots, now);
        for &index in inheritance.iter().flat_map(|i| &i.says_ready) {
            core.expect_ready_word(index);
        }
        for &(index, generation) in inheritance.iter().flat_map(|i| &i.generations) {
            core.continue_from(index, generation);
        }
        Ok(Supervisor {
            core,
            host: Host {
                config,
                program,
                exe,
                args: std::env::args_os().collect::<Vec<OsString>>(),
                poll,
                groups,
                baseline,
                procs: Default::default(),
                leftovers: Vec::new(),
                holds: std::collections::BTreeMap::new(),
                handed_over: false,
                inherited_nofile,
                next_steering_check: Instant::now(),
                next_steering_round: Instant::now(),
                output,
            },
            hooks,
            signals,
            status,
            started: now,
            pending_ipc: Vec::new(),
            drop_reports: vec![(now, 0); slots],
            notifier,
            pid_file,
            foreign_children: own_children(),
            successor: None,
            handed_over: false,
            taken_over: inheritance.is_none(),
            inheritance,
        })
    }

    /// Runs the event loop until the cluster has stopped. Exit status 0 after a clean stop,
    /// 1 if the loop itself failed (the workers are killed then: nobody would supervise
    /// them).
    pub(crate) fn run(mut self) -> ExitCode {
        let status_addr = self.status.as_ref().map(StatusService::local_addr);
        tracing::info!(
            pid = std::process::id(),
            listen = %self
                .host
                .groups
                .iter()
                .map(|g| g.listener.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            workers = self.core.slots().len(),
            balance = %self.host.policy(),
            status = %status_addr.map_or_else(|| "off".to_owned(), |addr| addr.to_string()),
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
            // Whatever the last events and this tick changed in the live set is published
            // once, before the loop sleeps. While a successor starts, its program is to
            // take the group over: this primary's must not take it back.
            let alone = self.successor.is_none() && self.inheritance.is_none();
            self.host
                .tend_steering(now, self.successor.is_none(), alone);
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
                break ExitCode::from(crate::exit::EXIT_FAILURE);
            }
            for event in &events {
                self.dispatch(event.token());
            }
            for id in std::mem::take(&mut self.pending_ipc) {
                self.on_ipc(id);
            }
        };
        self.reap_orphans(true);
        if let Some(file) = self.pid_file.take()
            && !self.handed_over
        {
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
        if let Some(retry) = self.baseline_wakeup(now) {
            at = at.min(retry);
        }
        if !self.taken_over
            && let Some(settled) = self.settled_at(now)
        {
            at = at.min(settled);
        }
        at
    }

    /// Housekeeping after the core's turn: an upgrade's progress, the status thread, the
    /// baseline, systemd.
    fn after_turn(&mut self, now: Instant) {
        self.take_over_if_ready(now);
        if let Some(successor) = &self.successor
            && !self.handed_over
            && now >= successor.deadline
        {
            let status = successor.abandon();
            self.upgrade_failed(&format!(
                "it did not have every worker ready within {} (killed{})",
                humantime::format_duration(self.host.config.start_timeout + SUCCESSOR_GRACE),
                status.map(|s| format!(": {s}")).unwrap_or_default()
            ));
        }
        if self.baseline_wakeup(now).is_some_and(|at| at <= now) {
            self.hand_off();
        }
        self.publish_status();
        self.notify_service_manager();
    }

    /// Stopped, nothing of any worker's group is left, and systemd knows who the main
    /// process is.
    fn finished(&self) -> bool {
        self.core.finished() && self.host.leftovers.is_empty() && !self.notifier.handing_over()
    }

    fn dispatch(&mut self, token: Token) {
        match token {
            SIGNAL_TOKEN => self.read_signals(),
            // `after_turn` publishes what the status thread asked for.
            STATUS_TOKEN => {}
            BASELINE_TOKEN => self.hand_off(),
            SUCCESSOR_READY_TOKEN => self.on_successor_word(),
            SUCCESSOR_EXIT_TOKEN => self.on_successor_exit(),
            PREDECESSOR_TOKEN => self.on_predecessor_gone(),
            Token(n) if (super::host::STALL_TOKEN_BASE..BASELINE_TOKEN.0).contains(&n) => self
                .host
                .on_stall_events(n - super::host::STALL_TOKEN_BASE, Instant::now()),
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
            Action::Upgrade => self.begin_upgrade(now),
            Action::AddWorker => {
                let slots = self.core.configured() + 1;
                self.core.resize(&mut self.host, slots, now, "SIGTTIN");
            }
            Action::RemoveWorker => {
                let slots = self.core.configured().saturating_sub(1);
                if slots == 0 {
                    tracing::warn!("SIGTTOU ignored: the last worker stays");
                } else {
                    self.core.resize(&mut self.host, slots, now, "SIGTTOU");
                }
            }
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

    /// This primary has handed over to its successor and is only draining.
    pub(super) fn handed_over(&self) -> bool {
        self.handed_over
    }

    /// A successor is starting (this primary has not handed over yet).
    pub(super) fn upgrading(&self) -> bool {
        self.successor.is_some() && !self.handed_over
    }

    /// SIGUSR1: start a successor from the executable now on disk, with the same command
    /// line; this primary keeps serving until it has taken over (see [`super::upgrade`]).
    fn begin_upgrade(&mut self, now: Instant) {
        if self.core.phase() != Phase::Running {
            tracing::warn!("SIGUSR1 ignored: the cluster is stopping");
            return;
        }
        if self.successor.is_some() {
            tracing::warn!("SIGUSR1 ignored: an upgrade is under way");
            return;
        }
        if !self.taken_over {
            // Its predecessor still serves: a second successor now would race this one
            // for the group. Once this primary has taken over, SIGUSR1 upgrades it.
            tracing::warn!(
                "SIGUSR1 ignored: this primary is still taking over from the previous one; \
                 send it again once it serves"
            );
            return;
        }
        if std::process::id() == 1 {
            // The old primary exits at the end of an upgrade, and a PID namespace ends
            // with its PID 1: the successor and every worker would die with it.
            tracing::warn!(
                "SIGUSR1 ignored: this primary is PID 1 (a container), whose exit would end \
                 the container; roll out a new image instead"
            );
            return;
        }
        let deadline = now + self.host.config.start_timeout + SUCCESSOR_GRACE;
        let slots: Vec<(usize, u64, bool)> = self
            .core
            .slots()
            .iter()
            .map(|s| (s.index, s.generation, s.says_ready))
            .collect();
        let started = Successor::start(
            self.host.exe.clone(),
            self.host.args.clone(),
            self.status.as_ref().map(StatusService::listener_fd),
            self.pid_file.as_ref().map(|f| f.file().as_fd()),
            &slots,
            self.host.inherited_nofile,
            deadline,
        );
        let successor = match started {
            Ok(successor) => successor,
            Err(err) => {
                tracing::error!(
                    "upgrade failed: cannot start {}: {err}; this primary keeps serving",
                    self.host.exe.display()
                );
                return;
            }
        };
        let registry = self.host.poll.registry();
        let watched = registry
            .register(
                &mut SourceFd(&successor.pidfd.as_raw_fd()),
                SUCCESSOR_EXIT_TOKEN,
                Interest::READABLE,
            )
            .and_then(|()| {
                registry.register(
                    &mut SourceFd(&successor.ready_fd()),
                    SUCCESSOR_READY_TOKEN,
                    Interest::READABLE,
                )
            });
        if let Err(err) = watched {
            successor.abandon();
            tracing::error!("upgrade failed: cannot watch the new primary: {err}");
            return;
        }
        tracing::info!(
            pid = successor.pid,
            exe = %self.host.exe.display(),
            "upgrade: a new primary is starting; this one serves until it has taken over"
        );
        self.successor = Some(successor);
    }

    /// The successor's `ready` pipe is readable.
    fn on_successor_word(&mut self) {
        let Some(successor) = self.successor.as_mut().filter(|_| !self.handed_over) else {
            return;
        };
        match successor.progress() {
            Progress::Starting => {}
            // It said `ready` and died before this primary heard it (stopped, or the host
            // busy): its exit and its word arrive together, and handing over to it would
            // drain every worker for nobody. Its program comes off the group.
            Progress::Ready if successor.has_exited() => self.on_successor_exit(),
            Progress::Ready => self.hand_over(),
            Progress::Failed(why) => {
                self.upgrade_failed(&format!("the new primary cannot start its workers: {why}"))
            }
            // It closed the pipe unsaid. Its exit, on the pidfd, says how it ended; one
            // that lives on without a word meets its deadline.
            Progress::Gone => {
                let _ = self
                    .host
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&successor.ready_fd()));
                if successor.has_exited() {
                    self.on_successor_exit();
                }
            }
        }
    }

    /// The successor exited. Before it took over, that is a failed upgrade.
    fn on_successor_exit(&mut self) {
        let Some(successor) = &self.successor else {
            return;
        };
        if self.handed_over {
            // It is the cluster now; this primary only reaps it if it is still its parent.
            let _ = successor.exited();
            return;
        }
        let Some(status) = successor.exited() else {
            return;
        };
        self.upgrade_failed(&format!(
            "the new primary ended ({status}) before it took over"
        ));
    }

    /// The upgrade did not happen: this primary keeps serving, with its own program back
    /// on the group if the successor had attached its own.
    fn upgrade_failed(&mut self, why: &str) {
        if let Some(successor) = self.successor.take() {
            let registry = self.host.poll.registry();
            let _ = registry.deregister(&mut SourceFd(&successor.pidfd.as_raw_fd()));
            let _ = registry.deregister(&mut SourceFd(&successor.ready_fd()));
            if successor.exited().is_none() {
                successor.abandon();
            }
        }
        tracing::error!("upgrade failed: {why}; this primary keeps serving");
        let serving: Vec<WorkerId> = self
            .core
            .slots()
            .iter()
            .filter_map(|s| s.current.as_ref().filter(|w| w.serving()).map(|w| w.id))
            .collect();
        if let Err(err) = self.host.reassert_steering(&serving) {
            tracing::warn!(
                "cannot put this primary's program back on the group: {}",
                crate::errors::error_chain(&err)
            );
        }
        // The successor may have named itself there just before it died.
        if let Some(file) = self.pid_file.as_mut().filter(|f| !f.names_this_process())
            && let Err(err) = file.write_pid()
        {
            tracing::warn!("cannot write --pid-file {}: {err}", file.path().display());
        }
    }

    /// The successor has taken over: tell systemd, stop answering status requests, and
    /// drain. The successor's program is already the group's, so what is queued on this
    /// primary's workers migrates to the new ones as their listeners close.
    fn hand_over(&mut self) {
        let Some(pid) = self.successor.as_ref().map(|s| s.pid) else {
            return;
        };
        if self.successor.as_ref().is_some_and(Successor::has_exited) {
            // It said `ready` and died before this primary heard it: nobody would serve.
            self.upgrade_failed("the new primary said it was ready, then exited");
            return;
        }
        self.handed_over = true;
        // The successor shares the UDP groups' pinned maps (flows, sockets): they outlive
        // this primary, and its draining workers keep their flows until they are idle, as
        // in a rolling restart.
        self.host.handed_over = true;
        for group in &mut self.host.groups {
            group.steering.set_unpin(false);
        }
        tracing::info!(
            successor = pid,
            "upgrade: the new primary has taken over; draining this primary's workers"
        );
        self.notifier.hand_over(pid as u32);
        if let Some(status) = &self.status {
            status.stop_accepting();
        }
        // The successor holds the pid file now (the lock is on the open file, which it
        // shares): this primary lets go of it without removing it.
        self.pid_file = None;
        self.close_baseline();
        self.core.stop(&mut self.host, Instant::now());
    }

    /// In a successor, once every slot is ready and settled: attach the program, write
    /// the pid file, and tell the predecessor. A slot that cannot start is told instead.
    fn take_over_if_ready(&mut self, now: Instant) {
        if self.taken_over || self.core.phase() != Phase::Running {
            return;
        }
        if let Some(why) = self.cannot_start() {
            if let Some(inherited) = self.inheritance.as_mut()
                && inherited.announce_failure(&why)
            {
                tracing::error!(
                    predecessor = inherited.from,
                    "{why}: told the previous primary, which keeps serving"
                );
            }
            return;
        }
        if self.settled_at(now).is_none_or(|at| at > now) {
            return;
        }
        self.taken_over = true;
        // The UDP groups' pinned maps are this primary's now: removed when it ends for good.
        for group in &mut self.host.groups {
            group.steering.set_unpin(true);
        }
        if let Err(err) = super::group::each(&mut self.host.groups, Steering::release) {
            tracing::error!(
                "cannot attach the steering program: {}",
                crate::errors::error_chain(&err)
            );
        }
        self.start_answering_status();
        if let Some(file) = self.pid_file.as_mut()
            && let Err(err) = file.write_pid()
        {
            tracing::warn!("cannot write --pid-file {}: {err}", file.path().display());
        }
        let Some(inherited) = self.inheritance.as_mut() else {
            return;
        };
        match inherited.announce_ready() {
            Ok(()) => tracing::info!(
                predecessor = inherited.from,
                "every worker is ready: took over from the previous primary"
            ),
            // It is gone already: this primary is on its own, which is what it is now.
            Err(err) => tracing::warn!(
                predecessor = inherited.from,
                "every worker is ready, but the previous primary did not hear it: {err}"
            ),
        }
    }

    /// In a successor: when every configured slot is ready and has settled, if they all
    /// are ready. A worker counted ready when it ran (an external program that has not
    /// said `ready`, on a slot whose workers never did) settles once it has stayed up for
    /// [`SETTLE`]: one that exits at start is not taken for a working release.
    fn settled_at(&self, now: Instant) -> Option<Instant> {
        let configured = self.core.configured();
        let mut at = now;
        for slot in &self.core.slots()[..configured] {
            if self.state_of(slot) != super::core::SlotState::Ready {
                return None;
            }
            let worker = slot.current.as_ref()?;
            if worker.ready_at_exec() && !slot.says_ready {
                let since = worker.ready_since.unwrap_or(now);
                at = at.max(since + SETTLE);
            }
        }
        Some(at)
    }

    /// In a successor: why a slot cannot start, once one has failed
    /// [`START_ATTEMPTS`] times in a row.
    fn cannot_start(&self) -> Option<String> {
        let configured = self.core.configured();
        self.core.slots()[..configured]
            .iter()
            .find(|s| s.failed || s.failed_starts >= START_ATTEMPTS)
            .map(|s| {
                format!(
                    "slot {}'s worker failed to start {} times in a row (last: {})",
                    s.index,
                    s.failed_starts,
                    s.last_start_failure.as_deref().unwrap_or("unknown")
                )
            })
    }

    /// In a successor: the predecessor has exited, and this primary speaks for the
    /// service. Gone before this one took over, it left its program on the group with
    /// no socket of its own to pick: this primary's program goes on at once.
    fn on_predecessor_gone(&mut self) {
        let Some(inherited) = self.inheritance.take() else {
            return;
        };
        if let Some(pidfd) = &inherited.predecessor {
            let _ = self
                .host
                .poll
                .registry()
                .deregister(&mut SourceFd(&pidfd.as_raw_fd()));
        }
        if !self.taken_over {
            tracing::warn!(
                predecessor = inherited.from,
                "the previous primary is gone before this one took over; taking over now"
            );
            if let Err(err) = super::group::each(&mut self.host.groups, Steering::release) {
                tracing::error!(
                    "cannot attach the steering program: {}",
                    crate::errors::error_chain(&err)
                );
            }
            self.start_answering_status();
        }
        self.notifier.set_quiet(false);
    }

    /// A successor takes over the status listener it inherited. The status thread gets
    /// this turn's state first: the one it holds is from before the last slot became
    /// ready, and a client waiting on the socket would be told `503`.
    fn start_answering_status(&mut self) {
        self.publish_status();
        if let Some(status) = &self.status {
            status.start_accepting();
        }
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
        let mut spared: BTreeSet<i32> = self.host.procs.values().map(|p| p.pid).collect();
        // The successor outlives this primary: it is the cluster now.
        spared.extend(self.successor.as_ref().map(|s| s.pid));
        let mut orphans: Vec<i32> = own_children()
            .into_iter()
            .filter(|pid| !spared.contains(pid) && !self.foreign_children.contains(pid))
            .collect();
        if last {
            // A successor of a successor (a chain of upgrades) is re-parented here when
            // its own parent, the primary between us, exits first: it is the cluster now,
            // not a leftover of a worker's tree.
            orphans.retain(|&pid| {
                let successor = super::upgrade::is_successor_primary(pid);
                if successor {
                    tracing::info!(
                        pid,
                        "a newer primary (a later upgrade) was re-parented here; it keeps running"
                    );
                }
                !successor
            });
        }
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
                        let what = if key == "listen" {
                            format!(
                                "`listen` changed in {}: {}",
                                path.display(),
                                crate::config::listener_changes(&config.listeners, &new.listeners)
                                    .join(", ")
                            )
                        } else {
                            format!("`{key}` changed in {}", path.display())
                        };
                        tracing::warn!(
                            "SIGHUP: {what}; it keeps its running value: a new primary applies it (SIGUSR1, an upgrade)"
                        );
                    }
                    let (workers, balance) = (new.workers, new.balance);
                    new.keep_unreloadable(config);
                    if let (WorkerProgram::External(_), Some(command)) =
                        (&self.host.program, &new.command)
                    {
                        self.host.program = WorkerProgram::External(command.clone());
                    }
                    let limits_changed = self.host.config.client_limits != new.client_limits;
                    let avoid_stalls_changed = self.host.config.avoid_stalls != new.avoid_stalls;
                    let flow_timeout = (self.host.config.udp_flows.timeout
                        != new.udp_flows.timeout)
                        .then_some(new.udp_flows.timeout);
                    self.host.config = new;
                    tracing::info!("SIGHUP: reloaded {}", path.display());
                    if limits_changed {
                        self.apply_client_limits();
                    }
                    if let Some(timeout) = flow_timeout {
                        self.apply_udp_flow_timeout(timeout);
                    }
                    if avoid_stalls_changed {
                        let on = self.host.config.avoid_stalls;
                        match super::group::each(&mut self.host.groups, |s| s.set_avoid_stalls(on))
                        {
                            Ok(()) => tracing::info!("SIGHUP: avoid-stalls now {on}"),
                            Err(err) => tracing::error!(
                                "SIGHUP: cannot apply avoid-stalls: {}",
                                crate::errors::error_chain(&err)
                            ),
                        }
                    }
                    self.switch_policy(balance);
                    self.core.resize(&mut self.host, workers, now, "SIGHUP");
                }
                Err(err) => {
                    tracing::error!(
                        "SIGHUP: keeping the running configuration: {}",
                        crate::errors::error_chain(&err)
                    );
                    return;
                }
            }
        }
        self.core.reload(Settings::of(&self.host.config), now);
    }
}

impl Supervisor {
    /// SIGHUP with another per-client limit: one write of the program's maps; the state of
    /// every client stays.
    fn apply_client_limits(&mut self) {
        let limits = &self.host.config.client_limits;
        match super::group::each(&mut self.host.groups, |s| s.set_client_limits(limits)) {
            Ok(()) => tracing::info!(
                "SIGHUP: per-client limit now {}",
                match limits.rate {
                    Some(rate) => format!("{rate}, burst {}", limits.burst),
                    None => "off".into(),
                }
            ),
            Err(err) => tracing::error!(
                "SIGHUP: cannot apply the per-client limit: {}",
                crate::errors::error_chain(&err)
            ),
        }
    }

    /// SIGHUP with another `udp-flow-timeout`: one write of each UDP group's `CONFIG`.
    fn apply_udp_flow_timeout(&mut self, timeout: Duration) {
        match super::group::each(&mut self.host.groups, |s| s.set_udp_flow_timeout(timeout)) {
            Ok(()) => tracing::info!(
                "SIGHUP: udp-flow-timeout now {}",
                humantime::format_duration(timeout)
            ),
            Err(err) => tracing::error!(
                "SIGHUP: cannot apply udp-flow-timeout: {}",
                crate::errors::error_chain(&err)
            ),
        }
    }

    /// SIGHUP with another `balance`: switches the policy without restarting anyone
    /// where the program allows it; otherwise warns, naming the key, and keeps it.
    fn switch_policy(&mut self, wanted: Balance) {
        let running = self.host.policy();
        let wanted = match wanted {
            Balance::Auto if self.host.is_ebpf() => Balance::RoundRobin,
            Balance::Auto => Balance::Kernel,
            other => other,
        };
        if wanted == running {
            return;
        }
        match self.host.switch_policy(wanted) {
            Ok(()) => {
                tracing::info!(
                    "SIGHUP: balance {running} -> {wanted}, without restarting a worker"
                );
                self.host.config.balance = wanted;
            }
            Err(why) => tracing::warn!(
                "SIGHUP: `balance` changed from {running} to {wanted}, which cannot apply live ({}); it keeps its running value: a new primary applies it (SIGUSR1, an upgrade)",
                crate::errors::error_chain(&why)
            ),
        }
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
