//! One end of a primary <-> worker `SOCK_SEQPACKET` socketpair.
//!
//! `SOCK_SEQPACKET` keeps message boundaries (one `send` is one `recv`), is reliable and
//! ordered, and reports the peer's death as end-of-file, so the protocol needs no framing
//! and a worker notices at once when its primary is gone.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::cmsg_space;
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use thiserror::Error;

use super::message::{Envelope, MAX_MESSAGE_BYTES, Message, PROTOCOL_VERSION};

/// Most fds accepted beside one message; more is a protocol violation (they are closed).
const MAX_FDS: usize = 1;

/// `SCM_MAX_FD`: the most fds the kernel passes in one message. The receive buffer has room
/// for all of them, so control data is never truncated: a truncated message would leave
/// installed fds that nix cannot hand back, leaking them (possibly a listening socket).
const SCM_MAX_FD: usize = 253;

/// Everything that can go wrong on an IPC channel.
#[derive(Debug, Error)]
pub enum IpcError {
    /// The peer closed its end (exited, or the primary died).
    #[error("the peer closed the IPC socket")]
    Closed,
    /// A system call on the socket failed.
    #[error("IPC socket {op} failed")]
    Io {
        /// `sendmsg` or `recvmsg`.
        op: &'static str,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// A datagram larger than [`MAX_MESSAGE_BYTES`] (or with too many fds) arrived.
    #[error("oversized IPC message (limit {MAX_MESSAGE_BYTES} bytes, {MAX_FDS} fds)")]
    Oversized,
    /// The datagram is not a JSON protocol message.
    #[error("malformed IPC message {preview:?}")]
    Malformed {
        /// The start of the datagram, for the log.
        preview: String,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
    /// The message is well-formed but speaks another protocol version.
    #[error("IPC protocol version {got}, this build speaks {PROTOCOL_VERSION}")]
    Version {
        /// The `v` the peer sent.
        got: u32,
    },
}

/// A message as received, with the fd that travelled beside it, if any.
#[derive(Debug)]
pub struct Received {
    /// The decoded message.
    pub message: Message,
    /// The fd passed with `SCM_RIGHTS`; received with `FD_CLOEXEC` set.
    pub fd: Option<OwnedFd>,
}

/// One end of an IPC socketpair.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// Creates a connected pair with `socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)`.
    /// Both ends block; see [`Channel::set_nonblocking`].
    pub fn pair() -> std::io::Result<(Channel, Channel)> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Wraps an fd inherited from the primary (the worker side: `STEER_IPC_FD`).
    pub fn from_owned(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    /// Takes ownership of a raw fd number inherited from the parent.
    ///
    /// # Safety
    /// `fd` must be an open IPC socket that nothing else in the process owns or closes.
    pub unsafe fn from_raw_fd(fd: RawFd) -> Channel {
        Channel {
            // SAFETY: the caller guarantees exclusive ownership of an open fd.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        }
    }

    /// Sets or clears `O_NONBLOCK` (`fcntl(F_SETFL)`).
    pub fn set_nonblocking(&self, nonblocking: bool) -> std::io::Result<()> {
        set_nonblocking(self.fd.as_fd(), nonblocking)
    }

    /// Sends one message (`sendmsg` with `MSG_NOSIGNAL`). On a non-blocking channel whose
    /// buffer is full this fails with `WouldBlock` inside [`IpcError::Io`].
    pub fn send(&self, message: &Message) -> Result<(), IpcError> {
        self.send_inner(message, None)
    }

    /// Sends one message with an fd attached as `SCM_RIGHTS`.
    pub fn send_with_fd(&self, message: &Message, fd: BorrowedFd<'_>) -> Result<(), IpcError> {
        self.send_inner(message, Some(fd))
    }

    fn send_inner(&self, message: &Message, fd: Option<BorrowedFd<'_>>) -> Result<(), IpcError> {
        let envelope = Envelope {
            v: PROTOCOL_VERSION,
            message: message.clone(),
        };
        let bytes = serde_json::to_vec(&envelope).map_err(|source| IpcError::Malformed {
            preview: format!("{message:?}"),
            source,
        })?;
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(IpcError::Oversized);
        }
        let raw_fds: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
        let cmsgs: Vec<ControlMessage<'_>> = if raw_fds.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&raw_fds)]
        };
        let iov = [IoSlice::new(&bytes)];
        loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(IpcError::Closed),
                Err(errno) => {
                    return Err(IpcError::Io {
                        op: "sendmsg",
                        source: errno.into(),
                    });
                }
            }
        }
    }

    /// Receives one message (`recvmsg` with `MSG_CMSG_CLOEXEC`).
    ///
    /// Returns `Ok(None)` when a non-blocking channel has nothing queued. Every fd that
    /// arrives is owned by the result (or closed on error), so a misbehaving peer cannot
    /// leak descriptors into this process.
    pub fn recv(&self) -> Result<Option<Received>, IpcError> {
        let mut buf = vec![0u8; MAX_MESSAGE_BYTES + 1];
        let mut cmsg_buf = cmsg_space!([RawFd; SCM_MAX_FD]);
        let (len, truncated, mut fds) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_buf),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    // `cmsgs()` refuses (ENOBUFS) when the kernel truncated the control data,
                    // which the buffer size rules out (see SCM_MAX_FD).
                    let cmsgs_ok = match msg.cmsgs() {
                        Ok(cmsgs) => {
                            for cmsg in cmsgs {
                                if let ControlMessageOwned::ScmRights(raw) = cmsg {
                                    // SAFETY: SCM_RIGHTS just installed these fds in this
                                    // process and nothing else refers to them.
                                    fds.extend(
                                        raw.into_iter()
                                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                                    );
                                }
                            }
                            true
                        }
                        Err(_) => false,
                    };
                    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC) || !cmsgs_ok;
                    break (msg.bytes, truncated, fds);
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::ECONNRESET) => return Err(IpcError::Closed),
                Err(errno) => {
                    return Err(IpcError::Io {
                        op: "recvmsg",
                        source: errno.into(),
                    });
                }
            }
        };
        if len == 0 && fds.is_empty() && !truncated {
            return Err(IpcError::Closed);
        }
        if truncated || len > MAX_MESSAGE_BYTES || fds.len() > MAX_FDS {
            return Err(IpcError::Oversized);
        }
        let bytes = &buf[..len];
        let envelope: Envelope = match serde_json::from_slice(bytes) {
            Ok(envelope) => envelope,
            Err(source) => {
                // Tell a version mismatch from garbage: a newer peer's message may carry
                // fields or types this build does not know.
                if let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes)
                    && let Some(v) = value.get("v").and_then(serde_json::Value::as_u64)
                    && v != u64::from(PROTOCOL_VERSION)
                {
                    return Err(IpcError::Version {
                        got: u32::try_from(v).unwrap_or(u32::MAX),
                    });
                }
                let preview = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
                return Err(IpcError::Malformed { preview, source });
            }
        };
        if envelope.v != PROTOCOL_VERSION {
            return Err(IpcError::Version { got: envelope.v });
        }
        Ok(Some(Received {
            message: envelope.message,
            fd: fds.pop(),
        }))
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Channel> for OwnedFd {
    fn from(channel: Channel) -> OwnedFd {
        channel.fd
    }
}

