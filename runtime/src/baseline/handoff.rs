//! The `userspace` baseline's work in the primary: accept every connection and pass it to
//! the next ready worker over its IPC socket.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::accept::AcceptPause;
use crate::ipc::{Channel, IpcError, Message};

/// Most connections accepted per wakeup, so a flood cannot starve signals, exits and
/// heartbeats in the primary's loop; the rest are taken on the next turn of the loop.
const ACCEPT_BUDGET: usize = 128;

/// How soon to retry when no worker could take a connection (every IPC socket full, or no
/// worker ready): the connection waits in the primary and the rest in the kernel's queue.
const RETRY_FULL: Duration = Duration::from_millis(2);

/// A worker that may receive connections: the serving process of a ready slot.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Its slot.
    pub slot: usize,
    /// The primary's end of its IPC socket.
    pub channel: &'a Channel,
}

/// The listening socket and the round-robin state.
#[derive(Debug)]
pub struct HandOff {
    listener: Socket,
    /// Slot of the worker that got the last connection.
    last: Option<usize>,
    /// Accepted connections no worker could take yet, oldest first.
    waiting: VecDeque<OwnedFd>,
    /// The accept budget ran out: the kernel's queue may hold more, and an edge-triggered
    /// poll will not say so again.
    more: bool,
    /// Accepting paused after `accept` ran out of descriptors or memory.
    pause: AcceptPause,
    handed: u64,
}

impl HandOff {
    /// Takes the (non-blocking, listening) socket.
    pub fn new(listener: Socket) -> HandOff {
        HandOff {
            listener,
            last: None,
            waiting: VecDeque::new(),
            more: false,
            pause: AcceptPause::default(),
            handed: 0,
        }
    }

    /// The listening socket's fd, to watch it.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Connections handed to workers so far.
    pub fn handed(&self) -> u64 {
        self.handed
    }

    /// Accepts (`accept4(SOCK_CLOEXEC)`) and hands out connections round-robin over
    /// `targets` (in slot order), `sendmsg` with `SCM_RIGHTS` each, then closes the
    /// primary's copy. A worker whose IPC socket is full is skipped; when none can take a
    /// connection it waits here, and accepting stops until [`HandOff::retry_at`]. Out of
    /// descriptors, accepting pauses (`crate::accept`) instead of failing again at once.
    pub fn hand_off(&mut self, targets: &[Target<'_>]) {
        self.more = false;
        let now = Instant::now();
        self.pause.expire(now);
        for _ in 0..ACCEPT_BUDGET {
            let connection = match self.waiting.pop_front() {
                Some(connection) => connection,
                None if self.pause.is_paused(now) => return,
                None => match self.listener.accept() {
                    Ok((socket, _peer)) => OwnedFd::from(socket),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                    Err(err)
                        if matches!(
                            err.kind(),
                            io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                        ) =>
                    {
                        continue;
                    }
                    // Out of descriptors or memory, typically: retrying at once would spin.
                    Err(err) => {
                        self.pause.failed(now, "userspace baseline", &err);
                        return;
                    }
                },
            };
            if let Err(connection) = self.send(connection, targets) {
                self.waiting.push_front(connection);
                return;
            }
        }
        self.more = true;
    }

    /// Sends `connection` to the first target after the last one served that takes it.
    fn send(&mut self, connection: OwnedFd, targets: &[Target<'_>]) -> Result<(), OwnedFd> {
        let start = self
            .last
            .and_then(|last| targets.iter().position(|t| t.slot > last))
            .unwrap_or(0);
        for i in 0..targets.len() {
            let target = targets[(start + i) % targets.len()];
            match target
                .channel
                .send_with_fd(&Message::Connection, connection.as_fd())
            {
                Ok(()) => {
                    self.last = Some(target.slot);
                    self.handed += 1;
                    return Ok(());
                }
                // Full: try the next worker. Gone: its exit arrives on the pidfd.
                Err(IpcError::Full | IpcError::Closed | IpcError::Io { .. }) => continue,
                Err(err) => {
                    tracing::warn!(slot = target.slot, "cannot hand a connection over: {err}");
                }
            }
        }
        Err(connection)
    }

    /// When the primary's loop should call [`HandOff::hand_off`] again without an event.
    pub fn retry_at(&self, now: Instant) -> Option<Instant> {
        if let Some(resume) = self.pause.resumes_at() {
            // Nothing says when descriptors are free again: look when the pause is over.
            Some(resume.max(now))
        } else if self.more {
            Some(now)
        } else if !self.waiting.is_empty() {
            Some(now + RETRY_FULL)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;

    fn listening() -> (Socket, std::net::SocketAddr) {
        let socket = crate::listener::bind_reuseport("127.0.0.1:0".parse().expect("addr"), true)
            .expect("bind");
        socket.set_nonblocking(true).expect("nonblocking");
        let addr = socket.local_addr().expect("addr").as_socket().expect("ip");
        (socket, addr)
    }

    fn received(channel: &Channel) -> OwnedFd {
        let received = channel.recv().expect("recv").expect("a message is queued");
        assert_eq!(received.message, Message::Connection);
        received
            .fd
            .expect("the connection travels beside the message")
    }

    #[test]
    fn connections_go_round_robin_and_wait_when_no_worker_can_take_them() {
        let (listener, addr) = listening();
        let mut handoff = HandOff::new(listener);
        let (primary_a, worker_a) = Channel::pair().expect("pair");
        let (primary_b, worker_b) = Channel::pair().expect("pair");
        worker_a.set_nonblocking(true).expect("nonblocking");
        worker_b.set_nonblocking(true).expect("nonblocking");

        let clients: Vec<TcpStream> = (0..4)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        // No worker: the first connection waits in the primary, the rest in the kernel.
        let deadline = Instant::now() + Duration::from_secs(5);
        while handoff.waiting.is_empty() {
            handoff.hand_off(&[]);
            assert!(Instant::now() < deadline, "nothing was accepted");
        }
        assert!(handoff.retry_at(Instant::now()).is_some());

        let targets = [
            Target {
                slot: 0,
                channel: &primary_a,
            },
            Target {
                slot: 1,
                channel: &primary_b,
            },
        ];
        while handoff.handed() < 4 {
            handoff.hand_off(&targets);
            assert!(
                Instant::now() < deadline,
                "only {} handed",
                handoff.handed()
            );
        }
        assert_eq!(handoff.retry_at(Instant::now()), None);
        let to_a = [received(&worker_a), received(&worker_a)];
        let to_b = [received(&worker_b), received(&worker_b)];
        assert!(worker_a.recv().expect("recv").is_none(), "two each");
        assert!(worker_b.recv().expect("recv").is_none(), "two each");

        // The handed fd is the client's connection: what it writes arrives there.
        let mut mine = clients;
        mine[0].write_all(b"ping").expect("write");
        let mut served = TcpStream::from(to_a.into_iter().next().expect("fd"));
        let mut buf = [0u8; 4];
        served.set_nonblocking(false).expect("blocking");
        served.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"ping", "the first connection went to slot 0");
        drop(to_b);
    }
}
