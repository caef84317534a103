//! The cluster's listeners: `[NAME=][tcp|udp|quic://]HOST:PORT`, one per `--listen`.
//!
//! Every worker serves every listener: a slot holds one socket per listener, in the
//! listeners' order, and each listener is its own `SO_REUSEPORT` group. A name is what an
//! external worker finds its socket by (`LISTEN_FDNAMES`, systemd's rule: ASCII, no `:`,
//! no control characters); left out, it is `<scheme>-<port>` (`tcp-8000`).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use super::values::parse_listen;

/// Allowed `udp-flow-table` values, as for `client-table-size`: below 1024 the kernel's LRU
/// (which keeps free entries per CPU) would evict flows long before the table is full.
pub const FLOW_TABLE_RANGE: std::ops::RangeInclusive<u64> = 1024..=16_777_216;

/// Allowed `udp-receive-buffer` values: below 64 KiB a UDP socket holds fewer datagrams
/// than the kernel's own default; above 1 GiB the kernel's `int` (which it doubles) would
/// overflow.
pub const UDP_RECEIVE_BUFFER_RANGE: std::ops::RangeInclusive<u64> = (64 << 10)..=(1 << 30);

/// The default `udp-receive-buffer`: 4 MiB, which the kernel doubles to 8 MiB of queue:
/// about 10,000 small datagrams (measured on loopback), or 25 s of 400 datagrams per
/// second (as QUIC stacks ask: quic-go wants 7 MiB, and warns below it).
pub const DEFAULT_UDP_RECEIVE_BUFFER: u64 = 4 << 20;

/// The UDP flow table's settings (`udp-flow-timeout`, `udp-flow-table`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFlows {
    /// A flow idle this long is forgotten; zero: no flow table.
    pub timeout: std::time::Duration,
    /// Entries of each UDP listener's flow table.
    pub table_size: u32,
    /// Set per group, not configured: the group is a QUIC listener's, whose datagrams are
    /// steered by connection ID and whose flow table only keeps handshakes together
    /// (see `steer_select_quic`). A QUIC group keeps its flow table even with a zero
    /// timeout: it then uses the default one.
    pub quic: bool,
}

impl Default for UdpFlows {
    fn default() -> Self {
        UdpFlows {
            timeout: std::time::Duration::from_secs(30),
            table_size: steer_common::DEFAULT_FLOW_TABLE_SIZE,
            quic: false,
        }
    }
}

/// The transport a listener's sockets speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// A listening TCP socket per worker.
    Tcp,
    /// A bound UDP socket per worker.
    Udp,
    /// A UDP socket whose datagrams are steered by QUIC connection ID (not supported yet).
    Quic,
}

impl Protocol {
    /// The scheme as written in `--listen` (`tcp`, `udp`, `quic`).
    pub fn scheme(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Quic => "quic",
        }
    }

    /// Whether its sockets are UDP sockets (UDP and QUIC).
    pub fn is_datagram(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.scheme())
    }
}

/// One address the cluster serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Listener {
    /// Unique within the cluster; what `LISTEN_FDNAMES` and `/status` call it.
    pub name: String,
    /// TCP, UDP or QUIC.
    pub protocol: Protocol,
    /// The address every worker's socket binds (port 0 resolved once the primary bound it).
    pub addr: SocketAddr,
}

impl Listener {
    /// A TCP listener on `addr` with its default name.
    pub fn tcp(addr: SocketAddr) -> Listener {
        Listener {
            name: default_name(Protocol::Tcp, addr),
            protocol: Protocol::Tcp,
            addr,
        }
    }
}

/// `<scheme>-<port>`.
fn default_name(protocol: Protocol, addr: SocketAddr) -> String {
    format!("{}-{}", protocol.scheme(), addr.port())
}

/// Whether `name` can name a listener: non-empty ASCII without `:`, `=` or control
/// characters (systemd's rule for `LISTEN_FDNAMES`, and `=` separates it in `--listen`),
/// at most 255 bytes.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a listener's name cannot be empty".into());
    }
    if name.len() > 255 {
        return Err("a listener's name is at most 255 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !c.is_ascii() || c.is_ascii_control() || *c == ':' || *c == '=')
    {
        return Err(format!(
            "a listener's name is ASCII without ':', '=' or control characters (found {c:?})"
        ));
    }
    Ok(())
}

impl FromStr for Listener {
    type Err = String;

    /// `[NAME=][SCHEME://]HOST:PORT`; no scheme means TCP.
    fn from_str(s: &str) -> Result<Listener, String> {
        let (name, rest) = match s.split_once('=') {
            Some((name, rest)) => (Some(name), rest),
            None => (None, s),
        };
        let (protocol, address) = match rest.split_once("://") {
            Some(("tcp", a)) => (Protocol::Tcp, a),
            Some(("udp", a)) => (Protocol::Udp, a),
            Some(("quic", a)) => (Protocol::Quic, a),
            Some((scheme, _)) => {
                return Err(format!(
                    "unknown scheme {scheme:?}: expected tcp://, udp:// or quic://"
                ));
            }
            None => (Protocol::Tcp, rest),
        };
        let addr = parse_listen(address).map_err(|reason| {
            format!("{reason} (a listener is [NAME=][tcp|udp|quic://]HOST:PORT)")
        })?;
        let name = match name {
            Some(name) => {
                check_name(name)?;
                name.to_owned()
            }
            None => default_name(protocol, addr),
        };
        Ok(Listener {
            name,
            protocol,
            addr,
        })
    }
}

impl fmt::Display for Listener {
    /// The form `--listen` reads back: `NAME=SCHEME://ADDR`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}://{}", self.name, self.protocol, self.addr)
    }
}

