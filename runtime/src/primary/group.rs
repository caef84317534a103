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
    ) -> Result<Group, String> {
        // A UDP group keeps flows on their process (`FLOWS`); a QUIC one, until its
        // connection IDs are steered, too.
        let flows = listener.protocol.is_datagram().then_some(flows);
        let steering = Steering::new(balance, slots, limits, flows).map_err(|err| {
            format!(
                "--balance {balance}{}: {}",
                match limits.rate {
                    Some(rate) => format!(" with --client-conn-rate {rate}"),
                    None => String::new(),
                },
                crate::errors::error_chain(&err)
            )
        })?;
        let reservation = crate::listener::reserve_for(&listener)
            .map_err(|err| crate::listener::explain_bind_error(listener.addr, &err))?;
        listener.addr = reservation
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| format!("cannot read the bound address of {}", listener.addr))?;
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
