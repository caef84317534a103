//! Listening sockets: creating one a worker can own, and checking one a worker registers.
//!
//! Each worker owns its own socket in the `SO_REUSEPORT` group of the listen address, so
//! each has its own accept queue. `SO_REUSEPORT` must be set before `bind`: the kernel only
//! lets a socket into a group whose sockets all set it (and belong to the same user).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use thiserror::Error;

/// Accept backlog requested for every worker socket (the kernel caps it at `somaxconn`).
pub const BACKLOG: i32 = 4096;

/// Creates a `SOCK_STREAM | SOCK_CLOEXEC` socket with `SO_REUSEPORT` and `SO_REUSEADDR`,
/// binds it to `addr` (`socket`, `setsockopt`, `bind`) and, if `listen` is true, starts
/// listening (`listen(BACKLOG)`).
///
/// Fails with `AddrInUse` when the port is held by a socket without `SO_REUSEPORT` or by
/// another user; see [`explain_bind_error`].
pub fn bind_reuseport(addr: SocketAddr, listen: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&SockAddr::from(addr))?;
    if listen {
        socket.listen(BACKLOG)?;
    }
    Ok(socket)
}

/// Reserves `addr` for the cluster: a `SOCK_STREAM | SOCK_CLOEXEC` socket with
/// `SO_REUSEPORT` alone, bound and never listening (`socket`, `setsockopt`, `bind`). It
/// resolves port 0 and keeps the port the cluster's while no worker listens (every
/// worker restarting, a one-worker cluster in crash backoff).
///
/// Not `SO_REUSEADDR`: the kernel lets a socket bind beside a bound, non-listening one
/// when both set `SO_REUSEADDR`, whatever their users, and then listen. A process of
/// another user could take the port while no worker listens, and the workers could not
/// bind it again. With `SO_REUSEPORT` alone, only sockets of the same user with
/// `SO_REUSEPORT` may share it: the cluster's own.
///
/// Fails like [`bind_reuseport`].
pub fn reserve(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&SockAddr::from(addr))?;
    Ok(socket)
}

/// Creates a `SOCK_DGRAM | SOCK_CLOEXEC` socket with `SO_REUSEPORT` and binds it to `addr`
/// (`socket`, `setsockopt`, `bind`): a UDP listener's socket. Not `SO_REUSEADDR`: on UDP it
/// lets a socket of any user bind the same address beside it.
///
/// `receive_buffer` bytes, when not zero, are asked for with [`set_receive_buffer`] before
/// the bind, so no datagram ever meets the kernel's small default queue.
pub fn bind_udp_reuseport(addr: SocketAddr, receive_buffer: u64) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    if receive_buffer > 0 {
        set_receive_buffer(&socket, receive_buffer)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&SockAddr::from(addr))?;
    Ok(socket)
}

/// Asks the kernel for a receive queue of `bytes` on `socket`: `SO_RCVBUFFORCE`, which a
/// primary with `CAP_NET_ADMIN` may set past `net.core.rmem_max`, else `SO_RCVBUF`, which the
/// kernel silently caps at `rmem_max`. Returns the queue the kernel granted, as
/// `SO_RCVBUF` reads it back (twice the bytes asked for: the kernel counts its own
/// bookkeeping in it).
///
/// A UDP socket has no accept queue to spread a burst over: the kernel's default queue
/// (`rmem_default`, 208 KiB: about 256 small datagrams) overflows in well under a second
/// of a worker not reading, and every datagram past it is dropped (`RcvbufErrors`).
pub fn set_receive_buffer(socket: &Socket, bytes: u64) -> io::Result<usize> {
    // The kernel takes an int and doubles it.
    let asked = usize::try_from(bytes.min(i32::MAX as u64 / 2)).unwrap_or(usize::MAX);
    let forced =
        nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::RcvBufForce, &asked);
    if forced.is_err() {
        socket.set_recv_buffer_size(asked)?;
    }
    socket.recv_buffer_size()
}

/// Tells the operator, once, when the kernel grants a UDP socket less receive queue than
/// `udp-receive-buffer` asks for: a primary without `CAP_NET_ADMIN` is held to
/// `net.core.rmem_max`.
pub fn warn_if_receive_buffer_capped(bytes: u64) {
    let granted = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .and_then(|probe| set_receive_buffer(&probe, bytes));
    match granted {
        Ok(granted) if (granted as u64) < 2 * bytes => tracing::warn!(
            "udp-receive-buffer: the kernel grants each UDP socket {} of receive queue, not \
             the {} asked for: without CAP_NET_ADMIN, net.core.rmem_max caps it",
            crate::config::format_size(granted as u64 / 2),
            crate::config::format_size(bytes)
        ),
        Ok(_) => {}
        Err(err) => tracing::warn!("udp-receive-buffer: cannot set it: {err}"),
    }
}

