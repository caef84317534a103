//! Health: heartbeats, hung workers and the memory limit.
//!
//! Every `--health-interval` the primary pings each worker that speaks the IPC protocol
//! and reads each serving worker's resident memory. A serving worker that has answered
//! pings before and then stays silent for `--health-timeout` is **hung**. The primary does
//! not wait for a replacement to react:
//!
//! 1. the slot leaves steering, so the program sends it nothing new;
//! 2. the worker's listening socket is taken from it (`pidfd_getfd(2)`) and shut down
//!    (`shutdown(SHUT_RD)`), which closes the listener in the kernel: the connections
//!    queued on it migrate to the live workers at once, and in `kernel` mode it also
//!    leaves the `SO_REUSEPORT` group;
//! 3. a replacement starts; once it is ready the hung process is asked to drain, and is
//!    SIGKILLed after `--shutdown-timeout` if it cannot.
//!
//! Connections the hung worker had already accepted stay with it: if it wakes up it
//! finishes them, otherwise they end with it.
//!
//! A worker whose resident set passes `--max-memory` is replaced gracefully: the new
//! generation registers first, then the old one drains.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use super::slot::{Phase, Process};
use super::supervisor::{ClusterPhase, Supervisor};
use crate::ipc::Message;
use crate::steering::holder::{find_socket_fd, pidfd_getfd};

/// The inode of a socket, which names it in `/proc/<pid>/fd` (`socket:[inode]`).
pub(super) fn socket_inode(fd: &OwnedFd) -> Option<u64> {
    crate::steering::holder::socket_inode(fd).ok()
}

impl Supervisor {
    /// The heartbeat tick: pings every process that speaks the protocol, repeats drain
    /// requests, and checks the memory limit.
    pub(super) fn send_pings(&mut self, now: Instant) {
        self.ping_seq += 1;
        let seq = self.ping_seq;
        for slot in &mut self.slots {
            for process in slot.processes_mut() {
                if !process.speaks_ipc || process.killed {
                    continue;
                }
                let _full_or_gone = process.channel.send(&Message::Ping { seq });
                if process.phase == Phase::Draining {
                    // A drain request can be lost to a full socket; repeating it is harmless.
                    let _full_or_gone = process.channel.send(&Message::Drain);
                }
            }
        }
        if self.config.max_memory.is_some() {
            for index in 0..self.slots.len() {
                self.check_memory(index);
            }
        }
        // Takeovers are logged and counted by steering itself.
        if let Err(err) = self.steering.ensure_program(self.listen) {
            tracing::warn!("cannot check who decides for the port's group: {err}");
        }
        if let Err(err) = self.steering.reconcile_load(self.listen) {
            tracing::warn!("cannot settle the load records: {err}");
        }
        self.check_health(now);
    }

    /// Declares hung every serving process silent for longer than `--health-timeout`.
    /// Runs on every turn of the loop, so a hang is acted on when its deadline passes, not
    /// at the next ping.
    pub(super) fn check_health(&mut self, now: Instant) {
        if self.phase != ClusterPhase::Running {
            return;
        }
        let timeout = self.config.health_timeout;
        let mut silent: Vec<usize> = Vec::new();
        let mut live = 0;
        for slot in &self.slots {
            let Some(process) = slot.current.as_ref() else {
                continue;
            };
            if process.phase == Phase::Ready && !process.hung {
                live += 1;
            }
            if watched_for_hangs(process)
                && now.saturating_duration_since(process.last_heard) > timeout
            {
                silent.push(slot.index);
            }
        }
        // When most workers fall silent together, the host (or this primary) is more
        // likely stalled than most workers hung, and taking them out would leave the
        // rest, or nobody, to serve everything. So a minority of silent workers is taken
        // out at once; a majority (which includes the only worker of a one-worker
        // cluster) stays in steering while replacements start, and each hands its queue
        // over only if it is still silent when its replacement is ready.
        if silent.len() * 2 <= live {
            for index in silent {
                self.declare_hung(index);
            }
        } else {
            for index in silent {
                self.replace_silent_in_place(index, live);
            }
        }
    }

