//! The library example `runtime/examples/hyper_cluster.rs` (tokio + hyper workers under a
//! Steer primary) run as a real cluster: its workers serve, its primary hears from them,
//! and SIGTERM drains and stops everything.
//!
//! This test builds nothing: run `cargo build -p steer --examples` first, or point
//! `STEER_EXAMPLE_HYPER` at the executable. The harness's `Cluster` always runs
//! `steer run`, so the example is started and guarded here with `std::process::Command`.

use std::collections::{BTreeMap, BTreeSet};
use std::env;
use std::fs::{self, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::kill;
use nix::unistd::Pid;
use steer_tests::{
    KeepAlive, POLL_INTERVAL, READY_TIMEOUT, STATUS_POLL_INTERVAL, Signal, TempFile, Value,
    descendants_of, free_local_addr, http_get, pid_alive, status,
};

/// Overrides where the example executable is looked for.
const EXAMPLE_ENV: &str = "STEER_EXAMPLE_HYPER";

/// New connections tried before giving up on seeing both workers answer.
const MAX_CONNECTIONS: usize = 200;

/// How long the primary may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The `hyper_cluster` example executable: `$STEER_EXAMPLE_HYPER`, or
/// `target/<profile>/examples/hyper_cluster` next to this test's `target/<profile>/deps/`.
fn example_bin() -> PathBuf {
    if let Some(path) = env::var_os(EXAMPLE_ENV) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{EXAMPLE_ENV}={} does not name a file",
            path.display()
        );
        return path;
    }
    let exe = env::current_exe().expect("locating the running test executable (current_exe)");
    let dir = exe.parent().unwrap_or(Path::new("."));
    let profile_dir = if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let bin = profile_dir.join("examples").join("hyper_cluster");
    assert!(
        bin.is_file(),
        "the hyper_cluster example is missing at {}: run `cargo build -p steer --examples` \
         first (with --release for a release test run), or set {EXAMPLE_ENV}",
        bin.display()
    );
    bin
}

/// The example's primary under test, with its output (and its workers') in a log file.
///
/// Dropping it SIGKILLs the primary, everything below it, and every worker pid seen in
/// `/status` that still runs the example, so a failing test leaves no processes behind.
struct ExampleCluster {
    child: Child,
    exe: PathBuf,
    listen: SocketAddr,
    status: SocketAddr,
    log: TempFile,
    seen_workers: BTreeSet<u32>,
}

