//! One worker process as the host holds it: its pid and pidfd, its process group, its IPC
//! channel, the socket it registered, and the files the primary reads about it.
//!
//! A worker is its **process group**: each worker is started in a group of its own
//! (`setpgid(0, 0)` before `execve`), and drain, kill and the clean-up after its exit all
//! reach the whole group, so a shell wrapper (`sh -c 'app; true'`) or an app that forks
//! helpers leaves nothing behind. The group is signalled while its leader is still
//! unreaped (or while members remain), so its number cannot have been reused.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use super::core::{ExitStatus, ListenerError, WorkerId};
use crate::ipc::Channel;
use crate::sys::borrow;
pub(crate) use crate::sys::memory::ResidentMemory;

/// The worker's listening socket, as the primary can find it again in the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListenerRef {
    /// Its inode, which names the socket whatever fd it sits at.
    pub inode: u64,
    /// The fd number the worker holds it at (3 for an external worker; what `register`
    /// said for a built-in or library one).
    pub fd: RawFd,
}

/// One worker process.
#[derive(Debug)]
pub(crate) struct Process {
    /// The core's name for it.
    pub id: WorkerId,
    /// Its slot.
    pub slot: usize,
    /// Its generation.
    pub generation: u64,
    /// Its pid, which is also its process group id.
    pub pid: i32,
    /// `pidfd_open(pid)`: readable when it exits; signals through it never hit a reused pid.
    pub pidfd: OwnedFd,
    /// The primary's end of its IPC socket.
    pub channel: Channel,
    /// Its sockets, one per listener in the listeners' order: what it registered (or,
    /// external, what was made for it), each held until the slot is in steering.
    pub sockets: Vec<Option<OwnedFd>>,
    /// Where each of its sockets is (per listener), to attach a program through it or to
    /// shut a hung worker's listeners down.
    pub listeners: Vec<Option<ListenerRef>>,
    /// Its `/proc/<pid>/statm`, kept open to read resident memory without allocating.
    pub memory: Option<ResidentMemory>,
    /// The read end of the pipe its `execve` reports a failure on (closed on success).
    pub exec_report: Option<File>,
    /// The executable it was started from.
    pub program: std::path::PathBuf,
    /// An external program (drain is SIGTERM to its group).
    pub external: bool,
    /// Its IPC is still read.
    pub ipc_watched: bool,
    /// What it may still relay to other workers, or hand to the primary's hook.
    pub budget: RelayBudget,
    /// A ping its socket could not take when it was sent: sent again before anything else
    /// goes to it, so a worker flooded with user messages still hears its heartbeat (the
    /// core keeps the time of the first attempt, so a worker that reads nothing is still
    /// hung after `health-timeout`).
    pub unsent_ping: Option<u64>,
}

impl Process {
    /// Sends `signal` to the worker's process group, or to the process alone if the group
    /// is gone (it left its group). `ESRCH` means everything is gone already.
    pub(crate) fn signal_group(&self, signal: libc::c_int) -> io::Result<()> {
        match signal_group(self.pid, signal) {
            Err(err) if err.raw_os_error() == Some(libc::ESRCH) => {
                super::spawn::pidfd_signal(&self.pidfd, signal)
            }
            other => other,
        }
    }

    /// Sends `ping`, or keeps it to send again ([`Process::resend_ping`]) if its socket is
    /// full.
    pub(crate) fn ping(&mut self, seq: u64) {
        self.unsent_ping = Some(seq);
        self.resend_ping();
    }

    /// Sends the ping its socket could not take, if any. Whether none waits any longer:
    /// until it does, nothing else is sent to this worker.
    pub(crate) fn resend_ping(&mut self) -> bool {
        let Some(seq) = self.unsent_ping else {
            return true;
        };
        if self
            .channel
            .send(&crate::ipc::Message::Ping { seq })
            .is_ok()
        {
            self.unsent_ping = None;
        }
        self.unsent_ping.is_none()
    }

