//! The ownership probe: is the program deciding for the port's group still Steer's?
//!
//! A same-user process that joins the group can replace the group's program with one
//! `setsockopt` (`SO_ATTACH_REUSEPORT_CBPF` or `_EBPF`), or detach it
//! (`SO_DETACH_REUSEPORT_BPF`), and nothing tells the primary. So once per health interval
//! it connects to the cluster's own port from a fixed local source that `CONFIG` names
//! (port and whole address). Steer's program recognises that SYN, counts it in `PROBE`
//! and drops it (the kernel answers with a reset). Any other outcome means another
//! program, or none, decided: the probe was answered by some socket, or refused without
//! being counted, or dropped silently by a socket whose accept queue is full.
//!
//! Where the probe goes:
//! - a cluster on one address probes that address, if it is local. A non-local address
//!   (`net.ipv4.ip_nonlocal_bind`, a VIP that is on another host for now) is not probed:
//!   the SYN would leave the host. [`is_local`] is asked again each interval;
//! - `0.0.0.0` probes a loopback address (from `127.0.0.1`) that no other group listens
//!   on: a socket of another process on `127.0.0.1:P` forms a group of its own, which the
//!   kernel prefers for that address, so the probe goes to `127.0.0.2:P` then;
//! - `[::]` probes `::1`, or, where `::1` cannot be used (IPv6 disabled on `lo`), the
//!   IPv4-mapped loopback, which reaches the same dual-stack group as IPv4.
//!
//! A UDP group has no handshake, so its probe is one datagram: once per health interval
//! the primary sends it from its own UDP socket (the source `CONFIG` names, bound for the
//! cluster's life, connected to the target so that an ICMP error reaches it). Steer's
//! program recognises the source as for TCP, counts the datagram in `PROBE` and drops it
//! (the kernel answers with ICMP port-unreachable, which the socket reads as
//! `ECONNREFUSED`). A datagram answered by some socket, refused without being counted, or
//! not counted within a health interval (delivered to a socket that does not answer) was
//! decided by another program, or none: the program is attached again. Unlike TCP there
//! is no full accept queue to tell a silent takeover from a firewall rule that drops the
//! probe, so a probe dropped before the group reads as a takeover (attaching again is
//! harmless; the takeover count says it happened).
//!
//! A UDP group on a wildcard address has no port survey (`sock_diag` lists TCP listeners
//! only), so a socket of another process bound to the probe's loopback address (a group
//! of its own, which the kernel prefers for that address) would take every probe: a
//! failed UDP probe of a wildcard group is therefore confirmed through the next loopback
//! address before it counts ([`OwnershipProbe::confirm_elsewhere`]). Counted there, the
//! first address was another group's, and is left alone from then on
//! ([`OwnershipProbe::confirmed`]); failed there too, it is a takeover.
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

/// The probe's fixed source, and the cluster it probes.
#[derive(Debug)]
pub struct OwnershipProbe {
    /// Keeps the source port ours between probes.
    _reservation: Socket,
    source: SocketAddr,
    /// The cluster's address (a wildcard, or the one address it listens on).
    listen: SocketAddr,
    /// The socket the next probe leaves from (bound, not connected).
    next: Option<Socket>,
    /// The probe sent last and still undecided, where it went, and when it left.
    in_flight: Option<(Socket, SocketAddr, Instant)>,
    /// A UDP group's probe: one datagram from the reservation itself.
    udp: bool,
    /// Loopback addresses where another group took a UDP probe: never probed again.
    taken_by_others: Vec<IpAddr>,
    /// The address whose UDP probe failed, while the probe in flight confirms it through
    /// another one.
    confirming: Option<IpAddr>,
}

/// What a UDP probe carries (the program does not read it; a worker that answers it
/// shows it back).
const UDP_PROBE: &[u8] = b"steer-ownership-probe";

