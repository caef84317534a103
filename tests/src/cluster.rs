//! A running `steer run` primary under test, and everything it spawned.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use serde_json::Value;

use crate::command::steer_bin;
use crate::http::http_get;
use crate::net::free_local_addr;
use crate::process::{POLL_INTERVAL, descendants_of, kill_if_same, nix_pid, start_time};
use crate::status::{self, WorkerStatus, all_ready, pids_leniently};
use crate::temp::LogFile;

/// How long [`Cluster::start`] waits for every worker to be `ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How often [`Cluster::wait_until`] polls `/status`.
pub const STATUS_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A `steer run` primary under test.
///
/// Its stdout and stderr go to a log file; every panic this type raises ends with the log's
/// tail. Every worker pid seen in `/status` is remembered, and dropping the cluster SIGKILLs
/// the primary, everything below it, and every remembered worker still alive, so a failing
/// test leaves no orphans. All methods take `&self`, so scoped threads can share a cluster.
pub struct Cluster {
    child: Mutex<Child>,
    pid: u32,
    listen: SocketAddr,
    status: SocketAddr,
    log: LogFile,
    /// Every worker process ever observed: pid and start time (see `process::start_time`),
    /// so that a recycled pid is neither confused with nor hides a worker.
    seen_workers: Mutex<BTreeSet<(u32, u64)>>,
}

impl Cluster {
    /// Runs `steer run <args>` and waits until `/status` shows every worker `ready`
    /// ([`READY_TIMEOUT`]).
    ///
    /// Unless `args` already contain them (before any `--`), `--listen` and `--status` are
    /// added with free ports on 127.0.0.1. `-v`/`-q` are left to the caller.
    ///
    /// # Panics
    ///
    /// If `steer` cannot be spawned, exits, or is not ready in time.
    pub fn start(args: &[&str]) -> Cluster {
        Self::start_with(args, |_| {})
    }

    /// [`start`](Cluster::start), letting `configure` adjust the command first (environment,
    /// working directory).
    ///
    /// # Panics
    ///
    /// As [`start`](Cluster::start).
    pub fn start_with(args: &[&str], configure: impl FnOnce(&mut Command)) -> Cluster {
        let cluster = Self::spawn_with(args, configure);
        cluster.wait_ready(READY_TIMEOUT);
        cluster
    }

    /// Runs `steer run <args>` like [`start`](Cluster::start) without waiting for anything:
    /// for clusters that are not meant to become ready (crash loops, failing workers).
    ///
    /// # Panics
    ///
    /// If `steer` cannot be spawned, or a `--listen`/`--status` value is not an address.
    pub fn spawn(args: &[&str]) -> Cluster {
        Self::spawn_with(args, |_| {})
    }

    /// [`spawn`](Cluster::spawn), letting `configure` adjust the command first.
    ///
    /// # Panics
    ///
    /// As [`spawn`](Cluster::spawn).
    pub fn spawn_with(args: &[&str], configure: impl FnOnce(&mut Command)) -> Cluster {
        let run = RunArgs::complete(args);
        let mut cmd = Command::new(steer_bin());
        cmd.arg("run").args(&run.args);
        configure(&mut cmd);
        Self::launch(cmd, run.listen, run.status)
    }

    /// [`start`](Cluster::start) with another `steer` executable than [`steer_bin`]: the
    /// release build, for what only it can show (its memory).
    ///
    /// # Panics
    ///
    /// As [`start`](Cluster::start).
    pub fn start_binary(steer: &Path, args: &[&str]) -> Cluster {
        let run = RunArgs::complete(args);
        let mut cmd = Command::new(steer);
        cmd.arg("run").args(&run.args);
        let cluster = Self::launch(cmd, run.listen, run.status);
        cluster.wait_ready(READY_TIMEOUT);
        cluster
    }

    /// Runs `steer run <args>` as given, with no `--listen` or `--status` added: for a
    /// config file that names them (a test of what a reload does with them). `listen` and
    /// `status` say where the harness finds the cluster. Waits until every worker is ready.
    ///
    /// # Panics
    ///
    /// As [`start`](Cluster::start).
    pub fn start_as_given(args: &[&str], listen: SocketAddr, status: SocketAddr) -> Cluster {
        let mut cmd = Command::new(steer_bin());
        cmd.arg("run").args(args);
        let cluster = Self::launch(cmd, listen, status);
        cluster.wait_ready(READY_TIMEOUT);
        cluster
    }

