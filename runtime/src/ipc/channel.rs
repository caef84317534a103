//! One end of a primary <-> worker IPC socketpair, of either kind:
//!
//! - **datagram** (`SOCK_SEQPACKET`), for built-in and library workers: one `send` is one
//!   message, boundaries are kept, and a listening socket can travel beside a message;
//! - **stream** (`SOCK_STREAM`), for external workers: one message per line
//!   (newline-delimited JSON), which is what Node's `process.send` speaks when
//!   `NODE_CHANNEL_FD` names the socket. No fds travel on it.
//!
//! Both report the peer's death as end-of-file, and both look the same to the code that
//! holds a [`Channel`]: `send`, `recv`, `flush`. Each channel owns one receive buffer and
//! one send buffer, reused for every message, so exchanging pings and pongs allocates
//! nothing. On a non-blocking stream the kernel may take part of a line; the rest waits in
//! a bounded output buffer that [`Channel::flush`] drains when the socket is writable. A
//! message that does not fit there is dropped whole and counted, never cut.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use std::io::IoSlice;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, getsockopt, sendmsg, socketpair,
    sockopt,
};

use super::error::IpcError;
use super::message::{MAX_MESSAGE_BYTES, Message};
use super::{packet, stream, wire};

/// A message as received, with the fd that travelled beside it, if any.
#[derive(Debug)]
pub struct Received {
    /// The decoded message.
    pub message: Message,
    /// The fd passed with `SCM_RIGHTS`; received with `FD_CLOEXEC` set.
    pub fd: Option<OwnedFd>,
}

/// A message serialized once, to be sent as it is to any number of channels
/// ([`Channel::send_encoded`]): a broadcast to N workers encodes its payload once.
#[derive(Debug, Clone)]
pub struct Encoded {
    bytes: Vec<u8>,
}

impl Encoded {
    /// Serializes `message`; fails if it is larger than [`MAX_MESSAGE_BYTES`].
    pub fn new(message: &Message) -> Result<Encoded, IpcError> {
        let mut bytes = Vec::new();
        wire::encode_into(message, &mut bytes)?;
        Ok(Encoded { bytes })
    }

    /// The JSON text (without the newline a stream adds).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// How messages are framed on the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `SOCK_SEQPACKET`: one datagram per message, fds allowed.
    Datagram,
    /// `SOCK_STREAM`: one line per message, no fds.
    Lines,
}

/// One end of an IPC socketpair.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
    framing: Framing,
    receive: Mutex<ReceiveBuffer>,
    send: Mutex<SendBuffer>,
    dropped: AtomicU64,
}

/// Bytes read and not yet handed out, plus room for control data.
#[derive(Debug)]
pub(super) struct ReceiveBuffer {
    /// `MAX_MESSAGE_BYTES + 1` bytes: one more than a message may have, so a datagram that
    /// fills it was too long, and a full line fits with its newline.
    pub(super) bytes: Vec<u8>,
    /// Lines: the first byte not handed out yet.
    pub(super) start: usize,
    /// Lines: one past the last byte read.
    pub(super) end: usize,
    /// Lines: where the search for the next newline resumes.
    pub(super) scanned: usize,
    /// Room for `SCM_MAX_FD` fds, so control data is truncated only when installing the
    /// fds failed.
    pub(super) control: Vec<u8>,
}

/// The encoding scratch buffer, and (lines) what the kernel has not taken yet.
#[derive(Debug, Default)]
struct SendBuffer {
    scratch: Vec<u8>,
    outbox: Outbox,
}

/// Lines: bytes waiting for the socket to become writable.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    /// The bytes, of which those before `sent` are written already.
    pub(super) bytes: Vec<u8>,
    pub(super) sent: usize,
}

impl Outbox {
    pub(super) fn len(&self) -> usize {
        self.bytes.len() - self.sent
    }
}

impl Channel {
    /// Creates a connected datagram pair with
    /// `socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)`. Both ends block; see
    /// [`Channel::set_nonblocking`].
    pub fn pair() -> std::io::Result<(Channel, Channel)> {
        Self::pair_of(SockType::SeqPacket, Framing::Datagram)
    }

    /// Creates a connected stream pair with `socketpair(AF_UNIX, SOCK_STREAM |
    /// SOCK_CLOEXEC)`: the kind an external worker (and Node's `NODE_CHANNEL_FD`) gets.
    pub fn stream_pair() -> std::io::Result<(Channel, Channel)> {
        Self::pair_of(SockType::Stream, Framing::Lines)
    }

    fn pair_of(kind: SockType, framing: Framing) -> std::io::Result<(Channel, Channel)> {
        let (a, b) = socketpair(AddressFamily::Unix, kind, None, SockFlag::SOCK_CLOEXEC)?;
        Ok((Channel::new(a, framing), Channel::new(b, framing)))
    }

