//! Worker lifecycle inside the supervisor: start, ready, drain, exit, restart.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::Interest;
use mio::unix::SourceFd;

use super::WorkerProgram;
use super::restart::Verdict;
use super::slot::{Phase, Process, Role};
use super::spawn::{self, LISTEN_FD, SpawnSpec};
use super::supervisor::{ClusterPhase, Supervisor, WorkerFd, worker_token};
use crate::ipc::{Channel, Message};
use crate::logging::{ENV_LOG_FORMAT, ENV_LOG_LEVEL};
use crate::worker::env;

/// fd number of the IPC socket in re-executed workers.
const IPC_FD_BUILTIN: i32 = 3;
/// fd number of the IPC socket in external workers (fd 3 is their listener).
const IPC_FD_EXTERNAL: i32 = 4;
/// An external worker's load record (`least-loaded`), `STEER_LOAD_FD`.
const LOAD_FD_EXTERNAL: i32 = 5;

impl Supervisor {
    /// Starts, replaces or gives up on one slot's processes as its timers say.
    pub(super) fn tick_slot(&mut self, index: usize, now: Instant) {
        let running = self.phase == ClusterPhase::Running;
        let slot = &mut self.slots[index];
        if running && !slot.failed {
            let due = slot.next_start.is_none_or(|t| t <= now);
            if slot.current.is_none() && slot.incoming.is_none() && slot.next_start.is_some() && due
            {
                slot.next_start = None;
                slot.replace_wanted = false;
                self.start_process(index, Role::Current, now);
            } else if slot.replace_wanted
                && slot.incoming.is_none()
                && due
                && slot
                    .current
                    .as_ref()
                    .is_some_and(|p| p.phase == Phase::Ready)
            {
                slot.next_start = None;
                self.start_process(index, Role::Incoming, now);
            }
        }
        let start_timeout = self.config.start_timeout;
        for process in self.slots[index].processes_mut() {
            let Some(deadline) = process.deadline.filter(|&t| t <= now && !process.killed) else {
                continue;
            };
            match process.phase {
                Phase::Starting => {
                    tracing::warn!(
                        slot = index,
                        pid = process.pid,
                        "worker did not register within {}; killing it",
                        humantime::format_duration(start_timeout)
                    );
                }
                Phase::Draining => {
                    tracing::warn!(
                        slot = index,
                        pid = process.pid,
                        "worker still draining after {}; killing it",
                        humantime::format_duration(
                            now.saturating_duration_since(deadline) + self.config.shutdown_timeout
                        )
                    );
                }
                Phase::Ready => continue,
            }
            Self::kill(process, "deadline");
        }
    }

    /// Spawns a new generation for `index`, as the slot's process or as its replacement.
    pub(super) fn start_process(&mut self, index: usize, role: Role, now: Instant) {
        let generation = self.slots[index].generation + 1;
        self.slots[index].generation = generation;
        let id = self.next_worker_id;
        self.next_worker_id += 1;
        match self.spawn_worker(index, generation, id) {
            Ok((spawned, channel, own_socket)) => {
                let pid = spawned.pid;
                let registry = self.poll.registry();
                let watch = registry
                    .register(
                        &mut SourceFd(&spawned.pidfd.as_raw_fd()),
                        worker_token(pid, WorkerFd::Exit),
                        Interest::READABLE,
                    )
                    .and_then(|()| {
                        registry.register(
                            &mut SourceFd(&channel.as_raw_fd()),
                            worker_token(pid, WorkerFd::Ipc),
                            Interest::READABLE,
                        )
                    });
                if let Err(err) = watch {
                    // Without its pidfd in the loop its exit would never be seen: kill and
                    // reap it here, and count a failed start.
                    tracing::error!(
                        slot = index,
                        pid,
                        "cannot watch the new worker: {err}; killing it"
                    );
                    spawn::kill_and_reap(pid);
                    self.after_crash(index, role, None, now);
                    return;
                }
                let mut process = Process::new(pid, spawned.pidfd, channel, generation, now);
                process.deadline = Some(now + self.config.start_timeout);
                self.pid_slot.insert(pid, index);
                tracing::info!(
                    slot = index,
                    generation,
                    pid,
                    replacing = (role == Role::Incoming),
                    "worker spawned"
                );
                let slot = &mut self.slots[index];
                match role {
                    Role::Incoming => slot.incoming = Some(process),
                    _ => slot.current = Some(process),
                }
                // An external worker's socket is made here and listening already: it is
                // ready as soon as it runs (the kernel queues connections until it accepts).
                if let Some(socket) = own_socket {
                    if let Some((_, process)) = self.slots[index].find_mut(pid) {
                        process.registered_fd = Some(socket);
                    }
                    self.become_ready(index, pid, now);
                }
            }
            Err(err) => {
                tracing::error!(slot = index, generation, "cannot start worker: {err}");
                self.slots[index].last_exit = None;
                self.after_crash(index, role, None, now);
            }
        }
    }

