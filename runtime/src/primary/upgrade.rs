//! Replacing the primary itself with zero downtime (`SIGUSR1`).
//!
//! The running primary starts a **successor**: the executable now on disk, with the same
//! command line (so the same config file, re-read as it is now). What cannot be re-created
//! without a gap is handed down as inherited fds: the status listener (so the status
//! address never refuses a connection) and the locked pid file. The successor starts its
//! own workers on the same address; they join the port's `SO_REUSEPORT` group next to the
//! old ones. Under an eBPF policy it holds its program back until every one of its slots
//! is ready, then attaches it to the group in one step: from then on new connections go to
//! the new workers only. It writes its pid into the pid file and says `ready` on a pipe.
//!
//! Only then does the old primary hand over: it tells systemd the new main pid
//! (`MAINPID=`), stops answering status requests, and drains its workers. Their listeners
//! close, and what was queued on them migrates through the new program (or, in `kernel`
//! mode, through `tcp_migrate_req`) to the new workers. It exits 0 once they are gone.
//!
//! A successor is no less careful than a rolling restart. It learns which slots' workers
//! say `ready` (a helper, or any worker that speaks the protocol), and counts its own as
//! ready only once they say it too; a worker counted ready when it runs (an external
//! program that never speaks) must also have stayed up for
//! [`SETTLE`](super::core::SETTLE) (3 s). A successor whose
//! slot fails to start [`START_ATTEMPTS`](super::core::START_ATTEMPTS) times in a row says
//! so, with the reason, on the same pipe.
//!
//! If the successor fails before it is ready (its config does not parse, it crashes, its
//! workers cannot start, or are not all ready within the deadline), it exits or is killed,
//! its workers die with it, and the old primary logs why, puts its own program back on
//! the group (or, under `kernel`, takes any program off it), names itself in the pid file
//! again and keeps serving.
//!
//! SIGUSR1 to a successor that has not taken over yet is refused with a log line. Once it
//! has, it may be upgraded again while the primary before it still drains (a chain): the
//! newest is re-parented to that older primary, a subreaper, when the one between them
//! exits, and is spared by its exit-time sweep ([`is_successor_primary`]).

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Instant;

use super::spawn::{self, ChildLimits, SpawnSpec};

/// The old primary's pid, in the successor's environment.
pub(crate) const ENV_FROM: &str = "STEER_UPGRADE_FROM";
/// The fd the successor says `ready` on.
pub(crate) const ENV_READY_FD: &str = "STEER_UPGRADE_READY_FD";
/// The inherited status listener's fd.
pub(crate) const ENV_STATUS_FD: &str = "STEER_UPGRADE_STATUS_FD";
/// The inherited (locked) pid file's fd.
pub(crate) const ENV_PID_FILE_FD: &str = "STEER_UPGRADE_PID_FILE_FD";
/// The slots whose workers say `ready` (comma-separated indices): the successor's count
/// as ready only once they say it too.
pub(crate) const ENV_SAYS_READY: &str = "STEER_UPGRADE_SAYS_READY";
/// Each slot's generation under the predecessor, `slot:generation,...`: the successor's
/// workers go on from there.
pub(crate) const ENV_GENERATIONS: &str = "STEER_UPGRADE_GENERATIONS";
/// Every variable of the hand-over: never passed on to workers.
pub(crate) const ENV: &[&str] = &[
    ENV_FROM,
    ENV_READY_FD,
    ENV_STATUS_FD,
    ENV_PID_FILE_FD,
    ENV_SAYS_READY,
    ENV_GENERATIONS,
    crate::quic::ENV_RESET_KEY,
];

const READY_FD: RawFd = 3;
const STATUS_FD: RawFd = 4;
const PID_FILE_FD: RawFd = 5;

/// What the successor says once it has taken over.
const READY: &[u8] = b"ready\n";
/// What a successor says, followed by the reason and a newline, when it cannot have
/// every slot ready: the predecessor then kills it and keeps serving.
const FAILED: &[u8] = b"failed: ";
/// The longest reason the predecessor reads.
const MOST_SAID: usize = 1024;

/// The old primary's view of a successor being started.
#[derive(Debug)]
pub(crate) struct Successor {
    /// Its pid.
    pub pid: i32,
    /// Readable when it exits.
    pub pidfd: OwnedFd,
    /// The read end of its `ready` pipe (non-blocking).
    ready: File,
    /// It is killed if it has not said `ready` by then.
    pub deadline: Instant,
    heard: Vec<u8>,
}

