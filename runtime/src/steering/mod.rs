//! Who receives the next connection.
//!
//! - `kernel`: nothing is loaded. Every worker socket is in the port's `SO_REUSEPORT` group
//!   and the kernel hashes each new connection's 4-tuple over the group. The primary still
//!   checks each registered socket, detaches a program someone else left on the group
//!   when a worker's socket enters it, and makes sure a closing worker's queue migrates
//!   instead of being reset (see [`ensure_tcp_migrate_req`]).
//! - `round-robin`, `hash`, `least-loaded`, `cpu`: Steer's `SK_REUSEPORT` program picks the
//!   socket ([`ebpf`]); only sockets the primary registered can be picked, connections
//!   queued on a closing listener are migrated by the same program, and once per health
//!   interval the primary checks that the program deciding is still its own ([`probe`]).
//! - `shared`, `userspace`: the baselines of [`crate::baseline`]; one listening socket, so
//!   nothing to steer here.
//!
//! Under every policy, once per health interval, the primary also lists the port's
//! listeners in both address families and reports those that are not its workers'
//! ([`foreign`]).
//!
//! [`maglev`] builds the `hash` policy's table; [`load`] holds the load records (every eBPF
//! policy), [`queues`] the port's listeners and the real accept-queue lengths they are settled
//! against.

pub mod clients;
pub mod ebpf;
pub mod foreign;
pub mod holder;
pub mod load;
pub mod maglev;
pub mod probe;
pub mod publisher;
pub mod queues;
pub mod shared;
pub mod stalls;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use serde::Serialize;

use crate::config::Balance;
pub use load::{LoadReporter, LoadShare};

/// What went wrong in steering. A variant caused by a failed call keeps that error as its
/// source, so the errno survives; print it with `crate::errors::error_chain` to show the
/// causes.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    /// The kernel refused the program or its maps for lack of privilege.
    #[error(
        "loading the eBPF steering program needs CAP_BPF (or CAP_SYS_ADMIN){}; run steer as root, grant it (CAP_BPF and CAP_PERFMON, as in deploy/systemd/steer.service), or use --balance kernel",
        missing_capability_detail()
    )]
    MissingCapability,
    /// `--balance` names no policy of the program.
    #[error("{0} is not an eBPF policy")]
    NotAProgramPolicy(Balance),
    /// More slots than the program's maps hold.
    #[error("{0} slots: the eBPF program takes 1..={max}", max = steer_common::MAX_SLOTS)]
    SlotCount(u32),
    /// Loading the object or the program failed (the verifier's or aya's words).
    #[error("cannot {what}: {detail}")]
    Load {
        /// What was being loaded.
        what: &'static str,
        /// The error and its sources, in one line.
        detail: String,
    },
    /// A map operation failed.
    #[error("cannot {what}")]
    Map {
        /// The operation, naming the map.
        what: String,
        /// aya's error, with the system call and errno.
        #[source]
        source: aya::maps::MapError,
    },
    /// Attaching or detaching the program through a socket failed.
    #[error("cannot {what}")]
    Attach {
        /// The operation, naming the slot.
        what: String,
        /// aya's error, with the errno of `setsockopt`.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Any other system call.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// A serving worker's socket could not be taken from it to attach the program through.
    #[error("cannot borrow slot {slot}'s socket")]
    Borrow {
        /// The worker's slot.
        slot: u32,
        /// Why, with the errno of `pidfd_getfd` or of reading `/proc/<pid>/fd`.
        #[source]
        source: crate::sys::borrow::BorrowError,
    },
    /// No worker serves, so no socket of the group is at hand to attach the program
    /// through.
    #[error("no serving worker's socket to attach the program through")]
    NoServingSocket,
}

/// Why [`Steering::switch_policy`] cannot switch the running cluster's policy live.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// The program refused the new policy (a write of its `CONFIG`, a table or a mapping).
    #[error(transparent)]
    Program(#[from] SteeringError),
    /// The running policy is a baseline, whose single socket has no group to steer.
    #[error("a baseline's single socket cannot be re-steered")]
    FromBaseline,
    /// The wanted policy is a baseline, which needs a single socket of its own.
    #[error("a baseline needs its own single socket")]
    ToBaseline,
    /// Between `kernel` and an eBPF policy: only a new primary loads or drops the program.
    #[error("switching between kernel and an eBPF policy needs a new primary")]
    KernelAndProgram,
}

