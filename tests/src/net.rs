//! Free TCP ports for clusters under test.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{Mutex, PoisonError};

/// Ports this process has already handed out; tests run in parallel threads and a port
/// returned twice would make two clusters collide.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// Binds `127.0.0.1:0` (`bind(2)` with port 0 lets the kernel choose), reads the port and
/// closes the socket. Another process could take the port before the caller binds it; that
/// race is accepted in tests. Within this process a port is never returned twice.
///
/// # Panics
///
/// If binding fails, or the kernel keeps returning ports already handed out.
pub fn free_port() -> u16 {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    for _ in 0..1000 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("binding 127.0.0.1:0 to find a free port");
        let port = listener
            .local_addr()
            .expect("reading the local address of a bound listener")
            .port();
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("the kernel returned only ports already handed out, 1000 times in a row");
}

/// `127.0.0.1:<free port>`; see [`free_port`].
pub fn free_local_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// The counter `name` of group `group` (`TcpExt`, `Udp`, `Ip`, ..) in `/proc/net/netstat`
/// or `/proc/net/snmp`, this network namespace's. For example `TcpExt` `TCPSynRetrans`
/// (SYNs a client sent again): a connection whose first SYN was dropped after the
/// reuseport program chose a socket runs the program again, and tests that compare the
/// program's selections with accepted connections allow for these. `Udp` `RcvbufErrors`
/// and `NoPorts` say where datagrams were lost.
///
/// # Panics
///
/// If neither file can be read or has such a counter.
pub fn net_counter(group: &str, name: &str) -> u64 {
    let heading = format!("{group}:");
    for file in ["/proc/net/netstat", "/proc/net/snmp"] {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("read {file}: {e}"));
        let mut lines = text.lines();
        while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
            if !names.starts_with(&heading) {
                continue;
            }
            if let Some((_, value)) = names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == name)
            {
                return value.parse().expect("a counter");
            }
        }
    }
    panic!("no counter {group} {name} in /proc/net/netstat or /proc/net/snmp");
}

/// A mark in the host's count of TCP handshakes the reuseport program may have seen twice:
/// SYNs a client sent again (`TCPSynRetrans`; the first may have been dropped after the
/// program chose a socket, on a full queue) and syncookie ACKs (`SyncookiesRecv`; the
/// program runs for those too). Host-wide, so an upper bound for one test's connections.
#[derive(Debug, Clone, Copy)]
pub struct SeenTwice(u64);

impl SeenTwice {
    /// The counts now.
    pub fn mark() -> SeenTwice {
        SeenTwice(Self::now())
    }

    /// How many handshakes may have been seen twice since the mark.
    pub fn since(&self) -> u64 {
        Self::now().saturating_sub(self.0)
    }

    fn now() -> u64 {
        net_counter("TcpExt", "TCPSynRetrans") + net_counter("TcpExt", "SyncookiesRecv")
    }

    /// Asserts that the program's per-slot `selections` are the connections each slot
    /// `accepted`, plus no more than the handshakes seen twice since the mark and one in a
    /// thousand. CI saw one selection in 10,000 sequential connections with no SYN sent
    /// again and no syncookie (cause not found).
    ///
    /// # Panics
    ///
    /// If they are not (`context` goes in the message).
    pub fn assert_selections_cover(&self, selections: &[u64], accepted: &[u64], context: &str) {
        let twice = self.since() + accepted.iter().sum::<u64>() / 1000;
        let extra = selections
            .iter()
            .sum::<u64>()
            .saturating_sub(accepted.iter().sum::<u64>());
        assert!(
            selections.len() == accepted.len()
                && selections.iter().zip(accepted).all(|(s, a)| s >= a)
                && extra <= twice,
            "the program's selections {selections:?} are the connections {accepted:?} plus at \
             most the {twice} handshakes seen twice (and 1 in 1,000): {context}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_bindable_and_never_repeats() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "ports repeated: {ports:?}");
        assert!(ports.iter().all(|&port| port != 0));
        TcpListener::bind((Ipv4Addr::LOCALHOST, ports[0])).expect("free port is bindable");
    }

    #[test]
    fn free_local_addr_is_on_loopback() {
        let addr = free_local_addr();
        assert_eq!(addr.ip(), Ipv4Addr::LOCALHOST);
        assert_ne!(addr.port(), 0);
    }
}