impl OwnershipProbe {
    /// A probe of the group listening on `listen`, from a source of its own (see the
    /// module docs). Fails if no source can be bound: a wildcard `[::]` with neither `::1`
    /// nor the IPv4-mapped loopback usable, or an address that is not local.
    pub fn new(listen: SocketAddr, udp: bool) -> io::Result<OwnershipProbe> {
        let (reservation, source) = match listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => reserve(Ipv4Addr::LOCALHOST.into(), udp)?,
            IpAddr::V6(ip) if ip.is_unspecified() => {
                match reserve(Ipv6Addr::LOCALHOST.into(), udp) {
                    Ok(reserved) => reserved,
                    // IPv6 is off on `lo`: the dual-stack group is reached over IPv4 too.
                    Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                        reserve(Ipv4Addr::LOCALHOST.to_ipv6_mapped().into(), udp)?
                    }
                    Err(e) => return Err(e),
                }
            }
            ip => reserve(ip, udp)?,
        };
        let next = if udp {
            reservation.set_nonblocking(true)?;
            None
        } else {
            Some(probe_socket(source)?)
        };
        Ok(OwnershipProbe {
            _reservation: reservation,
            next,
            source,
            listen,
            in_flight: None,
            udp,
            taken_by_others: Vec::new(),
            confirming: None,
        })
    }

    /// Where the next probe should go: the first address that reaches the cluster's group
    /// and that no listener in `shadowed` takes before it (a listener of another group on
    /// that very address, or on the wildcard of an address family that the kernel prefers:
    /// `0.0.0.0` beside a dual-stack `[::]`). `None` if every candidate is shadowed.
    pub fn target(&self, shadowed: &[IpAddr]) -> Option<SocketAddr> {
        let port = self.listen.port();
        let taken = |ip: IpAddr| {
            let ip = ip.to_canonical();
            self.taken_by_others.contains(&ip)
                || self.confirming == Some(ip)
                || shadowed.iter().any(|s| {
                    let s = s.to_canonical();
                    s == ip || (s.is_unspecified() && s.is_ipv4() == ip.is_ipv4())
                })
        };
        if !self.listen.ip().is_unspecified() {
            return Some(self.listen).filter(|t| !taken(t.ip()));
        }
        match self.source.ip() {
            // `::1` is the only IPv6 loopback address.
            IpAddr::V6(ip) if ip.to_ipv4_mapped().is_none() => {
                Some(SocketAddr::new(ip.into(), port)).filter(|t| !taken(t.ip()))
            }
            source => (1..=254u8)
                .map(|last| Ipv4Addr::new(127, 0, 0, last))
                .find(|ip| !taken((*ip).into()))
                .map(|ip| match source {
                    IpAddr::V4(_) => SocketAddr::new(ip.into(), port),
                    IpAddr::V6(_) => SocketAddr::new(ip.to_ipv6_mapped().into(), port),
                }),
        }
    }

    /// After a failed UDP probe to `failed` of a group on a wildcard address: where to
    /// confirm it (the next address that reaches the group), remembering `failed` as
    /// suspect meanwhile. `None` when there is nothing to confirm it through: a TCP probe
    /// (the port survey names other groups' addresses), a group on one address, a
    /// confirmation that failed too, or no other candidate.
    pub fn confirm_elsewhere(
        &mut self,
        failed: SocketAddr,
        shadowed: &[IpAddr],
    ) -> Option<SocketAddr> {
        if !self.udp || !self.listen.ip().is_unspecified() || self.confirming.take().is_some() {
            return None;
        }
        self.confirming = Some(failed.ip().to_canonical());
        let next = self.target(shadowed);
        if next.is_none() {
            self.confirming = None;
        }
        next
    }

    /// A probe reached Steer's program: if it was confirming a failed one, the failed
    /// address is another group's, returned once, and never probed again.
    pub fn confirmed(&mut self) -> Option<IpAddr> {
        let taken = self.confirming.take()?;
        self.taken_by_others.push(taken);
        Some(taken)
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
            .map_or(Duration::ZERO, |(_, _, sent)| sent.elapsed())
    }

    /// Where the probe in flight went.
    pub fn in_flight_to(&self) -> Option<SocketAddr> {
        self.in_flight.as_ref().map(|(_, target, _)| *target)
    }

    /// Closes the probe in flight, whatever becomes of it (its verdict is known).
    pub fn forget(&mut self) {
        self.close_in_flight();
    }

    /// Makes the next probe's socket, then closes the one in flight.
    fn close_in_flight(&mut self) {
        if self.next.is_none() && !self.udp {
            self.next = probe_socket(self.source).ok();
        }
        self.in_flight = None;
    }

    /// Sends a probe to `target` (a non-blocking `connect`).
    pub fn send(&mut self, target: SocketAddr) -> io::Result<()> {
        if self.udp {
            return self.send_datagram(target);
        }
        let socket = match self.next.take() {
            Some(socket) => socket,
            None => probe_socket(self.source)?,
        };
        match socket.connect(&SockAddr::from(target)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
            Err(e) => return Err(e),
        }
        self.in_flight = Some((socket, target, Instant::now()));
        Ok(())
    }

    /// A UDP probe: the reservation connects to `target` (so an ICMP error comes back to
    /// it) and sends one datagram. What an earlier probe left unread is read first.
    fn send_datagram(&mut self, target: SocketAddr) -> io::Result<()> {
        let socket = self._reservation.try_clone()?;
        let mut stale = [std::mem::MaybeUninit::<u8>::uninit(); 64];
        for _ in 0..64 {
            match socket.recv(&mut stale) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => continue,
            }
        }
        socket.connect(&SockAddr::from(target))?;
        match socket.send(UDP_PROBE) {
            Ok(_) => {}
            // An ICMP error of the last probe, reported on this send: the datagram was not
            // sent; the next check sends another.
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                socket.send(UDP_PROBE)?;
            }
            Err(e) => return Err(e),
        }
        self.in_flight = Some((socket, target, Instant::now()));
        Ok(())
    }

    /// A UDP probe's outcome: an answer, an ICMP refusal, or nothing yet.
    fn datagram_outcome(&mut self, wait: Duration) -> io::Result<Outcome> {
        let Some((socket, _, _)) = self.in_flight.as_ref() else {
            return Ok(Outcome::Pending);
        };
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(0) => return Ok(Outcome::Pending),
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
        let mut answer = [std::mem::MaybeUninit::<u8>::uninit(); 512];
        let outcome = match socket.recv(&mut answer) {
            Ok(_) => Ok(Outcome::Answered),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(Outcome::Refused),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Outcome::Pending),
            Err(e) => Err(e),
        };
        if !matches!(outcome, Ok(Outcome::Pending)) {
            self.close_in_flight();
        }
        outcome
    }

    /// Whether this probes a UDP group.
    pub fn is_udp(&self) -> bool {
        self.udp
    }

    /// Waits up to `wait` for the probe in flight to be decided (`poll(2)` for the reset
    /// or the handshake), and forgets it unless it is still pending. A probe that failed
    /// some other way (the kernel gave up on its SYNs: `ETIMEDOUT`) is forgotten too, and
    /// the error returned, so the next check sends a new one.
    pub fn outcome(&mut self, wait: Duration) -> io::Result<Outcome> {
        if self.udp {
            return self.datagram_outcome(wait);
        }
        let Some((socket, _, _)) = self.in_flight.as_ref() else {
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

/// Binds the probe's source: `ip` and a port of the kernel's choosing, kept by the
/// returned socket.
fn reserve(ip: IpAddr, udp: bool) -> io::Result<(Socket, SocketAddr)> {
    let reservation = if udp {
        udp_source_socket(ip)?
    } else {
        source_socket(ip)?
    };
    reservation.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    let source = reservation
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("the probe's source has no IP address"))?;
    Ok((reservation, source))
}

/// A socket bound to the probe's source, closing with a reset, non-blocking.
fn probe_socket(source: SocketAddr) -> io::Result<Socket> {
    let socket = source_socket(source.ip())?;
    socket.bind(&SockAddr::from(source))?;
    socket.set_linger(Some(Duration::ZERO))?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A UDP socket for the probe's source (not `SO_REUSEADDR`: the port is its alone).
fn udp_source_socket(ip: IpAddr) -> io::Result<Socket> {
    let domain = if ip.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if ip.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    Ok(socket)
}

fn source_socket(ip: IpAddr) -> io::Result<Socket> {
    let domain = if ip.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if ip.is_ipv6() {
        // An IPv4-mapped source needs a dual-stack socket.
        socket.set_only_v6(false)?;
    }
    Ok(socket)
}

/// Whether `ip` is an address of this host (in this network namespace): loopback, or one
/// the kernel routes to itself. Asked by routing a UDP socket to it (`connect(2)` sends
/// nothing): the kernel picks a local address as its own source. A non-local VIP bound
/// with `ip_nonlocal_bind` routes through another interface, from another source.
pub fn is_local(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    let domain = if ip.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let Ok(socket) = Socket::new(domain, Type::DGRAM, None) else {
        return false;
    };
    socket
        .connect(&SockAddr::from(SocketAddr::new(ip, 9)))
        .is_ok()
        && socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|source| source.ip() == ip)
}

/// The probe's source port as the program reads it from the TCP header (two bytes in
/// network order, loaded as a native `u16`).
pub fn port_in_packet(source: SocketAddr) -> u32 {
    u32::from(u16::from_ne_bytes(source.port().to_be_bytes()))
}

/// The probe's source address as the program reads it from the IP header: whether the
/// packet is IPv6, and the address bytes in network order read as native words (an
/// IPv4 address in word 0). An IPv4-mapped source sends IPv4 packets.
pub fn address_in_packet(source: SocketAddr) -> (bool, [u32; 4]) {
    match source.ip().to_canonical() {
        IpAddr::V4(ip) => (false, [u32::from_ne_bytes(ip.octets()), 0, 0, 0]),
        IpAddr::V6(ip) => {
            let o = ip.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (true, [word(0), word(4), word(8), word(12)])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("address")
    }

    #[test]
    fn a_wildcard_cluster_is_probed_where_no_other_group_listens() {
        let probe = OwnershipProbe::new(addr("0.0.0.0:8080"), false).expect("probe");
        assert_eq!(probe.target(&[]), Some(addr("127.0.0.1:8080")));
        let shadowed = ["127.0.0.1".parse().expect("ip")];
        assert_eq!(probe.target(&shadowed), Some(addr("127.0.0.2:8080")));
        let everything = ["0.0.0.0".parse().expect("ip")];
        assert_eq!(probe.target(&everything), None);
    }

    #[test]
    fn a_cluster_on_one_address_is_probed_there_or_not_at_all() {
        let probe = OwnershipProbe::new(addr("127.0.0.3:8080"), true).expect("probe");
        assert_eq!(probe.target(&[]), Some(addr("127.0.0.3:8080")));
        assert_eq!(probe.target(&["127.0.0.3".parse().expect("ip")]), None);
    }

    #[test]
    fn a_failed_udp_probe_of_a_wildcard_is_confirmed_once_through_another_address() {
        let mut probe = OwnershipProbe::new(addr("0.0.0.0:8080"), true).expect("probe");
        let first = probe.target(&[]).expect("a target");
        assert_eq!(first, addr("127.0.0.1:8080"));
        let second = probe.confirm_elsewhere(first, &[]);
        assert_eq!(second, Some(addr("127.0.0.2:8080")));
        assert_eq!(
            probe.confirm_elsewhere(addr("127.0.0.2:8080"), &[]),
            None,
            "a failed confirmation is a takeover"
        );
        assert_eq!(
            probe.target(&[]),
            Some(first),
            "and the first address is kept"
        );
        assert_eq!(probe.confirmed(), None, "nothing was being confirmed");
        let second = probe.confirm_elsewhere(first, &[]).expect("confirm");
        assert_eq!(
            probe.confirmed(),
            Some(first.ip()),
            "another group's address"
        );
        assert_eq!(probe.target(&[]), Some(second), "never probed again");
        let mut one = OwnershipProbe::new(addr("127.0.0.3:8080"), true).expect("probe");
        assert_eq!(one.confirm_elsewhere(addr("127.0.0.3:8080"), &[]), None);
        let mut tcp = OwnershipProbe::new(addr("0.0.0.0:8080"), false).expect("probe");
        assert_eq!(
            tcp.confirm_elsewhere(first, &[]),
            None,
            "TCP has the port survey"
        );
    }

    #[test]
    fn the_probe_source_is_compared_whole() {
        let v6 = address_in_packet(addr("[2001:db8::1]:1"));
        let other = address_in_packet(addr("[2001:db8::2]:1"));
        assert!(v6.0);
        assert_ne!(v6, other);
        assert_eq!(
            address_in_packet(addr("[::ffff:127.0.0.1]:1")),
            address_in_packet(addr("127.0.0.1:1")),
            "an IPv4-mapped source sends IPv4 packets"
        );
    }

    #[test]
    fn loopback_is_local_and_a_documentation_address_is_not() {
        assert!(is_local("127.0.0.2".parse().expect("ip")));
        assert!(!is_local("192.0.2.1".parse().expect("ip")));
    }
}