impl SteeringError {
    fn io(what: impl Into<String>, source: io::Error) -> SteeringError {
        SteeringError::Io {
            what: what.into(),
            source,
        }
    }

    fn map(what: impl Into<String>, source: aya::maps::MapError) -> SteeringError {
        SteeringError::Map {
            what: what.into(),
            source,
        }
    }
}

/// Another program, or none, was deciding for the group; Steer's was attached again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    /// What gave it away.
    pub evidence: &'static str,
}

fn missing_capability_detail() -> String {
    match effective_capabilities() {
        Some(caps) if caps & (1 << CAP_BPF) == 0 && caps & (1 << CAP_SYS_ADMIN) == 0 => {
            ", which this process does not have".into()
        }
        _ => String::new(),
    }
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The effective capability set (`CapEff` in `/proc/self/status`).
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
}

/// The program's counters, summed over CPUs (what `/status` shows under `steering`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SteeringCounters {
    /// The policy the program runs.
    #[serde(serialize_with = "serialize_display")]
    pub policy: Balance,
    /// Connections handed to each slot, new and migrated.
    #[serde(skip)]
    pub selections: Vec<u64>,
    /// Connections whose first choice held no socket and went to another live slot.
    pub fallbacks: u64,
    /// Connections dropped because no live slot could take them.
    pub drops: u64,
    /// Connections migrated out of a closing listener to a live slot.
    pub migrations: u64,
    /// Times the primary found another program (or none) deciding for the group and
    /// attached its own again.
    pub takeovers: u64,
    /// SYNs the per-client limit refused.
    pub client_refusals: u64,
    /// Clients entered into the program's client table (inserts; evictions are this minus
    /// the entries it holds).
    pub client_inserts: u64,
    /// UDP datagrams that went to the socket their flow is kept on.
    pub flow_hits: u64,
    /// UDP flows entered into the flow table (new, idle past the timeout, or moved).
    pub flow_inserts: u64,
    /// Datagrams of a known UDP flow whose socket had left, steered again.
    pub flow_moves: u64,
    /// QUIC datagrams that went to the worker their connection ID names.
    pub quic_steered: u64,
    /// QUIC datagrams dropped as garbage or truncated.
    pub quic_malformed: u64,
    /// Times each slot became stalled (queued connections, no accept), by slot index.
    #[serde(skip)]
    pub stalls: Vec<u64>,
    /// Whether each slot is stalled now, by slot index.
    #[serde(skip)]
    pub stalled: Vec<bool>,
    /// Round-robin turns lost or gained for good around stalled slots: each is one
    /// connection of drift from the exact split (0 while every stall is short enough for
    /// its skipped turns to be given back).
    pub turns_lost: u64,
}

impl SteeringCounters {
    /// The sum of two groups' counters (the policy is the same in every group).
    pub fn plus(mut self, other: &SteeringCounters) -> SteeringCounters {
        for (sum, value) in self.selections.iter_mut().zip(&other.selections) {
            *sum += value;
        }
        self.fallbacks += other.fallbacks;
        self.drops += other.drops;
        self.migrations += other.migrations;
        self.takeovers += other.takeovers;
        self.client_refusals += other.client_refusals;
        self.client_inserts += other.client_inserts;
        self.flow_hits += other.flow_hits;
        self.flow_inserts += other.flow_inserts;
        self.flow_moves += other.flow_moves;
        self.quic_steered += other.quic_steered;
        self.quic_malformed += other.quic_malformed;
        self.turns_lost += other.turns_lost;
        self
    }
}

fn serialize_display<S: serde::Serializer>(policy: &Balance, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(policy)
}

/// The steering policy in force and the state it keeps.
#[derive(Debug)]
pub enum Steering {
    /// No program: the kernel's own reuseport hash.
    Kernel,
    /// Steer's program and its maps.
    Ebpf(Box<ebpf::EbpfSteering>),
    /// A userspace baseline (`shared` or `userspace`): one listening socket, balanced
    /// outside the kernel's reuseport group ([`crate::baseline`]).
    Baseline(Balance),
}