    /// The executable, for messages.
    pub(crate) fn program_name(&self) -> std::path::Display<'_> {
        self.program.display()
    }

    /// Reaps it if it has exited (see [`super::spawn::try_reap`]).
    pub(crate) fn try_reap(&self) -> Option<ExitStatus> {
        super::spawn::try_reap(&self.pidfd)
    }

    /// Whether it has exited (without reaping it: `WNOWAIT`).
    pub(crate) fn has_exited(&self) -> bool {
        super::spawn::has_exited(&self.pidfd)
    }

    /// What its `execve` reported, if it failed: read once, without blocking.
    pub(crate) fn exec_failure(&mut self) -> Option<String> {
        let mut pipe = self.exec_report.take()?;
        let mut report = [0u8; 8];
        match pipe.read(&mut report) {
            Ok(8) => Some(super::spawn::describe_exec_report(report)),
            _ => None,
        }
    }

    /// Whether it holds a socket for every listener (registered, or made for it).
    pub(crate) fn has_every_socket(&self) -> bool {
        self.sockets.iter().all(Option::is_some)
    }

    /// A copy of its socket of listener `index`, taken from it at the fd it is known to
    /// hold it at ([`borrow::socket_at`]). Close it soon: while the primary holds it, the
    /// socket outlives its worker.
    pub(crate) fn borrow_socket(&self, index: usize) -> Result<OwnedFd, ListenerError> {
        let listener = self
            .listeners
            .get(index)
            .copied()
            .flatten()
            .ok_or(ListenerError::Unrecorded)?;
        Ok(borrow::socket_at(
            self.pidfd.as_fd(),
            listener.fd,
            listener.inode,
        )?)
    }

    /// Takes its TCP listening sockets from it ([`Process::borrow_socket`]) and shuts them
    /// down, so their queues migrate to the live workers and they receive nothing more.
    /// Looks only at the fds it is known to hold the sockets at: a worker that moved one is
    /// not searched for. (A UDP socket has no queue to migrate; it is out of steering.)
    pub(crate) fn shut_down_listeners(&self, tcp: &[bool]) -> Result<(), ListenerError> {
        let mut result = Ok(());
        for (index, _) in tcp.iter().enumerate().filter(|(_, tcp)| **tcp) {
            let shut = self.borrow_socket(index).and_then(|socket| {
                socket2::SockRef::from(&socket)
                    .shutdown(std::net::Shutdown::Read)
                    .map_err(ListenerError::ShutDown)
            });
            if let Err(err) = shut {
                result = result.and(Err(err));
            }
        }
        result
    }
}

/// `kill(-pgid, signal)`.
pub(crate) fn signal_group(pgid: i32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory effects; a negative pid names a process group.
    if unsafe { libc::kill(-pgid, signal) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether any process is left in group `pgid` (`kill(-pgid, 0)`).
pub(crate) fn group_alive(pgid: i32) -> bool {
    !matches!(signal_group(pgid, 0), Err(err) if err.raw_os_error() == Some(libc::ESRCH))
}

/// What is left of a worker's group after its main process exited: given until `deadline`
/// to finish (a draining worker's children may still be answering), then killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Leftovers {
    /// The group.
    pub pgid: i32,
    /// Its slot, for the log.
    pub slot: usize,
    /// SIGKILL then.
    pub deadline: Instant,
    /// SIGKILL sent.
    pub killed: bool,
}

/// A token bucket: what a worker may relay to other workers. Broadcasts cost one token
/// per message and their size in bytes; what exceeds the budget is dropped and counted
/// against the sender's slot, so one chatty worker cannot flood the primary or the others.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RelayBudget {
    messages: f64,
    bytes: f64,
    refilled: Instant,
}

/// Messages a worker may relay per second (and hold in reserve).
pub(crate) const RELAY_MESSAGES_PER_SECOND: f64 = 1_000.0;
/// Bytes a worker may relay per second (and hold in reserve).
pub(crate) const RELAY_BYTES_PER_SECOND: f64 = 8.0 * 1024.0 * 1024.0;

impl RelayBudget {
    /// A full budget.
    pub(crate) fn new(now: Instant) -> RelayBudget {
        RelayBudget {
            messages: RELAY_MESSAGES_PER_SECOND,
            bytes: RELAY_BYTES_PER_SECOND,
            refilled: now,
        }
    }

    /// Takes one message of `len` bytes from the budget, if it is there.
    pub(crate) fn take(&mut self, len: usize, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.messages =
            (self.messages + elapsed * RELAY_MESSAGES_PER_SECOND).min(RELAY_MESSAGES_PER_SECOND);
        self.bytes = (self.bytes + elapsed * RELAY_BYTES_PER_SECOND).min(RELAY_BYTES_PER_SECOND);
        let len = len as f64;
        if self.messages < 1.0 || self.bytes < len {
            return false;
        }
        self.messages -= 1.0;
        self.bytes -= len;
        true
    }
}

/// How long a group left behind by a crashed worker gets after SIGKILL before the primary
/// stops waiting for it (SIGKILL cannot be refused; this only bounds a zombie's reaping).
pub(crate) const LEFTOVER_GRACE: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_budget_refills_with_time_and_refuses_past_it() {
        let t0 = Instant::now();
        let mut budget = RelayBudget::new(t0);
        let taken = (0..2_000).filter(|_| budget.take(10, t0)).count();
        assert_eq!(taken, RELAY_MESSAGES_PER_SECOND as usize);
        assert!(
            budget.take(10, t0 + Duration::from_millis(10)),
            "10 ms refills 10"
        );
        let mut bytes = RelayBudget::new(t0);
        assert!(bytes.take(RELAY_BYTES_PER_SECOND as usize, t0));
        assert!(!bytes.take(1, t0), "the byte budget is spent");
    }
}