/// What a successor's `ready` pipe says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Nothing yet.
    Starting,
    /// It has taken over.
    Ready,
    /// It closed the pipe without saying `ready` (it exited or failed).
    Gone,
    /// It said it cannot start, and why.
    Failed(String),
}

impl Successor {
    /// Starts `exe` with `args` as a successor, handing it the status listener and the pid
    /// file, each slot's generation and whether its workers say `ready` (`slots`: slot,
    /// generation, says ready), and giving its workers the open-file limit this primary
    /// started with.
    pub(crate) fn start(
        exe: PathBuf,
        args: Vec<OsString>,
        status: Option<BorrowedFd<'_>>,
        pid_file: Option<BorrowedFd<'_>>,
        slots: &[(usize, u64, bool)],
        nofile: Option<(u64, u64)>,
        deadline: Instant,
    ) -> io::Result<Successor> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let says_ready: Vec<String> = slots
            .iter()
            .filter(|s| s.2)
            .map(|s| s.0.to_string())
            .collect();
        let mut env: Vec<(OsString, OsString)> = vec![
            (ENV_FROM.into(), std::process::id().to_string().into()),
            (ENV_READY_FD.into(), READY_FD.to_string().into()),
            (ENV_SAYS_READY.into(), says_ready.join(",").into()),
            (
                ENV_GENERATIONS.into(),
                slots
                    .iter()
                    .map(|(slot, generation, _)| format!("{slot}:{generation}"))
                    .collect::<Vec<_>>()
                    .join(",")
                    .into(),
            ),
        ];
        if let Some(key) = crate::quic::cluster_reset_key() {
            env.push((crate::quic::ENV_RESET_KEY.into(), key.to_hex().into()));
        }
        let mut fds = vec![(write, READY_FD)];
        if let Some(status) = status {
            env.push((ENV_STATUS_FD.into(), STATUS_FD.to_string().into()));
            fds.push((status.try_clone_to_owned()?, STATUS_FD));
        }
        if let Some(pid_file) = pid_file {
            env.push((ENV_PID_FILE_FD.into(), PID_FILE_FD.to_string().into()));
            fds.push((pid_file.try_clone_to_owned()?, PID_FILE_FD));
        }
        let program = exe;
        let child = spawn::spawn(SpawnSpec {
            program,
            argv: args,
            env,
            env_remove: ENV,
            fds,
            listen_pid: false,
            cpu: None,
            limits: ChildLimits {
                successor: true,
                nofile,
                ..ChildLimits::default()
            },
        })?;
        let ready = File::from(read);
        crate::sys::fd::set_nonblocking(ready.as_fd(), true)?;
        // Its exec report is not needed: a failed exec closes the ready pipe unsaid.
        drop(child.exec_report);
        Ok(Successor {
            pid: child.pid,
            pidfd: child.pidfd,
            ready,
            deadline,
            heard: Vec::new(),
        })
    }

    /// The fd to watch for its word.
    pub(crate) fn ready_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    /// Reads what it said so far, without blocking.
    pub(crate) fn progress(&mut self) -> Progress {
        let mut buf = [0u8; 256];
        loop {
            match self.ready.read(&mut buf) {
                Ok(0) => return self.heard_so_far().unwrap_or(Progress::Gone),
                Ok(n) => {
                    self.heard.extend_from_slice(&buf[..n]);
                    self.heard.truncate(MOST_SAID);
                    if let Some(progress) = self.heard_so_far() {
                        return progress;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Progress::Starting,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Progress::Gone,
            }
        }
    }

    /// A complete word in what it said, if there is one.
    fn heard_so_far(&self) -> Option<Progress> {
        if self.heard.starts_with(READY) {
            return Some(Progress::Ready);
        }
        let reason = self.heard.strip_prefix(FAILED)?;
        let end = reason.iter().position(|&b| b == b'\n')?;
        Some(Progress::Failed(
            String::from_utf8_lossy(&reason[..end]).into_owned(),
        ))
    }

    /// Kills it (and, through their parent-death signal, its workers) and reaps it.
    pub(crate) fn abandon(&self) -> Option<super::core::ExitStatus> {
        let _ = spawn::pidfd_signal(&self.pidfd, libc::SIGKILL);
        for _ in 0..200 {
            if let Some(status) = spawn::try_reap(&self.pidfd) {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        None
    }

    /// Reaps it if it has exited.
    pub(crate) fn exited(&self) -> Option<super::core::ExitStatus> {
        spawn::try_reap(&self.pidfd)
    }

    /// Whether it has exited, without reaping it.
    pub(crate) fn has_exited(&self) -> bool {
        spawn::has_exited(&self.pidfd)
    }
}

/// The new primary's view: what its predecessor handed down.
#[derive(Debug)]
pub(crate) struct Inheritance {
    /// The predecessor's pid.
    pub from: i32,
    /// Readable once the predecessor has exited.
    pub predecessor: Option<OwnedFd>,
    ready: Option<File>,
    /// The status listener, still listening.
    pub status: Option<std::net::TcpListener>,
    /// The pid file, locked.
    pub pid_file: Option<File>,
    /// Slots whose workers say `ready` under the predecessor.
    pub says_ready: Vec<usize>,
    /// Each slot's generation under the predecessor.
    pub generations: Vec<(usize, u64)>,
}

/// The QUIC stateless-reset key a predecessor handed down (`STEER_QUIC_RESET_KEY`), if
/// this process is a successor and the value is one.
pub(crate) fn inherited_reset_key() -> Option<crate::quic::ResetKey> {
    std::env::var(ENV_FROM).ok()?;
    crate::quic::ResetKey::from_hex(&std::env::var(crate::quic::ENV_RESET_KEY).ok()?)
}

impl Inheritance {
    /// What this process inherited, if it was started as a successor. The fds are taken
    /// at the numbers the environment names, and checked to be what they claim.
    pub(crate) fn take() -> Option<Inheritance> {
        let from: i32 = std::env::var(ENV_FROM).ok()?.parse().ok()?;
        let fd = |name: &str| -> Option<OwnedFd> {
            let number: RawFd = std::env::var(name).ok()?.parse().ok()?;
            // SAFETY: F_GETFD only reads the flags of an fd number.
            if number < 3 || unsafe { libc::fcntl(number, libc::F_GETFD) } < 0 {
                return None;
            }
            // SAFETY: the predecessor placed this fd here for this process alone, and
            // nothing else in it refers to the number: it is taken exactly once.
            Some(unsafe { OwnedFd::from_raw_fd(number) })
        };
        let ready = fd(ENV_READY_FD).map(File::from);
        let status = fd(ENV_STATUS_FD).map(std::net::TcpListener::from);
        let pid_file = fd(ENV_PID_FILE_FD).map(File::from);
        for file in [
            ready.as_ref().map(AsFd::as_fd),
            pid_file.as_ref().map(AsFd::as_fd),
        ]
        .into_iter()
        .flatten()
        {
            let _ = set_cloexec(file);
        }
        if let Some(listener) = &status {
            let _ = set_cloexec(listener.as_fd());
        }
        let says_ready = std::env::var(ENV_SAYS_READY)
            .unwrap_or_default()
            .split(',')
            .filter_map(|index| index.parse().ok())
            .collect();
        let generations = std::env::var(ENV_GENERATIONS)
            .unwrap_or_default()
            .split(',')
            .filter_map(|pair| {
                let (slot, generation) = pair.split_once(':')?;
                Some((slot.parse().ok()?, generation.parse().ok()?))
            })
            .collect();
        Some(Inheritance {
            from,
            predecessor: spawn::pidfd_open(from).ok(),
            ready,
            status,
            pid_file,
            says_ready,
            generations,
        })
    }

    /// Tells the predecessor this primary has taken over.
    pub(crate) fn announce_ready(&mut self) -> io::Result<()> {
        let Some(mut pipe) = self.ready.take() else {
            return Ok(());
        };
        pipe.write_all(READY)
    }

    /// Tells the predecessor this primary cannot have every slot ready, and why: it kills
    /// this one and keeps serving. Said once; false if nobody heard it.
    pub(crate) fn announce_failure(&mut self, why: &str) -> bool {
        let Some(mut pipe) = self.ready.take() else {
            return false;
        };
        let mut word = FAILED.to_vec();
        word.extend(
            why.bytes()
                .filter(|&b| b != b'\n')
                .take(MOST_SAID - FAILED.len() - 1),
        );
        word.push(b'\n');
        pipe.write_all(&word).is_ok()
    }
}

/// Whether `pid` is a primary started as a successor (an upgrade): its environment,
/// fixed at its `execve`, names the primary it took over from. Workers never carry the
/// variable ([`ENV`] is removed from theirs).
pub(crate) fn is_successor_primary(pid: i32) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let marker = format!("{ENV_FROM}=");
    environ
        .split(|&b| b == 0)
        .any(|entry| entry.starts_with(marker.as_bytes()))
}

fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}