    /// Builds the spawn for this slot's program and starts it. Returns the child, the
    /// primary's end of its IPC socket, and (external workers) the primary's copy of the
    /// listening socket it made for the child.
    fn spawn_worker(
        &mut self,
        index: usize,
        generation: u64,
        id: u64,
    ) -> std::io::Result<(spawn::Spawned, Channel, Option<OwnedFd>)> {
        let (primary_end, worker_end) = Channel::pair()?;
        primary_end.set_nonblocking(true)?;
        let mut vars: Vec<(OsString, OsString)> = vec![
            (env::SLOT.into(), index.to_string().into()),
            (env::GENERATION.into(), generation.to_string().into()),
            (env::ID.into(), id.to_string().into()),
            (
                ENV_LOG_FORMAT.into(),
                log_format_name(self.config.log_format).into(),
            ),
            (
                ENV_LOG_LEVEL.into(),
                self.config.verbosity.to_string().into(),
            ),
        ];
        let (program, argv, fds, own_socket) = match &self.program {
            WorkerProgram::External(command) => {
                // The `shared` baseline's socket, else one of the child's own.
                let socket = match self.baseline.as_ref().and_then(|b| b.external_socket()) {
                    Some(shared) => shared?,
                    None => OwnedFd::from(crate::listener::bind_reuseport(self.listen, true)?),
                };
                let primary_copy = socket.try_clone()?;
                vars.push((env::IPC_FD.into(), IPC_FD_EXTERNAL.to_string().into()));
                vars.push(("LISTEN_FDS".into(), "1".into()));
                vars.push(("LISTEN_FDNAMES".into(), "steer".into()));
                let first = command.first().map(OsString::from).unwrap_or_default();
                let program = spawn::resolve_program(&first)?;
                let argv = command.iter().map(OsString::from).collect();
                let mut fds = vec![
                    (socket, LISTEN_FD),
                    (OwnedFd::from(worker_end), IPC_FD_EXTERNAL),
                ];
                // An external worker does not register, so its load record is placed
                // at spawn, like its socket.
                match self.steering.load_record(index, generation as u32) {
                    Some(Ok((record, _share))) => {
                        vars.push((env::LOAD_FD.into(), LOAD_FD_EXTERNAL.to_string().into()));
                        vars.push((
                            env::LOAD_LAYOUT.into(),
                            crate::steering::load::LAYOUT.into(),
                        ));
                        fds.push((record, LOAD_FD_EXTERNAL));
                    }
                    Some(Err(err)) => {
                        tracing::warn!(slot = index, "worker will not publish its load: {err}");
                    }
                    None => {}
                }
                (program, argv, fds, Some(primary_copy))
            }
            builtin => {
                let role = if *builtin == WorkerProgram::Demo {
                    env::ROLE_DEMO
                } else {
                    env::ROLE_LIBRARY
                };
                vars.push((env::ROLE.into(), role.into()));
                vars.push((env::IPC_FD.into(), IPC_FD_BUILTIN.to_string().into()));
                vars.push((env::LISTEN.into(), self.listen.to_string().into()));
                if self.config.demo_faults {
                    vars.push((env::DEMO_FAULTS.into(), "1".into()));
                }
                if let Some(credentials) = &self.config.credentials {
                    let switch = crate::privileges::env_for(credentials);
                    vars.extend(switch.map(|(k, v)| (k.into(), v.into())));
                }
                let argv0 = self.args.first().cloned().unwrap_or_else(|| "steer".into());
                let argv = if *builtin == WorkerProgram::Demo {
                    vec![argv0, "worker".into(), index.to_string().into()]
                } else {
                    self.args.clone()
                };
                let mut fds = vec![(OwnedFd::from(worker_end), IPC_FD_BUILTIN)];
                if let Some(baseline) = &self.baseline {
                    let inheritance = baseline.worker_inheritance()?;
                    vars.extend(inheritance.env);
                    fds.extend(inheritance.fds);
                }
                (self.exe.clone(), argv, fds, None)
            }
        };
        let listen_pid = own_socket.is_some();
        let spawned = spawn::spawn(SpawnSpec {
            program,
            argv,
            env: vars,
            env_remove: env::ALL,
            fds,
            listen_pid,
            cpu: self
                .config
                .cpu_affinity
                .then(|| index % crate::steering::online_cpus()),
            limits: spawn::ChildLimits::for_worker(&self.config, own_socket.is_some()),
        })?;
        Ok((spawned, primary_end, own_socket))
    }