/// `fcntl(F_SETFL)` toggling `O_NONBLOCK`.
fn set_nonblocking(fd: BorrowedFd<'_>, nonblocking: bool) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    let flags = if nonblocking {
        flags | OFlag::O_NONBLOCK
    } else {
        flags - OFlag::O_NONBLOCK
    };
    fcntl(fd, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;

    use super::*;
    use crate::ipc::Counters;

    #[test]
    fn message_and_fd_cross_the_pair() {
        let (a, b) = Channel::pair().expect("socketpair");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        a.send_with_fd(&Message::Register { pid: 42, fd: None }, listener.as_fd())
            .expect("send");
        let got = b.recv().expect("recv").expect("a message");
        assert_eq!(got.message, Message::Register { pid: 42, fd: None });
        let fd = got.fd.expect("fd attached");
        let flags = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("getfd");
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received fds must be close-on-exec"
        );
        let received = TcpListener::from(fd);
        assert_eq!(
            received.local_addr().expect("addr"),
            listener.local_addr().expect("addr")
        );

        b.send(&Message::Pong {
            seq: 1,
            counters: Counters {
                accepted: 3,
                active: 1,
                requests: 9,
            },
        })
        .expect("send");
        let got = a.recv().expect("recv").expect("a message");
        assert!(
            matches!(got.message, Message::Pong { seq: 1, counters } if counters.requests == 9)
        );
        assert!(got.fd.is_none());
    }

    #[test]
    fn a_message_with_too_many_fds_is_refused_and_leaks_none_of_them() {
        let (a, b) = Channel::pair().expect("socketpair");
        let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
        let copies: Vec<OwnedFd> = (0..5)
            .map(|_| write_end.try_clone().expect("dup"))
            .collect();
        let raw: Vec<RawFd> = copies.iter().map(AsRawFd::as_raw_fd).collect();
        let bytes = br#"{"v":1,"type":"ready"}"#;
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(bytes)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        drop(copies);
        drop(write_end);
        assert!(matches!(b.recv(), Err(IpcError::Oversized)));
        // If any received copy of the write end were still open here, this read would block
        // instead of seeing end-of-file.
        set_nonblocking(read_end.as_fd(), true).expect("nonblocking");
        let mut buf = [0u8; 1];
        assert_eq!(
            nix::unistd::read(&read_end, &mut buf),
            Ok(0),
            "a received fd leaked"
        );
    }

    #[test]
    fn nonblocking_empty_channel_yields_none() {
        let (a, _b) = Channel::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        assert!(a.recv().expect("recv").is_none());
    }

    #[test]
    fn peer_close_is_reported() {
        let (a, b) = Channel::pair().expect("socketpair");
        drop(b);
        assert!(matches!(a.recv(), Err(IpcError::Closed)));
        assert!(matches!(
            a.send(&Message::Ready { heartbeats: false }),
            Err(IpcError::Closed)
        ));
    }

    #[test]
    fn garbage_oversize_and_wrong_version_are_errors_not_panics() {
        let (a, b) = Channel::pair().expect("socketpair");
        let mut raw = std::fs::File::from(OwnedFd::from(a));
        raw.write_all(b"\x00\xffnot json").expect("write");
        assert!(matches!(b.recv(), Err(IpcError::Malformed { .. })));
        raw.write_all(&vec![b' '; MAX_MESSAGE_BYTES + 10])
            .expect("write");
        assert!(matches!(b.recv(), Err(IpcError::Oversized)));
        raw.write_all(br#"{"v":9,"type":"warp"}"#).expect("write");
        assert!(matches!(b.recv(), Err(IpcError::Version { got: 9 })));
        raw.write_all(br#"{"v":1,"type":"ready"}"#).expect("write");
        assert_eq!(
            b.recv().expect("recv").expect("msg").message,
            Message::Ready { heartbeats: false }
        );
    }
}