impl Steering {
    /// Sets up steering for `balance` over `slots` slots, with the per-client `limits`.
    /// `auto` loads the program for `round-robin` and falls back to `kernel` with one
    /// warning if it cannot (unless a per-client limit is set: only the program enforces
    /// one); an explicit eBPF policy that cannot load is an error.
    pub fn new(
        balance: Balance,
        slots: u32,
        limits: &crate::config::ClientLimits,
        flows: Option<crate::config::UdpFlows>,
        pins: Option<ebpf::Pins>,
    ) -> Result<Steering, SteeringError> {
        match balance {
            Balance::Kernel => Ok(Steering::Kernel),
            Balance::Shared | Balance::Userspace => Ok(Steering::Baseline(balance)),
            Balance::Auto => {
                match ebpf::EbpfSteering::load_limited(
                    Balance::RoundRobin,
                    slots,
                    limits,
                    flows,
                    pins,
                ) {
                    Ok(program) => Ok(Steering::Ebpf(Box::new(program))),
                    Err(err) if limits.rate.is_some() => Err(err),
                    Err(err) => {
                        tracing::warn!(
                            "eBPF steering unavailable ({}); balancing with the kernel's SO_REUSEPORT hash (--balance kernel)",
                            crate::errors::error_chain(&err)
                        );
                        Ok(Steering::Kernel)
                    }
                }
            }
            other => Ok(Steering::Ebpf(Box::new(ebpf::EbpfSteering::load_limited(
                other, slots, limits, flows, pins,
            )?))),
        }
    }

    /// Applies a changed per-client limit (SIGHUP). Without the program there is none to
    /// apply (the configuration check refuses one).
    pub fn set_client_limits(
        &mut self,
        limits: &crate::config::ClientLimits,
    ) -> Result<(), SteeringError> {
        match self {
            Steering::Ebpf(program) => program.set_client_limits(limits),
            _ => Ok(()),
        }
    }

    /// Once per health interval: see [`ebpf::EbpfSteering::survey_clients`].
    pub fn survey_clients(&mut self) -> Result<(), SteeringError> {
        match self {
            Steering::Ebpf(program) => program.survey_clients(),
            _ => Ok(()),
        }
    }

    /// What the per-client limit's last survey found; `None` without a limit.
    pub fn client_view(&self) -> Option<&clients::ClientView> {
        match self {
            Steering::Ebpf(program) => program.client_view(),
            _ => None,
        }
    }

    /// Whether Steer's program runs.
    pub fn is_ebpf(&self) -> bool {
        matches!(self, Steering::Ebpf(_))
    }

    /// Switches to `wanted` without restarting a worker: between the eBPF policies this is
    /// one write of the program's `CONFIG`. Refused (with the reason) where it cannot be
    /// done live: to or from the baselines, whose socket layout differs, and between
    /// `kernel` and the eBPF policies.
    pub fn switch_policy(&mut self, wanted: Balance) -> Result<(), SwitchError> {
        match self {
            Steering::Ebpf(program) if wanted.is_ebpf() => Ok(program.set_policy(wanted)?),
            Steering::Baseline(_) => Err(SwitchError::FromBaseline),
            _ if matches!(wanted, Balance::Shared | Balance::Userspace) => {
                Err(SwitchError::ToBaseline)
            }
            _ => Err(SwitchError::KernelAndProgram),
        }
    }

    /// The policy actually in force (never `auto`).
    pub fn policy(&self) -> Balance {
        match self {
            Steering::Kernel => Balance::Kernel,
            Steering::Baseline(balance) => *balance,
            Steering::Ebpf(program) => program.policy(),
        }
    }

    /// Puts a worker's verified socket into steering at `slot`; `pid`/`pidfd` is the
    /// worker holding it (at fd `held_at`, if known). The primary's copy of the fd is closed afterwards: the worker's
    /// copy keeps the socket alive, so the socket leaves the group (and the program's map)
    /// by itself when the worker exits. The live set is published by [`Steering::flush`].
    ///
    /// In `kernel` mode, a program someone else attached to the group is detached here
    /// (`SO_DETACH_REUSEPORT_BPF`): the kernel's hash over the group is the policy.
    pub fn activate(
        &mut self,
        slot: usize,
        generation: u32,
        fd: OwnedFd,
        pid: i32,
        pidfd: BorrowedFd<'_>,
        held_at: Option<RawFd>,
    ) -> Result<(), SteeringError> {
        match self {
            Steering::Kernel => ebpf::detach_foreign_program(&fd, slot),
            Steering::Baseline(_) => Ok(()),
            Steering::Ebpf(program) => {
                program.activate(slot as u32, generation, &fd, pid, pidfd, held_at)
            }
        }
    }