    /// The worker is serving: put its socket into steering, and if it replaces an older
    /// generation, drain that one now.
    pub(super) fn become_ready(&mut self, index: usize, pid: i32, now: Instant) {
        let stopping = self.phase != ClusterPhase::Running;
        let Some((role, process)) = self.slots[index].find_mut(pid) else {
            return;
        };
        // A process already on its way out (killed while starting, or retired) must never
        // enter steering: nothing would take it out again when it dies.
        if process.phase != Phase::Starting || process.killed || role == Role::Retiring {
            return;
        }
        process.phase = Phase::Ready;
        process.ready_since = Some(now);
        process.deadline = None;
        let generation = process.generation;
        let startup = now.saturating_duration_since(process.started);
        if let Some(fd) = &process.registered_fd {
            process.listener_inode = super::health::socket_inode(fd);
        }
        if let Some(fd) = process.registered_fd.take()
            && let Err(err) = self.steering.activate(
                index,
                generation as u32,
                fd,
                process.pid,
                process.pidfd.as_fd(),
            )
        {
            // Serving nothing: replace it (a fresh socket may work), keep the others going.
            tracing::error!(
                slot = index,
                generation,
                pid,
                "cannot put the worker into steering: {err}"
            );
            Self::kill(process, "not in steering");
            return;
        }
        tracing::info!(
            slot = index,
            generation,
            pid,
            startup_ms = startup.as_millis() as u64,
            "worker ready"
        );
        if stopping {
            let timeout = self.config.shutdown_timeout;
            if let Some((_, process)) = self.slots[index].find_mut(pid) {
                Self::drain(&self.program, index, process, now, timeout);
            }
            return;
        }
        if role == Role::Incoming {
            let health_timeout = self.config.health_timeout;
            let slot = &mut self.slots[index];
            let Some(incoming) = slot.incoming.take() else {
                return;
            };
            if let Some(mut old) = slot.current.replace(incoming) {
                Self::retire_silent(index, &old, now, health_timeout);
                tracing::info!(
                    slot = index,
                    pid = old.pid,
                    generation = old.generation,
                    "replaced; draining the old generation"
                );
                Self::drain(
                    &self.program,
                    index,
                    &mut old,
                    now,
                    self.config.shutdown_timeout,
                );
                slot.retiring.push(old);
            }
            slot.replace_wanted = false;
        }
    }

    /// Takes `index` out of steering (logged if the maps refuse: the kernel drops a closed
    /// socket from them anyway).
    pub(super) fn leave_steering(&mut self, index: usize) {
        if let Err(err) = self.steering.deactivate(index) {
            tracing::warn!(slot = index, "cannot take the slot out of steering: {err}");
        }
    }

