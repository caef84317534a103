//! `GET /status` (JSON), `GET /metrics` (Prometheus text) and `GET /ready`, served by the
//! primary's status listener thread (`listener.rs`), and the `steer status` client that reads
//! them ([`client`]).

mod board;
pub mod client;
mod listener;
mod metrics;
mod request;

use serde::{Deserialize, Serialize};

pub(crate) use board::{Phase, Readiness};
pub(crate) use listener::StatusService;
pub use metrics::render as render_metrics;

/// The `/status` document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusDocument {
    /// The primary process.
    pub primary: PrimaryStatus,
    /// One entry per slot, by slot index.
    pub workers: Vec<WorkerStatus>,
    /// Sums over the slots.
    pub totals: Totals,
    /// The eBPF program's counters; absent in `kernel` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steering: Option<SteeringStatus>,
    /// The per-client connection limit; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_limits: Option<ClientLimitsStatus>,
    /// Every listener, in the listeners' order (each is its own `SO_REUSEPORT` group).
    #[serde(default)]
    pub listeners: Vec<ListenerStatus>,
}

/// One listener in `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// Its name (`LISTEN_FDNAMES`).
    pub name: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The address its sockets are bound to.
    pub address: String,
    /// Connections (TCP) or datagrams (UDP) the program handed to a worker of this group;
    /// absent without the program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steered: Option<u64>,
    /// Connections or datagrams the program dropped because no live slot took them.
    #[serde(default)]
    pub drops: u64,
    /// SYNs the per-client limit refused on this listener.
    #[serde(default)]
    pub refusals: u64,
    /// Times another program (or none) was found deciding for this group.
    #[serde(default)]
    pub takeovers: u64,
    /// A UDP group's flow table: datagrams that went to their flow's socket, flows
    /// entered, and datagrams of a flow whose socket had left; absent for TCP and
    /// without the table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<FlowCounts>,
    /// A QUIC listener's datagrams steered by connection ID, and those dropped as garbage
    /// or truncated; absent for TCP and UDP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic: Option<QuicCounts>,
}

/// A QUIC listener's datagrams, as counted by the program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuicCounts {
    /// Datagrams that went to the worker their connection ID names.
    pub steered: u64,
    /// Datagrams dropped because they cannot be QUIC sent to this cluster.
    pub malformed: u64,
}

/// A UDP listener's flow table, as counted by the program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowCounts {
    /// Datagrams that went to the socket their flow is kept on.
    pub hits: u64,
    /// Flows entered (new clients, flows idle past the timeout, moved flows). With
    /// nothing deleted from the table, this minus its size is at least what it evicted.
    pub inserts: u64,
    /// Datagrams of a known flow whose socket had left (its process exited or drained):
    /// steered again, to the slot's serving generation first.
    pub moves: u64,
}

/// The per-client connection limit in `/status` (`client-conn-rate`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientLimitsStatus {
    /// The limit in force, as configured (`50/s`).
    pub rate: String,
    /// Connections a client may open at once on top of the rate.
    pub burst: u32,
    /// SYNs refused, per listening address (one today).
    #[serde(default)]
    pub refused: Vec<ListenerRefusals>,
    /// Client prefixes in the program's table (as of the last health interval).
    pub clients_tracked: u64,
    /// The table's bound (`client-table-size`).
    pub table_size: u64,
    /// Clients the program entered into the table since it loaded.
    pub inserts: u64,
    /// Clients evicted from the table (least recently seen first), as inserts minus
    /// the entries it holds: nothing else removes one.
    pub evictions: u64,
    /// The most-refused prefixes, most first (at most ten; refusals since the prefix's
    /// entry in the program's refusal table was made).
    #[serde(default)]
    pub top_refused: Vec<RefusedPrefix>,
}

/// Refusals at one listening address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerRefusals {
    /// The listening address.
    pub listener: String,
    /// SYNs refused there.
    pub refused: u64,
}

/// A client prefix and its refused SYNs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedPrefix {
    /// The prefix (`203.0.113.7/32`).
    pub prefix: String,
    /// SYNs refused from it.
    pub refused: u64,
}

/// The eBPF program's view in `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SteeringStatus {
    /// The policy the program runs.
    pub policy: String,
    /// Connections the program handed to each slot, by slot index.
    #[serde(default)]
    pub selections: Vec<u64>,
    /// Connections whose first choice held no socket (a worker that just died) and went to
    /// another live slot.
    pub fallbacks: u64,
    /// Connections dropped because no live slot could take them (none was ready).
    pub drops: u64,
    /// Connections migrated out of a closing listener to a live slot.
    pub migrations: u64,
    /// Times the primary found another program (or none) deciding for the port's group
    /// and attached its own again (checked once per health interval).
    #[serde(default)]
    pub takeovers: u64,
    /// Round-robin turns lost or gained for good around stalled workers: connections of
    /// drift from the exact split (0 while every stall is short enough for the turns it
    /// skipped to be given back; see docs/architecture.md, "Stalls").
    #[serde(default)]
    pub turns_lost: u64,
}

