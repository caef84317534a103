//! Listeners on the cluster's port that are not the cluster's.
//!
//! Once per health interval the primary lists the port's listening sockets in both
//! address families ([`super::queues`]) and sets apart those that are not its workers'
//! (nor its own). Where such a socket sits decides what it gets:
//!
//! - on the cluster's own address, in the same family, bound to no interface: it joined
//!   Steer's `SO_REUSEPORT` group. Under an eBPF policy Steer's program never picks it;
//!   under `kernel` it gets its share of the kernel's hash;
//! - anywhere else on the port (a more specific address beside a wildcard cluster, the
//!   other family, an interface): it forms a group of its own. The kernel looks up the most
//!   specific address first, and, on one wildcard, an IPv4 socket before a dual-stack
//!   one: a group that it prefers gets those connections, and Steer's program is never
//!   asked. Steer cannot steer them away; it reports the socket.
//!
//! Each foreign socket is reported once (by inode) with its address, and counted in
//! `/status` (`primary.foreign_listeners`) and `/metrics` (`steer_foreign_listeners`) for
//! as long as it listens. The addresses of foreign groups are also where the ownership
//! probe must not go ([`super::probe`]).

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};

use super::queues::{ListenQueues, Listener};

/// How a foreign listener stands to the cluster's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// In Steer's group: Steer's program never picks it.
    InGroup,
    /// A group of its own, which the kernel prefers for the connections it matches.
    OwnGroup,
}

/// A listening socket on the port that is not the cluster's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForeignListener {
    /// What `sock_diag` says of it.
    pub listener: Listener,
    /// In Steer's group, or a group of its own.
    pub standing: Standing,
}

impl ForeignListener {
    /// Classifies `listener` against a cluster listening on `cluster` (a dual-stack socket
    /// if IPv6).
    pub fn of(listener: Listener, cluster: SocketAddr) -> ForeignListener {
        let standing = if listener.ipv6 == cluster.is_ipv6()
            && listener.address.ip() == cluster.ip()
            && listener.interface == 0
        {
            Standing::InGroup
        } else {
            Standing::OwnGroup
        };
        ForeignListener { listener, standing }
    }

    /// Which of the port's connections it takes, for the operator.
    pub fn takes(&self, cluster: SocketAddr) -> String {
        let ip = self.listener.address.ip().to_canonical();
        if self.standing == Standing::InGroup {
            return "none under an eBPF policy: it is in Steer's SO_REUSEPORT group, where \
                    Steer's program never picks it (under --balance kernel, its share of \
                    the kernel's hash)"
                .into();
        }
        let which = if self.listener.interface != 0 {
            format!(
                "the connections arriving on interface #{} that its address matches",
                self.listener.interface
            )
        } else if !ip.is_unspecified() {
            format!("every connection to {ip}")
        } else if ip.is_ipv4() && cluster.is_ipv6() && cluster.ip().is_unspecified() {
            "every IPv4 connection to the port (the kernel prefers an IPv4 socket to a \
             dual-stack one)"
                .into()
        } else if ip.is_ipv4() != cluster.ip().to_canonical().is_ipv4() {
            "the port's connections in the other address family, which the cluster does \
             not listen for"
                .into()
        } else {
            "the port's connections to every address but the cluster's".into()
        };
        format!(
            "{which}: it forms a SO_REUSEPORT group of its own, which the kernel prefers for \
             them, so Steer cannot steer them away"
        )
    }

    /// Whether the ownership probe must stay away from its address (see
    /// [`super::probe::OwnershipProbe::target`]).
    pub fn shadows_probe(&self) -> bool {
        self.standing == Standing::OwnGroup
    }
}

/// The port's listeners, surveyed once per health interval.
#[derive(Debug, Default)]
pub struct PortSurvey {
    queues: Option<ListenQueues>,
    /// Inodes already reported, so each socket is reported once.
    reported: BTreeSet<u64>,
    /// The foreign listeners found by the last survey.
    foreign: Vec<ForeignListener>,
}

