//! Who receives the next connection.
//!
//! In `kernel` mode nothing is loaded: every worker socket is in the port's `SO_REUSEPORT`
//! group and the kernel hashes each new connection's 4-tuple over the group. The primary
//! still checks each registered socket, and it makes sure a closing worker's queue migrates
//! instead of being reset (see [`ensure_tcp_migrate_req`]).

use std::os::fd::OwnedFd;

use crate::config::Balance;

/// The steering policy in force and the state it keeps.
#[derive(Debug)]
pub struct Steering {
    policy: Balance,
}

impl Steering {
    /// Steering with no program: the kernel's own reuseport hash.
    pub fn kernel() -> Steering {
        Steering {
            policy: Balance::Kernel,
        }
    }

    /// The policy actually in force (never `auto`).
    pub fn policy(&self) -> Balance {
        self.policy
    }

    /// Puts a worker's verified socket into steering at `slot`. The primary's copy of the
    /// fd is consumed and closed: the worker's copy keeps the socket alive, so the socket
    /// leaves the group by itself when the worker exits.
    pub fn activate(&mut self, _slot: usize, fd: OwnedFd) {
        drop(fd);
    }

    /// Takes `slot` out of steering. In `kernel` mode a socket stays in the group until its
    /// worker closes it, which a draining worker does at once.
    pub fn deactivate(&mut self, _slot: usize) {}
}

const TCP_MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// What [`ensure_tcp_migrate_req`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrateReq {
    /// Already 1: nothing changed.
    AlreadyOn,
    /// Was 0, now 1.
    TurnedOn,
    /// Could not be read or written; the reason.
    Unavailable(String),
}

/// Sets `net.ipv4.tcp_migrate_req=1` in this network namespace if it is 0.
///
/// Without it, connections queued on a listener that closes (a worker exiting, crashing or
/// being replaced) are reset; with it the kernel moves them to another listener of the same
/// group. The setting is per network namespace and affects other `SO_REUSEPORT` users in it
/// only in the same way: their queued connections are migrated rather than reset.
pub fn ensure_tcp_migrate_req() -> MigrateReq {
    match std::fs::read_to_string(TCP_MIGRATE_REQ) {
        Ok(value) if value.trim() == "1" => MigrateReq::AlreadyOn,
        Ok(_) => match std::fs::write(TCP_MIGRATE_REQ, "1") {
            Ok(()) => MigrateReq::TurnedOn,
            Err(err) => MigrateReq::Unavailable(format!("cannot write {TCP_MIGRATE_REQ}: {err}")),
        },
        Err(err) => MigrateReq::Unavailable(format!("cannot read {TCP_MIGRATE_REQ}: {err}")),
    }
}