    /// Runs `cmd`, which starts a primary some other way (a container runtime's `run`,
    /// with `steer run --listen <listen> --status <status>` inside), and waits until every
    /// worker is ready. [`pid`](Cluster::pid) and [`signal`](Cluster::signal) then concern
    /// `cmd`'s process, not necessarily the primary: the status says which that is.
    /// Dropping the cluster kills `cmd` and everything below it.
    ///
    /// # Panics
    ///
    /// As [`start`](Cluster::start).
    pub fn start_command(cmd: Command, listen: SocketAddr, status: SocketAddr) -> Cluster {
        let cluster = Self::launch(cmd, listen, status);
        cluster.wait_ready(READY_TIMEOUT);
        cluster
    }

    /// Runs another primary than `steer run`, such as a program built on the `steer`
    /// library, with `args` completed by `--listen`/`--status` as in
    /// [`start`](Cluster::start), and waits until every worker is ready.
    ///
    /// # Panics
    ///
    /// As [`start`](Cluster::start).
    pub fn start_program(program: &Path, args: &[&str]) -> Cluster {
        let run = RunArgs::complete(args);
        let mut cmd = Command::new(program);
        cmd.args(&run.args).env("NO_COLOR", "1");
        let cluster = Self::launch(cmd, run.listen, run.status);
        cluster.wait_ready(READY_TIMEOUT);
        cluster
    }

    /// [`start`](Cluster::start) with the primary's stderr going to `stderr` (a pipe the
    /// test reads at its own pace, or never) instead of the log file, which then holds its
    /// stdout only.
    ///
    /// # Panics
    ///
    /// As [`start`](Cluster::start).
    pub fn start_with_stderr(args: &[&str], stderr: std::os::fd::OwnedFd) -> Cluster {
        let run = RunArgs::complete(args);
        let mut cmd = Command::new(steer_bin());
        cmd.arg("run").args(&run.args);
        let cluster = Self::launch_with(cmd, run.listen, run.status, Some(Stdio::from(stderr)));
        cluster.wait_ready(READY_TIMEOUT);
        cluster
    }

    /// Spawns `cmd` with its output going to a fresh log file.
    fn launch(cmd: Command, listen: SocketAddr, status: SocketAddr) -> Cluster {
        Self::launch_with(cmd, listen, status, None)
    }

    /// Spawns `cmd` with its stdout going to a fresh log file, and its stderr there too
    /// unless `stderr` says where.
    fn launch_with(
        mut cmd: Command,
        listen: SocketAddr,
        status: SocketAddr,
        stderr: Option<Stdio>,
    ) -> Cluster {
        let (log, stdout) = LogFile::create();
        let stderr = match stderr {
            Some(stderr) => stderr,
            None => Stdio::from(stdout.try_clone().unwrap_or_else(|e| {
                panic!("duplicating the handle of {}: {e}", log.path().display())
            })),
        };
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Cluster {
            pid: child.id(),
            child: Mutex::new(child),
            listen,
            status,
            log,
            seen_workers: Mutex::new(BTreeSet::new()),
        }
    }

    /// Waits until every worker is `ready` (see [`status::all_ready`]); returns that status.
    ///
    /// # Panics
    ///
    /// As [`wait_until`](Cluster::wait_until).
    pub fn wait_ready(&self, timeout: Duration) -> Value {
        self.wait_until("every worker ready", timeout, all_ready)
    }

    /// The address clients connect to (`--listen`).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The address of `GET /status` and `GET /metrics` (`--status`).
    pub fn status_addr(&self) -> SocketAddr {
        self.status
    }

