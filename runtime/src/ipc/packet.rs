//! Datagram framing (`SOCK_SEQPACKET`): one `sendmsg` is one message, one `recvmsg`
//! returns exactly that message, and an fd may travel beside it as `SCM_RIGHTS`.
//!
//! A zero-length datagram and the peer's end-of-file both make `recvmsg` return 0 with
//! the same flags. They are told apart by asking the socket whether the peer has shut
//! down (`POLLRDHUP`) and, if it has, whether bytes are still queued behind the empty
//! datagram (`FIONREAD`).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::cmsg_space;
use nix::errno::Errno;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use super::channel::{ReceiveBuffer, Received, send_some};
use super::error::IpcError;
use super::message::MAX_MESSAGE_BYTES;
use super::wire;

/// Most fds accepted beside one message; more is a protocol violation (they are closed).
const MAX_FDS: usize = 1;

/// `SCM_MAX_FD`: the most fds the kernel passes in one message. The control buffer has
/// room for all of them, so control data is truncated only when installing them failed.
const SCM_MAX_FD: usize = 253;

/// A control buffer with room for [`SCM_MAX_FD`] fds.
pub(super) fn control_buffer() -> Vec<u8> {
    cmsg_space!([RawFd; SCM_MAX_FD])
}

/// Sends one datagram, with an fd beside it if given.
pub(super) fn send(
    fd: BorrowedFd<'_>,
    bytes: &[u8],
    attached: Option<BorrowedFd<'_>>,
) -> Result<(), IpcError> {
    let sent = match attached {
        None => send_some(fd, &[IoSlice::new(bytes)], &[])?,
        Some(attached) => send_with_rights(fd, bytes, attached)?,
    };
    match sent {
        // A datagram is taken whole or not at all.
        Some(_) => Ok(()),
        None => Err(IpcError::Full),
    }
}

/// A control buffer for one `SCM_RIGHTS` fd, aligned as `cmsghdr` needs.
#[repr(C)]
union OneFdControl {
    _header: libc::cmsghdr,
    bytes: [u8; 64],
}

/// `sendmsg(MSG_NOSIGNAL)` of `bytes` with `attached` in `SCM_RIGHTS`, retried on `EINTR`,
/// with its control buffer on the stack: nix's `sendmsg` allocates one per call, and the
/// `userspace` baseline sends one of these per connection. `None` when the socket is
/// full (`EAGAIN`); `EPIPE`/`ECONNRESET` are [`IpcError::Closed`].
fn send_with_rights(
    fd: BorrowedFd<'_>,
    bytes: &[u8],
    attached: BorrowedFd<'_>,
) -> Result<Option<usize>, IpcError> {
    let fd_bytes = size_of::<RawFd>() as libc::c_uint;
    // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
    let (space, len) = unsafe { (libc::CMSG_SPACE(fd_bytes), libc::CMSG_LEN(fd_bytes)) };
    let mut control = OneFdControl { bytes: [0; 64] };
    debug_assert!(space as usize <= size_of::<OneFdControl>());
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &raw mut iov;
    header.msg_iovlen = 1;
    header.msg_control = (&raw mut control).cast();
    header.msg_controllen = space as _;
    // SAFETY: `header` points at `control`, which has room for CMSG_SPACE(one fd) bytes
    // and cmsghdr's alignment, so CMSG_FIRSTHDR is non-null and its data holds one fd.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&header);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = len as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), attached.as_raw_fd());
    }
    loop {
        // SAFETY: `header` and everything it points at (`iov`, `bytes`, `control`) live
        // through the call; the kernel only reads them.
        let written = unsafe { libc::sendmsg(fd.as_raw_fd(), &header, libc::MSG_NOSIGNAL) };
        if let Ok(written) = usize::try_from(written) {
            return Ok(Some(written));
        }
        match Errno::last() {
            Errno::EINTR => continue,
            Errno::EAGAIN => return Ok(None),
            Errno::EPIPE | Errno::ECONNRESET => return Err(IpcError::Closed),
            errno => {
                return Err(IpcError::Io {
                    op: "sendmsg",
                    source: errno.into(),
                });
            }
        }
    }
}