    /// A silent worker among a silent majority stays in steering; a replacement is
    /// started, and takes its queue when it is ready (see [`Supervisor::retire_silent`]).
    fn replace_silent_in_place(&mut self, index: usize, live: usize) {
        let slot = &mut self.slots[index];
        if slot.replace_wanted {
            return;
        }
        slot.replace_wanted = true;
        tracing::warn!(
            slot = index,
            "worker has not answered heartbeats for {}, nor have most of the {live} serving: \
             keeping it in steering while a replacement starts (host overloaded?)",
            humantime::format_duration(self.config.health_timeout)
        );
    }

    /// Called when `old` is replaced: if it is still silent, its listener is shut down so
    /// its queue moves to the replacement now rather than when it is killed.
    pub(super) fn retire_silent(index: usize, old: &Process, now: Instant, timeout: Duration) {
        let silent = old.answers_pings && now.saturating_duration_since(old.last_heard) > timeout;
        if old.hung || !silent {
            return;
        }
        match shut_down_listener(old) {
            Ok(()) => tracing::info!(
                slot = index,
                pid = old.pid,
                "shut the silent worker's listener down; its queue moved to its replacement"
            ),
            Err(err) => tracing::warn!(
                slot = index,
                pid = old.pid,
                "cannot shut the silent worker's listener down: {err}"
            ),
        }
    }

    /// When the next serving process turns hung if it stays silent.
    pub(super) fn next_health_deadline(&self) -> Option<Instant> {
        if self.phase != ClusterPhase::Running {
            return None;
        }
        self.slots
            .iter()
            .filter_map(|slot| slot.current.as_ref())
            .filter(|p| watched_for_hangs(p))
            .map(|p| p.last_heard + self.config.health_timeout)
            .min()
    }

    fn declare_hung(&mut self, index: usize) {
        let timeout = self.config.health_timeout;
        let Some(process) = self.slots[index].current.as_mut() else {
            return;
        };
        process.hung = true;
        let pid = process.pid;
        tracing::warn!(
            slot = index,
            pid,
            generation = process.generation,
            "worker has not answered heartbeats for {}: hung; taking it out of steering \
             and replacing it",
            humantime::format_duration(timeout)
        );
        // Out of the live set first, so the program never picks it for its own migrating
        // queue.
        self.leave_steering(index);
        let Some(process) = self.slots[index].current.as_ref() else {
            return;
        };
        match shut_down_listener(process) {
            Ok(()) => tracing::info!(
                slot = index,
                pid,
                "shut the hung worker's listener down; its queued connections moved to \
                 the live workers"
            ),
            Err(err) => tracing::warn!(
                slot = index,
                pid,
                "cannot shut the hung worker's listener down ({err}); its queued \
                 connections wait for it to wake or die"
            ),
        }
        self.slots[index].replace_wanted = true;
    }

    /// Asks for a graceful replacement of a serving process over `--max-memory`.
    fn check_memory(&mut self, index: usize) {
        let Some(limit) = self.config.max_memory else {
            return;
        };
        if self.phase != ClusterPhase::Running {
            return;
        }
        let slot = &mut self.slots[index];
        let Some(process) = slot.current.as_mut() else {
            return;
        };
        if process.phase != Phase::Ready || process.over_memory || process.hung {
            return;
        }
        let Some(rss) = process.memory.as_ref().and_then(ResidentMemory::bytes) else {
            return;
        };
        if rss <= limit {
            return;
        }
        process.over_memory = true;
        tracing::warn!(
            slot = index,
            pid = process.pid,
            rss_bytes = rss,
            limit_bytes = limit,
            "worker passed --max-memory: replacing it gracefully"
        );
        slot.replace_wanted = true;
    }
}

