//! One listener's `SO_REUSEPORT` group as the primary keeps it: the listener (its port
//! resolved), the address reservation, the steering that decides for the group, and the
//! port's foreign listeners.
//!
//! Every listener is a group of its own, with a program object of its own (its own
//! `SOCKETS`, `CONFIG`, counters and probe state), so each integrity guarantee holds per
//! group: only the sockets the primary registered in that group are picked, a takeover of
//! one group is repaired through one of its own sockets, and its ownership probe goes to
//! its own address. What is per worker, not per listener, is shared: a worker's load
//! record (`least-loaded`) sits in every group's `LOADS`.

use crate::config::{Balance, ClientLimits, Listener, Protocol, UdpFlows};
use crate::steering::ebpf::Pins;
use crate::steering::foreign::PortSurvey;
use crate::steering::{Steering, SteeringError};

/// One listener's group.
#[derive(Debug)]
pub(crate) struct Group {
    /// The listener, with port 0 resolved.
    pub listener: Listener,
    /// What decides for the group.
    pub steering: Steering,
    /// The port's listeners that are not this cluster's, as last surveyed (TCP only).
    pub port: PortSurvey,
    /// Keeps the address the cluster's while no worker holds it (see [`Group::open`]).
    _reservation: Option<socket2::Socket>,
}

impl Group {
    /// Reserves `listener`'s address (resolving port 0) and sets up its steering.
    ///
    /// A TCP reservation is bound and never listens, so it is no member of the listening
    /// group. A UDP socket is a member as soon as it is bound: under Steer's program it is
    /// never picked (it is not in `SOCKETS`), but under `kernel` the kernel's hash would
    /// hand it a share of the datagrams, which nobody reads. So under `kernel` a UDP
    /// reservation only resolves the port and is closed at once.
    pub fn open(
        mut listener: Listener,
        balance: Balance,
        slots: u32,
        limits: &ClientLimits,
        flows: UdpFlows,
        successor: bool,
    ) -> Result<Group, String> {
        let reservation = crate::listener::reserve_for(&listener)
            .map_err(|err| crate::listener::explain_bind_error(listener.addr, &err))?;
        listener.addr = reservation
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| format!("cannot read the bound address of {}", listener.addr))?;
        // A UDP group keeps flows on their process (`FLOWS`); a QUIC one steers by
        // connection ID and keeps only handshakes together there. Their flow maps are
        // pinned, for a successor.
        let datagram = listener.protocol.is_datagram();
        let quic = listener.protocol == Protocol::Quic;
        let flows = datagram.then_some(UdpFlows {
            quic,
            timeout: if quic && flows.timeout.is_zero() {
                UdpFlows::default().timeout
            } else {
                flows.timeout
            },
            ..flows
        });
        let pins = datagram
            .then(|| pin_dir(&listener, successor))
            .flatten()
            .map(|dir| Pins {
                dir,
                reuse: successor,
            });
        let steering = Steering::new(balance, slots, limits, flows, pins).map_err(|err| {
            format!(
                "--balance {balance}{}: {}",
                match limits.rate {
                    Some(rate) => format!(" with --client-conn-rate {rate}"),
                    None => String::new(),
                },
                crate::errors::error_chain(&err)
            )
        })?;
        let keep = !listener.protocol.is_datagram() || steering.is_ebpf();
        Ok(Group {
            listener,
            steering,
            port: PortSurvey::default(),
            _reservation: keep.then_some(reservation),
        })
    }

    /// Whether the group's sockets are TCP listeners.
    pub fn is_tcp(&self) -> bool {
        self.listener.protocol == Protocol::Tcp
    }
}

/// Where a UDP listener's flow maps are pinned: `/sys/fs/bpf/steer/<`[`pin_name`]`>`,
/// if `/sys/fs/bpf` is a bpf filesystem (systemd mounts one; else this mounts it, as
/// bpftool does); `None` otherwise, said: then a primary upgrade moves the flows to the
/// new primary's workers.
fn pin_dir(listener: &Listener, successor: bool) -> Option<std::path::PathBuf> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let root = std::path::Path::new("/sys/fs/bpf");
    let is_bpffs =
        || nix::sys::statfs::statfs(root).is_ok_and(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC);
    // Mounted where systemd (and bpftool, when it pins) mounts it, if nobody did: a
    // container or a minimal host. Needs CAP_SYS_ADMIN; without it, no pins.
    let mounted = is_bpffs()
        || (nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .is_ok()
            && is_bpffs());
    if !mounted {
        tracing::warn!(
            listener = %listener.name,
            "/sys/fs/bpf is not a bpf filesystem: this listener's UDP flows will move to the new primary's workers on an upgrade (SIGUSR1)"
        );
        return None;
    }
    let dir = root.join("steer");
    if !successor {
        collect_stale_pins(&dir);
    }
    Some(dir.join(pin_name(listener.protocol.scheme(), listener.addr)))
}

/// A pin directory's name: `<scheme>-<address as hex>-<port>` (bpffs refuses names with
/// a dot, and the address must read back for [`collect_stale_pins`]).
fn pin_name(scheme: &str, addr: std::net::SocketAddr) -> String {
    let ip: String = match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().iter().map(|b| format!("{b:02x}")).collect(),
        std::net::IpAddr::V6(ip) => ip.octets().iter().map(|b| format!("{b:02x}")).collect(),
    };
    format!("{scheme}-{ip}-{}", addr.port())
}

/// Removes the pins of UDP listeners that no socket is bound to any more: a cluster
/// killed outright (SIGKILL) leaves its maps pinned, and a pinned flow table keeps its
/// memory. A UDP socket bound there without `SO_REUSEPORT` succeeds only if nobody holds
/// the address.
fn collect_stale_pins(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(addr) = name.to_str().and_then(parse_pin_name) else {
            continue;
        };
        if std::net::UdpSocket::bind(addr).is_ok() {
            Pins {
                dir: entry.path(),
                reuse: false,
            }
            .remove();
        }
    }
}

/// The address of a [`pin_name`] of a UDP or QUIC listener.
fn parse_pin_name(name: &str) -> Option<std::net::SocketAddr> {
    let mut parts = name.splitn(3, '-');
    let (scheme, ip, port) = (parts.next()?, parts.next()?, parts.next()?);
    if scheme != "udp" && scheme != "quic" {
        return None;
    }
    let bytes: Vec<u8> = (0..ip.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(ip.get(i..i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port.parse().ok()?))
}

/// Applies `f` to each group's steering, and returns the first error (after trying all).
pub(crate) fn each(
    groups: &mut [Group],
    mut f: impl FnMut(&mut Steering) -> Result<(), SteeringError>,
) -> Result<(), SteeringError> {
    let mut first = None;
    for group in groups {
        if let Err(err) = f(&mut group.steering) {
            first.get_or_insert(err);
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_name_reads_back_as_its_address() {
        for addr in ["127.0.0.1:53", "[::1]:8443", "0.0.0.0:9"] {
            let addr: std::net::SocketAddr = addr.parse().expect("an address");
            let name = pin_name("udp", addr);
            assert!(!name.contains('.'), "bpffs refuses dots: {name}");
            assert_eq!(parse_pin_name(&name), Some(addr), "{name}");
        }
        assert_eq!(parse_pin_name("tcp-7f000001-80"), None);
        assert_eq!(parse_pin_name("udp-7f0000-80"), None);
        assert_eq!(parse_pin_name("udp-zz000001-80"), None);
    }
}
