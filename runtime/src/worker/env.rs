//! The environment a primary hands to each worker process.
//!
//! | variable | meaning |
//! |---|---|
//! | `STEER_ROLE` | `demo` or `library` for re-executed workers; absent for external ones |
//! | `STEER_WORKER_SLOT` | slot index `0..N-1`: stable across restarts |
//! | `STEER_WORKER_GENERATION` | grows each time the slot's process is replaced |
//! | `STEER_WORKER_ID` | unique per process over the primary's life, from 1 |
//! | `STEER_IPC_FD` | fd number of the worker's end of the IPC socketpair |
//! | `STEER_LISTENERS` | re-executed workers: the listeners to bind, one per line as `NAME=SCHEME://ADDR`, in order |
//! | `STEER_UDP_RECEIVE_BUFFER` | re-executed workers: bytes of receive queue to ask for on each UDP and QUIC socket (`udp-receive-buffer`) |
//! | `STEER_DEMO_FAULTS`, `STEER_DEMO_TIMEOUTS` | the demo app's fault routes (`1`) and client timeouts (`header=MS,idle=MS,body=MS,send=MS`) |
//! | `STEER_LISTEN_FD` | `shared` baseline: fd number of the inherited shared listening socket, used instead of binding one |
//! | `STEER_HANDOFF` | `userspace` baseline (`1`): no listener; connections arrive over IPC |
//! | `STEER_WORKER_UID`, `STEER_WORKER_GID` | re-executed workers: whom to become once registered (`--user`, `--group`) |
//! | `STEER_LOAD_FD`, `STEER_LOAD_LAYOUT` | external workers under `least-loaded`: fd of the worker's own load record, and its fields (docs/ipc.md) |
//! | `STEER_QUIC_CID_LEN`, `STEER_QUIC_SERVER_ID`, `STEER_QUIC_RESET_KEY` | a cluster with a `quic://` listener: what the worker puts in its connection IDs, and the cluster's stateless-reset key (`crate::quic`, docs/ipc.md) |
//! | `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES` | external workers: fds 3, 4, ... are their listeners' sockets, named in order and joined by `:` (systemd socket activation) |
//!
//! `NOTIFY_SOCKET` is never passed on: only the primary talks to systemd.

use std::os::fd::RawFd;

use crate::config::Listener;

/// Which built-in program a re-executed worker runs.
pub(crate) const ROLE: &str = "STEER_ROLE";
/// Slot index.
pub(crate) const SLOT: &str = "STEER_WORKER_SLOT";
/// The slot again, under PM2's name, for Node apps written for PM2.
pub(crate) const NODE_APP_INSTANCE: &str = "NODE_APP_INSTANCE";
/// Generation of the slot.
pub(crate) const GENERATION: &str = "STEER_WORKER_GENERATION";
/// Unique worker id.
pub(crate) const ID: &str = "STEER_WORKER_ID";
/// IPC fd number.
pub(crate) const IPC_FD: &str = "STEER_IPC_FD";
/// The listeners to bind, one per line (`NAME=SCHEME://ADDR`).
pub(crate) const LISTENERS: &str = "STEER_LISTENERS";
/// Bytes of receive queue for each UDP and QUIC socket a re-executed worker binds.
pub(crate) const UDP_RECEIVE_BUFFER: &str = "STEER_UDP_RECEIVE_BUFFER";
/// Demo fault routes on (`1`).
pub(crate) const DEMO_FAULTS: &str = "STEER_DEMO_FAULTS";
/// `shared` baseline: the inherited listening socket's fd number.
pub(crate) const LISTEN_FD: &str = "STEER_LISTEN_FD";
/// `userspace` baseline: connections arrive over IPC (`1`).
pub(crate) const HANDOFF: &str = "STEER_HANDOFF";

/// External workers under `least-loaded`: fd number of the worker's own load record.
pub(crate) const LOAD_FD: &str = "STEER_LOAD_FD";
/// External workers under `least-loaded`: `name:offset` of the record's `u64` fields.
pub(crate) const LOAD_LAYOUT: &str = "STEER_LOAD_LAYOUT";

/// `STEER_ROLE` value for the demo app.
pub(crate) const ROLE_DEMO: &str = "demo";
/// `STEER_ROLE` value for a library user's program.
pub(crate) const ROLE_LIBRARY: &str = "library";

/// Every variable a primary sets for a worker; removed from what it passes on otherwise,
/// so a primary started from inside a worker does not confuse its own children.
pub(crate) const ALL: &[&str] = &[
    ROLE,
    SLOT,
    NODE_APP_INSTANCE,
    GENERATION,
    ID,
    IPC_FD,
    LISTENERS,
    UDP_RECEIVE_BUFFER,
    DEMO_FAULTS,
    crate::demo::TIMEOUTS_ENV,
    crate::demo::ENV_TLS_CERT,
    crate::demo::ENV_TLS_KEY,
    LISTEN_FD,
    HANDOFF,
    LOAD_FD,
    LOAD_LAYOUT,
    crate::quic::ENV_CID_LEN,
    crate::quic::ENV_SERVER_ID,
    crate::quic::ENV_RESET_KEY,
    crate::privileges::ENV_UID,
    crate::privileges::ENV_GID,
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    // The service manager speaks to the primary only (NotifyAccess=main).
    crate::systemd::NOTIFY_SOCKET,
    // An upgrade's hand-over is the successor primary's alone: a worker that carried it
    // would pass for a primary when its tree is swept (`upgrade::is_successor_primary`).
    crate::primary::upgrade::ENV_FROM,
    crate::primary::upgrade::ENV_READY_FD,
    crate::primary::upgrade::ENV_STATUS_FD,
    crate::primary::upgrade::ENV_PID_FILE_FD,
];