impl ExampleCluster {
    fn spawn(workers: usize) -> ExampleCluster {
        let exe = example_bin();
        let listen = free_local_addr();
        let status = free_local_addr();
        let log = TempFile::new("log", "");
        let stdout = OpenOptions::new()
            .append(true)
            .open(log.path())
            .unwrap_or_else(|e| panic!("opening the log {}: {e}", log.path().display()));
        let stderr = stdout
            .try_clone()
            .unwrap_or_else(|e| panic!("duplicating the handle of {}: {e}", log.path().display()));
        let mut cmd = Command::new(&exe);
        cmd.args(["--listen", &listen.to_string()])
            .args(["--workers", &workers.to_string()])
            .args(["--status", &status.to_string()])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        ExampleCluster {
            child,
            exe,
            listen,
            status,
            log,
            seen_workers: BTreeSet::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        fs::read(self.log.path())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Panics with `message` and the whole log (the example's log is short).
    fn fail(&self, message: impl std::fmt::Display) -> ! {
        panic!(
            "{message}\n--- hyper_cluster log {} ---\n{}--- end of log ---",
            self.log.path().display(),
            self.log()
        )
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        match self.child.try_wait() {
            Ok(exit) => exit,
            Err(e) => self.fail(format_args!("waitpid({}) failed: {e}", self.pid())),
        }
    }

    /// `GET /status`, parsed; remembers the worker pids in it.
    fn try_status(&mut self) -> Result<Value, String> {
        let response = http_get(self.status, "/status").map_err(|e| e.to_string())?;
        if response.status != 200 {
            return Err(format!("GET /status answered {response}"));
        }
        let status: Value = serde_json::from_str(&response.body)
            .map_err(|e| format!("GET /status is not JSON ({e}): {}", response.body))?;
        self.seen_workers.extend(
            status["workers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|worker| u32::try_from(worker["pid"].as_u64()?).ok()),
        );
        Ok(status)
    }

    /// Polls `/status` until `condition` holds; fails fast if the primary exits.
    fn wait_until(
        &mut self,
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
                    "hyper_cluster exited ({exit}) while waiting for {desc}\n{last}"
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

    /// Waits until the log contains every one of `needles`.
    fn wait_for_log(&self, needles: &[String], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            let missing: Vec<&String> = needles.iter().filter(|n| !log.contains(*n)).collect();
            if missing.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                self.fail(format_args!(
                    "timed out after {timeout:?} waiting for {missing:?} in the log"
                ));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn signal(&mut self, signal: Signal) {
        if let Some(exit) = self.try_exit_status() {
            self.fail(format_args!(
                "cannot send {signal}: hyper_cluster already exited ({exit})"
            ));
        }
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("a child pid fits in i32"));
        if let Err(e) = kill(pid, signal) {
            self.fail(format_args!("kill({pid}, {signal}) failed: {e}"));
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.try_exit_status() {
                return exit;
            }
            if Instant::now() >= deadline {
                self.fail(format_args!(
                    "hyper_cluster (pid {}) did not exit within {timeout:?}",
                    self.pid()
                ));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Whether `pid` still runs the example (and is not a stranger that reused the pid).
    fn runs_example(&self, pid: u32) -> bool {
        pid_alive(pid)
            && fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
                exe == self.exe || fs::canonicalize(&self.exe).is_ok_and(|ours| exe == ours)
            })
    }
}

impl Drop for ExampleCluster {
    fn drop(&mut self) {
        let primary = self.pid();
        if let Ok(None) = self.child.try_wait() {
            // Stopped, the primary cannot start replacements while its tree is listed.
            let raw = i32::try_from(primary).ok().map(Pid::from_raw);
            if let Some(pid) = raw {
                let _ = kill(pid, Signal::SIGSTOP);
            }
            self.seen_workers.extend(descendants_of(primary));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for &pid in &self.seen_workers {
            if self.runs_example(pid)
                && let Ok(raw) = i32::try_from(pid)
            {
                let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
        }
    }
}

#[test]
fn hyper_library_workers_serve_and_drain_on_sigterm() {
    let started = Instant::now();
    let mut cluster = ExampleCluster::spawn(2);
    let ready = cluster.wait_until("both workers ready", READY_TIMEOUT, |s| {
        status::all_ready(s) && status::workers(s).len() == 2
    });
    let pids: BTreeMap<usize, u32> = status::worker_pids(&ready).into_iter().collect();
    assert_eq!(
        pids.keys().copied().collect::<Vec<_>>(),
        [0, 1],
        "{ready:#}"
    );

    // Both workers answer, each with its slot and its own pid.
    let mut answered: BTreeMap<usize, u64> = BTreeMap::new();
    for _ in 0..MAX_CONNECTIONS {
        let response = http_get(cluster.listen, "/")
            .unwrap_or_else(|e| cluster.fail(format_args!("GET / failed: {e}")));
        let Some(slot) = response.worker() else {
            cluster.fail(format_args!("no numeric X-Steer-Worker in:\n{response}"));
        };
        let expected = format!("hello from hyper worker {slot} (pid {})\n", pids[&slot]);
        if response.status != 200 || response.body != expected {
            cluster.fail(format_args!("expected 200 {expected:?}, got:\n{response}"));
        }
        *answered.entry(slot).or_default() += 1;
        if answered.len() == 2 {
            break;
        }
    }
    if answered.len() != 2 {
        cluster.fail(format_args!(
            "only slots {answered:?} answered over {MAX_CONNECTIONS} new connections"
        ));
    }

    // The workers' WorkerStats reach the primary with the next heartbeats.
    cluster.wait_until(
        "/status to count the connections each worker accepted",
        Duration::from_secs(10),
        |s| {
            answered
                .iter()
                .all(|(&slot, &count)| status::worker(s, slot).accepted >= count)
        },
    );

    // Each worker's `send` reached the primary's on_message hook.
    let hellos: Vec<String> = (0..2)
        .map(|slot| format!(r#"primary received {{"hello":{slot}}} from worker {slot}"#))
        .collect();
    cluster.wait_for_log(&hellos, Duration::from_secs(10));

    // An idle keep-alive connection must not hold up the drain: hyper's graceful shutdown
    // closes it.
    let mut keep_alive = KeepAlive::connect(cluster.listen)
        .unwrap_or_else(|e| cluster.fail(format_args!("keep-alive connect failed: {e}")));
    let first = keep_alive
        .get("/")
        .unwrap_or_else(|e| cluster.fail(format_args!("keep-alive GET / failed: {e}")));
    assert_eq!(first.status, 200, "{first}");
    assert!(
        keep_alive.is_open(),
        "hyper closed a keep-alive connection: {first}"
    );

    let stopping = Instant::now();
    cluster.signal(Signal::SIGTERM);
    let exit = cluster.wait_exit(STOP_TIMEOUT);
    let stop_took = stopping.elapsed();
    if exit.code() != Some(0) {
        cluster.fail(format_args!(
            "hyper_cluster stopped with {exit}, expected 0"
        ));
    }
    let alive: Vec<u32> = pids.values().copied().filter(|&p| pid_alive(p)).collect();
    if !alive.is_empty() {
        cluster.fail(format_args!(
            "workers {alive:?} outlived their primary ({pids:?})"
        ));
    }
    if keep_alive.get("/").is_ok() {
        cluster.fail("the keep-alive connection still answered after the cluster stopped");
    }
    eprintln!(
        "answers per slot {answered:?}; stop took {stop_took:?}; test took {:?}",
        started.elapsed()
    );
}