    /// Takes `slot` out of steering: its socket can no longer be picked from now on; the
    /// live set follows at [`Steering::flush`]. In `kernel` mode a socket stays in the
    /// group until its worker closes it, which a draining worker does as soon as its queue
    /// is empty.
    pub fn deactivate(&mut self, slot: usize) -> Result<(), SteeringError> {
        match self {
            Steering::Kernel | Steering::Baseline(_) => Ok(()),
            Steering::Ebpf(program) => program.deactivate(slot as u32),
        }
    }

    /// Holds the program back from the port's group: sockets enter steering as usual, but
    /// the program is attached only at [`Steering::release`], and [`Steering::ensure_program`]
    /// leaves the group alone meanwhile. A successor primary does this so that the group
    /// switches from the old program to its own in one step, once all of its workers are
    /// ready.
    pub fn hold(&mut self) {
        if let Steering::Ebpf(program) = self {
            program.hold();
        }
    }

    /// Attaches the program held back by [`Steering::hold`].
    pub fn release(&mut self) -> Result<(), SteeringError> {
        match self {
            Steering::Kernel | Steering::Baseline(_) => Ok(()),
            Steering::Ebpf(program) => program.release(),
        }
    }

    /// Puts this primary's decision back on the group through `socket`, a socket of the
    /// group (for a primary whose successor failed after attaching its own program): its
    /// own program, or in `kernel` mode none at all, so that the kernel's hash decides
    /// again instead of a dead successor's program refusing every connection.
    pub fn reattach_through(&mut self, socket: BorrowedFd<'_>) -> Result<(), SteeringError> {
        match self {
            Steering::Kernel => {
                if ebpf::detach_any_program(socket, 0)? {
                    tracing::info!(
                        "took the failed successor's program off the group: the kernel's hash decides again"
                    );
                }
                Ok(())
            }
            Steering::Baseline(_) => Ok(()),
            Steering::Ebpf(program) => {
                program.reassert_current()?;
                program.attach_through(socket, None)
            }
        }
    }

    /// Turns stall avoidance (`avoid-stalls`) on or off; nothing to do without the program.
    pub fn set_avoid_stalls(&mut self, on: bool) -> Result<(), SteeringError> {
        match self {
            Steering::Ebpf(program) => program.set_avoid_stalls(on),
            _ => Ok(()),
        }
    }

    /// Whether this group's shared maps (a UDP group's pins) are removed when it ends; see
    /// [`ebpf::EbpfSteering::set_unpin`].
    pub fn set_unpin(&mut self, unpin: bool) {
        if let Steering::Ebpf(program) = self {
            program.set_unpin(unpin);
        }
    }

    /// Rebuilds what depends on the configured slot count for `slots` slots: the `hash`
    /// policy's Maglev table (a consistent hash: only the clients that must move do) and
    /// the `cpu` policy's mapping. Sockets in steering stay.
    pub fn resize(&mut self, slots: u32) -> Result<(), SteeringError> {
        match self {
            Steering::Kernel | Steering::Baseline(_) => Ok(()),
            Steering::Ebpf(program) => program.resize(slots),
        }
    }

    /// Whether new connections and flows can reach `slot` once it is live: false from
    /// [`Steering::activate`] until the program reads a live set holding it.
    pub fn in_steering(&self, slot: usize) -> bool {
        match self {
            Steering::Kernel | Steering::Baseline(_) => true,
            Steering::Ebpf(program) => program.in_steering(slot as u32),
        }
    }

