//! The primary <-> worker protocol: JSON messages over a `SOCK_SEQPACKET` socketpair, with
//! listening sockets passed as `SCM_RIGHTS`. One pair per worker process; the worker's end
//! is inherited at the fd number named by `STEER_IPC_FD`.

mod channel;
mod message;

pub use channel::{Channel, IpcError, Received};
pub use message::{Counters, MAX_MESSAGE_BYTES, Message, PROTOCOL_VERSION, Recipient};