/// The primary's part of `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrimaryStatus {
    /// Its pid.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// Policy in force (`kernel`, `round-robin`, ...; never `auto`).
    pub balance: String,
    /// The address the workers listen on.
    pub listen: String,
    /// `running`, `rolling` (a rolling restart is under way) or `stopping`.
    pub phase: String,
    /// The primary's own resident memory.
    pub rss_bytes: Option<u64>,
    /// Log lines the primary dropped because its log output (stderr) could not keep up;
    /// the primary never waits for it.
    #[serde(default)]
    pub log_lines_dropped: u64,
    /// Times the primary's own loop ran late (it was stopped, or starved of CPU); the
    /// heartbeat deadlines restarted then, so nobody was declared hung for it.
    #[serde(default)]
    pub stalls: u64,
    /// The last rolling restart gave up on a slot whose new worker could not start; absent
    /// otherwise, and cleared by the next rolling restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roll_abandoned: Option<RollAbandonedStatus>,
    /// Listening sockets on the cluster's port, in either address family, that are not
    /// this cluster's (as of the last health interval): each was reported once with a
    /// warning naming its address.
    #[serde(default)]
    pub foreign_listeners: u64,
    /// Their addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign_listener_addresses: Vec<String>,
}

/// A rolling restart that gave up, in `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollAbandonedStatus {
    /// The slot whose new worker failed to start three times in a row.
    pub slot: usize,
    /// How its last attempt ended, e.g. `not ready within 10s`.
    pub reason: String,
}

/// One slot in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Slot index.
    pub slot: usize,
    /// Pid of the slot's serving (or starting) process; `null` in backoff or failed.
    pub pid: Option<i32>,
    /// Generation of that process.
    pub generation: u64,
    /// `starting`, `ready`, `hung` (out of steering, being replaced), `draining`,
    /// `backoff`, `failed` or `stopped`.
    pub state: String,
    /// Seconds since that process started.
    pub uptime_s: Option<u64>,
    /// Crash restarts of this slot.
    pub restarts: u32,
    /// Connections accepted by every generation of this slot: what the eBPF program
    /// steered there, else what its workers reported. `null` when no program counts and
    /// none of its workers reports (an external program that does not speak the protocol).
    #[serde(default)]
    pub accepted: Option<u64>,
    /// Connections open now (last heartbeat); `null` when the process does not report.
    #[serde(default)]
    pub active: Option<u64>,
    /// Requests answered by the current process (last heartbeat); `null` when it does not
    /// report.
    #[serde(default)]
    pub requests: Option<u64>,
    /// Resident memory of the process, from `/proc/<pid>/statm`.
    pub rss_bytes: Option<u64>,
    /// How the slot's last process ended: `exit code N` or `signal N (SIGX)`.
    pub last_exit: Option<String>,
    /// Backoff left before the next start.
    pub next_restart_in_ms: Option<u64>,
    /// Milliseconds the process has owed an answer to a ping (since the oldest ping it has
    /// not answered was sent; 0 when it owes none); absent for a program that never spoke
    /// the protocol. A watched worker is hung when this passes `health-timeout`.
    pub health_ms: Option<u64>,
    /// Old generations still draining.
    pub draining: usize,
    /// User messages from this slot that were not relayed: over the relay budget, or the
    /// receiver could not take them.
    #[serde(default)]
    pub messages_dropped: u64,
    /// Lines this slot's workers wrote to stdout or stderr that were dropped because the
    /// primary's output (its stderr, or the journal) could not keep up.
    #[serde(default)]
    pub output_dropped: u64,
    /// The worker is stalled: connections wait in its queue and it has accepted none for a
    /// moment (2 ms), so the eBPF policy steers new connections around it until it accepts
    /// again. Not a state: a stalled worker stays `ready` and in steering, and is not
    /// replaced (only the heartbeat's `health-timeout` does that). Always false without an
    /// eBPF policy.
    #[serde(default)]
    pub stalled: bool,
    /// Times the slot became stalled, since the program loaded.
    #[serde(default)]
    pub stalls: u64,
}

/// Sums in `/status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Totals {
    /// Slots.
    pub workers: usize,
    /// Slots in state `ready`.
    pub ready: usize,
    /// Crash restarts over all slots.
    pub restarts: u64,
    /// Connections accepted over the slots that count them.
    pub accepted: u64,
}
