//! The primary <-> worker protocol: JSON messages over an `AF_UNIX` socketpair, one pair
//! per worker process, the worker's end inherited at the fd number named by
//! `STEER_IPC_FD`.
//!
//! Built-in and library workers get a `SOCK_SEQPACKET` pair (one datagram per message, and
//! listening sockets passed as `SCM_RIGHTS`); external workers get a `SOCK_STREAM` pair
//! carrying newline-delimited JSON, which Node speaks natively through `NODE_CHANNEL_FD`.
//! [`Channel`] hides the difference.

mod channel;
mod error;
mod message;
mod packet;
mod stream;
mod wire;

pub use channel::{Channel, Encoded, Framing, Received};
pub use error::IpcError;
pub use message::{Counters, MAX_MESSAGE_BYTES, Message, Payload, Recipient};
/// The pure decoder both framings use, for the fuzz target (`crate::fuzzing`).
pub(crate) use wire::decode;