/// A worker's socket for `listener`: listening TCP ([`bind_reuseport`]) or bound UDP
/// ([`bind_udp_reuseport`], with a receive queue of `udp_receive_buffer` bytes).
pub fn bind_for(listener: &crate::config::Listener, udp_receive_buffer: u64) -> io::Result<Socket> {
    if listener.protocol.is_datagram() {
        bind_udp_reuseport(listener.addr, udp_receive_buffer)
    } else {
        bind_reuseport(listener.addr, true)
    }
}

/// Reserves `listener`'s address ([`reserve`] for TCP; for UDP a bound socket with
/// `SO_REUSEPORT` alone, which is in the group: see the primary's use of it).
pub fn reserve_for(listener: &crate::config::Listener) -> io::Result<Socket> {
    if listener.protocol.is_datagram() {
        // Never picked: no datagram waits on it.
        bind_udp_reuseport(listener.addr, 0)
    } else {
        reserve(listener.addr)
    }
}

/// Checks that `fd` is a worker's socket for `listener`: [`verify_listener`] for TCP; for
/// UDP a datagram socket with `SO_REUSEPORT` bound to its address.
pub fn verify_for(
    fd: BorrowedFd<'_>,
    listener: &crate::config::Listener,
) -> Result<(), RegistrationError> {
    if !listener.protocol.is_datagram() {
        return verify_listener(fd, listener.addr);
    }
    let socket = socket2::SockRef::from(&fd);
    let ty = socket.r#type().map_err(RegistrationError::Inspect)?;
    if ty != Type::DGRAM {
        return Err(RegistrationError::NotDatagram);
    }
    if !socket.reuse_port().map_err(RegistrationError::Inspect)? {
        return Err(RegistrationError::NoReusePort);
    }
    // A connected UDP socket takes its peer's datagrams before any `SO_REUSEPORT`
    // selection: the program never sees them, and its flows cannot be kept or moved.
    if let Ok(peer) = socket.peer_addr() {
        return Err(RegistrationError::Connected(
            peer.as_socket()
                .map_or_else(|| "a non-IP peer".to_owned(), |a| a.to_string()),
        ));
    }
    let actual = socket.local_addr().map_err(RegistrationError::Inspect)?;
    if actual.as_socket() != Some(listener.addr) {
        let actual = actual
            .as_socket()
            .map_or_else(|| "a non-IP address".to_owned(), |a| a.to_string());
        return Err(RegistrationError::WrongAddress {
            expected: listener.addr,
            actual,
        });
    }
    Ok(())
}

/// A bound-and-listening socket for a worker, as a std listener (blocking).
#[cfg(test)]
pub fn worker_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    bind_reuseport(addr, true).map(std::net::TcpListener::from)
}

/// Turns a bind failure into a message that says what to do.
pub fn explain_bind_error(addr: SocketAddr, err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::AddrInUse => format!(
            "cannot bind {addr}: the address is in use by a socket without SO_REUSEPORT \
             (or one owned by another user); stop that process or choose another --listen"
        ),
        io::ErrorKind::PermissionDenied => format!(
            "cannot bind {addr}: permission denied; ports below 1024 need root or \
             CAP_NET_BIND_SERVICE"
        ),
        io::ErrorKind::AddrNotAvailable => {
            format!("cannot bind {addr}: no local interface has this address")
        }
        _ => format!("cannot bind {addr}: {err}"),
    }
}

