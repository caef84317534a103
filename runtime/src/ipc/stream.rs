//! Line framing (`SOCK_STREAM`): each message is one line of JSON ended by `\n`, the
//! framing of Node's IPC channel in `json` serialization mode (`JSON.stringify` escapes
//! every newline inside strings, so a line is always one whole message).
//!
//! Reading keeps what it has read in the channel's receive buffer and hands out one line
//! per call; a line longer than [`MAX_MESSAGE_BYTES`] is refused as soon as the buffer is
//! full without a newline. Writing goes straight to the socket while nothing waits; the
//! part the kernel does not take is kept in a bounded [`Outbox`], and a message that does
//! not fit there is refused whole, so the peer never sees half a line.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use super::channel::{Outbox, ReceiveBuffer, Received, send_some};
use super::error::IpcError;
use super::message::MAX_MESSAGE_BYTES;
use super::wire;

/// Most bytes kept waiting for a slow reader: four largest messages. Past that the
/// reader is not keeping up, and what it would get late is dropped instead.
pub const OUTBOX_LIMIT: usize = 4 * (MAX_MESSAGE_BYTES + 1);

/// Writes `bytes` and a newline, or keeps what the socket does not take in `outbox`.
pub(super) fn send(fd: BorrowedFd<'_>, outbox: &mut Outbox, bytes: &[u8]) -> Result<(), IpcError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(IpcError::Oversized);
    }
    let line = bytes.len() + 1;
    if outbox.len() > 0 {
        // Order: this line goes behind what already waits, or nowhere.
        flush(fd, outbox)?;
        if outbox.len() > 0 {
            if outbox.len() + line > OUTBOX_LIMIT {
                return Err(IpcError::Full);
            }
            outbox.bytes.extend_from_slice(bytes);
            outbox.bytes.push(b'\n');
            return Ok(());
        }
    }
    let written = write(fd, &[IoSlice::new(bytes), IoSlice::new(b"\n")])?;
    if written < line {
        outbox.bytes.clear();
        outbox.sent = 0;
        if written < bytes.len() {
            outbox.bytes.extend_from_slice(&bytes[written..]);
        }
        outbox.bytes.push(b'\n');
    }
    Ok(())
}

/// Writes what waits in `outbox` until it is empty or the socket is full.
pub(super) fn flush(fd: BorrowedFd<'_>, outbox: &mut Outbox) -> Result<(), IpcError> {
    while outbox.len() > 0 {
        let written = write(fd, &[IoSlice::new(&outbox.bytes[outbox.sent..])])?;
        if written == 0 {
            return Ok(());
        }
        outbox.sent += written;
    }
    outbox.bytes.clear();
    outbox.sent = 0;
    Ok(())
}

/// One `sendmsg`; 0 bytes written when the socket is full.
fn write(fd: BorrowedFd<'_>, iov: &[IoSlice<'_>]) -> Result<usize, IpcError> {
    Ok(send_some(fd, iov, &[])?.unwrap_or(0))
}

/// Hands out the next complete line, reading more when none is buffered.
pub(super) fn recv(
    fd: BorrowedFd<'_>,
    buffer: &mut ReceiveBuffer,
) -> Result<Option<Received>, IpcError> {
    loop {
        if let Some(at) = buffer.bytes[buffer.scanned..buffer.end]
            .iter()
            .position(|&b| b == b'\n')
        {
            let newline = buffer.scanned + at;
            let line = buffer.start..newline;
            buffer.start = newline + 1;
            buffer.scanned = buffer.start;
            let message = wire::decode(&buffer.bytes[line])?;
            return Ok(Some(Received { message, fd: None }));
        }
        buffer.scanned = buffer.end;
        if buffer.end - buffer.start > MAX_MESSAGE_BYTES {
            // No newline in a full buffer: the line is too long. Skip what was read of it;
            // the rest of it would be read as garbage, so the caller should stop here.
            buffer.start = buffer.end;
            return Err(IpcError::Oversized);
        }
        if buffer.start > 0 {
            buffer.bytes.copy_within(buffer.start..buffer.end, 0);
            buffer.end -= buffer.start;
            buffer.scanned = buffer.end;
            buffer.start = 0;
        }
        match read(fd, buffer)? {
            Read::Bytes(n) => buffer.end += n,
            Read::Nothing => return Ok(None),
            // A line cut off by the peer's exit is not a message.
            Read::EndOfFile => return Err(IpcError::Closed),
            Read::Fds(got) => {
                return Err(IpcError::TooManyFds { got, limit: 0 });
            }
        }
    }
}

enum Read {
    Bytes(usize),
    Nothing,
    EndOfFile,
    /// Bytes came with fds, which a stream may not carry; the bytes are kept, the fds
    /// closed.
    Fds(usize),
}

