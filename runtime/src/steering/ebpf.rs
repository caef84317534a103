//! The eBPF side of steering: loads Steer's `SK_REUSEPORT` program (built from
//! `workspace-ebpf/steer-ebpf` and embedded in this binary) and keeps its maps true.
//!
//! Upkeep, all from the primary's event loop:
//! - a worker's socket enters `SOCKETS` at its slot when the worker is ready (the program is
//!   attached through that socket first: harmless if it already is, and it covers a group
//!   re-created after all its sockets closed, or a program someone else left on it);
//! - it leaves `SOCKETS` the moment the slot stops serving (exit, drain at shutdown). A
//!   replacement (rolling restart, a worker replaced after a protocol violation or a
//!   missed heartbeat) overwrites its slot's entry, which takes the old socket out in the
//!   same instant;
//! - the live set follows once per turn of the loop ([`EbpfSteering::flush`]);
//! - once per health interval, the ownership probe checks that the program deciding is
//!   this one ([`super::probe`]), and the load records are settled against the real
//!   accept queues ([`super::queues`]); workers that do not publish their accepts are
//!   judged for stalls from those queues ([`super::stalls`]), every 10 ms while one is
//!   suspect.
//!
//! # What is guaranteed about the live set
//!
//! - A published set is never written again. Each change is a new one-entry map, swapped
//!   into `LIVE[0]` by one map update ([`super::publisher`]), and the kernel returns from
//!   that update only after every program run that could see the old map has finished. A
//!   run therefore reads one whole set, the old or the new, never a mix, and never a set
//!   being written.
//! - At most one set is handed over per [`EbpfSteering::flush`], which the primary calls
//!   once per turn of its loop; the publisher thread applies only the newest when several
//!   wait, so a burst of changes (a stop takes every slot out) is one update. A flush that
//!   adds a slot waits (20 ms at most) until the set is published, so a worker reported
//!   ready is one the policy picks; one that only removes slots does not wait.
//! - A connection never reaches a socket that is out of steering: [`EbpfSteering::deactivate`]
//!   removes the socket from `SOCKETS` before it returns, and `activate` adds it before
//!   the set naming its slot is handed over. Until the new set is published (one grace
//!   period, 8 to 60 ms), a run may pick a slot that has just left; it finds no socket
//!   there and falls back to the next live slot (counted in `fallbacks`).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use aya::maps::{
    Array, ArrayOfMaps, Map, MapData, PerCpuArray, ProgramArray, ReusePortSockArray, RingBuf,
};
use aya::programs::{ProgramError, SkReuseport};
use aya::{Ebpf, EbpfError, EbpfLoader};
use steer_common::{
    Config, Counters, GENERATIONS, HASH_TABLE_SIZE, LiveSet, MAX_CPUS, MAX_SLOTS, policy,
    socket_index,
};

use super::clients::{self, ClientTables, ClientView};
use super::holder::ListenerHolder;
use super::load::{LoadRecord, LoadShare, SharedRecord};
use super::probe::{self, Outcome, OwnershipProbe};
use super::publisher::Publisher;
use super::queues::ListenQueues;
use super::shared::SharedArray;
use super::stalls::SilentWatch;
use super::{SteeringCounters, SteeringError, Takeover};
use crate::config::{Balance, ClientLimits, UdpFlows};

/// The program's `CONFIG.policy` code for `policy`.
fn policy_code(policy: Balance) -> Result<u32, SteeringError> {
    match policy {
        Balance::RoundRobin => Ok(policy::ROUND_ROBIN),
        Balance::Hash => Ok(policy::HASH),
        Balance::LeastLoaded => Ok(policy::LEAST_LOADED),
        Balance::Cpu => Ok(policy::CPU),
        other => Err(SteeringError::NotAProgramPolicy(other)),
    }
}

/// The program object, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer-ebpf"));

/// The maps a UDP group shares with its successor primary through bpffs pins: the flows,
/// and the sockets they are kept on, so that an upgrade moves no active flow.
const SHARED_MAPS: [&str; 4] = ["FLOWS", "SOCKETS", "CURRENT", "LAST_HIT"];

/// Where a UDP group's shared maps are pinned, and whether to use what is there.
#[derive(Debug, Clone)]
pub struct Pins {
    /// A directory on a bpf filesystem, one per listener address.
    pub dir: std::path::PathBuf,
    /// A successor primary takes the maps its predecessor pinned; a fresh cluster removes
    /// whatever a cluster before it left there and starts empty.
    pub reuse: bool,
}

impl Pins {
    /// Unpins the shared maps and removes the directory (what is missing is skipped). The
    /// maps live on while a program or a primary holds them.
    pub fn remove(&self) {
        for name in SHARED_MAPS {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The program of a TCP group.
const PROGRAM: &str = "steer_select";
/// The program of a UDP group (the flow table's path too).
const PROGRAM_UDP: &str = "steer_select_udp";
/// The program of a QUIC group: connection IDs, then UDP's path through a tail call to
/// [`PROGRAM_QUIC_FLOW`].
const PROGRAM_QUIC: &str = "steer_select_quic";
/// A QUIC group's UDP path, in `QUIC_FLOW[0]`.
const PROGRAM_QUIC_FLOW: &str = "steer_select_quic_flow";

/// How long a flush that adds a slot waits for the set to be published.
const GROWTH_WAIT: Duration = Duration::from_millis(20);

/// How long one check waits for a probe's reset or handshake before it leaves the verdict
/// to the next look (the primary looks again 50 ms later). On loopback the answer is
/// there before `connect` returns, unless the host is overloaded.
const PROBE_WAIT: Duration = Duration::from_millis(5);

/// Why the ownership probe cannot tell who decides, said once per episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeTrouble {
    /// The cluster's address is not local: the probe would leave the host.
    NotLocal,
    /// Its source could not be reserved.
    SetUp,
    /// Every address it could use belongs to another group.
    Shadowed,
    /// It went unanswered with no full queue in the group: dropped before the group.
    Unanswered,
}

impl ProbeTrouble {
    fn name(self) -> &'static str {
        match self {
            ProbeTrouble::NotLocal => "a listen address that was not local",
            ProbeTrouble::SetUp => "no source to probe from",
            ProbeTrouble::Shadowed => "every probe address taken by another group",
            ProbeTrouble::Unanswered => "probes dropped before they reached the group",
        }
    }
}

/// A slot in steering.
#[derive(Debug)]
struct Serving {
    generation: u32,
    holder: ListenerHolder,
}

/// The loaded program and its maps.
pub struct EbpfSteering {
    ebpf: Ebpf,
    policy: Balance,
    /// The entry point loaded: [`PROGRAM`], [`PROGRAM_UDP`] or [`PROGRAM_QUIC`].
    program: &'static str,
    /// A QUIC group's `QUIC_FLOW`, held so that its entry stays.
    _quic_flow: Option<ProgramArray<MapData>>,
    sockets: ReusePortSockArray<MapData>,
    /// `CURRENT`: each slot's serving generation (mod [`GENERATIONS`]).
    current: Array<MapData, u32>,
    /// `LAST_HIT`: when a UDP flow last reached each socket index.
    last_hit: Array<MapData, u64>,
    /// The group's UDP flows, if it is a UDP group with flow tracking on: a socket whose
    /// slot gets a new generation (or leaves) stays in `SOCKETS` for its flows until
    /// [`EbpfSteering::release_flows`].
    flows: Option<UdpFlows>,
    /// Which generation's socket each `SOCKETS` index holds.
    occupants: BTreeMap<u32, u32>,
    /// Where the UDP group's shared maps are pinned, if they are.
    pins: Option<Pins>,
    /// Whether to remove the pins when this steering ends: not while a successor takes
    /// them over, nor in a successor before it has taken over.
    unpin: bool,
    config_map: Array<MapData, Config>,
    publisher: Publisher,
    probe_seen: Array<MapData, u64>,
    counters: PerCpuArray<MapData, Counters>,
    /// The slots the program has started judging stalled, as they happen.
    stall_events: RingBuf<MapData>,
    /// Whether `stall_events` is registered with the primary's poll.
    stall_events_watched: bool,
    config: Config,
    live: BTreeMap<u32, Serving>,
    /// The live set changed since the last flush.
    dirty: bool,
    /// The slots that entered the live set since the last flush.
    entered: BTreeSet<u32>,
    /// Slots that entered the live set, each with the number of the first published set
    /// that holds it, until that set is what program runs read (see
    /// [`EbpfSteering::in_steering`]).
    awaiting: BTreeMap<u32, u64>,
    /// Load records by (slot, generation): handed out, serving, or waiting to serve.
    records: BTreeMap<(u32, u32), SharedRecord>,
    probe: Option<OwnershipProbe>,
    /// `PROBE` as it was when the probe in flight was sent.
    seen_at_send: u64,
    queues: Option<ListenQueues>,
    takeovers: u64,
    /// Why the probe cannot tell, as last said (said once until it changes).
    probe_trouble: Option<ProbeTrouble>,
    /// While the program is held back ([`EbpfSteering::hold`]), the last socket put into
    /// steering, to attach it through at [`EbpfSteering::release`]; `None` otherwise.
    /// Held only for the seconds a successor primary starts: a copy kept any longer would
    /// keep a dead worker's socket (and its queue) in the group.
    held: Option<Option<OwnedFd>>,
    /// The per-client limit's maps.
    clients: ClientTables,
    /// Workers that do not publish, suspect or stalled.
    silent: SilentWatch,
}

impl Drop for EbpfSteering {
    fn drop(&mut self) {
        if let Some(pins) = self.pins.as_ref().filter(|_| self.unpin) {
            pins.remove();
        }
    }
}

impl std::fmt::Debug for EbpfSteering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfSteering")
            .field("policy", &self.policy)
            .field("live", &self.live)
            .field("takeovers", &self.takeovers)
            .finish_non_exhaustive()
    }
}