    /// The primary's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything the primary and its workers wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        self.log.read()
    }

    /// Where the log is; kept after a failed test.
    pub fn log_path(&self) -> &Path {
        self.log.path()
    }

    /// `GET /status`, parsed; remembers the worker pids in it.
    ///
    /// # Errors
    ///
    /// If the request fails, the status code is not 200, or the body is not JSON.
    pub fn try_status(&self) -> io::Result<Value> {
        let response = http_get(self.status, "/status")?;
        if response.status != 200 {
            return Err(io::Error::other(format!(
                "GET /status answered {}: {}",
                response.status, response.body
            )));
        }
        let status: Value = serde_json::from_str(&response.body).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("GET /status is not JSON ({e}): {}", response.body),
            )
        })?;
        self.remember_workers(pids_leniently(&status));
        // A successor primary (after an upgrade) is not a child of this harness: it is
        // remembered like a worker, so a failing test does not leave it behind.
        if let Some(primary) = status::primary_pid(&status).filter(|&pid| pid != self.pid) {
            self.remember_workers([primary]);
        }
        Ok(status)
    }

    /// `GET /status`, parsed.
    ///
    /// # Panics
    ///
    /// If [`try_status`](Cluster::try_status) fails.
    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|e| self.fail(format_args!("GET /status failed: {e}")))
    }

    /// The workers in a fresh `/status`.
    ///
    /// # Panics
    ///
    /// If `/status` fails or breaks the contract.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        status::workers(&self.status())
    }

    /// `(slot, pid)` of every worker with a process, from a fresh `/status`.
    ///
    /// # Panics
    ///
    /// If `/status` fails or breaks the contract.
    pub fn worker_pids(&self) -> Vec<(usize, u32)> {
        status::worker_pids(&self.status())
    }

    /// Every worker pid this harness has seen in `/status` since the start (or found below
    /// the primary), ascending.
    pub fn seen_worker_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = lock(&self.seen_workers)
            .iter()
            .map(|&(pid, _)| pid)
            .collect();
        pids.dedup();
        pids
    }

    /// Polls `/status` every [`STATUS_POLL_INTERVAL`] until `condition` holds; returns the
    /// status that satisfied it. Failed requests are retried (the status listener may not
    /// be up yet).
    ///
    /// # Panics
    ///
    /// After `timeout`, or as soon as the primary exits, with `desc`, the last status (or
    /// request error) and the log tail.
    pub fn wait_until(
        &self,
        desc: &str,
        timeout: Duration,
        mut condition: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.try_status() {
                Ok(status) if condition(&status) => return status,
                Ok(status) => format!("last /status:\n{status:#}"),
                Err(e) => format!("last /status request failed: {e}"),
            };
            if let Some(exit) = self.try_exit_status() {
                self.fail(format_args!(
                    "steer exited ({exit}) while waiting for {desc}\n{last}"
                ));
            }
            if Instant::now() >= deadline {
                self.fail(format_args!(
                    "timed out after {timeout:?} waiting for {desc}\n{last}"
                ));
            }
            thread::sleep(STATUS_POLL_INTERVAL);
        }
    }

    /// Waits until the log contains `needle`; returns the log.
    ///
    /// # Panics
    ///
    /// After `timeout`, with the log tail.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            if Instant::now() >= deadline {
                self.fail(format_args!(
                    "timed out after {timeout:?} waiting for {needle:?} in the log"
                ));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Sends `signal` to the primary (`kill(2)`).
    ///
    /// # Panics
    ///
    /// If the primary has already exited (its pid may belong to someone else by now), or
    /// `kill` fails.
    pub fn signal(&self, signal: Signal) {
        // Holding the lock keeps the child from being reaped, so the pid stays ours.
        let mut child = lock(&self.child);
        if let Ok(Some(exit)) = child.try_wait() {
            drop(child);
            self.fail(format_args!(
                "cannot send {signal}: steer already exited ({exit})"
            ));
        }
        let pid = nix_pid(self.pid).expect("a spawned child has a valid pid");
        if let Err(e) = kill(pid, signal) {
            drop(child);
            self.fail(format_args!("kill({}, {signal}) failed: {e}", self.pid));
        }
    }

    /// How the primary exited, if it has (reaps it; never blocks).
    ///
    /// # Panics
    ///
    /// If `waitpid(2)` fails.
    pub fn try_exit_status(&self) -> Option<ExitStatus> {
        lock(&self.child)
            .try_wait()
            .unwrap_or_else(|e| panic!("waitpid({}) failed: {e}", self.pid))
    }

    /// Waits for the primary to exit and returns how it did.
    ///
    /// # Panics
    ///
    /// After `timeout`, with the log tail (the primary keeps running until drop).
    pub fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.try_exit_status() {
                return exit;
            }
            if Instant::now() >= deadline {
                self.fail(format_args!(
                    "steer (pid {}) did not exit within {timeout:?}",
                    self.pid
                ));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The pids of every slot's current process, in slot order.
    ///
    /// # Panics
    ///
    /// As [`status`](Cluster::status).
    pub fn worker_pid_list(&self) -> Vec<u32> {
        self.worker_pids().into_iter().map(|(_, pid)| pid).collect()
    }

    /// SIGKILLs the process serving `slot` and returns its pid.
    ///
    /// # Panics
    ///
    /// If the slot has no process or the signal cannot be sent.
    pub fn kill_worker(&self, slot: usize) -> u32 {
        let Some(pid) = status::worker(&self.status(), slot).pid else {
            self.fail(format_args!("slot {slot} has no process"));
        };
        let Some(target) = nix_pid(pid) else {
            self.fail(format_args!("slot {slot} reports pid {pid}"));
        };
        if let Err(e) = kill(target, Signal::SIGKILL) {
            self.fail(format_args!("kill -9 {pid} (slot {slot}): {e}"));
        }
        pid
    }

    /// Sends SIGUSR2 and waits until every slot is `ready` with a newer generation than
    /// before; returns how long the roll took.
    ///
    /// # Panics
    ///
    /// As [`wait_until`](Cluster::wait_until), after `timeout`.
    pub fn rolling_restart(&self, timeout: Duration) -> Duration {
        let before: std::collections::BTreeMap<usize, u64> = status::workers(&self.status())
            .iter()
            .map(|w| (w.slot, w.generation))
            .collect();
        let at = Instant::now();
        self.signal(Signal::SIGUSR2);
        self.wait_until("a rolling restart to complete", timeout, |s| {
            all_ready(s)
                && status::workers(s)
                    .iter()
                    .all(|w| before.get(&w.slot).is_some_and(|&g| w.generation > g))
        });
        at.elapsed()
    }

    /// Waits until the workers' heartbeat answers report at least `requests` answered
    /// requests in all: proof that they answer pings (the counters travel in pongs).
    ///
    /// # Panics
    ///
    /// As [`wait_until`](Cluster::wait_until), after `timeout`.
    pub fn wait_for_reported_requests(&self, requests: u64, timeout: Duration) -> Value {
        self.wait_until("heartbeat answers carrying request counts", timeout, |s| {
            status::workers(s)
                .iter()
                .map(|w| w.raw["requests"].as_u64().unwrap_or(0))
                .sum::<u64>()
                >= requests
        })
    }

    /// SIGTERM, then asserts a clean stop (exit 0) within `timeout`.
    ///
    /// # Panics
    ///
    /// If the primary exits otherwise or not in time, with the log.
    pub fn stop_cleanly(&self, timeout: Duration) {
        let status = self.stop(timeout);
        assert_eq!(
            status.code(),
            Some(0),
            "expected a clean stop, got {status}\n{}",
            self.log()
        );
    }

    /// Graceful stop: SIGTERM, then [`wait_exit`](Cluster::wait_exit).
    ///
    /// # Panics
    ///
    /// As [`signal`](Cluster::signal) and [`wait_exit`](Cluster::wait_exit).
    pub fn stop(&self, timeout: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(timeout)
    }

    fn remember_workers(&self, pids: impl IntoIterator<Item = u32>) {
        let mut seen = lock(&self.seen_workers);
        for pid in pids {
            if let Some(started) = start_time(pid) {
                seen.insert((pid, started));
            }
        }
    }

    /// Panics with `message` and the log tail.
    fn fail(&self, message: impl fmt::Display) -> ! {
        panic!("{message}\n{}", self.log.tail())
    }
}