/// One `recvmsg` into the free end of the buffer. Control data is read too, so an fd a
/// peer passes anyway (Node's `process.send(message, handle)`) is closed, not leaked.
fn read(fd: BorrowedFd<'_>, buffer: &mut ReceiveBuffer) -> Result<Read, IpcError> {
    let ReceiveBuffer {
        bytes,
        end,
        control,
        ..
    } = buffer;
    let mut iov = [IoSliceMut::new(&mut bytes[*end..])];
    loop {
        match recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut *control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = 0;
                if let Ok(cmsgs) = msg.cmsgs() {
                    for cmsg in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = cmsg {
                            fds += raw.len();
                            for fd in raw {
                                // SAFETY: SCM_RIGHTS just installed this fd in this process
                                // and nothing else refers to it; dropping it closes it.
                                drop(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
                        }
                    }
                }
                if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                    *end += msg.bytes;
                    return Err(IpcError::FdsExhausted);
                }
                return Ok(match (msg.bytes, fds) {
                    (0, 0) => Read::EndOfFile,
                    (n, 0) => Read::Bytes(n),
                    (n, fds) => {
                        *end += n;
                        Read::Fds(fds)
                    }
                });
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(Read::Nothing),
            Err(Errno::ECONNRESET) => return Err(IpcError::Closed),
            Err(errno) => {
                return Err(IpcError::Io {
                    op: "recvmsg",
                    source: errno.into(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write};
    use std::os::fd::AsFd;

    use nix::sys::socket::sendmsg;

    use super::*;
    use crate::ipc::{Channel, Encoded, Message, Payload};

    fn raw(channel: Channel) -> std::fs::File {
        std::fs::File::from(OwnedFd::from(channel))
    }

    #[test]
    fn lines_split_and_merged_by_the_kernel_come_out_as_messages() {
        let (a, b) = Channel::stream_pair().expect("socketpair");
        b.set_nonblocking(true).expect("nonblocking");
        let mut peer = raw(a);
        peer.write_all(br#"{"v":1,"type":"ready","heartbeats":true}"#)
            .expect("write");
        assert!(
            b.recv().expect("recv").is_none(),
            "half a line is no message"
        );
        peer.write_all(b"\n{\"v\":1,\"type\":\"pong\",\"seq\":4}\n{\"v\":1,")
            .expect("write");
        assert_eq!(
            b.recv().expect("recv").expect("msg").message,
            Message::Ready { heartbeats: true }
        );
        assert!(matches!(
            b.recv().expect("recv").expect("msg").message,
            Message::Pong { seq: 4, .. }
        ));
        assert!(b.recv().expect("recv").is_none());
        peer.write_all(b"\"type\":\"drain\"}\n").expect("write");
        assert_eq!(
            b.recv().expect("recv").expect("msg").message,
            Message::Drain
        );
        drop(peer);
        assert!(matches!(b.recv(), Err(IpcError::Closed)));
    }

    #[test]
    fn a_line_at_the_limit_passes_and_one_byte_more_is_oversized() {
        let (a, b) = Channel::stream_pair().expect("socketpair");
        let filler = MAX_MESSAGE_BYTES - r#"{"v":1,"type":"user","data":""}"#.len();
        let fits = format!(r#"{{"v":1,"type":"user","data":"{}"}}"#, "x".repeat(filler));
        assert_eq!(fits.len(), MAX_MESSAGE_BYTES);
        let writer = std::thread::spawn(move || {
            let mut peer = raw(a);
            peer.write_all(fits.as_bytes()).expect("write");
            peer.write_all(b"\n").expect("write");
            peer.write_all(&vec![b' '; MAX_MESSAGE_BYTES + 1])
                .expect("write");
            peer.write_all(b"\n").expect("write");
            peer
        });
        let got = b.recv().expect("recv").expect("msg");
        assert!(
            matches!(got.message, Message::User { data, .. } if data.get().len() == filler + 2)
        );
        assert!(matches!(b.recv(), Err(IpcError::Oversized)));
        drop(writer.join().expect("writer"));
    }

    #[test]
    fn empty_lines_and_fds_are_violations_and_the_fds_are_closed() {
        let (a, b) = Channel::stream_pair().expect("socketpair");
        let mut peer = raw(a);
        peer.write_all(b"\n").expect("write");
        assert!(matches!(b.recv(), Err(IpcError::Empty)));
        let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
        let raw_fd = [write_end.as_raw_fd()];
        sendmsg::<()>(
            peer.as_raw_fd(),
            &[IoSlice::new(b"{\"v\":1,\"type\":\"drain\"}\n")],
            &[nix::sys::socket::ControlMessage::ScmRights(&raw_fd)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        drop(write_end);
        assert!(matches!(
            b.recv(),
            Err(IpcError::TooManyFds { got: 1, limit: 0 })
        ));
        let mut byte = [0u8; 1];
        assert_eq!(
            std::fs::File::from(read_end).read(&mut byte).expect("read"),
            0,
            "the passed fd was closed"
        );
        assert_eq!(
            b.recv().expect("recv").expect("msg").message,
            Message::Drain
        );
        assert!(matches!(
            b.send_with_fd(&Message::Drain, peer.as_fd()),
            Err(IpcError::FdOnStream)
        ));
    }

    #[test]
    fn a_slow_reader_gets_whole_lines_and_what_cannot_wait_is_dropped_and_counted() {
        let (a, b) = Channel::stream_pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        let big = Encoded::new(&Message::User {
            to: None,
            from: Some(1),
            data: Payload::new(&"y".repeat(MAX_MESSAGE_BYTES - 100)).expect("json"),
        })
        .expect("encode");
        let mut queued = 0;
        while a.dropped() == 0 {
            match a.send_encoded(&big) {
                Ok(()) => queued += 1,
                Err(IpcError::Full) => {}
                Err(err) => panic!("unexpected {err}"),
            }
            assert!(queued < 1_000, "the output buffer never filled");
            assert!(a.pending_output() <= OUTBOX_LIMIT);
        }
        assert!(a.pending_output() > 0, "the kernel took only part");
        assert_eq!(a.dropped(), 1);
        // The reader catches up while the writer flushes on writability.
        let reader = std::thread::spawn(move || {
            let mut got = 0;
            while got < queued {
                let received = b.recv().expect("recv").expect("msg");
                assert!(matches!(
                    received.message,
                    Message::User { from: Some(1), .. }
                ));
                got += 1;
            }
            got
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while a.pending_output() > 0 {
            a.flush().expect("flush");
            assert!(std::time::Instant::now() < deadline, "never flushed");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(reader.join().expect("reader"), queued);
    }
}