/// The first conflict among `listeners`, named by both listeners: the same name twice, the
/// same protocol and address twice, or a wildcard and a specific address of one family on
/// the same protocol and port (two groups, of which the kernel prefers the specific one for
/// its address: the wildcard's workers never see those clients).
pub fn conflict(listeners: &[Listener]) -> Option<String> {
    for (i, a) in listeners.iter().enumerate() {
        for b in &listeners[i + 1..] {
            if a.name == b.name {
                return Some(format!(
                    "two listeners are named {:?} ({a} and {b}): names must be unique",
                    a.name
                ));
            }
            let same_transport = a.protocol.is_datagram() == b.protocol.is_datagram();
            if !same_transport || a.addr.port() != b.addr.port() || a.addr.port() == 0 {
                continue;
            }
            let (x, y) = (a.addr.ip().to_canonical(), b.addr.ip().to_canonical());
            if x == y {
                return Some(format!(
                    "listeners {:?} and {:?} both take {} {}",
                    a.name, b.name, a.protocol, a.addr
                ));
            }
            let wildcard_meets = |w: std::net::IpAddr, other: std::net::IpAddr| {
                // `[::]` is dual-stack: it meets IPv4 addresses too.
                w.is_unspecified() && (w.is_ipv6() || other.is_ipv4())
            };
            if wildcard_meets(x, y) || wildcard_meets(y, x) {
                return Some(format!(
                    "listeners {:?} ({}) and {:?} ({}) overlap on {} port {}: a wildcard and a \
                     specific address form two SO_REUSEPORT groups, and the kernel gives the \
                     specific one its clients; use one of them",
                    a.name,
                    a.addr,
                    b.name,
                    b.addr,
                    a.protocol,
                    a.addr.port()
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Listener {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn a_bare_address_is_a_tcp_listener_named_by_its_port() {
        let l = parse("127.0.0.1:8000");
        assert_eq!(l.protocol, Protocol::Tcp);
        assert_eq!(l.name, "tcp-8000");
        assert_eq!(l.addr, SocketAddr::from(([127, 0, 0, 1], 8000)));
        assert_eq!(parse("[::1]:53").addr.port(), 53);
    }

    #[test]
    fn names_and_schemes_are_read() {
        let l = parse("dns=udp://0.0.0.0:5353");
        assert_eq!((l.name.as_str(), l.protocol), ("dns", Protocol::Udp));
        assert_eq!(parse("udp://[::]:53").name, "udp-53");
        assert_eq!(parse("web=tcp://127.0.0.1:80").protocol, Protocol::Tcp);
        assert_eq!(parse("quic://127.0.0.1:443").protocol, Protocol::Quic);
        assert_eq!(parse(&parse("a=udp://127.0.0.1:9").to_string()).name, "a");
    }

    #[test]
    fn bad_listeners_say_what_is_allowed() {
        for (text, needle) in [
            ("sctp://127.0.0.1:1", "unknown scheme"),
            ("=127.0.0.1:1", "cannot be empty"),
            ("a:b=127.0.0.1:1", "without ':'"),
            ("a\tb=127.0.0.1:1", "control"),
            ("web=nope", "[NAME=][tcp|udp|quic://]HOST:PORT"),
            ("udp://", "HOST:PORT"),
        ] {
            let err = text.parse::<Listener>().expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn conflicts_name_both_listeners() {
        let list = |items: &[&str]| items.iter().map(|s| parse(s)).collect::<Vec<_>>();
        assert_eq!(
            conflict(&list(&[
                "127.0.0.1:8000",
                "udp://127.0.0.1:8000",
                "127.0.0.1:8001"
            ])),
            None,
            "TCP and UDP on one port are two groups that never meet"
        );
        for (items, needles) in [
            (
                &["a=127.0.0.1:1", "a=127.0.0.1:2"][..],
                &["\"a\"", "unique"][..],
            ),
            (
                &["a=udp://127.0.0.1:1", "b=udp://127.0.0.1:1"],
                &["\"a\"", "\"b\"", "both take"],
            ),
            (
                &["a=0.0.0.0:1", "b=127.0.0.1:1"],
                &["\"a\"", "\"b\"", "wildcard"],
            ),
            (
                &["a=udp://127.0.0.1:1", "b=udp://[::]:1"],
                &["\"a\"", "\"b\"", "wildcard"],
            ),
            (
                &["a=quic://127.0.0.1:1", "b=udp://127.0.0.1:1"],
                &["both take"],
            ),
        ] {
            let found = conflict(&list(items)).unwrap_or_else(|| panic!("{items:?}"));
            for needle in needles {
                assert!(found.contains(needle), "{items:?}: {found}");
            }
        }
        assert_eq!(conflict(&list(&["a=[::1]:1", "b=127.0.0.1:1"])), None);
        assert_eq!(conflict(&list(&["a=0.0.0.0:1", "b=[::1]:1"])), None);
    }
}
