//! What the host can fail at when the core asks it to act ([`super::Io`]), as typed
//! errors: the core logs them whole (with [`crate::errors::error_chain`]) and decides on the
//! variant where that matters, and the errno of a failed system call survives to the log.

use std::io;

use crate::steering::SteeringError;
use crate::sys::borrow::BorrowError;

/// Why a worker could not be started ([`super::Io::spawn`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpawnError {
    /// Preparing or starting the process failed: its IPC socket pair, its listening
    /// socket, finding the program, `fork`, or its exec-report pipe. The error says which
    /// where the host could tell.
    #[error(transparent)]
    Start(io::Error),
    /// The process started, but the event loop could not watch its fds (`epoll_ctl`), so
    /// its exit would never be seen; it was killed and reaped.
    #[error("cannot watch the new worker")]
    Watch(#[source] io::Error),
}

/// Why a worker's socket could not be put into steering ([`super::Io::enter_steering`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum EnterError {
    /// The worker is no longer among the host's processes.
    #[error("the worker is gone")]
    Gone,
    /// The worker never registered a socket (nor was one made for it).
    #[error("it registered no socket")]
    NoSocket,
    /// Steering refused the socket: a map update, or attaching the program through it.
    #[error(transparent)]
    Steering(#[from] SteeringError),
}

/// Why a worker's listening socket could not be shut down from outside
/// ([`super::Io::shut_down_listener`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ListenerError {
    /// The worker is no longer among the host's processes.
    #[error("the worker is gone")]
    Gone,
    /// The host never learned where the worker holds its listening socket.
    #[error("its listening socket was never recorded")]
    Unrecorded,
    /// The socket could not be taken from the worker.
    #[error(transparent)]
    Borrow(#[from] BorrowError),
    /// `shutdown(2)` of the borrowed socket failed.
    #[error("shutdown of its listening socket")]
    ShutDown(#[source] io::Error),
}
