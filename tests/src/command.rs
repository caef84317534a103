//! Finding the `steer` binary and running it to completion (bad-input tests).

use std::env;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};

use crate::process::{POLL_INTERVAL, descendants_of, nix_pid};

/// How long [`run_steer`] lets `steer` run before killing it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(10);

/// The `steer` executable under test.
///
/// `$STEER_BIN` if set; otherwise `steer` in the target profile directory of the running
/// test executable (`target/<profile>/deps/<test>-<hash>` -> `target/<profile>/steer`).
/// Cargo does not build another package's binary for this crate's tests, so it must have
/// been built first.
///
/// # Panics
///
/// If the file does not exist, with the command that builds it.
pub fn steer_bin() -> PathBuf {
    if let Some(path) = env::var_os("STEER_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "STEER_BIN={} does not name a file",
            path.display()
        );
        return path;
    }
    let exe = env::current_exe().expect("locating the running test executable (current_exe)");
    let bin = binary_next_to(&exe);
    assert!(
        bin.is_file(),
        "the steer binary is missing at {}: run `cargo build -p steer` first (with --release \
         for a release test run), or set STEER_BIN",
        bin.display()
    );
    bin
}

/// Where `steer` lives relative to a test executable in `target/<profile>/deps/`.
fn binary_next_to(test_exe: &Path) -> PathBuf {
    let dir = test_exe.parent().unwrap_or(Path::new("."));
    let profile_dir = if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    profile_dir.join("steer")
}

/// What a finished `steer` invocation left behind.
#[derive(Debug)]
pub struct RunOutput {
    /// How the process ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout (lossy UTF-8).
    pub stdout: String,
    /// Everything it wrote to stderr (lossy UTF-8).
    pub stderr: String,
}

impl RunOutput {
    /// The exit code, or `None` if a signal ended the process.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Shows the status and both streams, for assertion messages: `assert!(.., "{out}")`.
impl fmt::Display for RunOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `steer <args>` to completion with stdin closed, capturing stdout and stderr.
///
/// For tests of the command-line contract (bad flags, bad config, `steer status`).
///
/// # Panics
///
/// If `steer` cannot be spawned, or runs longer than [`RUN_TIMEOUT`] (it is then killed,
/// with every process it started, and the panic shows what it printed).
pub fn run_steer(args: &[&str]) -> RunOutput {
    let mut cmd = Command::new(steer_bin());
    cmd.args(args);
    run_to_completion(&mut cmd, RUN_TIMEOUT)
}

/// Runs `cmd` to completion with stdin closed, capturing stdout and stderr, within
/// `timeout`. The general form of [`run_steer`], for extra environment or another program.
///
/// # Panics
///
/// If `cmd` cannot be spawned, or outlives `timeout` (it and its descendants are then
/// SIGKILLed, and the panic shows what it printed).
pub fn run_to_completion(cmd: &mut Command, timeout: Duration) -> RunOutput {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let stdout = Capture::start(child.stdout.take());
    let stderr = Capture::start(child.stderr.take());
    let deadline = Instant::now() + timeout;
    loop {
        let exited = child
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting for {cmd:?}: {e}"));
        if let Some(status) = exited {
            // Readers end at EOF, which a grandchild holding the pipe could postpone
            // forever: give them a bounded grace period.
            let grace = Instant::now() + Duration::from_secs(2);
            return RunOutput {
                status,
                stdout: stdout.finish(grace),
                stderr: stderr.finish(grace),
            };
        }
        if Instant::now() >= deadline {
            let status = kill_tree(&mut child);
            let grace = Instant::now() + Duration::from_millis(200);
            panic!(
                "{cmd:?} did not exit within {timeout:?}; killed it ({status})\n\
                 --- stdout ---\n{}--- stderr ---\n{}",
                stdout.finish(grace),
                stderr.finish(grace),
            );
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// SIGKILLs `child` and everything below it, and reaps `child`.
fn kill_tree(child: &mut Child) -> String {
    // Stop first so it cannot fork while its descendants are listed.
    if let Some(pid) = nix_pid(child.id()) {
        let _ = kill(pid, Signal::SIGSTOP);
    }
    let descendants = descendants_of(child.id());
    let _ = child.kill();
    for pid in descendants.into_iter().filter_map(nix_pid) {
        let _ = kill(pid, Signal::SIGKILL);
    }
    match child.wait() {
        Ok(status) => status.to_string(),
        Err(e) => format!("reaping failed: {e}"),
    }
}

/// A thread copying one output pipe into a buffer that stays readable while it runs.
struct Capture {
    buffer: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
}

impl Capture {
    fn start(pipe: Option<impl Read + Send + 'static>) -> Capture {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let reader = pipe.map(|mut pipe| {
            let buffer = Arc::clone(&buffer);
            thread::spawn(move || {
                let mut chunk = [0; 8192];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    buffer
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .extend_from_slice(&chunk[..n]);
                }
            })
        });
        Capture { buffer, reader }
    }

    /// Everything captured once the pipe reached EOF, or by `deadline`.
    fn finish(self, deadline: Instant) -> String {
        if let Some(reader) = self.reader {
            while !reader.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
        let bytes = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn steer_binary_sits_in_the_profile_dir_above_deps() {
        assert_eq!(
            binary_next_to(Path::new("/t/target/debug/deps/cli-0123abcd")),
            Path::new("/t/target/debug/steer")
        );
        assert_eq!(
            binary_next_to(Path::new("/t/target/release/examples/x")),
            Path::new("/t/target/release/examples/steer")
        );
    }

    #[test]
    fn captures_both_streams_and_the_exit_code() {
        let out = run_to_completion(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 2"]),
            Duration::from_secs(10),
        );
        assert_eq!(out.code(), Some(2), "{out}");
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
    }

    #[test]
    fn a_background_grandchild_holding_the_pipe_does_not_block() {
        let started = Instant::now();
        let out = run_to_completion(
            Command::new("sh").args(["-c", "echo early; sleep 5 & exit 0"]),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "{out}");
        assert_eq!(out.stdout, "early\n");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_hung_command_is_killed_and_reported() {
        let panic = std::panic::catch_unwind(|| {
            run_to_completion(
                Command::new("sh").args(["-c", "echo still-here; exec sleep 30"]),
                Duration::from_millis(300),
            )
        })
        .expect_err("a hung command panics");
        let message = panic
            .downcast_ref::<String>()
            .expect("panic message is a String");
        assert!(message.contains("did not exit within"), "{message}");
        assert!(message.contains("still-here"), "{message}");
        assert!(message.contains("SIGKILL"), "{message}");
    }

    #[test]
    fn display_shows_status_and_streams() {
        let out = RunOutput {
            status: ExitStatus::from_raw(2 << 8),
            stdout: String::new(),
            stderr: "error: --workers: invalid value\n".into(),
        };
        let shown = out.to_string();
        assert!(shown.contains("exit status: 2"), "{shown}");
        assert!(shown.contains("--workers"), "{shown}");
    }
}