impl EbpfSteering {
    /// Loads the program for `policy` over `slots` configured slots, with no per-client
    /// limit.
    #[cfg(test)]
    pub fn load(policy: Balance, slots: u32) -> Result<EbpfSteering, SteeringError> {
        EbpfSteering::load_limited(policy, slots, &ClientLimits::default(), None, None)
    }

    /// Loads the program for `policy` over `slots` configured slots, enforcing `limits`
    /// (whose table size is fixed from now on). `flows`: a UDP group's flow table (its
    /// size is fixed from now on); `None` for a TCP group.
    pub fn load_limited(
        policy: Balance,
        slots: u32,
        limits: &ClientLimits,
        flows: Option<UdpFlows>,
        pins: Option<Pins>,
    ) -> Result<EbpfSteering, SteeringError> {
        let code = policy_code(policy)?;
        if slots == 0 || slots > MAX_SLOTS {
            return Err(SteeringError::SlotCount(slots));
        }
        // Without kernel BTF: the program has no CO-RE relocations to resolve against it.
        // `Ebpf::load` parses /sys/kernel/btf/vmlinux twice and keeps both copies until the
        // object is loaded (32 MiB of heap at peak); the maps and program allocated in
        // between pin that heap, and glibc keeps it resident once freed (the primary's RSS
        // was 21 MiB, 7 MiB now). `new()` still parses it once; `btf(None)` drops it first.
        let mut loader = EbpfLoader::new();
        loader
            .btf(None)
            .map_max_entries("CLIENTS", limits.table_size)
            // A TCP group's program never enters a flow: the smallest table the kernel's
            // LRU takes.
            .map_max_entries(
                "FLOWS",
                flows.map_or(*crate::config::FLOW_TABLE_RANGE.start() as u32, |f| {
                    f.table_size
                }),
            );
        let pins = pins.filter(|pins| {
            if !pins.reuse {
                pins.remove();
            }
            match std::fs::create_dir_all(&pins.dir) {
                Ok(()) => true,
                Err(err) => {
                    tracing::warn!(
                        dir = %pins.dir.display(),
                        "cannot pin the UDP flow maps ({err}): flows will move on a primary upgrade"
                    );
                    false
                }
            }
        });
        if let Some(pins) = &pins {
            for name in SHARED_MAPS {
                loader.map_pin_path(name, pins.dir.join(name));
            }
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| classify("load the eBPF maps", &e))?;
        let program = match flows {
            Some(f) if f.quic => PROGRAM_QUIC,
            Some(_) => PROGRAM_UDP,
            None => PROGRAM,
        };
        program_mut(&mut ebpf, program)?
            .load()
            .map_err(|e| classify("load the eBPF program", &e))?;
        // A QUIC group's second program, in the tail-call map that is kept open: the kernel
        // empties a program array once no user holds it.
        let quic_flow = if program == PROGRAM_QUIC {
            let flow = program_mut(&mut ebpf, PROGRAM_QUIC_FLOW)?;
            flow.load()
                .map_err(|e| classify("load the eBPF program", &e))?;
            let fd = flow
                .fd()
                .map_err(|e| classify("load the eBPF program", &e))?
                .try_clone()
                .map_err(|e| SteeringError::io("copy the QUIC flow program's fd", e))?;
            let mut tail = ProgramArray::try_from(take(&mut ebpf, "QUIC_FLOW")?)
                .map_err(|e| SteeringError::map("use map QUIC_FLOW", e))?;
            tail.set(0, &fd, 0)
                .map_err(|e| SteeringError::map("write QUIC_FLOW[0]", e))?;
            Some(tail)
        } else {
            None
        };
        let sockets = ReusePortSockArray::try_from(take(&mut ebpf, "SOCKETS")?)
            .map_err(|e| SteeringError::map("use map SOCKETS", e))?;
        let config_map = Array::try_from(take(&mut ebpf, "CONFIG")?)
            .map_err(|e| SteeringError::map("use map CONFIG", e))?;
        let current = Array::try_from(take(&mut ebpf, "CURRENT")?)
            .map_err(|e| SteeringError::map("use map CURRENT", e))?;
        let last_hit = Array::try_from(take(&mut ebpf, "LAST_HIT")?)
            .map_err(|e| SteeringError::map("use map LAST_HIT", e))?;
        let live_map = ArrayOfMaps::try_from(take(&mut ebpf, "LIVE")?)
            .map_err(|e| SteeringError::map("use map LIVE", e))?;
        let loads = ArrayOfMaps::try_from(take(&mut ebpf, "LOADS")?)
            .map_err(|e| SteeringError::map("use map LOADS", e))?;
        let probe_seen = Array::try_from(take(&mut ebpf, "PROBE")?)
            .map_err(|e| SteeringError::map("use map PROBE", e))?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?)
            .map_err(|e| SteeringError::map("use map COUNTERS", e))?;
        let stall_events = RingBuf::try_from(take(&mut ebpf, "STALLS")?)
            .map_err(|e| SteeringError::map("use map STALLS", e))?;
        let clients = ClientTables::new(
            take(&mut ebpf, "CLIENTS")?,
            take(&mut ebpf, "REFUSED")?,
            take(&mut ebpf, "EXEMPT")?,
        )?;
        write_maglev(&ebpf, slots)?;
        let allowed = super::allowed_cpus();
        write_cpu_index(&mut ebpf, &allowed)?;
        let publisher = Publisher::start(live_map, loads)
            .map_err(|e| SteeringError::io("start the steering publisher thread", e))?;
        let mut steering = EbpfSteering {
            ebpf,
            policy,
            program,
            _quic_flow: quic_flow,
            sockets,
            current,
            last_hit,
            flows: flows.filter(|f| !f.timeout.is_zero()),
            occupants: BTreeMap::new(),
            unpin: pins.as_ref().is_some_and(|p| !p.reuse),
            pins,
            config_map,
            publisher,
            probe_seen,
            counters,
            stall_events,
            stall_events_watched: false,
            config: Config {
                policy: code,
                slots,
                cpus: allowed.len() as u32,
                flow_timeout_ns: flows.map_or(0, |f| duration_ns(f.timeout)),
                ..Config::default()
            },
            live: BTreeMap::new(),
            dirty: true,
            entered: BTreeSet::new(),
            awaiting: BTreeMap::new(),
            records: BTreeMap::new(),
            probe: None,
            seen_at_send: 0,
            queues: None,
            takeovers: 0,
            probe_trouble: None,
            held: None,
            clients,
            silent: SilentWatch::default(),
        };
        steering.set_client_limits(limits)?;
        steering.queues = Some(
            ListenQueues::open().map_err(|e| SteeringError::io("open a sock_diag socket", e))?,
        );
        steering.write_config()?;
        steering.flush()?;
        steering.publisher.wait();
        Ok(steering)
    }

    /// The policy the program runs.
    pub fn policy(&self) -> Balance {
        self.policy
    }

    /// Switches the policy the program runs: one write of `CONFIG`, read by the very next
    /// program run. Workers, their load records and the live set stay as they are.
    pub fn set_policy(&mut self, policy: Balance) -> Result<(), SteeringError> {
        self.config.policy = policy_code(policy)?;
        self.write_config()?;
        self.policy = policy;
        Ok(())
    }

    /// Applies a per-client limit (all but its table size, fixed at load): the exempt
    /// prefixes, then one write of `CONFIG`. Clients' state stays: a client under the new
    /// limit goes on from where it was.
    pub fn set_client_limits(&mut self, limits: &ClientLimits) -> Result<(), SteeringError> {
        self.clients.apply(limits)?;
        clients::apply_to_config(limits, &mut self.config);
        self.write_config()
    }

    /// Once per health interval: counts the tracked clients, reads the refusals per
    /// prefix, and logs the prefixes that started being refused.
    pub fn survey_clients(&mut self) -> Result<(), SteeringError> {
        if self.config.client_interval_ns == 0 {
            return Ok(());
        }
        self.clients.survey()
    }

    /// What [`EbpfSteering::survey_clients`] found last; `None` with no limit.
    pub fn client_view(&self) -> Option<&ClientView> {
        (self.config.client_interval_ns != 0).then(|| self.clients.view())
    }

    /// See [`super::Steering::hold`].
    pub fn hold(&mut self) {
        self.held.get_or_insert(None);
    }

    /// See [`super::Steering::release`].
    pub fn release(&mut self) -> Result<(), SteeringError> {
        // The program reads the live set from the moment it is attached: every slot in
        // steering must be in the published one.
        self.publisher.wait();
        match self.held.take() {
            Some(Some(socket)) => self.attach_through(socket.as_fd(), None),
            // Nothing held: no socket entered steering meanwhile, and the first one to
            // enter attaches the program.
            _ => Ok(()),
        }
    }

    /// Rebuilds the Maglev table over `slots` slots and records the new count in
    /// `CONFIG`. The table is rewritten in place: while it is, a new connection may find
    /// an entry of the old table or of the new one, both of which name live slots or fall
    /// back to one, so nothing is dropped; a client whose entry changed moves, which a
    /// resize has to do for the clients of added or removed slots anyway.
    pub fn resize(&mut self, slots: u32) -> Result<(), SteeringError> {
        if slots == 0 || slots > MAX_SLOTS {
            return Err(SteeringError::SlotCount(slots));
        }
        write_maglev(&self.ebpf, slots)?;
        self.config.slots = slots;
        self.write_config()
    }

    /// Puts `fd` into steering at `slot` for the worker of `generation` (process `pid`,
    /// holding it at fd `held_at` if known).
    pub fn activate(
        &mut self,
        slot: u32,
        generation: u32,
        fd: &OwnedFd,
        pid: i32,
        pidfd: BorrowedFd<'_>,
        held_at: Option<std::os::fd::RawFd>,
    ) -> Result<(), SteeringError> {
        let holder = ListenerHolder::new(pid, pidfd, fd, held_at)
            .map_err(|e| SteeringError::io(format!("remember the worker of slot {slot}"), e))?;
        match &mut self.held {
            Some(held) => {
                *held = Some(fd.try_clone().map_err(|e| {
                    SteeringError::io(format!("keep slot {slot}'s socket until release"), e)
                })?)
            }
            None => self.attach_through(fd.as_fd(), Some(slot))?,
        }
        if let Some(record) = self.records.get(&(slot, generation)) {
            let map = record
                .share()
                .map_err(|e| SteeringError::io("copy the load record's fd", e))?;
            self.publisher.place_record(slot, map);
        }
        // Records of older generations of this slot (a draining worker, one that never
        // served) are read by nobody from now on.
        self.records
            .retain(|&(s, g), _| s != slot || g == generation);
        let index = socket_index(slot, generation);
        self.sockets.set(index, &fd.as_raw_fd(), 0).map_err(|e| {
            SteeringError::map(format!("put slot {slot}'s socket into SOCKETS[{index}]"), e)
        })?;
        // No flow has reached this socket yet (the index's last occupant's time is not its).
        let _ = self.last_hit.set(index, 0, 0);
        self.occupants.insert(index, generation);
        // New connections and new flows go to this generation from the next program run.
        self.current
            .set(slot, generation % GENERATIONS, 0)
            .map_err(|e| SteeringError::map(format!("write CURRENT[{slot}]"), e))?;
        // Every other generation of the slot: a TCP socket leaves now (its queue migrates
        // when its worker closes it); a UDP one keeps its flows until it is released.
        if !self.tracks_flows() {
            for other in (0..GENERATIONS).map(|g| socket_index(slot, g)) {
                if other != index {
                    self.clear_socket(other)?;
                }
            }
        }
        // The probe's fds are taken with the first socket, not at the first check: the
        // primary holds the same fds from the moment a worker is ready.
        let socket = socket2::SockRef::from(fd);
        if self.probe.is_none()
            && let Ok(Some(listen)) = socket.local_addr().map(|a| a.as_socket())
            && let Err(err) = self.set_up_probe(
                listen,
                socket.r#type().is_ok_and(|t| t == socket2::Type::DGRAM),
            )
        {
            tracing::warn!(
                "cannot set up the ownership probe yet: {}",
                crate::errors::error_chain(&err)
            );
        }
        if self
            .live
            .insert(slot, Serving { generation, holder })
            .is_none()
        {
            self.dirty = true;
            self.entered.insert(slot);
        }
        Ok(())
    }

    /// Takes `slot` out of steering: no new connection or new flow reaches its socket from
    /// now on. A UDP socket with flow tracking keeps its flows until
    /// [`EbpfSteering::release_flows`] (or until it closes).
    pub fn deactivate(&mut self, slot: u32) -> Result<(), SteeringError> {
        let Some(serving) = self.live.remove(&slot) else {
            return Ok(());
        };
        self.records.remove(&(slot, serving.generation));
        self.silent.forget(slot);
        self.dirty = true;
        if self.tracks_flows() {
            return Ok(());
        }
        self.clear_socket(socket_index(slot, serving.generation))
    }

    /// Turns stall avoidance on or off (one write of `CONFIG`, read by the next run).
    pub fn set_avoid_stalls(&mut self, on: bool) -> Result<(), SteeringError> {
        self.config.avoid_stalls = u32::from(on);
        self.write_config()
    }

    /// Whether the pins go with this steering (see [`EbpfSteering::unpin`]): a primary that
    /// hands over keeps them for its successor (`false`); a successor that has taken over
    /// owns them (`true`).
    pub fn set_unpin(&mut self, unpin: bool) {
        self.unpin = unpin;
    }

    /// Writes `CURRENT` again for every slot in steering: after a failed upgrade, the
    /// successor's workers may have named their generation there (in a UDP group's
    /// shared map), and they are gone.
    pub fn reassert_current(&mut self) -> Result<(), SteeringError> {
        for (slot, serving) in &self.live {
            self.current
                .set(*slot, serving.generation % GENERATIONS, 0)
                .map_err(|e| SteeringError::map(format!("write CURRENT[{slot}]"), e))?;
        }
        Ok(())
    }

    /// How many slots are in steering.
    pub fn serving(&self) -> usize {
        self.live.len()
    }

    /// Whether this is a QUIC group's program.
    pub fn is_quic(&self) -> bool {
        self.flows.is_some_and(|f| f.quic)
    }

    /// Whether this is a UDP group that keeps flows on their socket.
    pub fn tracks_flows(&self) -> bool {
        self.flows.is_some_and(|f| !f.timeout.is_zero())
    }

    /// Takes the socket of `slot`'s `generation` out of `SOCKETS`, unless it is the slot's
    /// serving one or its index holds a newer generation already: its flows are steered
    /// again from their next datagram (to the slot's serving generation first).
    ///
    /// A QUIC group's socket stays: its connections are steered to it by their IDs for as
    /// long as its worker keeps it open, and it leaves `SOCKETS` when the worker closes
    /// it (the kernel removes a closed socket), or when a newer generation of the slot
    /// takes its index.
    pub fn release_flows(&mut self, slot: u32, generation: u32) -> Result<(), SteeringError> {
        if self.is_quic() {
            return Ok(());
        }
        let index = socket_index(slot, generation);
        if self
            .live
            .get(&slot)
            .is_some_and(|s| s.generation == generation)
            || self.occupants.get(&index) != Some(&generation)
        {
            return Ok(());
        }
        self.clear_socket(index)
    }

    /// Whether every flow on the socket of `slot`'s `generation` has been idle for the
    /// flow timeout (true when the group keeps no flows, or the index holds another
    /// generation now).
    /// A QUIC group's are always idle: its draining worker keeps its socket until it
    /// closes it, so it is told to drain at once (see [`EbpfSteering::release_flows`]).
    pub fn flows_idle(&self, slot: u32, generation: u32) -> bool {
        let Some(flows) = self.flows.filter(|f| !f.timeout.is_zero() && !f.quic) else {
            return true;
        };
        let index = socket_index(slot, generation);
        if self.occupants.get(&index) != Some(&generation) {
            return true;
        }
        let last = self.last_hit.get(&index, 0).unwrap_or(0);
        last == 0 || monotonic_ns().saturating_sub(last) > duration_ns(flows.timeout)
    }

    /// Changes the UDP flow timeout live (one write of `CONFIG`). Flows already in the
    /// table are judged by the new timeout from their next datagram.
    pub fn set_udp_flow_timeout(&mut self, timeout: Duration) -> Result<(), SteeringError> {
        let Some(flows) = self.flows.as_mut() else {
            return Ok(());
        };
        // A QUIC group's handshakes always need the table.
        let timeout = if flows.quic && timeout.is_zero() {
            UdpFlows::default().timeout
        } else {
            timeout
        };
        flows.timeout = timeout;
        self.config.flow_timeout_ns = duration_ns(timeout);
        self.write_config()
    }

    /// Clears `SOCKETS[index]` (already empty is fine: the kernel removes a socket from
    /// the map when it closes).
    fn clear_socket(&mut self, index: u32) -> Result<(), SteeringError> {
        self.occupants.remove(&index);
        match self.sockets.clear_index(&index) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(err))
                if err.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(err) => Err(SteeringError::map(format!("clear SOCKETS[{index}]"), err)),
        }
    }

    /// Hands the live set to the publisher if it changed (see the module docs for what a
    /// program run can see, and when). When a slot entered it, waits until it is published
    /// (one RCU grace period: 8 ms idle), up to [`GROWTH_WAIT`], so that a worker reported
    /// ready is one the policy picks; a set that only shrank is published without
    /// waiting, since a slot that left is unreachable already (its socket is out of
    /// `SOCKETS`).
    pub fn flush(&mut self) -> Result<(), SteeringError> {
        if !self.dirty {
            return Ok(());
        }
        let mut set = Box::new(LiveSet::EMPTY);
        for (i, slot) in self.live.keys().enumerate() {
            set.slots[i] = *slot;
        }
        set.count = self.live.len() as u32;
        let number = self.publisher.publish(set);
        let live = &self.live;
        self.awaiting.retain(|slot, _| live.contains_key(slot));
        for slot in std::mem::take(&mut self.entered) {
            if live.contains_key(&slot) {
                self.awaiting.insert(slot, number);
            }
        }
        if !self.awaiting.is_empty() {
            // Longer than an idle host's grace period, shorter than a busy one's: the loop
            // never stops long; on a busy host the slot is in steering a moment later.
            let _published = self.publisher.wait_at_most(GROWTH_WAIT);
        }
        let publisher = &self.publisher;
        self.awaiting
            .retain(|_, number| !publisher.is_published(*number));
        self.dirty = false;
        Ok(())
    }

    /// Whether `slot`, if it is live, is in the live set that program runs read: false
    /// from [`EbpfSteering::activate`] until the set holding it is published (one RCU
    /// grace period, 8 ms on an idle host, tens on a busy one). Until then a worker is not
    /// reported ready, because no new connection or flow would reach it.
    pub fn in_steering(&self, slot: u32) -> bool {
        !self.entered.contains(&slot)
            && self
                .awaiting
                .get(&slot)
                .is_none_or(|number| self.publisher.is_published(*number))
    }

    /// Whether a slot waits for its live set to be published (the primary looks again
    /// soon).
    pub fn publishing(&self) -> bool {
        !self.entered.is_empty()
            || self
                .awaiting
                .values()
                .any(|number| !self.publisher.is_published(*number))
    }

    /// Waits until what [`EbpfSteering::flush`] handed over is published.
    #[cfg(test)]
    pub fn wait_published(&self) {
        self.publisher.wait();
    }

    /// A fresh record for the worker of `slot`/`generation`, a copy of its fd, and the
    /// record for the cluster's other groups.
    pub fn load_record(
        &mut self,
        slot: u32,
        generation: u32,
    ) -> Result<(OwnedFd, LoadShare, SharedRecord), SteeringError> {
        let record = SharedRecord::new(LoadRecord::create().map_err(|e| {
            SteeringError::map(format!("create the load record of slot {slot}"), e)
        })?);
        record.set_generation(generation);
        let fd = record
            .share()
            .map_err(|e| SteeringError::io("copy the load record's fd", e))?;
        self.records.insert((slot, generation), record.clone());
        Ok((fd, LoadShare::RECORD, record))
    }

    /// Holds `record` (another group's) as the record of the worker of `slot`/`generation`.
    pub fn adopt_record(&mut self, slot: u32, generation: u32, record: SharedRecord) {
        self.records.insert((slot, generation), record);
    }

    /// The ownership check of one health interval (see [`super::probe`]). A probe that
    /// has been on its way for `patience` (the health interval) without Steer's program
    /// seeing it counts as a takeover when a socket of the group has a full accept queue
    /// (the one a foreign program picked); otherwise the SYN never reached the group (a
    /// firewall rule dropping it), which is said once and is not a takeover. The probe
    /// stays away from `shadowed` addresses, where another group listens.
    pub fn ensure_program(
        &mut self,
        listener: &crate::config::Listener,
        patience: Duration,
        shadowed: &[IpAddr],
    ) -> Result<Option<Takeover>, SteeringError> {
        let listen = listener.addr;
        let udp = listener.protocol.is_datagram();
        if self.live.is_empty() || self.held.is_some() {
            // Nothing to probe: no socket of ours is in a group (the next activation
            // attaches the program through its socket), or the program is held back while
            // the previous primary's decides.
            return Ok(None);
        }
        if !self.probe_in_flight() && !probe::is_local(listen.ip()) {
            self.probe_trouble(
                ProbeTrouble::NotLocal,
                format!(
                    "{} is not an address of this host (yet): a probe would leave the host, \
                     so none is sent until it is",
                    listen.ip()
                ),
            );
            return Ok(None);
        }
        if self.probe.is_none()
            && let Err(err) = self.set_up_probe(listen, udp)
        {
            self.probe_trouble(ProbeTrouble::SetUp, crate::errors::error_chain(&err));
            return Ok(None);
        }
        let Some(probe) = self.probe.as_mut() else {
            return Ok(None);
        };
        if !probe.in_flight() {
            let Some(target) = probe.target(shadowed) else {
                self.probe_trouble(
                    ProbeTrouble::Shadowed,
                    format!(
                        "every local address the probe could use for {listen} is taken by \
                         another process's group on the port ({shadowed:?})"
                    ),
                );
                return Ok(None);
            };
            // What the program had counted before this probe left: a probe still in
            // flight from an earlier tick keeps the count from when it was sent.
            self.seen_at_send = self
                .probe_seen
                .get(&0, 0)
                .map_err(|e| SteeringError::map("read PROBE", e))?;
            probe.send(target).map_err(|e| {
                SteeringError::io(format!("send the ownership probe to {target}"), e)
            })?;
        }
        let target = probe.in_flight_to().unwrap_or(listen);
        let outcome = probe
            .outcome(PROBE_WAIT)
            .map_err(|e| SteeringError::io("read the ownership probe", e))?;
        let seen = self
            .probe_seen
            .get(&0, 0)
            .map_err(|e| SteeringError::map("read PROBE", e))?;
        if seen > self.seen_at_send {
            // Steer's program decided (and dropped it); its reset may still be on the way.
            probe.forget();
            if let Some(other) = probe.confirmed() {
                tracing::warn!(
                    %listen,
                    %target,
                    "the ownership probe to {other} was taken by another group: a socket of                      another process bound to {other}:{} (which the kernel prefers to the                      wildcard for that address) gets every datagram sent there; the probe goes                      to {target} from now on",
                    listen.port()
                );
            }
            if let Some(trouble) = self.probe_trouble.take() {
                tracing::info!(
                    %target,
                    "the ownership probe reaches Steer's program again (after: {})",
                    trouble.name()
                );
            }
            return Ok(None);
        }
        let evidence = match outcome {
            Outcome::Pending if probe.waited() < patience => return Ok(None),
            Outcome::Pending if probe.is_udp() => {
                probe.forget();
                "the probe datagram was not counted by Steer's program within a health \
                 interval (another program, or none, delivered it to a socket that does not \
                 answer it)"
            }
            Outcome::Pending => {
                probe.forget();
                if !self.group_has_full_queue(listen)? {
                    self.probe_trouble(
                        ProbeTrouble::Unanswered,
                        format!(
                            "the probe to {target} went unanswered for a health interval, and \
                             no socket of the group has a full accept queue: something \
                             drops it before it reaches the port's sockets (a firewall rule \
                             on the port?), so a takeover that drops SYNs silently cannot be \
                             told from it; takeovers that answer or refuse are still noticed"
                        ),
                    );
                    return Ok(None);
                }
                "the probe went unanswered for a health interval and Steer's program never \
                 saw it (a socket whose accept queue is full was chosen instead)"
            }
            Outcome::Answered => {
                "a socket of the group answered the probe, which Steer's program drops"
            }
            Outcome::Refused => "the probe was refused without Steer's program seeing it",
        };
        // A UDP group on a wildcard has no port survey to say that another group took the
        // probe's address: confirm through another address before counting a takeover.
        if let Some(probe) = self.probe.as_mut()
            && let Some(next) = probe.confirm_elsewhere(target, shadowed)
        {
            self.seen_at_send = self
                .probe_seen
                .get(&0, 0)
                .map_err(|e| SteeringError::map("read PROBE", e))?;
            tracing::debug!(%listen, %target, %next, evidence, "confirming a failed probe elsewhere");
            probe
                .send(next)
                .map_err(|e| SteeringError::io(format!("send the ownership probe to {next}"), e))?;
            return Ok(None);
        }
        self.takeovers += 1;
        let restored = self.reattach();
        tracing::warn!(
            %listen,
            %target,
            evidence,
            takeovers = self.takeovers,
            "steering takeover: another program (or none) was deciding for the port's SO_REUSEPORT group; {}",
            match &restored {
                Ok(slot) => format!("Steer's program is attached again (through slot {slot}'s socket)"),
                Err(err) => format!(
                    "Steer's program could not be attached again: {}",
                    crate::errors::error_chain(err)
                ),
            }
        );
        restored.map(|_| Some(Takeover { evidence }))
    }

    /// Says once why the probe cannot tell (until it works again, or the reason changes).
    fn probe_trouble(&mut self, trouble: ProbeTrouble, why: String) {
        if self.probe_trouble != Some(trouble) {
            self.probe_trouble = Some(trouble);
            tracing::warn!(
                "the ownership probe cannot check who decides for the port's group: {why}"
            );
        }
    }

    /// Whether a socket of `listen`'s group (its address and family) has an accept queue
    /// over its bound: where a foreign program's choice drops SYNs without a word.
    fn group_has_full_queue(&mut self, listen: SocketAddr) -> Result<bool, SteeringError> {
        let queues = match &mut self.queues {
            Some(queues) => queues,
            None => self.queues.insert(
                ListenQueues::open()
                    .map_err(|e| SteeringError::io("open a sock_diag socket", e))?,
            ),
        };
        let listeners = queues
            .listeners(listen.is_ipv6(), listen.port())
            .map_err(|e| {
                SteeringError::io(format!("list the listeners on port {}", listen.port()), e)
            })?;
        Ok(listeners
            .iter()
            .any(|l| l.address.ip() == listen.ip() && l.interface == 0 && l.is_full()))
    }

    /// Reserves the ownership probe's source and names it in `CONFIG`: once, before the
    /// first probe is sent (so no probe is in flight while `CONFIG` changes).
    fn set_up_probe(&mut self, listen: SocketAddr, udp: bool) -> Result<(), SteeringError> {
        let probe = OwnershipProbe::new(listen, udp)
            .map_err(|e| SteeringError::io(format!("set up the ownership probe of {listen}"), e))?;
        let (v6, address) = probe::address_in_packet(probe.source());
        self.config.probe_port = probe::port_in_packet(probe.source());
        self.config.probe_v6 = u32::from(v6);
        self.config.probe_addr = address;
        self.write_config()?;
        self.probe = Some(probe);
        Ok(())
    }

    /// Whether the probe sent last is still undecided.
    pub fn probe_in_flight(&self) -> bool {
        self.probe.as_ref().is_some_and(OwnershipProbe::in_flight)
    }

    /// Attaches the program again through the socket of any serving worker.
    fn reattach(&self) -> Result<u32, SteeringError> {
        let mut last = None;
        for (slot, serving) in &self.live {
            match serving.holder.borrow() {
                Ok(socket) => {
                    self.attach_through(socket.as_fd(), Some(*slot))?;
                    return Ok(*slot);
                }
                Err(source) => {
                    last = Some(SteeringError::Borrow {
                        slot: *slot,
                        source,
                    })
                }
            }
        }
        Err(last.unwrap_or(SteeringError::NoServingSocket))
    }

    /// The accept queue of each serving slot's socket in this group (on `listen`).
    pub fn queued_per_slot(
        &mut self,
        listen: SocketAddr,
    ) -> Result<BTreeMap<u32, u64>, SteeringError> {
        let queues = match &mut self.queues {
            Some(queues) => queues,
            None => self.queues.insert(
                ListenQueues::open()
                    .map_err(|e| SteeringError::io("open a sock_diag socket", e))?,
            ),
        };
        let lengths = queues
            .lengths(listen.is_ipv6(), listen.port())
            .map_err(|e| {
                SteeringError::io(
                    format!("read the accept queues on port {}", listen.port()),
                    e,
                )
            })?;
        Ok(self
            .live
            .iter()
            .filter_map(|(slot, serving)| {
                let queued = lengths.get(&serving.holder.inode())?;
                Some((*slot, u64::from(*queued)))
            })
            .collect())
    }

    /// Settles each serving worker's record against `queued`, its real accept queues
    /// summed over the cluster's TCP listeners (a slot missing from it has none queued),
    /// and judges the workers that have never published an accept from it (see
    /// [`super::stalls`]).
    pub fn settle_load(&mut self, queued: &BTreeMap<u32, u64>) {
        let now = std::time::Instant::now();
        for (slot, serving) in &self.live {
            let Some(record) = self.records.get(&(*slot, serving.generation)) else {
                continue;
            };
            let queued = queued.get(slot).copied().unwrap_or(0);
            record.settle(queued);
            if record.view().accepted == 0 {
                let stalled = self.silent.judge(*slot, queued, now);
                record.set_verdict(stalled);
            } else {
                self.silent.forget(*slot);
            }
        }
    }

    /// The program's stall events' fd, to be registered with the primary's poll once
    /// (`None` once it is): readable when the program starts judging a slot stalled.
    pub fn unwatched_stall_events(&mut self) -> Option<BorrowedFd<'_>> {
        if self.stall_events_watched {
            return None;
        }
        self.stall_events_watched = true;
        Some(self.stall_events.as_fd())
    }

    /// Takes the stall events that arrived; whether there were any. A stall the program
    /// judged from the estimate may be made of SYNs that never became connections: the
    /// caller settles the records against the real queues at once
    /// ([`EbpfSteering::settle_load`]).
    pub fn take_stall_events(&mut self) -> bool {
        let mut any = false;
        while self.stall_events.next().is_some() {
            any = true;
        }
        any
    }

    /// Whether a worker that does not publish is suspect or stalled: call
    /// [`EbpfSteering::settle_load`] again in [`super::stalls::QUICK_LOOK`].
    /// Also while the program judges a worker stalled: a settlement that finds its real
    /// queue empty ends a "stall" made of SYNs that never became connections within
    /// [`super::stalls::QUICK_LOOK`], not a health interval.
    pub fn wants_quick_look(&self) -> bool {
        self.silent.wants_quick_look()
            || self.live.iter().any(|(slot, serving)| {
                self.records
                    .get(&(*slot, serving.generation))
                    .is_some_and(|r| r.view().stalled != 0)
            })
    }

    /// Which of the first `slots` slots are stalled now, as their serving workers' records
    /// say (judged again with the current time: a worker that accepted since the program
    /// last looked is not stalled).
    pub fn stalled(&self, slots: usize) -> Vec<bool> {
        let now = monotonic_ns();
        let mut stalled = vec![false; slots];
        for (slot, serving) in &self.live {
            if let (Some(flag), Some(record)) = (
                stalled.get_mut(*slot as usize),
                self.records.get(&(*slot, serving.generation)),
            ) {
                let view = record.view();
                *flag = view.stalled != 0 && view.is_stalled(now);
            }
        }
        stalled
    }

    /// The program's counters, summed over CPUs, for the first `slots` slots.
    pub fn counters(&self, slots: usize) -> Result<SteeringCounters, SteeringError> {
        let per_cpu = self
            .counters
            .get(&0, 0)
            .map_err(|e| SteeringError::map("read COUNTERS", e))?;
        let mut total = SteeringCounters {
            policy: self.policy,
            selections: vec![0; slots],
            fallbacks: 0,
            drops: 0,
            migrations: 0,
            takeovers: self.takeovers,
            client_refusals: 0,
            client_inserts: 0,
            flow_hits: 0,
            flow_inserts: 0,
            flow_moves: 0,
            quic_steered: 0,
            quic_malformed: 0,
            stalls: vec![0; slots],
            stalled: self.stalled(slots),
            turns_lost: 0,
        };
        for cpu in per_cpu.iter() {
            for (sum, value) in total.stalls.iter_mut().zip(cpu.stalls.iter()) {
                *sum += value;
            }
            for (sum, value) in total.selections.iter_mut().zip(cpu.selections.iter()) {
                *sum += value;
            }
            total.fallbacks += cpu.fallbacks;
            total.drops += cpu.drops;
            total.migrations += cpu.migrations;
            total.client_refusals += cpu.client_refusals;
            total.client_inserts += cpu.client_inserts;
            total.flow_hits += cpu.flow_hits;
            total.flow_inserts += cpu.flow_inserts;
            total.flow_moves += cpu.flow_moves;
            total.quic_steered += cpu.quic_steered;
            total.quic_malformed += cpu.quic_malformed;
            total.turns_lost += cpu.turns_lost;
        }
        Ok(total)
    }

    /// Attaches the program to the group through `socket` (any socket of the group; the
    /// one of `slot`, for the error message).
    pub fn attach_through(
        &self,
        socket: BorrowedFd<'_>,
        slot: Option<u32>,
    ) -> Result<(), SteeringError> {
        let attach_error = |source| SteeringError::Attach {
            what: match slot {
                Some(slot) => format!("attach the program through slot {slot}'s socket"),
                None => "attach the program through a socket of the group".into(),
            },
            source,
        };
        let program: &SkReuseport = self
            .ebpf
            .program(self.program)
            .ok_or(ProgramError::NotLoaded)
            .map_err(attach_error)?
            .try_into()
            .map_err(attach_error)?;
        program.attach(socket).map_err(attach_error)
    }

    fn write_config(&mut self) -> Result<(), SteeringError> {
        self.config_map
            .set(0, self.config, 0)
            .map_err(|e| SteeringError::map("write CONFIG", e))
    }
}