    /// Asks a process to stop accepting, finish what it has, and exit; SIGKILL after
    /// `timeout`. The caller has taken its slot out of steering if no one replaces it.
    pub(super) fn drain(
        program: &WorkerProgram,
        index: usize,
        process: &mut Process,
        now: Instant,
        timeout: Duration,
    ) {
        if process.phase == Phase::Draining {
            return;
        }
        process.phase = Phase::Draining;
        process.deadline = Some(now + timeout);
        process.registered_fd = None;
        let _not_listening = process.channel.send(&Message::Drain);
        if matches!(program, WorkerProgram::External(_)) {
            // The systemd convention: SIGTERM asks a service to finish and exit.
            if let Err(err) = spawn::pidfd_signal(&process.pidfd, libc::SIGTERM) {
                // Without it the worker drains only at the SIGKILL deadline (a worker of
                // another user needs CAP_KILL).
                tracing::warn!(slot = index, pid = process.pid, "SIGTERM failed: {err}");
            }
        }
        tracing::debug!(slot = index, pid = process.pid, "draining");
    }

    /// SIGKILL through the pidfd (never a reused pid). The exit arrives on the pidfd.
    pub(super) fn kill(process: &mut Process, why: &str) {
        if process.killed {
            return;
        }
        process.killed = true;
        if let Err(err) = spawn::pidfd_signal(&process.pidfd, libc::SIGKILL) {
            tracing::debug!(pid = process.pid, why, "SIGKILL failed: {err}");
        }
    }

    /// A pidfd became readable: reap the child and decide what comes next.
    pub(super) fn on_exit(&mut self, pid: i32) {
        let Some(status) = spawn::try_reap(pid) else {
            return;
        };
        let Some(index) = self.pid_slot.remove(&pid) else {
            return;
        };
        let now = Instant::now();
        let slot = &mut self.slots[index];
        let Some((role, process)) = slot.remove(pid) else {
            return;
        };
        slot.accepted_before += process.counters.accepted;
        let expected = process.phase == Phase::Draining || self.phase != ClusterPhase::Running;
        let ready_since = process.ready_since;
        let generation = process.generation;
        drop(process);
        if expected {
            if status.success() {
                tracing::info!(
                    slot = index,
                    generation,
                    pid,
                    "worker exited after draining"
                );
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
        self.slots[index].last_exit = Some(status);
        if role == Role::Current {
            self.leave_steering(index);
        }
        self.after_crash(index, role, ready_since, now);
    }

    /// Restart accounting for a process that ended (or never started) unexpectedly.
    pub(super) fn after_crash(
        &mut self,
        index: usize,
        role: Role,
        ready_since: Option<Instant>,
        now: Instant,
    ) {
        let (max, window) = (self.config.max_restarts, self.config.restart_window);
        let slot = &mut self.slots[index];
        let verdict = slot.crashes.record(now, ready_since, max, window);
        match verdict {
            Verdict::Fail if role == Role::Incoming => {
                tracing::error!(
                    slot = index,
                    "replacement crashed more than {max} times in {}; keeping the running generation",
                    humantime::format_duration(window)
                );
                slot.replace_wanted = false;
            }
            Verdict::Fail => {
                tracing::error!(
                    slot = index,
                    "crashed more than {max} times in {}: slot failed (revive with SIGHUP)",
                    humantime::format_duration(window)
                );
                slot.failed = true;
                slot.next_start = None;
                // A rolling restart waiting on this slot must move on.
                slot.replace_wanted = false;
                if let Some(mut incoming) = slot.incoming.take() {
                    Self::kill(&mut incoming, "slot failed");
                    slot.retiring.push(incoming);
                }
            }
            Verdict::RestartAfter(delay) => {
                slot.restarts += 1;
                if role == Role::Current && slot.incoming.is_some() {
                    // The replacement already on its way takes over.
                    slot.current = slot.incoming.take();
                    slot.replace_wanted = false;
                    tracing::info!(slot = index, "the replacement being started takes over");
                } else {
                    slot.next_start = Some(now + delay);
                    tracing::info!(slot = index, "restarting in {} ms", delay.as_millis());
                }
            }
        }
    }
}

fn log_format_name(format: crate::config::LogFormat) -> &'static str {
    match format {
        crate::config::LogFormat::Text => "text",
        crate::config::LogFormat::Json => "json",
    }
}