/// Shows the pid and addresses (the log is too long for `Debug`).
impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("pid", &self.pid)
            .field("listen", &self.listen)
            .field("status", &self.status)
            .field("log", &self.log.path())
            .finish_non_exhaustive()
    }
}

/// SIGKILLs the primary, everything below it, and every worker ever seen that is still the
/// same process; reaps the primary.
impl Drop for Cluster {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Ok(None) = child.try_wait() {
            // Stopped, the primary cannot replace a worker while its tree is listed.
            if let Some(pid) = nix_pid(self.pid) {
                let _ = kill(pid, Signal::SIGSTOP);
            }
            let below = descendants_of(self.pid);
            self.remember_workers(below);
            let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
            let _ = child.kill();
            let _ = child.wait();
        }
        for &(pid, started) in lock(&self.seen_workers).iter() {
            kill_if_same(pid, started);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The `steer run` arguments with `--listen` and `--status` filled in.
#[derive(Debug, PartialEq)]
struct RunArgs {
    args: Vec<String>,
    listen: SocketAddr,
    status: SocketAddr,
}

impl RunArgs {
    fn complete(args: &[&str]) -> RunArgs {
        let mut full = Vec::new();
        let mut address = |long: &str, short: Option<&str>| match flag_value(args, long, short) {
            Some(value) => parse_addr(long, value),
            None => {
                let addr = free_local_addr();
                full.extend([long.to_owned(), addr.to_string()]);
                addr
            }
        };
        let listen = address("--listen", Some("-l"));
        let status = address("--status", None);
        full.extend(args.iter().map(|&arg| arg.to_owned()));
        RunArgs {
            args: full,
            listen,
            status,
        }
    }
}

/// The value of option `long` (or `short`) among the options, i.e. before any `--`:
/// `--flag V`, `--flag=V`, `-s V`, `-sV` and `-s=V`.
fn flag_value<'a>(args: &[&'a str], long: &str, short: Option<&str>) -> Option<&'a str> {
    for (i, &arg) in args.iter().enumerate() {
        if arg == "--" {
            break;
        }
        if arg == long || Some(arg) == short {
            let value = args.get(i + 1).unwrap_or_else(|| {
                panic!("{arg} without a value; bad-input tests belong with run_steer")
            });
            return Some(value);
        }
        if let Some(value) = arg
            .strip_prefix(long)
            .and_then(|rest| rest.strip_prefix('='))
        {
            return Some(value);
        }
        if let Some(value) = short.and_then(|short| arg.strip_prefix(short))
            && !value.is_empty()
        {
            return Some(value.strip_prefix('=').unwrap_or(value));
        }
    }
    None
}