/// Receives and decodes one datagram (`recvmsg` with `MSG_CMSG_CLOEXEC`).
pub(super) fn recv(
    fd: BorrowedFd<'_>,
    buffer: &mut ReceiveBuffer,
) -> Result<Option<Received>, IpcError> {
    let ReceiveBuffer { bytes, control, .. } = buffer;
    let (len, flags, mut fds) = loop {
        let mut iov = [IoSliceMut::new(bytes)];
        match recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut *control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                // `cmsgs()` refuses when the kernel truncated the control data (MSG_CTRUNC),
                // which the buffer's size leaves to one cause: installing an fd failed.
                if let Ok(cmsgs) = msg.cmsgs() {
                    for cmsg in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = cmsg {
                            // SAFETY: SCM_RIGHTS just installed these fds in this process
                            // and nothing else refers to them.
                            fds.extend(
                                raw.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                    }
                }
                break (msg.bytes, msg.flags, fds);
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
    if flags.contains(MsgFlags::MSG_CTRUNC) {
        // The fds that did arrive (none, with the one fd the protocol allows) are closed
        // with `fds`; the message is useless without its fd.
        return Err(IpcError::FdsExhausted);
    }
    if flags.contains(MsgFlags::MSG_TRUNC) || len > MAX_MESSAGE_BYTES {
        return Err(IpcError::Oversized);
    }
    if fds.len() > MAX_FDS {
        return Err(IpcError::TooManyFds {
            got: fds.len(),
            limit: MAX_FDS,
        });
    }
    if len == 0 && fds.is_empty() && peer_is_gone(fd)? {
        return Err(IpcError::Closed);
    }
    let message = wire::decode(&bytes[..len])?;
    Ok(Some(Received {
        message,
        fd: fds.pop(),
    }))
}

/// After `recvmsg` returned 0 bytes: whether that was the peer's end-of-file rather than
/// an empty datagram. It was end-of-file if the peer has shut down and nothing is queued;
/// if bytes are queued, the 0 was a datagram that came before them.
fn peer_is_gone(fd: BorrowedFd<'_>) -> Result<bool, IpcError> {
    // Straight to libc: nix's `PollFlags` has no POLLRDHUP, and its `revents()` gives up
    // on bits it does not know.
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid `pollfd`, count 1, no waiting.
    if unsafe { libc::poll(&mut pollfd, 1, 0) } < 0 {
        return Err(IpcError::Io {
            op: "poll",
            source: std::io::Error::last_os_error(),
        });
    }
    let hung_up = pollfd.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0;
    Ok(hung_up && queued_bytes(fd)? == 0)
}

/// `ioctl(FIONREAD)`: bytes queued for reading.
fn queued_bytes(fd: BorrowedFd<'_>) -> Result<usize, IpcError> {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD stores one c_int through the pointer, which points at `queued`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut queued) };
    if rc < 0 {
        return Err(IpcError::Io {
            op: "ioctl(FIONREAD)",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(usize::try_from(queued).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;
    use std::os::fd::AsFd;

    use nix::sys::socket::{ControlMessage, sendmsg};

    use super::*;
    use crate::ipc::{Channel, Counters, Message};

    #[test]
    fn message_and_fd_cross_the_pair() {
        let (a, b) = Channel::pair().expect("socketpair");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        a.send_with_fd(
            &Message::Register {
                pid: 42,
                fd: Some(listener.as_raw_fd()),
                listener: None,
            },
            listener.as_fd(),
        )
        .expect("send");
        let got = b.recv().expect("recv").expect("a message");
        assert_eq!(
            got.message,
            Message::Register {
                pid: 42,
                fd: Some(listener.as_raw_fd()),
                listener: None,
            }
        );
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
        assert!(matches!(
            b.recv(),
            Err(IpcError::TooManyFds { got: 5, limit: 1 })
        ));
        // If any received copy of the write end were still open here, this read would block
        // instead of seeing end-of-file.
        crate::sys::fd::set_nonblocking(read_end.as_fd(), true).expect("nonblocking");
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
        let got = a.recv();
        assert!(matches!(got, Err(IpcError::Closed)), "{got:?}");
        assert!(matches!(
            a.send(&Message::Ready { heartbeats: true }),
            Err(IpcError::Closed)
        ));
    }

    #[test]
    fn an_empty_datagram_is_not_end_of_file() {
        let (a, b) = Channel::pair().expect("socketpair");
        let empty = |peer: &std::fs::File| {
            // `write_all` skips an empty buffer; `send` does send an empty datagram.
            nix::sys::socket::send(peer.as_raw_fd(), b"", MsgFlags::empty()).expect("send")
        };
        let mut raw = std::fs::File::from(OwnedFd::from(a));
        empty(&raw);
        raw.write_all(br#"{"v":1,"type":"ready"}"#).expect("write");
        assert!(matches!(b.recv(), Err(IpcError::Empty)));
        assert_eq!(
            b.recv().expect("recv").expect("msg").message,
            Message::Ready { heartbeats: false }
        );
        // The same with the peer gone right after: the queued message still comes first.
        empty(&raw);
        raw.write_all(br#"{"v":1,"type":"drain"}"#).expect("write");
        drop(raw);
        assert!(matches!(b.recv(), Err(IpcError::Empty)));
        assert_eq!(
            b.recv().expect("recv").expect("msg").message,
            Message::Drain
        );
        assert!(matches!(b.recv(), Err(IpcError::Closed)));
    }

    #[test]
    fn garbage_oversize_and_wrong_version_are_errors_and_the_channel_goes_on() {
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

    #[test]
    fn a_full_socket_drops_the_datagram_whole_and_counts_it() {
        let (a, b) = Channel::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        let mut sent = 0u64;
        let dropped = loop {
            match a.send(&Message::Ping { seq: sent + 1 }) {
                Ok(()) => sent += 1,
                Err(IpcError::Full) => break 1,
                Err(err) => panic!("unexpected {err}"),
            }
            assert!(sent < 1_000_000, "the socket never filled");
        };
        assert_eq!(a.dropped(), dropped);
        b.set_nonblocking(true).expect("nonblocking");
        let mut received = 0;
        while let Some(got) = b.recv().expect("recv") {
            received += 1;
            assert_eq!(got.message, Message::Ping { seq: received });
        }
        assert_eq!(
            received, sent,
            "every datagram the socket took arrives whole"
        );
    }
}
