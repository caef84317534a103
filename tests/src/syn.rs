//! Raw TCP SYNs that never become connections: phantom load for steering tests.
//!
//! Each SYN comes from a spoofed loopback source (`127.1.x.y`, a port nobody uses). The
//! listener answers with a SYN-ACK to that address; the local stack finds no socket there
//! and resets the half-open request. So the SYN runs the reuseport program once and the
//! handshake never completes: nothing reaches `accept`. Needs root (a raw socket).

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// A raw IPv4 socket that writes whole packets (`IPPROTO_RAW`, so `IP_HDRINCL`).
#[derive(Debug)]
pub struct SynSender {
    socket: Socket,
    sent: u64,
}

impl SynSender {
    /// Opens the raw socket.
    ///
    /// # Errors
    ///
    /// Without `CAP_NET_RAW`.
    pub fn open() -> io::Result<SynSender> {
        Ok(SynSender {
            socket: raw_socket()?,
            sent: 0,
        })
    }

    /// Sends `count` SYNs to `target`, each from its own spoofed source.
    ///
    /// # Errors
    ///
    /// What `sendto(2)` reports.
    pub fn send(&mut self, target: SocketAddrV4, count: u64) -> io::Result<()> {
        let to = SockAddr::from(target);
        for _ in 0..count {
            let n = self.sent;
            self.sent += 1;
            let source = SocketAddrV4::new(
                Ipv4Addr::new(127, 1, (n >> 8) as u8, n as u8),
                20_000 + (n % 40_000) as u16,
            );
            self.socket
                .send_to(&syn_packet(source, target, n as u32), &to)?;
        }
        Ok(())
    }

    /// SYNs sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }
}

/// Sends UDP datagrams from spoofed IPv4 sources on 127.0.0.0/8 through a raw socket
/// (root), each from a source address and port of its own: a flood of new flows that no
/// socket owns.
#[derive(Debug)]
pub struct SpoofedDatagrams {
    socket: Socket,
    sent: u64,
}

impl SpoofedDatagrams {
    /// Opens the raw socket.
    ///
    /// # Errors
    ///
    /// Without `CAP_NET_RAW`.
    pub fn open() -> io::Result<SpoofedDatagrams> {
        Ok(SpoofedDatagrams {
            socket: raw_socket()?,
            sent: 0,
        })
    }

    /// Sends `count` datagrams to `target`, each from a new source (127.2.x.y and up,
    /// ports 20000-59999).
    ///
    /// # Errors
    ///
    /// What `sendto(2)` reports.
    pub fn send(&mut self, target: SocketAddrV4, count: u64) -> io::Result<()> {
        let to = SockAddr::from(target);
        for _ in 0..count {
            let n = self.sent;
            self.sent += 1;
            let source = SocketAddrV4::new(
                Ipv4Addr::new(127, 2 + (n >> 16) as u8, (n >> 8) as u8, n as u8),
                20_000 + (n % 40_000) as u16,
            );
            self.socket.send_to(&datagram(source, target), &to)?;
        }
        Ok(())
    }

    /// Datagrams sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }
}

/// An IPv4 header (checksum, id and length left to the kernel) and a UDP datagram of 8
/// payload bytes, without a UDP checksum (0: none, allowed over IPv4).
fn datagram(source: SocketAddrV4, target: SocketAddrV4) -> [u8; 36] {
    let mut packet = [0u8; 36];
    packet[0] = 0x45; // IPv4, 5-word header
    packet[8] = 64; // TTL
    packet[9] = libc::IPPROTO_UDP as u8;
    packet[12..16].copy_from_slice(&source.ip().octets());
    packet[16..20].copy_from_slice(&target.ip().octets());
    let udp = &mut packet[20..];
    udp[0..2].copy_from_slice(&source.port().to_be_bytes());
    udp[2..4].copy_from_slice(&target.port().to_be_bytes());
    udp[4..6].copy_from_slice(&16u16.to_be_bytes());
    udp[8..16].copy_from_slice(b"spoofed!");
    packet
}

/// A raw IPv4 socket that writes whole packets (`IPPROTO_RAW`, so `IP_HDRINCL`).
fn raw_socket() -> io::Result<Socket> {
    Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
}

/// An IPv4 header (checksum, id and length left to the kernel) and a TCP SYN.
fn syn_packet(source: SocketAddrV4, target: SocketAddrV4, seq: u32) -> [u8; 40] {
    let mut packet = [0u8; 40];
    packet[0] = 0x45; // IPv4, 5-word header
    packet[8] = 64; // TTL
    packet[9] = libc::IPPROTO_TCP as u8;
    packet[12..16].copy_from_slice(&source.ip().octets());
    packet[16..20].copy_from_slice(&target.ip().octets());
    let tcp = &mut packet[20..];
    tcp[0..2].copy_from_slice(&source.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&target.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4; // 5-word header
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let checksum = tcp_checksum(*source.ip(), *target.ip(), &packet[20..]);
    packet[36..38].copy_from_slice(&checksum.to_be_bytes());
    packet
}

/// The TCP checksum over the IPv4 pseudo-header and `segment` (RFC 793).
fn tcp_checksum(source: Ipv4Addr, target: Ipv4Addr, segment: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&source.octets());
    add(&target.octets());
    add(&[0, libc::IPPROTO_TCP as u8]);
    add(&(segment.len() as u16).to_be_bytes());
    add(segment);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_with_its_checksum_sums_to_zero() {
        let (s, t) = (
            SocketAddrV4::new(Ipv4Addr::new(127, 1, 0, 1), 20_001),
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8000),
        );
        let packet = syn_packet(s, t, 7);
        assert_eq!(tcp_checksum(*s.ip(), *t.ip(), &packet[20..]), 0);
    }

    #[test]
    fn a_syn_reaches_a_listener_and_never_becomes_a_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let std::net::SocketAddr::V4(target) = listener.local_addr().expect("addr") else {
            panic!("v4");
        };
        let mut sender = SynSender::open().expect("raw socket (root)");
        sender.send(target, 50).expect("send");
        assert_eq!(sender.sent(), 50);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            listener.accept().is_err(),
            "a spoofed SYN's handshake must never complete"
        );
    }
}