/// A worker's identity and inheritance, read from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    /// Slot index.
    pub slot: usize,
    /// Generation of the slot.
    pub generation: u64,
    /// Unique worker id.
    pub id: u64,
    /// IPC fd number.
    pub ipc_fd: RawFd,
    /// The listeners to bind, in order (never empty).
    pub listeners: Vec<Listener>,
    /// Bytes of receive queue to ask for on each UDP socket; 0 (variable unset): the
    /// kernel's default.
    pub udp_receive_buffer: u64,
    /// Where connections come from.
    pub intake: Intake,
}

/// Where a re-executed worker's connections come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    /// Its own `SO_REUSEPORT` socket, bound at start and registered (kernel and eBPF
    /// policies).
    OwnSocket,
    /// `shared` baseline: the listening socket inherited at this fd, shared by all workers.
    Inherited(RawFd),
    /// `userspace` baseline: none; the primary sends accepted connections over IPC.
    HandOff,
}

impl WorkerEnv {
    /// Reads the variables through `get` (`std::env::var` in production). The error names
    /// the variable.
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Result<WorkerEnv, String> {
        fn field<T: std::str::FromStr>(
            get: &impl Fn(&str) -> Option<String>,
            name: &str,
        ) -> Result<T, String> {
            let text = get(name).ok_or_else(|| format!("{name} is not set"))?;
            text.parse()
                .map_err(|_| format!("{name}={text:?} is not valid"))
        }
        Ok(WorkerEnv {
            slot: field(&get, SLOT)?,
            generation: field(&get, GENERATION)?,
            id: field(&get, ID)?,
            ipc_fd: field(&get, IPC_FD)?,
            listeners: {
                let text = get(LISTENERS).ok_or_else(|| format!("{LISTENERS} is not set"))?;
                let listeners = text
                    .lines()
                    .map(|line| {
                        line.parse()
                            .map_err(|e| format!("{LISTENERS}: {line:?} is not valid: {e}"))
                    })
                    .collect::<Result<Vec<Listener>, String>>()?;
                if listeners.is_empty() {
                    return Err(format!("{LISTENERS} names no listener"));
                }
                listeners
            },
            udp_receive_buffer: match get(UDP_RECEIVE_BUFFER) {
                Some(_) => field(&get, UDP_RECEIVE_BUFFER)?,
                None => 0,
            },
            intake: if get(HANDOFF).as_deref() == Some("1") {
                Intake::HandOff
            } else if get(LISTEN_FD).is_some() {
                Intake::Inherited(field(&get, LISTEN_FD)?)
            } else {
                Intake::OwnSocket
            },
        })
    }

    /// Reads the process environment.
    pub fn from_process() -> Result<WorkerEnv, String> {
        WorkerEnv::read(|name| std::env::var(name).ok())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn reads_every_field_and_names_the_missing_one() {
        let mut vars: HashMap<&str, &str> = HashMap::from([
            (SLOT, "2"),
            (GENERATION, "5"),
            (ID, "11"),
            (IPC_FD, "3"),
            (
                LISTENERS,
                "web=tcp://127.0.0.1:8000\ndns=udp://127.0.0.1:5353",
            ),
        ]);
        let env = WorkerEnv::read(|k| vars.get(k).map(|v| v.to_string())).expect("complete");
        assert_eq!(
            (env.slot, env.generation, env.id, env.ipc_fd),
            (2, 5, 11, 3)
        );
        assert_eq!(env.intake, Intake::OwnSocket);
        assert_eq!(env.udp_receive_buffer, 0, "unset: the kernel's default");
        vars.insert(UDP_RECEIVE_BUFFER, "4194304");
        let sized = WorkerEnv::read(|k| vars.get(k).map(|v| v.to_string())).expect("complete");
        assert_eq!(sized.udp_receive_buffer, 4 << 20);
        vars.insert(UDP_RECEIVE_BUFFER, "lots");
        let err = WorkerEnv::read(|k| vars.get(k).map(|v| v.to_string())).expect_err("refused");
        assert!(err.contains(UDP_RECEIVE_BUFFER), "{err}");
        vars.remove(UDP_RECEIVE_BUFFER);
        let names: Vec<&str> = env.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["web", "dns"]);
        vars.insert(LISTEN_FD, "4");
        let shared = WorkerEnv::read(|k| vars.get(k).map(|v| v.to_string())).expect("complete");
        assert_eq!(shared.intake, Intake::Inherited(4));
        vars.insert(HANDOFF, "1");
        let handed = WorkerEnv::read(|k| vars.get(k).map(|v| v.to_string())).expect("complete");
        assert_eq!(handed.intake, Intake::HandOff);
        vars.remove(IPC_FD);
        let err = WorkerEnv::read(|k| vars.get(k).map(|v| v.to_string())).expect_err("missing");
        assert!(err.contains(IPC_FD), "{err}");
    }
}