/// Why a registered fd was refused.
#[derive(Debug, Error)]
pub enum RegistrationError {
    /// `getsockopt`/`getsockname` failed: probably not a socket at all.
    #[error("cannot inspect the registered fd")]
    Inspect(#[source] io::Error),
    /// Not a TCP stream socket.
    #[error("the registered fd is not a TCP stream socket")]
    NotStream,
    /// Not a UDP datagram socket (for a UDP listener).
    #[error("the registered fd is not a UDP datagram socket")]
    NotDatagram,
    /// `SO_REUSEPORT` is off, so it cannot share the port with the other workers.
    #[error("the registered socket does not have SO_REUSEPORT set")]
    NoReusePort,
    /// A UDP socket connected to a peer (`connect()`), which the kernel's reuseport
    /// selection, and so Steer's program, never sees datagrams for.
    #[error("the registered UDP socket is connected to {0}: it must stay unconnected")]
    Connected(String),
    /// `listen()` was never called.
    #[error("the registered socket is not listening")]
    NotListening,
    /// Bound to another address than the cluster's.
    #[error("the registered socket is bound to {actual}, expected {expected}")]
    WrongAddress {
        /// The address the cluster listens on.
        expected: SocketAddr,
        /// What the socket is bound to.
        actual: String,
    },
}

/// Checks that `fd` is a listening TCP socket with `SO_REUSEPORT`, bound to `expected`
/// (`getsockopt(SO_TYPE, SO_REUSEPORT, SO_ACCEPTCONN)`, `getsockname`).
pub fn verify_listener(fd: BorrowedFd<'_>, expected: SocketAddr) -> Result<(), RegistrationError> {
    let socket = socket2::SockRef::from(&fd);
    let ty = socket.r#type().map_err(RegistrationError::Inspect)?;
    if ty != Type::STREAM {
        return Err(RegistrationError::NotStream);
    }
    if !socket.reuse_port().map_err(RegistrationError::Inspect)? {
        return Err(RegistrationError::NoReusePort);
    }
    if !socket.is_listener().map_err(RegistrationError::Inspect)? {
        return Err(RegistrationError::NotListening);
    }
    let actual = socket.local_addr().map_err(RegistrationError::Inspect)?;
    if actual.as_socket() != Some(expected) {
        let actual = actual
            .as_socket()
            .map_or_else(|| "a non-IP address".to_owned(), |a| a.to_string());
        return Err(RegistrationError::WrongAddress { expected, actual });
    }
    Ok(())
}

/// `verify_listener` for anything that has an fd.
pub fn verify(fd: &impl AsFd, expected: SocketAddr) -> Result<(), RegistrationError> {
    verify_listener(fd.as_fd(), expected)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn two_reuseport_listeners_share_a_port_and_pass_verification() {
        let first = worker_listener("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = first.local_addr().expect("addr");
        let second = worker_listener(addr).expect("second socket joins the group");
        verify(&first, addr).expect("valid");
        verify(&second, addr).expect("valid");
    }

    #[test]
    fn a_udp_socket_gets_the_receive_queue_asked_for() {
        let default = bind_udp_reuseport("127.0.0.1:0".parse().expect("addr"), 0).expect("bind");
        let kernel = default.recv_buffer_size().expect("SO_RCVBUF");
        let asked = 4 << 20;
        let socket = bind_udp_reuseport("127.0.0.1:0".parse().expect("addr"), asked).expect("bind");
        let granted = socket.recv_buffer_size().expect("SO_RCVBUF");
        // Root (the tests run as root) gets it whatever `rmem_max` says: doubled.
        assert_eq!(
            granted as u64,
            2 * asked,
            "the kernel's default was {kernel}"
        );
        assert!(granted > kernel);
    }

    #[test]
    fn a_connected_udp_socket_is_refused() {
        let socket = bind_udp_reuseport("127.0.0.1:0".parse().expect("addr"), 0).expect("bind");
        let addr = socket.local_addr().expect("addr").as_socket().expect("ip");
        let listener: crate::config::Listener =
            format!("dns=udp://{addr}").parse().expect("listener");
        verify_for(socket.as_fd(), &listener).expect("an unconnected UDP socket is valid");
        let peer: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        socket.connect(&peer.into()).expect("connect");
        assert!(matches!(
            verify_for(socket.as_fd(), &listener),
            Err(RegistrationError::Connected(p)) if p == "127.0.0.1:9"
        ));
    }

    #[test]
    fn verification_names_what_is_wrong() {
        let plain = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = plain.local_addr().expect("addr");
        assert!(matches!(
            verify(&plain, addr),
            Err(RegistrationError::NoReusePort)
        ));

        let bound = bind_reuseport("127.0.0.1:0".parse().expect("addr"), false).expect("bind");
        let addr = bound.local_addr().expect("addr").as_socket().expect("ip");
        assert!(matches!(
            verify(&bound, addr),
            Err(RegistrationError::NotListening)
        ));

        let listening = worker_listener("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let other: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        assert!(matches!(
            verify(&listening, other),
            Err(RegistrationError::WrongAddress { .. })
        ));

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        assert!(matches!(
            verify(&udp, addr),
            Err(RegistrationError::NotStream)
        ));
    }

    #[test]
    fn port_held_without_reuseport_is_explained() {
        let plain = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = plain.local_addr().expect("addr");
        let err = worker_listener(addr).expect_err("must collide");
        assert!(explain_bind_error(addr, &err).contains("without SO_REUSEPORT"));
    }
}