    /// Wraps an inherited IPC socket (the worker side: `STEER_IPC_FD`), framed as its
    /// socket type says (`getsockopt(SO_TYPE)`): datagrams for `SOCK_SEQPACKET`, lines for
    /// `SOCK_STREAM`. Fails for an fd that is not a socket, or a socket of another type.
    pub fn from_owned(fd: OwnedFd) -> std::io::Result<Channel> {
        let framing = match getsockopt(&fd, sockopt::SockType)? {
            SockType::SeqPacket => Framing::Datagram,
            SockType::Stream => Framing::Lines,
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("an IPC socket must be SOCK_SEQPACKET or SOCK_STREAM, not {other:?}"),
                ));
            }
        };
        Ok(Channel::new(fd, framing))
    }

    /// Takes ownership of a raw fd number inherited from the parent; see
    /// [`Channel::from_owned`].
    ///
    /// # Safety
    /// `fd` must be an open fd that nothing else in the process owns or closes.
    pub unsafe fn from_raw_fd(fd: RawFd) -> std::io::Result<Channel> {
        // SAFETY: the caller guarantees exclusive ownership of an open fd.
        Channel::from_owned(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn new(fd: OwnedFd, framing: Framing) -> Channel {
        Channel {
            fd,
            framing,
            receive: Mutex::new(ReceiveBuffer {
                bytes: vec![0; MAX_MESSAGE_BYTES + 1],
                start: 0,
                end: 0,
                scanned: 0,
                control: packet::control_buffer(),
            }),
            send: Mutex::new(SendBuffer::default()),
            dropped: AtomicU64::new(0),
        }
    }

    /// How this channel frames messages.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Sets or clears `O_NONBLOCK` (`fcntl(F_SETFL)`).
    pub fn set_nonblocking(&self, nonblocking: bool) -> std::io::Result<()> {
        crate::sys::fd::set_nonblocking(self.fd.as_fd(), nonblocking)
    }

    /// Sends one message (`sendmsg` with `MSG_NOSIGNAL`).
    ///
    /// On a non-blocking channel whose socket is full, a datagram fails with
    /// [`IpcError::Full`]; a line is kept in the channel's output buffer for
    /// [`Channel::flush`], and fails with `Full` only when that buffer is full too. Either
    /// way a refused message is dropped whole and counted in [`Channel::dropped`].
    pub fn send(&self, message: &Message) -> Result<(), IpcError> {
        let mut buffer = self.send_buffer();
        let SendBuffer { scratch, outbox } = &mut *buffer;
        wire::encode_into(message, scratch)?;
        self.send_bytes(outbox, scratch)
    }

    /// Sends a message serialized once with [`Encoded::new`]; otherwise as
    /// [`Channel::send`].
    pub fn send_encoded(&self, message: &Encoded) -> Result<(), IpcError> {
        self.send_bytes(&mut self.send_buffer().outbox, &message.bytes)
    }

    /// Sends one message with an fd attached as `SCM_RIGHTS`. Datagram channels only:
    /// on a stream it fails with [`IpcError::FdOnStream`].
    pub fn send_with_fd(&self, message: &Message, fd: BorrowedFd<'_>) -> Result<(), IpcError> {
        if self.framing == Framing::Lines {
            return Err(IpcError::FdOnStream);
        }
        let mut buffer = self.send_buffer();
        wire::encode_into(message, &mut buffer.scratch)?;
        let sent = packet::send(self.fd.as_fd(), &buffer.scratch, Some(fd));
        self.count_drop(sent)
    }

    fn send_bytes(&self, outbox: &mut Outbox, bytes: &[u8]) -> Result<(), IpcError> {
        let sent = match self.framing {
            Framing::Datagram => packet::send(self.fd.as_fd(), bytes, None),
            Framing::Lines => stream::send(self.fd.as_fd(), outbox, bytes),
        };
        self.count_drop(sent)
    }

    fn count_drop(&self, sent: Result<(), IpcError>) -> Result<(), IpcError> {
        if matches!(sent, Err(IpcError::Full)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Writes what a stream channel's output buffer holds, as far as the socket takes it.
    /// Call it when the socket becomes writable. Does nothing on a datagram channel.
    pub fn flush(&self) -> Result<(), IpcError> {
        match self.framing {
            Framing::Datagram => Ok(()),
            Framing::Lines => stream::flush(self.fd.as_fd(), &mut self.send_buffer().outbox),
        }
    }

    /// Bytes waiting in the output buffer for the socket to become writable (always 0 on
    /// a datagram channel).
    pub fn pending_output(&self) -> usize {
        self.send_buffer().outbox.len()
    }

    /// Messages dropped since the channel was made because the socket (and the output
    /// buffer) was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Receives one message.
    ///
    /// Returns `Ok(None)` when a non-blocking channel has nothing complete queued. Every fd
    /// that arrives is owned by the result (or closed on error), so a misbehaving peer
    /// cannot leak descriptors into this process. Errors for which
    /// [`IpcError::is_violation`] holds leave the channel usable: the next call reads the
    /// next message.
    pub fn recv(&self) -> Result<Option<Received>, IpcError> {
        let mut buffer = self.receive.lock().unwrap_or_else(PoisonError::into_inner);
        match self.framing {
            Framing::Datagram => packet::recv(self.fd.as_fd(), &mut buffer),
            Framing::Lines => stream::recv(self.fd.as_fd(), &mut buffer),
        }
    }

    fn send_buffer(&self) -> MutexGuard<'_, SendBuffer> {
        self.send.lock().unwrap_or_else(PoisonError::into_inner)
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

/// One `sendmsg` with `MSG_NOSIGNAL`, retried on `EINTR`: the bytes written, or `None`
/// when the socket is full (`EAGAIN`). A peer that is gone is [`IpcError::Closed`].
pub(super) fn send_some(
    fd: BorrowedFd<'_>,
    iov: &[IoSlice<'_>],
    cmsgs: &[ControlMessage<'_>],
) -> Result<Option<usize>, IpcError> {
    loop {
        match sendmsg::<()>(fd.as_raw_fd(), iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(written) => return Ok(Some(written)),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(None),
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