impl PortSurvey {
    /// Lists `cluster`'s port in both families and keeps the listeners that `ours` does
    /// not claim; a listener not seen before is reported with a warning. `ours` is not
    /// asked again about a listener once it was found foreign, so it may look further
    /// (through `/proc`) for a socket that a worker has not registered yet.
    pub fn survey(
        &mut self,
        cluster: SocketAddr,
        mut ours: impl FnMut(u64) -> bool,
    ) -> io::Result<&[ForeignListener]> {
        let queues = match &mut self.queues {
            Some(queues) => queues,
            None => self.queues.insert(ListenQueues::open()?),
        };
        let mut listeners = queues.listeners(false, cluster.port())?;
        listeners.extend(queues.listeners(true, cluster.port())?);
        let foreign: Vec<ForeignListener> = listeners
            .into_iter()
            .filter(|l| self.reported.contains(&l.inode) || !ours(l.inode))
            .map(|l| ForeignListener::of(l, cluster))
            .collect();
        for found in &foreign {
            if self.reported.insert(found.listener.inode) {
                tracing::warn!(
                    %cluster,
                    address = %found.listener.address,
                    inode = found.listener.inode,
                    "foreign listener: a socket of another process listens on {} (not a \
                     worker of this cluster; the same cluster started twice? a leftover \
                     worker?). It takes {}",
                    found.listener.address,
                    found.takes(cluster)
                );
            }
        }
        // Forget what is gone, so the set stays as small as what listens.
        self.reported
            .retain(|inode| foreign.iter().any(|f| f.listener.inode == *inode));
        self.foreign = foreign;
        Ok(&self.foreign)
    }

    /// The foreign listeners found by the last survey.
    pub fn foreign(&self) -> &[ForeignListener] {
        &self.foreign
    }

    /// The addresses the ownership probe must not go to: those of foreign groups.
    pub fn shadowed(&self) -> Vec<IpAddr> {
        self.foreign
            .iter()
            .filter(|f| f.shadows_probe())
            .map(|f| f.listener.address.ip())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::os::fd::AsFd;

    use super::*;

    fn listener(address: &str, ipv6: bool) -> Listener {
        Listener {
            address: address.parse().expect("address"),
            ipv6,
            interface: 0,
            inode: 1,
            queued: 0,
            backlog: 128,
        }
    }

    #[test]
    fn a_socket_on_the_clusters_address_is_in_its_group_and_any_other_is_not() {
        let cluster: SocketAddr = "0.0.0.0:80".parse().expect("address");
        let same = ForeignListener::of(listener("0.0.0.0:80", false), cluster);
        assert_eq!(same.standing, Standing::InGroup);
        assert!(!same.shadows_probe());
        let specific = ForeignListener::of(listener("127.0.0.2:80", false), cluster);
        assert_eq!(specific.standing, Standing::OwnGroup);
        assert!(
            specific
                .takes(cluster)
                .contains("every connection to 127.0.0.2")
        );
        let other_family = ForeignListener::of(listener("[::]:80", true), cluster);
        assert_eq!(other_family.standing, Standing::OwnGroup);
        let dual: SocketAddr = "[::]:80".parse().expect("address");
        let v4_beside_dual = ForeignListener::of(listener("0.0.0.0:80", false), dual);
        assert!(v4_beside_dual.takes(dual).contains("every IPv4 connection"));
    }

    #[test]
    fn a_listener_nobody_claims_is_foreign_and_reported_once() {
        let mine = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = mine.local_addr().expect("addr");
        let inode = crate::sys::fd::inode(mine.as_fd()).expect("fstat");
        let cluster = SocketAddr::new("0.0.0.0".parse().expect("ip"), addr.port());
        let mut survey = PortSurvey::default();
        let found = survey.survey(cluster, |_| true).expect("survey").len();
        assert_eq!(found, 0, "claimed: not foreign");
        let mut asked = 0;
        let found = survey
            .survey(cluster, |i| {
                asked += 1;
                i != inode
            })
            .expect("survey")
            .to_vec();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].listener.address, addr);
        assert_eq!(found[0].standing, Standing::OwnGroup);
        assert_eq!(survey.shadowed(), vec![addr.ip()]);
        let again = survey
            .survey(cluster, |_| panic!("not asked again"))
            .expect("survey");
        assert_eq!(again.len(), 1, "still counted, not asked about again");
        assert_eq!(asked, 1);
    }
}
