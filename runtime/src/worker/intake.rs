//! Where a re-executed worker gets its listening socket: its own, the baseline's shared
//! one, or none at all.

use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd};

use super::env::{Intake, WorkerEnv};

/// The worker's listener for its [`Intake`]: a fresh `SO_REUSEPORT` socket bound to the
/// cluster address (`socket`, `bind`, `listen`), the shared socket inherited at the fd the
/// primary named (`shared` baseline), or `None` (`userspace`: connections come over IPC).
pub(crate) fn open_listener(env: &WorkerEnv) -> Result<Option<TcpListener>, String> {
    match env.intake {
        Intake::OwnSocket => crate::listener::worker_listener(env.listen)
            .map(Some)
            .map_err(|err| crate::listener::explain_bind_error(env.listen, &err)),
        Intake::Inherited(fd) => {
            if fd < 3 || !super::fd_is_open(fd) {
                return Err(format!("{}={fd} is not an open fd", super::env::LISTEN_FD));
            }
            // SAFETY: the primary placed the shared socket at this fd for this process; it
            // is open (checked) and nothing else in this freshly exec'd process owns it.
            let socket = unsafe { OwnedFd::from_raw_fd(fd) };
            crate::listener::verify(&socket, env.listen)
                .map_err(|err| format!("the inherited shared socket: {err}"))?;
            Ok(Some(TcpListener::from(socket)))
        }
        Intake::HandOff => Ok(None),
    }
}
