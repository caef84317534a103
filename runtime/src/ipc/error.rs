//! What can go wrong on an IPC channel, sorted so that the primary can tell a worker that
//! broke the protocol ([`IpcError::is_violation`]) from its own trouble (no fd left, a
//! full socket, a failed syscall) and from a peer that is simply gone.

use thiserror::Error;

use super::message::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};

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
    /// A message arrived with file descriptors beside it, and this process could not take
    /// them: the kernel set `MSG_CTRUNC` because installing the fds failed (`EMFILE` or
    /// `ENFILE`). The message is discarded. This says nothing about the peer: this
    /// process has run out of descriptors.
    #[error(
        "no file descriptor left to receive the one passed with an IPC message \
         (raise the open-file limit)"
    )]
    FdsExhausted,
    /// Nothing could be sent now: the socket's buffer (and, on a stream channel, the
    /// channel's own bounded output buffer) is full. The message was dropped whole, and
    /// counted in the channel's drops.
    #[error("IPC socket full; message dropped")]
    Full,
    /// An fd was to be sent on a stream channel, which carries JSON lines only.
    #[error("a stream IPC channel cannot carry file descriptors")]
    FdOnStream,
    /// A message larger than [`MAX_MESSAGE_BYTES`] arrived or was to be sent.
    #[error("oversized IPC message (limit {MAX_MESSAGE_BYTES} bytes)")]
    Oversized,
    /// More fds came beside a message than the protocol allows (they were closed).
    #[error("{got} fds beside one IPC message (at most {limit} on this channel)")]
    TooManyFds {
        /// How many arrived (at least).
        got: usize,
        /// How many this channel accepts: 1 on a datagram channel, 0 on a stream.
        limit: usize,
    },
    /// A zero-length datagram, or an empty line: not a message (and not end-of-file).
    #[error("empty IPC message")]
    Empty,
    /// The bytes are not a JSON protocol message.
    #[error("malformed IPC message {preview:?}")]
    Malformed {
        /// The start of the message, for the log.
        preview: String,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
    /// The message is well-formed JSON but not one of this protocol's messages (a missing
    /// or unknown field, an unknown type, a message of the wrong direction's fields).
    #[error("invalid IPC message {preview:?}: {reason}")]
    Invalid {
        /// The start of the message, for the log.
        preview: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The message is well-formed but speaks another protocol version.
    #[error("IPC protocol version {got}, this build speaks {PROTOCOL_VERSION}")]
    Version {
        /// The `v` the peer sent.
        got: u32,
    },
}

impl IpcError {
    /// Whether the peer broke the protocol (as opposed to being gone, or this process
    /// being short of fds or buffer space). The primary replaces a worker for these only.
    pub fn is_violation(&self) -> bool {
        match self {
            IpcError::Oversized
            | IpcError::TooManyFds { .. }
            | IpcError::Empty
            | IpcError::Malformed { .. }
            | IpcError::Invalid { .. }
            | IpcError::Version { .. } => true,
            IpcError::Closed
            | IpcError::Io { .. }
            | IpcError::FdsExhausted
            | IpcError::Full
            | IpcError::FdOnStream => false,
        }
    }
}
