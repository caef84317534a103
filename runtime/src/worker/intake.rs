//! Where a re-executed worker gets its sockets: its own (one per listener), the baseline's
//! shared one, or none at all.

use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use super::env::{Intake, WorkerEnv};
use crate::config::Listener;

/// One listener's socket in a worker: a listening TCP socket, or a bound UDP socket.
#[derive(Debug)]
pub enum ListenerSocket {
    /// A listening TCP socket.
    Tcp(TcpListener),
    /// A bound UDP socket.
    Udp(UdpSocket),
}

impl ListenerSocket {
    /// Its fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            ListenerSocket::Tcp(listener) => listener.as_fd(),
            ListenerSocket::Udp(socket) => socket.as_fd(),
        }
    }
}

/// A fresh `SO_REUSEPORT` socket for `listener` (`socket`, `bind`, and `listen` for TCP).
fn bind(listener: &Listener, udp_receive_buffer: u64) -> Result<ListenerSocket, String> {
    let socket = crate::listener::bind_for(listener, udp_receive_buffer)
        .map_err(|err| crate::listener::explain_bind_error(listener.addr, &err))?;
    Ok(if listener.protocol.is_datagram() {
        ListenerSocket::Udp(UdpSocket::from(socket))
    } else {
        ListenerSocket::Tcp(TcpListener::from(socket))
    })
}

/// The worker's sockets for its [`Intake`], in the listeners' order: its own, the shared
/// socket inherited at the fd the primary named (`shared` baseline, one TCP listener), or
/// none (`userspace`: connections come over IPC).
pub(crate) fn open_sockets(env: &WorkerEnv) -> Result<Vec<ListenerSocket>, String> {
    match env.intake {
        Intake::OwnSocket => env
            .listeners
            .iter()
            .map(|l| bind(l, env.udp_receive_buffer))
            .collect(),
        Intake::Inherited(fd) => {
            if fd < 3 || !super::fd_is_open(fd) {
                return Err(format!("{}={fd} is not an open fd", super::env::LISTEN_FD));
            }
            // SAFETY: the primary placed the shared socket at this fd for this process; it
            // is open (checked) and nothing else in this freshly exec'd process owns it.
            let socket = unsafe { OwnedFd::from_raw_fd(fd) };
            let [listener] = &env.listeners[..] else {
                return Err("the shared baseline serves exactly one listener".into());
            };
            crate::listener::verify(&socket, listener.addr)
                .map_err(|err| format!("the inherited shared socket: {err}"))?;
            Ok(vec![ListenerSocket::Tcp(TcpListener::from(socket))])
        }
        Intake::HandOff => Ok(Vec::new()),
    }
}