fn parse_addr(flag: &str, value: &str) -> SocketAddr {
    // `--status PORT` means 127.0.0.1:PORT.
    if let Ok(port) = value.parse::<u16>() {
        return SocketAddr::from(([127, 0, 0, 1], port));
    }
    value
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| {
            panic!("{flag} {value:?} is not an address; bad-input tests belong with run_steer")
        })
}

#[cfg(test)]
mod tests {
    use std::env;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::os::unix::process::ExitStatusExt;
    use std::panic::{self, AssertUnwindSafe};

    use serde_json::json;

    use super::*;
    use crate::process::{pid_alive, wait_for};

    /// Set (to the status address) when this test binary is started as a fake primary.
    const FAKE_PRIMARY: &str = "STEER_TESTS_FAKE_PRIMARY";

    /// A stand-in for `steer run`, so the harness can be tested without the real binary:
    /// when the harness's own tests launch this test binary with [`FAKE_PRIMARY`] set, this
    /// test spawns two `sleep` "workers" and serves a `/status` naming them, until killed.
    /// Run normally, it does nothing.
    #[test]
    fn fake_primary() {
        let Some(status_addr) = env::var_os(FAKE_PRIMARY) else {
            return;
        };
        let status_addr = status_addr.to_str().expect("status addr is UTF-8");
        let workers: Vec<u32> = (0..2)
            .map(|_| {
                Command::new("sleep")
                    .arg("300")
                    .spawn()
                    .expect("spawn sleep")
                    .id()
            })
            .collect();
        let listener = TcpListener::bind(status_addr).expect("bind fake status");
        println!("fake primary {} serving /status", std::process::id());
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let body = json!({
                "primary": {"pid": std::process::id(), "balance": "kernel"},
                "workers": workers.iter().enumerate().map(|(slot, pid)| json!({
                    "slot": slot, "pid": pid, "generation": 1, "state": "ready",
                })).collect::<Vec<_>>(),
                "totals": {"workers": workers.len()},
            })
            .to_string();
            let _ = write!(
                reader.get_mut(),
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    }

    fn fake_cluster() -> Cluster {
        let status = free_local_addr();
        let mut cmd = Command::new(env::current_exe().expect("current exe"));
        cmd.args([
            "--exact",
            "cluster::tests::fake_primary",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FAKE_PRIMARY, status.to_string());
        Cluster::launch(cmd, free_local_addr(), status)
    }

    fn panic_message(f: impl FnOnce()) -> String {
        let panic = panic::catch_unwind(AssertUnwindSafe(f)).expect_err("expected a panic");
        match panic.downcast::<String>() {
            Ok(message) => *message,
            Err(panic) => panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .unwrap_or_default(),
        }
    }

    #[test]
    fn drop_kills_the_primary_and_every_worker_it_saw() {
        let cluster = fake_cluster();
        let status = cluster.wait_ready(READY_TIMEOUT);
        let workers = status::worker_pids(&status);
        assert_eq!(workers.len(), 2, "{status:#}");
        assert_eq!(cluster.seen_worker_pids().len(), 2);
        assert!(
            cluster.log().contains("serving /status"),
            "{}",
            cluster.log()
        );
        let primary = cluster.pid();
        drop(cluster);
        wait_for(
            "the fake primary and its workers to die",
            READY_TIMEOUT,
            || !pid_alive(primary) && workers.iter().all(|&(_, pid)| !pid_alive(pid)),
        );
    }

    #[test]
    fn a_signal_ends_the_primary_and_wait_exit_reports_it() {
        let cluster = fake_cluster();
        let workers = status::worker_pids(&cluster.wait_ready(READY_TIMEOUT));
        let exit = cluster.stop(Duration::from_secs(10));
        assert_eq!(exit.signal(), Some(Signal::SIGTERM as i32));
        assert_eq!(cluster.try_exit_status(), Some(exit));
        let message = panic_message(|| cluster.signal(Signal::SIGUSR2));
        assert!(message.contains("already exited"), "{message}");
        // The workers outlive a primary killed by a signal it does not handle; drop still
        // finds them through /status.
        drop(cluster);
        wait_for("orphaned workers to die", READY_TIMEOUT, || {
            workers.iter().all(|&(_, pid)| !pid_alive(pid))
        });
    }

    #[test]
    fn wait_until_timeout_shows_the_last_status_and_the_log() {
        let cluster = fake_cluster();
        cluster.wait_ready(READY_TIMEOUT);
        let message = panic_message(|| {
            cluster.wait_until("the impossible", Duration::from_millis(200), |_| false);
        });
        assert!(message.contains("waiting for the impossible"), "{message}");
        assert!(message.contains("\"state\": \"ready\""), "{message}");
        assert!(message.contains("serving /status"), "{message}");
    }

    #[test]
    fn start_fails_fast_with_the_log_when_steer_exits() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'error: address in use' >&2; exit 1"]);
        let cluster = Cluster::launch(cmd, free_local_addr(), free_local_addr());
        let started = Instant::now();
        let message = panic_message(|| {
            cluster.wait_ready(READY_TIMEOUT);
        });
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            message.contains("steer exited (exit status: 1)"),
            "{message}"
        );
        assert!(message.contains("error: address in use"), "{message}");
        assert!(message.contains("last /status request failed"), "{message}");
    }