    /// The program's stall events' fd, if it has one not yet registered with the
    /// primary's poll (see [`ebpf::EbpfSteering::unwatched_stall_events`]).
    pub fn unwatched_stall_events(&mut self) -> Option<BorrowedFd<'_>> {
        match self {
            Steering::Kernel | Steering::Baseline(_) => None,
            Steering::Ebpf(program) => program.unwatched_stall_events(),
        }
    }

    /// Takes the program's stall events; whether there were any.
    pub fn take_stall_events(&mut self) -> bool {
        match self {
            Steering::Kernel | Steering::Baseline(_) => false,
            Steering::Ebpf(program) => program.take_stall_events(),
        }
    }

    /// Whether a slot that entered steering waits for its live set to be published.
    pub fn publishing(&self) -> bool {
        match self {
            Steering::Kernel | Steering::Baseline(_) => false,
            Steering::Ebpf(program) => program.publishing(),
        }
    }

    /// Publishes the live set if [`Steering::activate`] or [`Steering::deactivate`]
    /// changed it: at most once per call, so once per turn of the primary's loop.
    pub fn flush(&mut self) -> Result<(), SteeringError> {
        match self {
            Steering::Kernel | Steering::Baseline(_) => Ok(()),
            Steering::Ebpf(program) => program.flush(),
        }
    }

    /// Once per health interval: makes sure the program deciding for the group of
    /// `listener` is Steer's, and attaches it again if not (see [`probe`]). `Some` when it
    /// was not; the takeover is logged and counted. The probe stays away from the
    /// addresses in `shadowed`, where another group listens ([`foreign`]).
    pub fn ensure_program(
        &mut self,
        listen: &crate::config::Listener,
        patience: Duration,
        shadowed: &[std::net::IpAddr],
    ) -> Result<Option<Takeover>, SteeringError> {
        match self {
            Steering::Kernel | Steering::Baseline(_) => Ok(None),
            Steering::Ebpf(program) => program.ensure_program(listen, patience, shadowed),
        }
    }

    /// Whether an ownership probe sent by [`Steering::ensure_program`] is still undecided
    /// (call `ensure_program` again soon to judge it).
    pub fn probe_in_flight(&self) -> bool {
        match self {
            Steering::Ebpf(program) => program.probe_in_flight(),
            _ => false,
        }
    }

    /// Once per health interval (and every [`stalls::QUICK_LOOK`] while
    /// [`Steering::wants_quick_look`]): the real accept queue of each serving slot's
    /// socket in this group (a TCP group on `listen`); empty under the other policies.
    pub fn queued_per_slot(
        &mut self,
        listen: SocketAddr,
    ) -> Result<std::collections::BTreeMap<u32, u64>, SteeringError> {
        match self {
            Steering::Ebpf(program) => program.queued_per_slot(listen),
            _ => Ok(Default::default()),
        }
    }

    /// Settles every serving worker's load record against `queued`, its real accept
    /// queues summed over the TCP listeners ([`Steering::queued_per_slot`]), and judges
    /// the workers that do not publish their accepts for stalls.
    pub fn settle_load(&mut self, queued: &std::collections::BTreeMap<u32, u64>) {
        if let Steering::Ebpf(program) = self {
            program.settle_load(queued);
        }
    }

    /// Whether a worker that does not publish its accepts is suspect or stalled: its queue
    /// is read again in [`stalls::QUICK_LOOK`].
    pub fn wants_quick_look(&self) -> bool {
        match self {
            Steering::Ebpf(program) => program.wants_quick_look(),
            _ => false,
        }
    }

    /// A fresh load record for the worker of `slot`/`generation` (every eBPF policy): an
    /// fd of a map that holds only that worker's record, for the worker to map, and the
    /// record, for the other groups of the cluster to [`Steering::adopt_record`]. Call once
    /// per worker process, when it registers or (external programs) when it is spawned.
    pub fn load_record(
        &mut self,
        slot: usize,
        generation: u32,
    ) -> Option<Result<(OwnedFd, LoadShare, load::SharedRecord), SteeringError>> {
        match self {
            Steering::Ebpf(program) => Some(program.load_record(slot as u32, generation)),
            _ => None,
        }
    }

    /// Places `record`, made by another group's [`Steering::load_record`], as this group's
    /// record of the worker of `slot`/`generation`: one record per worker, in every group.
    pub fn adopt_record(&mut self, slot: usize, generation: u32, record: &load::SharedRecord) {
        if let Steering::Ebpf(program) = self {
            program.adopt_record(slot as u32, generation, record.clone());
        }
    }

    /// Whether this group keeps UDP flows on their socket (a UDP group under an eBPF
    /// policy, with `udp-flow-timeout` not 0): a worker that drains keeps its flows until
    /// Whether this is a QUIC group under Steer's program.
    pub fn is_quic(&self) -> bool {
        match self {
            Steering::Ebpf(program) => program.is_quic(),
            _ => false,
        }
    }

    /// they are idle, then [`Steering::release_flows`] takes its socket out.
    pub fn tracks_flows(&self) -> bool {
        matches!(self, Steering::Ebpf(program) if program.tracks_flows())
    }

    /// How many slots are in steering under the program (0 without one).
    pub fn serving(&self) -> usize {
        match self {
            Steering::Ebpf(program) => program.serving(),
            _ => 0,
        }
    }

    /// Takes the socket of `slot`'s `generation` out of steering for good (its flows go to
    /// the slot's serving generation from their next datagram). See
    /// [`ebpf::EbpfSteering::release_flows`].
    pub fn release_flows(&mut self, slot: usize, generation: u64) -> Result<(), SteeringError> {
        match self {
            Steering::Ebpf(program) => program.release_flows(slot as u32, generation as u32),
            _ => Ok(()),
        }
    }

    /// Whether every flow on the socket of `slot`'s `generation` is idle past the flow
    /// timeout (always, in a group that keeps no flows).
    pub fn flows_idle(&self, slot: usize, generation: u64) -> bool {
        match self {
            Steering::Ebpf(program) => program.flows_idle(slot as u32, generation as u32),
            _ => true,
        }
    }

    /// Applies a changed `udp-flow-timeout` (SIGHUP).
    pub fn set_udp_flow_timeout(&mut self, timeout: Duration) -> Result<(), SteeringError> {
        match self {
            Steering::Ebpf(program) => program.set_udp_flow_timeout(timeout),
            _ => Ok(()),
        }
    }

    /// The program's counters; `None` without a program.
    pub fn counters(&self, slots: usize) -> Option<Result<SteeringCounters, SteeringError>> {
        match self {
            Steering::Kernel | Steering::Baseline(_) => None,
            Steering::Ebpf(program) => Some(program.counters(slots)),
        }
    }
}