/// A serving process whose silence means it is stuck: ready, answering pings so far, and
/// not already declared hung or killed.
fn watched_for_hangs(process: &Process) -> bool {
    process.phase == Phase::Ready && process.answers_pings && !process.hung && !process.killed
}

/// Takes the worker's listening socket from it and shuts it down, so its queue migrates
/// to the live workers and it receives nothing more.
fn shut_down_listener(process: &Process) -> io::Result<()> {
    let inode = process
        .listener_inode
        .ok_or_else(|| io::Error::other("its listening socket was never recorded"))?;
    let target = find_socket_fd(process.pid, inode)?;
    let socket = pidfd_getfd(process.pidfd.as_fd(), target)?;
    socket2::SockRef::from(&socket).shutdown(std::net::Shutdown::Read)
}

/// A process's `/proc/<pid>/statm`, opened once and re-read from offset 0 (the kernel
/// regenerates it on each read), so each check is one `pread(2)` into a stack buffer.
#[derive(Debug)]
pub(crate) struct ResidentMemory {
    statm: File,
    page_size: u64,
}

impl ResidentMemory {
    /// Opens `/proc/<pid>/statm`; `None` if the process is already gone.
    pub(crate) fn open(pid: i32) -> Option<ResidentMemory> {
        let statm = File::open(format!("/proc/{pid}/statm")).ok()?;
        // SAFETY: sysconf has no preconditions.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Some(ResidentMemory {
            statm,
            page_size: u64::try_from(page_size).unwrap_or(4096),
        })
    }

    /// Resident memory in bytes now; `None` once the process has exited.
    pub(crate) fn bytes(&self) -> Option<u64> {
        let mut buf = [0u8; 128];
        let n = self.statm.read_at(&mut buf, 0).ok()?;
        resident_pages(&buf[..n]).map(|pages| pages * self.page_size)
    }
}

/// The second field of a `statm` line (resident pages), parsed without allocating.
fn resident_pages(statm: &[u8]) -> Option<u64> {
    let field = statm
        .split(|&b| b == b' ')
        .filter(|f| !f.is_empty())
        .nth(1)?;
    let mut pages: u64 = 0;
    for &b in field.iter().take_while(|b| b.is_ascii_digit()) {
        pages = pages.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statm_resident_field_is_the_second() {
        assert_eq!(resident_pages(b"6613 1460 1054 205 0 621 0\n"), Some(1460));
        assert_eq!(resident_pages(b"1 2\n"), Some(2));
        assert_eq!(resident_pages(b"1"), None);
    }

    #[test]
    fn own_resident_memory_is_read_and_tracks_growth() {
        let memory = ResidentMemory::open(std::process::id() as i32).expect("own statm");
        let before = memory.bytes().expect("rss");
        assert!(before > 0);
        let block = vec![1u8; 64 << 20];
        let after = memory.bytes().expect("rss");
        assert!(
            after >= before + (60 << 20),
            "64 MiB touched, rss {before} -> {after}"
        );
        drop(block);
    }

    #[test]
    fn a_listener_taken_with_pidfd_getfd_and_shut_down_stops_listening() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let inode =
            socket_inode(&OwnedFd::from(listener.try_clone().expect("dup"))).expect("inode");
        let pid = std::process::id() as i32;
        let fd = find_socket_fd(pid, inode).expect("found in /proc/self/fd");
        let pidfd = super::super::spawn::pidfd_open(pid).expect("pidfd_open");
        let socket = pidfd_getfd(pidfd.as_fd(), fd).expect("pidfd_getfd");
        socket2::SockRef::from(&socket)
            .shutdown(std::net::Shutdown::Read)
            .expect("shutdown");
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "a shut-down listener must refuse"
        );
        let err = listener
            .accept()
            .expect_err("accept on a shut-down listener");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }
}