    #[test]
    fn wait_exit_times_out_with_the_log() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo still running; exec sleep 30"]);
        let cluster = Cluster::launch(cmd, free_local_addr(), free_local_addr());
        cluster.wait_for_log("still running", Duration::from_secs(10));
        let message = panic_message(|| {
            cluster.wait_exit(Duration::from_millis(100));
        });
        assert!(message.contains("did not exit within 100ms"), "{message}");
        assert!(message.contains("still running"), "{message}");
        let pid = cluster.pid();
        drop(cluster);
        assert!(!pid_alive(pid));
    }

    #[test]
    fn run_args_add_missing_addresses_before_the_command() {
        let run = RunArgs::complete(&["-w", "2", "--", "server", "--listen", "x"]);
        assert_eq!(
            run.args,
            [
                "--listen",
                &run.listen.to_string(),
                "--status",
                &run.status.to_string(),
                "-w",
                "2",
                "--",
                "server",
                "--listen",
                "x",
            ]
        );
        assert_ne!(run.listen, run.status);
    }

    #[test]
    fn run_args_keep_given_addresses_in_every_spelling() {
        for args in [
            &["--listen", "127.0.0.1:81", "--status", "127.0.0.1:82"][..],
            &["--listen=127.0.0.1:81", "--status=127.0.0.1:82"],
            &["-l", "127.0.0.1:81", "--status", "127.0.0.1:82"],
            &["-l127.0.0.1:81", "--status", "127.0.0.1:82"],
            &["-l=127.0.0.1:81", "--status", "127.0.0.1:82"],
        ] {
            let run = RunArgs::complete(args);
            assert_eq!(run.args, args, "nothing added to {args:?}");
            assert_eq!(run.listen, "127.0.0.1:81".parse().expect("addr"));
            assert_eq!(run.status, "127.0.0.1:82".parse().expect("addr"));
        }
    }

    #[test]
    fn run_args_fill_in_only_what_is_missing() {
        let run = RunArgs::complete(&["--listen", "[::1]:9000"]);
        assert_eq!(run.listen, "[::1]:9000".parse().expect("addr"));
        assert_eq!(run.args[0], "--status");
        assert_eq!(run.args.len(), 4);
    }
}
