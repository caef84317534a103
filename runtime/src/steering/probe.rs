//! The ownership probe: is the program deciding for the port's group still Steer's?
//!
//! A same-user process that joins the group can replace the group's program with one
//! `setsockopt` (`SO_ATTACH_REUSEPORT_CBPF` or `_EBPF`), or detach it
//! (`SO_DETACH_REUSEPORT_BPF`), and nothing tells the primary. So once per health interval
//! it connects to the cluster's own address from a fixed local source that `CONFIG`
//! names. Steer's program recognises that SYN, counts it in `PROBE` and drops it (the
//! kernel answers with a reset). Any other outcome means another program, or none,
//! decided: the probe was answered by some socket, or refused without being counted.
//!
//! The source is a local address and a port reserved for the cluster's life (a bound,
//! never-connected `SO_REUSEADDR` socket), so no packet from outside can look like the
//! probe, and `CONFIG` is written once. Each probe closes with a reset (`SO_LINGER` 0), so
//! the four-tuple can be used again at once. The next probe's socket is made when the last
//! one is closed, so the primary holds the same two fds between probes as during one.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// What became of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Refused: dropped by a program (Steer's, if it counted it).
    Refused,
    /// A socket of the group completed the handshake: Steer's program never does that.
    Answered,
    /// Nothing yet: looked at again shortly. A probe still pending after a whole health
    /// interval, which Steer's program never saw, is a takeover too: a socket whose
    /// program picked it and whose accept queue is full drops SYNs without a word.
    Pending,
}

/// The probe's fixed source and target.
#[derive(Debug)]
pub struct OwnershipProbe {
    /// Keeps the source port ours between probes.
    _reservation: Socket,
    source: SocketAddr,
    target: SocketAddr,
    /// The socket the next probe leaves from (bound, not connected).
    next: Option<Socket>,
    /// The probe sent last and still undecided, and when it left.
    in_flight: Option<(Socket, Instant)>,
}

impl OwnershipProbe {
    /// A probe of the group listening on `listen`: from the listen address itself (or
    /// loopback for a wildcard address) to `listen`.
    pub fn new(listen: SocketAddr) -> io::Result<OwnershipProbe> {
        let ip = match listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let target = SocketAddr::new(ip, listen.port());
        let reservation = source_socket(target)?;
        reservation.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
        let source = reservation
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("the probe's source has no IP address"))?;
        Ok(OwnershipProbe {
            _reservation: reservation,
            next: Some(probe_socket(source, target)?),
            source,
            target,
            in_flight: None,
        })
    }

    /// The probe's source address.
    pub fn source(&self) -> SocketAddr {
        self.source
    }

    /// Whether a probe sent earlier is still waiting for its outcome.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// How long the probe in flight has been on its way (zero if none is).
    pub fn waited(&self) -> Duration {
        self.in_flight
            .as_ref()
            .map_or(Duration::ZERO, |(_, sent)| sent.elapsed())
    }

    /// Closes the probe in flight, whatever becomes of it (its verdict is known).
    pub fn forget(&mut self) {
        self.close_in_flight();
    }

    /// Makes the next probe's socket, then closes the one in flight.
    fn close_in_flight(&mut self) {
        if self.next.is_none() {
            self.next = probe_socket(self.source, self.target).ok();
        }
        self.in_flight = None;
    }

    /// Sends a probe (a non-blocking `connect`).
    pub fn send(&mut self) -> io::Result<()> {
        let socket = match self.next.take() {
            Some(socket) => socket,
            None => probe_socket(self.source, self.target)?,
        };
        match socket.connect(&SockAddr::from(self.target)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
            Err(e) => return Err(e),
        }
        self.in_flight = Some((socket, Instant::now()));
        Ok(())
    }

    /// Waits up to `wait` for the probe in flight to be decided (`poll(2)` for the reset
    /// or the handshake), and forgets it unless it is still pending. A probe that failed
    /// some other way (the kernel gave up on its SYNs: `ETIMEDOUT`) is forgotten too, and
    /// the error returned, so the next check sends a new one.
    pub fn outcome(&mut self, wait: Duration) -> io::Result<Outcome> {
        let Some((socket, _)) = self.in_flight.as_ref() else {
            return Ok(Outcome::Pending);
        };
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLOUT)];
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(0) => return Ok(Outcome::Pending),
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
        let outcome = match socket.take_error() {
            Ok(None) if socket.peer_addr().is_ok() => Ok(Outcome::Answered),
            Ok(None) => Ok(Outcome::Pending),
            Ok(Some(e)) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(Outcome::Refused),
            Ok(Some(e)) | Err(e) => Err(e),
        };
        if !matches!(outcome, Ok(Outcome::Pending)) {
            self.close_in_flight();
        }
        outcome
    }
}

/// A socket bound to the probe's source, closing with a reset, non-blocking.
fn probe_socket(source: SocketAddr, target: SocketAddr) -> io::Result<Socket> {
    let socket = source_socket(target)?;
    socket.bind(&SockAddr::from(source))?;
    socket.set_linger(Some(Duration::ZERO))?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn source_socket(target: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    Ok(socket)
}

/// The probe's source port as the program reads it from the TCP header (two bytes in
/// network order, loaded as a native `u16`).
pub fn port_in_packet(source: SocketAddr) -> u32 {
    u32::from(u16::from_ne_bytes(source.port().to_be_bytes()))
}

/// [`steer_common::hash_client`] of the probe's source address, as the program computes
/// it from the IP header.
pub fn client_in_packet(source: SocketAddr) -> u32 {
    match source.ip() {
        IpAddr::V4(ip) => {
            steer_common::hash_client([u32::from_ne_bytes(ip.octets()), 0, 0, 0], false)
        }
        IpAddr::V6(ip) => {
            let o = ip.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            steer_common::hash_client([word(0), word(4), word(8), word(12)], true)
        }
    }
}