/// The CPUs this process may run on (`sched_getaffinity(2)`: a cpuset, `taskset`), in
/// ascending order and never empty: slot i is pinned to the (i mod n)-th, and the `cpu`
/// policy maps each of them back to its slots. CPU numbers are below `CPU_SETSIZE` (1024).
/// If the affinity cannot be read, every online CPU.
pub fn allowed_cpus() -> Vec<u32> {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the size is that of `set`, which it writes.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    let allowed: Vec<u32> = if rc == 0 {
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: CPU_ISSET reads inside `set` for cpu < CPU_SETSIZE.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .map(|cpu| cpu as u32)
            .collect()
    } else {
        Vec::new()
    };
    if allowed.is_empty() {
        (0..online_cpus() as u32).collect()
    } else {
        allowed
    }
}

/// The CPU slot `slot` is pinned to (`--cpu-affinity`): the (slot mod n)-th of `allowed`.
pub fn cpu_for_slot(slot: usize, allowed: &[u32]) -> Option<u32> {
    allowed.get(slot.checked_rem(allowed.len())?).copied()
}

/// CPUs online (`/sys/devices/system/cpu/online`, e.g. `0-1`), at least 1.
fn online_cpus() -> usize {
    let parsed = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|text| {
            text.trim()
                .split(',')
                .filter_map(|range| range.rsplit('-').next()?.parse::<usize>().ok())
                .max()
        });
    match parsed {
        Some(highest) => highest + 1,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

const TCP_MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// What [`ensure_tcp_migrate_req`] found and did.
#[derive(Debug)]
pub enum MigrateReq {
    /// Already 1: nothing changed.
    AlreadyOn,
    /// Was 0, now 1.
    TurnedOn,
    /// Could not be read or written.
    Unavailable(MigrateReqError),
}

/// Why `net.ipv4.tcp_migrate_req` could not be checked or set.
#[derive(Debug, thiserror::Error)]
pub enum MigrateReqError {
    /// Reading it failed (no such sysctl: a kernel older than 5.14).
    #[error("cannot read {TCP_MIGRATE_REQ}")]
    Read(#[source] io::Error),
    /// Writing it failed (`EACCES`, `EROFS`: not root in this network namespace).
    #[error("cannot write {TCP_MIGRATE_REQ}")]
    Write(#[source] io::Error),
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
            Err(err) => MigrateReq::Unavailable(MigrateReqError::Write(err)),
        },
        Err(err) => MigrateReq::Unavailable(MigrateReqError::Read(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_pinned_to_the_allowed_cpus_in_turn() {
        let cpuset = [4, 5, 6, 7];
        let pinned: Vec<_> = (0..6).map(|slot| cpu_for_slot(slot, &cpuset)).collect();
        assert_eq!(pinned, [4, 5, 6, 7, 4, 5].map(Some));
        assert_eq!(cpu_for_slot(0, &[]), None);
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        assert!(allowed.windows(2).all(|w| w[0] < w[1]), "{allowed:?}");
    }
}