/// `d` in ns, saturating.
fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`, which the program stamps
/// the load records with.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// `kernel` mode: detaches whatever program is attached to the group of `socket`
/// (nothing of Steer's ever is), with a warning naming what was found.
pub fn detach_foreign_program(socket: &OwnedFd, slot: usize) -> Result<(), SteeringError> {
    if detach_any_program(socket.as_fd(), slot)? {
        tracing::warn!(
            slot,
            "steering takeover: a program someone else attached was deciding for the port's SO_REUSEPORT group; detached it (--balance kernel hashes over the group)"
        );
    }
    Ok(())
}

/// Detaches whatever program is attached to the group of `socket`
/// (`SO_DETACH_REUSEPORT_BPF`); whether there was one.
pub(crate) fn detach_any_program(
    socket: BorrowedFd<'_>,
    slot: usize,
) -> Result<bool, SteeringError> {
    match SkReuseport::detach(socket) {
        Ok(()) => Ok(true),
        Err(ProgramError::SkReuseportError(
            aya::programs::sk_reuseport::SkReuseportError::SetsockoptError { io_error, .. },
        )) if io_error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(source) => Err(SteeringError::Attach {
            what: format!("detach a program from slot {slot}'s group"),
            source,
        }),
    }
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SkReuseport, SteeringError> {
    let load_error = |detail: String| SteeringError::Load {
        what: "find the program in the object",
        detail,
    };
    ebpf.program_mut(name)
        .ok_or_else(|| load_error(format!("program {name} missing")))?
        .try_into()
        .map_err(|e| load_error(format!("program {name}: {e}")))
}

/// The Maglev table depends only on the slot count, so it is written once, before any
/// socket is in steering, through a shared mapping (65,537 entries would be as many system
/// calls through the map API).
fn write_maglev(ebpf: &Ebpf, slots: u32) -> Result<(), SteeringError> {
    let maglev_fd = map_fd(ebpf, "MAGLEV")?;
    let maglev = SharedArray::map(maglev_fd.as_fd(), 4, HASH_TABLE_SIZE as usize)
        .map_err(|e| SteeringError::io("map MAGLEV", e))?;
    let mut table = vec![0u32; HASH_TABLE_SIZE as usize];
    super::maglev::build(slots, &mut table);
    for (i, slot) in table.iter().enumerate() {
        maglev
            .u32_at(maglev.offset_of(i))
            .store(*slot, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(())
}

/// `CPU_INDEX`: each CPU the workers may run on, to 1 + its place among them (the `cpu`
/// policy's way back from the CPU that handles a SYN to the slots pinned there).
fn write_cpu_index(ebpf: &mut Ebpf, allowed: &[u32]) -> Result<(), SteeringError> {
    let mut index: Array<_, u32> = Array::try_from(take(ebpf, "CPU_INDEX")?)
        .map_err(|e| SteeringError::map("use map CPU_INDEX", e))?;
    for (place, &cpu) in allowed.iter().enumerate().filter(|(_, c)| **c < MAX_CPUS) {
        index
            .set(cpu, place as u32 + 1, 0)
            .map_err(|e| SteeringError::map("write map CPU_INDEX", e))?;
    }
    Ok(())
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map, SteeringError> {
    ebpf.take_map(name).ok_or_else(|| SteeringError::Load {
        what: "find the program's maps",
        detail: format!("map {name} missing from the object"),
    })
}

fn map_fd(ebpf: &Ebpf, name: &str) -> Result<OwnedFd, SteeringError> {
    let missing = |detail: String| SteeringError::Load {
        what: "find the program's maps",
        detail,
    };
    let data = match ebpf.map(name) {
        Some(Map::Array(data)) => data,
        Some(_) => return Err(missing(format!("map {name} is not an array"))),
        None => return Err(missing(format!("map {name} missing from the object"))),
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| SteeringError::io(format!("dup the fd of {name}"), e))
}

/// Turns a load failure into a [`SteeringError`]: a permission error says which
/// capability is missing.
fn classify(what: &'static str, err: &(dyn std::error::Error + 'static)) -> SteeringError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            return SteeringError::MissingCapability;
        }
        source = e.source();
    }
    if let Some(EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })) =
        err.downcast_ref::<EbpfError>()
        && io_error.raw_os_error() == Some(libc::EPERM)
    {
        return SteeringError::MissingCapability;
    }
    SteeringError::Load {
        what,
        detail: crate::errors::error_chain(err),
    }
}

#[cfg(test)]
mod tests {
    //! Needs CAP_BPF (root), as `cargo xtask test` runs.

    use std::collections::HashMap;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use socket2::{Domain, Protocol, Socket, Type};

    use super::*;

    const SLOTS: usize = 5;

    fn own_pidfd() -> OwnedFd {
        // SAFETY: plain syscall on integers.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, std::process::id(), 0) };
        assert!(fd >= 0, "pidfd_open: {}", io::Error::last_os_error());
        // SAFETY: a fresh fd the kernel just gave this process.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    fn reuseport_listener(addr: SocketAddr) -> TcpListener {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        socket.set_reuse_port(true).expect("SO_REUSEPORT");
        socket.bind(&addr.into()).expect("bind");
        socket.listen(4096).expect("listen");
        socket.set_nonblocking(true).expect("nonblocking");
        socket.into()
    }

    /// Notes that `slot`'s listener accepted a connection from `peer`.
    fn record(accepted: &Mutex<HashMap<SocketAddr, Vec<usize>>>, peer: SocketAddr, slot: usize) {
        accepted
            .lock()
            .expect("lock")
            .entry(peer)
            .or_default()
            .push(slot);
    }

    /// A client connection: its source, and when `connect` started and returned.
    struct Attempt {
        source: SocketAddr,
        started: Instant,
        done: Instant,
    }

    /// A slot is in steering only once the live set that holds it is the one program
    /// runs read: not when it is activated, not when the set is handed to the publisher.
    #[test]
    fn a_slot_is_in_steering_only_once_its_live_set_is_published() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let first = reuseport_listener(addr);
        let second = reuseport_listener(first.local_addr().expect("addr"));
        let pidfd = own_pidfd();
        let pid = std::process::id() as i32;
        let mut steering = EbpfSteering::load(Balance::RoundRobin, 2).expect("load (root)");
        assert!(!steering.publishing(), "nothing entered yet");
        for (slot, listener) in [&first, &second].into_iter().enumerate() {
            let fd = OwnedFd::from(listener.try_clone().expect("dup"));
            steering
                .activate(slot as u32, 1, &fd, pid, pidfd.as_fd(), None)
                .expect("activate");
            assert!(
                !steering.in_steering(slot as u32),
                "slot {slot} is live but not published"
            );
            assert!(steering.publishing());
        }
        // `flush` waits for publication at most 20 ms; `wait_published` until it is done.
        steering.flush().expect("flush");
        steering.wait_published();
        for slot in 0..2 {
            assert!(steering.in_steering(slot), "slot {slot} is published");
        }
        assert!(!steering.publishing());
        // Leaving and coming back: out of steering again until the new set is published.
        steering.deactivate(1).expect("deactivate");
        steering.flush().expect("flush");
        let fd = OwnedFd::from(second.try_clone().expect("dup"));
        steering
            .activate(1, 2, &fd, pid, pidfd.as_fd(), None)
            .expect("activate again");
        assert!(!steering.in_steering(1));
        assert!(steering.in_steering(0), "slot 0 never left");
        steering.flush().expect("flush");
        steering.wait_published();
        assert!(steering.in_steering(1));
    }

    #[test]
    fn the_live_set_holds_under_rapid_flips_while_connections_arrive() {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listeners: Vec<TcpListener> = (0..SLOTS).map(|_| reuseport_listener(addr)).collect();
        let fds: Vec<OwnedFd> = listeners
            .iter()
            .map(|l| OwnedFd::from(l.try_clone().expect("dup")))
            .collect();
        let pidfd = own_pidfd();
        let pid = std::process::id() as i32;
        let mut steering =
            EbpfSteering::load(Balance::RoundRobin, SLOTS as u32).expect("load (root)");
        // Slot 0 always serves; slots 1..4 rotate, two in and two out at any time, so a slot
        // that leaves stays out for a whole flip.
        let mut serving: std::collections::VecDeque<u32> = [1, 2].into();
        let mut resting: std::collections::VecDeque<u32> = [3, 4].into();
        for slot in [0, 1, 2] {
            steering
                .activate(slot, 1, &fds[slot as usize], pid, pidfd.as_fd(), None)
                .expect("activate");
        }
        steering.flush().expect("flush");
        steering.wait_published();

        let stop = AtomicBool::new(false);
        /// Stops every thread of the test, even when the flipper panics.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let bound = Instant::now() + Duration::from_secs(20);
        // Source -> the slots whose listener accepted a connection from it. A client port is
        // now and then chosen twice in a run; such sources are not judged.
        let accepted: Mutex<HashMap<SocketAddr, Vec<usize>>> = Mutex::new(HashMap::new());
        let attempts: Mutex<Vec<Attempt>> = Mutex::new(Vec::new());
        let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
        // (slot, out since, back at): the listener of a slot that is out stays open, as a
        // draining worker's does, so only steering keeps connections away from it.
        let mut out_windows: Vec<(usize, Instant, Option<Instant>)> = Vec::new();
        let mut flips = 0u64;
        std::thread::scope(|scope| {
            for (slot, listener) in listeners.iter().enumerate() {
                let (stop, accepted) = (&stop, &accepted);
                scope.spawn(move || {
                    while !stop.load(Ordering::Relaxed) && Instant::now() < bound {
                        match listener.accept() {
                            Ok((_stream, peer)) => record(accepted, peer, slot),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_micros(200));
                            }
                            Err(e) => panic!("accept: {e}"),
                        }
                    }
                });
            }
            for client in 0..2u8 {
                let (stop, attempts, failures) = (&stop, &attempts, &failures);
                scope.spawn(move || {
                    let mut n = 0u32;
                    while !stop.load(Ordering::Relaxed) && n < 10_000 && Instant::now() < bound {
                        n += 1;
                        let ip = [127, 0, 5 + client, (n % 250 + 1) as u8];
                        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
                            .expect("socket");
                        socket
                            .bind(&SocketAddr::from((ip, 0)).into())
                            .expect("bind client");
                        let started = Instant::now();
                        match socket.connect_timeout(&addr.into(), Duration::from_secs(2)) {
                            Ok(()) => {
                                let source = socket
                                    .local_addr()
                                    .expect("local")
                                    .as_socket()
                                    .expect("inet");
                                attempts.lock().expect("lock").push(Attempt {
                                    source,
                                    started,
                                    done: Instant::now(),
                                });
                                let _closed = TcpStream::from(socket);
                            }
                            Err(e) => failures.lock().expect("lock").push(e.to_string()),
                        }
                    }
                });
            }
            let _stop = StopOnDrop(&stop);
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                // As a replacement does it: the new slot in, then the old one out.
                let (Some(entering), Some(leaving)) = (resting.pop_front(), serving.pop_front())
                else {
                    unreachable!("two slots in each queue");
                };
                if let Some(window) = out_windows
                    .iter_mut()
                    .rev()
                    .find(|w| w.0 == entering as usize)
                {
                    window.2 = Some(Instant::now());
                }
                steering
                    .activate(
                        entering,
                        1,
                        &fds[entering as usize],
                        pid,
                        pidfd.as_fd(),
                        None,
                    )
                    .expect("activate");
                steering.flush().expect("flush");
                steering.deactivate(leaving).expect("deactivate");
                // Out of steering from here on, although the set without it may still be
                // on its way to the program.
                out_windows.push((leaving as usize, Instant::now(), None));
                steering.flush().expect("flush");
                serving.push_back(entering);
                resting.push_back(leaving);
                flips += 1;
            }
        });
        // Let the acceptors' last connections count: take what is still queued.
        for (slot, listener) in listeners.iter().enumerate() {
            while let Ok((_, peer)) = listener.accept() {
                record(&accepted, peer, slot);
            }
        }
        let accepted = accepted.into_inner().expect("lock");
        let attempts = attempts.into_inner().expect("lock");
        let failures = failures.into_inner().expect("lock");
        let counters = steering.counters(SLOTS).expect("counters");
        let mut tries: HashMap<SocketAddr, usize> = HashMap::new();
        for attempt in &attempts {
            *tries.entry(attempt.source).or_default() += 1;
        }
        let accepts: usize = accepted.values().map(Vec::len).sum();
        let mut outside = Vec::new();
        let mut ambiguous = 0;
        for attempt in &attempts {
            let slot = match accepted.get(&attempt.source).map(Vec::as_slice) {
                Some(&[slot]) if tries[&attempt.source] == 1 => slot,
                _ => {
                    ambiguous += 1;
                    continue;
                }
            };
            let was_out = out_windows.iter().any(|&(s, from, to)| {
                s == slot && from <= attempt.started && to.is_none_or(|to| attempt.done <= to)
            });
            if was_out {
                outside.push((attempt.source, slot));
            }
        }
        println!(
            "{flips} flips of the live set in 2 s, {} connections ({ambiguous} from a reused \
             source, not judged), {} fallbacks, selections {:?}",
            attempts.len(),
            counters.fallbacks,
            counters.selections
        );
        // A flush that adds a slot waits for the set to be published (one RCU grace
        // period): that, not the test, bounds how fast the set can flip.
        assert!(flips >= 50, "too few flips to stress anything: {flips}");
        assert!(
            attempts.len() >= 500,
            "too few connections: {}",
            attempts.len()
        );
        assert!(
            failures.is_empty(),
            "connections failed: {:?}",
            &failures[..failures.len().min(5)]
        );
        assert_eq!(counters.drops, 0, "the program dropped connections");
        assert_eq!(
            accepts,
            attempts.len(),
            "every connection was accepted, once"
        );
        assert!(
            ambiguous <= attempts.len() / 100,
            "too many reused sources: {ambiguous}"
        );
        assert!(
            outside.is_empty(),
            "{} connections reached a slot outside the live set, e.g. {:?}",
            outside.len(),
            &outside[..outside.len().min(5)]
        );
    }

    fn reuseport_udp(addr: SocketAddr) -> std::net::UdpSocket {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("socket");
        socket.set_reuse_port(true).expect("SO_REUSEPORT");
        socket.bind(&addr.into()).expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        socket.into()
    }

    /// A short-header datagram to the worker `(slot, generation)`.
    fn short_to(slot: u16, generation: u16, tag: u8) -> Vec<u8> {
        let cid = steer_common::quic::encode_server_id(
            steer_common::quic::ServerId { slot, generation },
            &[tag; steer_common::quic::ENTROPY_LEN],
        );
        let mut d = vec![0x41];
        d.extend_from_slice(&cid);
        d.extend_from_slice(&[tag; 24]);
        d
    }

    /// Which of `sockets` received `payload`, read once `marker` (sent after it by the same
    /// socket, so queued after it) has reached `sockets[0]`.
    fn receivers(sockets: &[&std::net::UdpSocket], payload: &[u8], marker: &[u8]) -> Vec<usize> {
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(5);
        sockets[0].set_nonblocking(false).expect("blocking");
        loop {
            assert!(Instant::now() < deadline, "the marker never arrived");
            let n = sockets[0].recv(&mut buf).unwrap_or(0);
            if &buf[..n] == payload {
                got.push(0);
            }
            if &buf[..n] == marker {
                break;
            }
        }
        for (i, socket) in sockets.iter().enumerate().skip(1) {
            socket.set_nonblocking(true).expect("nonblocking");
            while let Ok(n) = socket.recv(&mut buf) {
                if &buf[..n] == payload {
                    got.push(i);
                }
            }
        }
        got
    }

    #[test]
    fn the_quic_program_steers_by_connection_id_and_drops_garbage() {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // Slot 0 generation 5 and slot 1 generation 6 serve; slot 1 generation 3 drains
        // (still in SOCKETS); a rogue socket is in the group but never registered.
        let a = reuseport_udp(addr);
        let b = reuseport_udp(addr);
        let old = reuseport_udp(addr);
        let rogue = reuseport_udp(addr);
        let pidfd = own_pidfd();
        let pid = std::process::id() as i32;
        let flows = UdpFlows {
            quic: true,
            ..UdpFlows::default()
        };
        let mut steering = EbpfSteering::load_limited(
            Balance::RoundRobin,
            2,
            &ClientLimits::default(),
            Some(flows),
            None,
        )
        .expect("load (root)");
        assert_eq!(steering.program, PROGRAM_QUIC);
        let fd = |s: &std::net::UdpSocket| OwnedFd::from(s.try_clone().expect("dup"));
        let (fa, fb, fold) = (fd(&a), fd(&b), fd(&old));
        steering
            .activate(1, 3, &fold, pid, pidfd.as_fd(), None)
            .expect("activate");
        steering
            .activate(0, 5, &fa, pid, pidfd.as_fd(), None)
            .expect("activate");
        steering
            .activate(1, 6, &fb, pid, pidfd.as_fd(), None)
            .expect("activate");
        steering.flush().expect("flush");
        steering.wait_published();
        let all = [&a, &b, &old, &rogue];
        let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("client");
        let marker = short_to(0, 5, 0xee);
        let send = |d: &[u8]| {
            client.send_to(d, addr).expect("send");
            client.send_to(&marker, addr).expect("send");
        };
        // Each ID goes to the socket it names, the draining one's included, every time.
        for round in 0..20u8 {
            for (slot, generation, want) in [(0, 5, 0), (1, 6, 1), (1, 3, 2)] {
                let d = short_to(slot, generation, round);
                send(&d);
                assert_eq!(
                    receivers(&all, &d, &marker),
                    vec![want],
                    "{slot}/{generation}"
                );
            }
        }
        // An ID whose process is gone (slot 0 generation 4, slot 900, slot 65535) goes to
        // a live socket of the current generation, never the rogue or the draining one.
        for (slot, generation) in [(0u16, 4u16), (900, 1), (65_535, 9)] {
            let d = short_to(slot, generation, 0x77);
            send(&d);
            let got = receivers(&all, &d, &marker);
            assert!(
                got == vec![0] || got == vec![1],
                "{slot}/{generation}: {got:?}"
            );
        }
        // A client's Initials (a DCID it chose) from one port all reach one socket of the
        // current generation, round-robin or not.
        let mut initial = vec![0xc0, 0, 0, 0, 1, 20];
        initial.extend_from_slice(&[0xab; 20]);
        initial.extend_from_slice(&[0u8; 1200]);
        let mut seen = Vec::new();
        for i in 0..10u8 {
            let mut d = initial.clone();
            d[30] = i;
            send(&d);
            seen.extend(receivers(&all, &d, &marker));
        }
        assert_eq!(seen.len(), 10, "{seen:?}");
        assert!(seen.iter().all(|&s| s == seen[0] && s < 2), "{seen:?}");
        // Garbage, truncated headers, a greased short header: nobody gets them.
        let long_cut = &short_to(0, 5, 1)[..10];
        let mut long_steer = vec![0xc0, 0, 0, 0, 1, 16];
        long_steer.extend_from_slice(&short_to(0, 5, 3)[1..12]);
        for d in [
            &[][..],
            &[0x41; 5][..],
            long_cut,
            &long_steer[..],
            &[0x01; 64][..],
            &[0xc0, 0, 0][..],
        ] {
            send(d);
            assert!(receivers(&all, d, &marker).is_empty(), "{d:02x?}");
        }
        let counters = steering.counters(2).expect("counters");
        // 60 named, and a marker after each of the 79 datagrams sent.
        assert_eq!(counters.quic_steered, 60 + 79);
        assert!(counters.quic_malformed >= 5, "{counters:?}");
    }
}
