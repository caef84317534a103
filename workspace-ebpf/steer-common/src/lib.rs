//! Types and constants shared by the kernel side (`steer-ebpf`) and the user side (`steer`).
//!
//! Everything here is `no_std` so the eBPF program can use it; map value types are
//! `#[repr(C)]` so both sides agree on their layout byte for byte. With the `user` feature
//! the map value types implement [`aya::Pod`] so the loader can read and write them.
//!
//! # The maps (defined in `steer-ebpf`, kept true by `steer::steering`)
//!
//! | map | key | value | written by |
//! |---|---|---|---|
//! | `SOCKETS` (`REUSEPORT_SOCKARRAY`, [`MAX_SLOTS`] x [`GENERATIONS`]) | [`socket_index`]`(slot, generation)` | a registered worker's socket | primary |
//! | `CURRENT` (array, [`MAX_SLOTS`]) | slot | `generation % GENERATIONS` of the slot's serving socket | primary |
//! | `FLOWS` (LRU hash, `--udp-flow-table`) | [`FlowKey`] | [`Flow`]: the socket a UDP flow is kept on | program |
//! | `LAST_HIT` (array, [`MAX_SLOTS`] x [`GENERATIONS`]) | socket index | `u64`: when a flow last reached that socket (ns) | program; read by the primary while a worker drains |
//! | `CONFIG` (array, 1) | 0 | [`Config`] | primary, once |
//! | `LIVE` (array of maps, 1) | 0 | a one-entry array holding the [`LiveSet`] | primary: a new inner map per change |
//! | `MAGLEV` (mmapable array, [`HASH_TABLE_SIZE`]) | `hash % M` | slot | primary, once |
//! | `LOADS` (array of maps, [`MAX_SLOTS`]) | slot | the serving worker's own one-entry mmapable array holding its [`SlotLoad`] | program, worker and primary, one field each |
//! | `PROBE` (array, 1) | 0 | `u64`: ownership probes seen | program |
//! | `COUNTERS` (per-CPU array, 1) | 0 | [`Counters`] | program |
//! | `CURSOR` (per-CPU array, 1) | 0 | `u32` round-robin cursor | program |
//! | `CPU_INDEX` (array, [`MAX_CPUS`]) | CPU number | 1 + its index among the CPUs workers may run on, 0 if none | primary, once |
//! | `CLIENTS` (LRU hash, `--client-table-size`) | [`ClientKey`] | `u64`: the client's GCRA theoretical arrival time (ns, `bpf_ktime_get_ns`) | program |
//! | `REFUSED` (LRU hash, [`REFUSED_TABLE_SIZE`]) | [`ClientKey`] | `u64`: SYNs refused from that prefix | program; read by the primary each health interval |
//! | `EXEMPT` (LPM trie, [`MAX_EXEMPT`]) | `prefix length + 16 address bytes` (IPv4 as IPv4-mapped IPv6) | `u8` 1 | primary, at start and on SIGHUP |
#![no_std]

pub mod quic;

/// Most worker slots a cluster may have. Sizes the steering maps; `--workers` above it is
/// a configuration error.
pub const MAX_SLOTS: u32 = 1024;

/// CPU numbers the `cpu` policy knows (`CPU_SETSIZE`): a SYN handled on a higher one is
/// treated as one on a CPU outside the workers' set.
pub const MAX_CPUS: u32 = 1024;

/// Size of one Maglev lookup table: a prime well above 64 x [`MAX_SLOTS`], so every slot owns
/// at least 64 entries and the shares differ by at most one entry.
pub const HASH_TABLE_SIZE: u32 = 65_537;

/// How many further live slots the program tries when the chosen one holds no socket (its
/// worker died a moment ago and the primary has not yet updated the live set). After that it
/// drops the connection rather than let the kernel pick any socket in the group.
pub const FALLBACK_TRIES: u32 = 4;

/// Entries of `REFUSED`: the prefixes whose SYNs the program refused, most recent first
/// to stay. Small on purpose: the primary reads the whole map once per health interval.
pub const REFUSED_TABLE_SIZE: u32 = 1024;

/// Most `--client-exempt` prefixes.
pub const MAX_EXEMPT: u32 = 1024;

/// Default size of `CLIENTS` (`--client-table-size`).
pub const DEFAULT_CLIENT_TABLE_SIZE: u32 = 65_536;

/// Generations of one slot whose sockets `SOCKETS` holds at once: the serving one and up
/// to three older ones that keep their UDP flows while they drain. A fourth replacement
/// within one drain takes the oldest one's index (its flows move forward to the slot's
/// serving generation).
pub const GENERATIONS: u32 = 4;

/// The `SOCKETS` index of `slot`'s socket of `generation`.
#[inline(always)]
pub const fn socket_index(slot: u32, generation: u32) -> u32 {
    slot + MAX_SLOTS * (generation % GENERATIONS)
}

/// Default size of `FLOWS` (`--udp-flow-table`).
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 65_536;

/// A UDP flow: the client's address and port, as the datagram carries them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The client's address in network byte order, read as native words: an IPv4 address
    /// in word 0 (the rest 0), or the 16 bytes of an IPv6 address.
    pub addr: [u32; 4],
    /// The client's port as the two bytes of the packet read in native order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Zero.
    pub _pad: u8,
}

/// Where a UDP flow is kept: the value of `FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// The `SOCKETS` index ([`socket_index`]) of the socket that took its first datagram.
    pub index: u32,
    /// That socket's slot: where the flow goes if that socket has left (the slot's serving
    /// generation).
    pub slot: u32,
    /// When its last datagram arrived (ns, `bpf_ktime_get_ns`). A flow idle for
    /// `Config::flow_timeout_ns` is a new flow.
    pub last_ns: u64,
}

/// The [`ClientKey::family`] of an IPv4 client (an IPv4-mapped IPv6 address included).
pub const FAMILY_V4: u8 = 4;
/// The [`ClientKey::family`] of an IPv6 client.
pub const FAMILY_V6: u8 = 6;

/// A client prefix: the key of the per-client limit's state (`CLIENTS`) and of the refusal
/// counts (`REFUSED`).
///
/// It names an address family and the client's address masked to the configured prefix,
/// nothing of the transport: a TCP SYN and (once the program sees UDP and QUIC) the first
/// datagram of a new flow from the same prefix look up the same entry, so one budget
/// covers a client's new connections and new flows alike.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// The prefix length the address was masked to.
    pub prefix: u8,
    /// Zero. Room for a class of traffic, should one ever need a budget of its own.
    pub _reserved: [u8; 2],
    /// The masked address in network byte order, read as native words: an IPv4 address
    /// in word 0 (the rest 0), or the 16 bytes of an IPv6 address.
    pub addr: [u32; 4],
}

/// The `policy` values of [`Config`].
pub mod policy {
    /// Next live slot, per CPU.
    pub const ROUND_ROBIN: u32 = 1;
    /// Maglev table lookup of the client IP's hash.
    pub const HASH: u32 = 2;
    /// Power of two choices on published load.
    pub const LEAST_LOADED: u32 = 3;
    /// The slot pinned to the CPU that handles the SYN.
    pub const CPU: u32 = 4;
}

/// Program-wide settings (`CONFIG[0]`), written once before any socket is in steering.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// One of the [`policy`] constants. Anything else drops every connection.
    pub policy: u32,
    /// Configured slot count (`--workers`): the Maglev table and the `cpu` policy map onto
    /// `0..slots`, live or not.
    pub slots: u32,
    /// How many CPUs the workers may run on (the primary's affinity: a cpuset, `taskset`),
    /// for the `cpu` policy: slot i is pinned to the (i mod `cpus`)-th of them.
    pub cpus: u32,
    /// The TCP source port of the primary's ownership probe, as the two bytes of the
    /// packet read in native order (0: no probe).
    pub probe_port: u32,
    /// 1 if the probe's packets are IPv6, 0 if IPv4 (a probe through an IPv4-mapped
    /// address travels as IPv4).
    pub probe_v6: u32,
    /// The probe's source address as the packet carries it: the IPv4 address in word 0
    /// (the rest 0), or the 16 bytes of the IPv6 address; network byte order, read as
    /// native words. The whole address is compared, so no other client is taken for the
    /// probe (a 32-bit hash of an IPv6 address is not unique).
    pub probe_addr: [u32; 4],
    /// 1: every policy steers new connections around a stalled slot (`--avoid-stalls`);
    /// 0: no slot is skipped for a stall (nor counted stalled).
    pub avoid_stalls: u32,
    /// The per-client limit's emission interval in ns (one connection per this, GCRA's
    /// `T`); 0: no per-client limit.
    pub client_interval_ns: u64,
    /// GCRA's tolerance in ns: `(burst - 1) x T`, how far ahead of now a client's
    /// theoretical arrival time may run before its SYNs are refused.
    pub client_tolerance_ns: u64,
    /// The IPv4 prefix mask (`--client-prefix-v4`), network order read as a native word.
    pub client_mask_v4: u32,
    /// The IPv6 prefix mask (`--client-prefix-v6`), network order read as native words.
    pub client_mask_v6: [u32; 4],
    /// `--client-prefix-v4`, stored in keys.
    pub client_prefix_v4: u8,
    /// `--client-prefix-v6`, stored in keys.
    pub client_prefix_v6: u8,
    /// Padding; keeps the size a multiple of 8.
    pub _pad2: [u8; 2],
    /// A UDP flow idle this long (ns) is a new flow (`--udp-flow-timeout`); 0: no flow
    /// table, every datagram is steered by the policy on its own.
    pub flow_timeout_ns: u64,
}

/// The slots in steering, in slot order: the one value of the inner map at `LIVE[0]`.
///
/// A published set is never written again: each change is a new inner map, swapped into
/// `LIVE` by one pointer store, and the kernel frees the old one only after every program
/// run that could see it has returned (an RCU grace period). A run therefore sees one
/// whole set, the old or the new.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LiveSet {
    /// How many entries of `slots` are valid.
    pub count: u32,
    /// Padding; keeps `slots` 8-byte aligned.
    pub _pad: u32,
    /// Live slot indices; the first `count` are valid.
    pub slots: [u32; MAX_SLOTS as usize],
}

impl LiveSet {
    /// A set with no live slot.
    pub const EMPTY: LiveSet = LiveSet {
        count: 0,
        _pad: 0,
        slots: [0; MAX_SLOTS as usize],
    };
}

/// One worker's load record: the only value of a one-entry `BPF_F_MMAPABLE` array map made
/// for that worker process alone, and placed at `LOADS[slot]` while it serves.
///
/// Each field has one writer. The worker maps its record (and nothing else: its fd is of
/// this map only) and stores `accepted` and `active`; the program adds to `steered` and
/// keeps the stall watch (`progress`, `waiting_since`, `stalled`); the primary writes
/// `settled` once per health interval from the listener's real accept queue, and `verdict`
/// for a worker that has never published an accept. The load the program compares is
/// `max(0, steered - accepted - settled) + active`: what waits in the queue plus what is
/// open. One cache line, so the writers never share a line with another record.
///
/// # Stalls
///
/// A slot is *stalled* ([`SlotLoad::is_stalled`]) when at least [`STALL_QUEUE`] steered
/// connections wait for it and it has accepted none for [`STALL_AFTER_NS`]: the program
/// sees that on the next SYN that considers the slot, and every policy then steers new
/// connections around it. It is available again on the first accept the program sees, or
/// when the primary's settlement (once per health interval) shows the queue was phantom.
/// A worker that has never published an accept (`accepted` 0: an external program that
/// does not publish) is judged by the primary from its real accept queue instead
/// (`verdict`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotLoad {
    /// Connections the program steered to this worker (new and migrated). Program only.
    pub steered: u64,
    /// Connections the worker has accepted. Worker only (0 if it never publishes).
    pub accepted: u64,
    /// Connections the worker has open now. Worker only.
    pub active: u64,
    /// Steered connections that are neither accepted nor queued: SYNs that never completed
    /// a handshake, retransmits, SYNs dropped on a full queue. Primary only, as
    /// `steered - accepted - queue length` (wrapping), so the estimate corrects itself.
    pub settled: u64,
    /// `accepted` as the program last saw it. Program only.
    pub progress: u64,
    /// When (`bpf_ktime_get_ns`) the program last saw `accepted` advance, or steered a
    /// connection to an empty queue: the start of the current wait for an accept.
    /// Program only.
    pub waiting_since: u64,
    /// `steered` when the program last saw `accepted` advance: what was steered since is
    /// what the worker has not caught up with, whatever the estimate's drift. Program
    /// only.
    pub steered_at_progress: u64,
    /// 1 while the program judges the slot stalled (it counts each 0 -> 1 in
    /// `COUNTERS.stalls`). Program only.
    pub stalled: u32,
    /// The primary's judgement of a worker that has never published an accept:
    /// [`VERDICT_STALLED`] or 0. Primary only.
    pub verdict: u16,
    /// `generation % GENERATIONS` of the worker the record is for. Primary only, written
    /// before the worker starts. A replacement's record reaches `LOADS[slot]` a moment
    /// after its socket is the slot's current one (`CURRENT`); until then `LOADS[slot]`
    /// still holds the replaced worker's record, which says nothing of the new socket, so
    /// the program reads a record only while this is the slot's current generation
    /// ([`SlotLoad::is_for`]).
    pub generation: u16,
}

/// Steered connections that must wait, unaccepted, before a slot can be stalled. Two, not
/// one: a single connection waiting for a busy worker is the normal case.
pub const STALL_QUEUE: u64 = 2;

/// How long a slot with [`STALL_QUEUE`] connections waiting may go without an accept before
/// it is stalled: 0.5 ms, several times what a running worker takes to accept a completed
/// handshake on a local network, and far below what a stall (a pause, a blocking call)
/// lasts. A worker that was only slow (descheduled for a moment) is available again on
/// its next accept.
pub const STALL_AFTER_NS: u64 = 500_000;

/// [`SlotLoad::verdict`] of a worker the primary found stalled.
pub const VERDICT_STALLED: u16 = 1;

impl SlotLoad {
    /// Whether the record is the one of the slot's serving socket: `current` is the slot's
    /// `CURRENT` entry (`generation % GENERATIONS`).
    #[inline(always)]
    pub fn is_for(&self, current: u32) -> bool {
        u32::from(self.generation) == current
    }

    /// The estimated accept queue: steered, neither accepted nor settled (never negative).
    #[inline(always)]
    pub fn queued(&self) -> u64 {
        let queued = self
            .steered
            .wrapping_sub(self.accepted)
            .wrapping_sub(self.settled) as i64;
        queued.max(0) as u64
    }

    /// What the program weighs: the estimated queue plus open connections.
    #[inline(always)]
    pub fn load(&self) -> u64 {
        self.queued().saturating_add(self.active)
    }

    /// The connections waiting for the worker, as far as the program can tell: steered
    /// since its last accept, and no more than the settled estimate ([`SlotLoad::queued`]),
    /// so that neither SYNs that never became connections nor an accept the program
    /// missed keep a slot stalled past the primary's next settlement.
    #[inline(always)]
    pub fn waiting(&self) -> u64 {
        let since = self.steered.wrapping_sub(self.steered_at_progress) as i64;
        let since = since.max(0) as u64;
        let queued = self.queued();
        if since < queued { since } else { queued }
    }

    /// Whether the slot is stalled at `now` (`bpf_ktime_get_ns`, `CLOCK_MONOTONIC`): at
    /// least [`STALL_QUEUE`] connections waiting ([`SlotLoad::waiting`]) and no accept
    /// since `waiting_since`, at least [`STALL_AFTER_NS`] ago. An accept the program has
    /// not seen yet (`accepted` is not `progress`) is progress. A worker that has never
    /// published an accept has the primary's `verdict`.
    #[inline(always)]
    pub fn is_stalled(&self, now: u64) -> bool {
        if self.accepted == 0 {
            return self.verdict == VERDICT_STALLED;
        }
        self.accepted == self.progress
            && self.waiting() >= STALL_QUEUE
            && now.saturating_sub(self.waiting_since) >= STALL_AFTER_NS
    }
}

/// Byte offsets of the [`SlotLoad`] fields, for workers in other languages (docs/ipc.md).
pub mod record {
    /// `steered`.
    pub const STEERED: usize = 0;
    /// `accepted`.
    pub const ACCEPTED: usize = 8;
    /// `active`.
    pub const ACTIVE: usize = 16;
    /// `settled`.
    pub const SETTLED: usize = 24;
    /// `progress`.
    pub const PROGRESS: usize = 32;
    /// `waiting_since`.
    pub const WAITING_SINCE: usize = 40;
    /// `steered_at_progress`.
    pub const STEERED_AT_PROGRESS: usize = 48;
    /// `stalled` (`u32`).
    pub const STALLED: usize = 56;
    /// `verdict` (`u16`).
    pub const VERDICT: usize = 60;
    /// `generation` (`u16`).
    pub const GENERATION: usize = 62;
}

/// The program's counters (`COUNTERS[0]`, one copy per CPU; the user side sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Counters {
    /// Connections handed to each slot (new and migrated).
    pub selections: [u64; MAX_SLOTS as usize],
    /// Connections whose first choice held no socket and went to another live slot.
    pub fallbacks: u64,
    /// Connections dropped: no live slot could take them.
    pub drops: u64,
    /// Connections migrated out of a closing listener to a live slot (by the `migrate`
    /// path; a migration that ends in a drop is counted in `drops` only).
    pub migrations: u64,
    /// SYNs refused by the per-client limit (not counted in `drops`).
    pub client_refusals: u64,
    /// Clients entered into `CLIENTS`. With nothing ever deleted from it, this minus the
    /// entries it holds is how many the LRU evicted.
    pub client_inserts: u64,
    /// UDP datagrams that went to the socket their flow is kept on.
    pub flow_hits: u64,
    /// UDP flows entered into `FLOWS` (a new client, one idle past the timeout, one whose
    /// socket had left).
    pub flow_inserts: u64,
    /// UDP datagrams of a known flow whose socket had left (its process exited or
    /// drained), steered again.
    pub flow_moves: u64,
    /// QUIC datagrams that went to the worker their connection ID names.
    pub quic_steered: u64,
    /// QUIC datagrams dropped as malformed: garbage or truncated (see `quic::parse`).
    pub quic_malformed: u64,
    /// Times each slot became stalled (see [`SlotLoad`]).
    pub stalls: [u64; MAX_SLOTS as usize],
    /// Round-robin turns lost or gained for good, each one connection of drift from the
    /// exact split: a turn skipped while the stalled slot was already owed the most it
    /// can be, or one taken out of turn, with nothing owed, when every slot looked at was
    /// stalled. 0 while no slot stalls for longer than its owed turns cover.
    pub turns_lost: u64,
}

impl Counters {
    /// All zero.
    pub const ZERO: Counters = Counters {
        selections: [0; MAX_SLOTS as usize],
        fallbacks: 0,
        drops: 0,
        migrations: 0,
        client_refusals: 0,
        client_inserts: 0,
        flow_hits: 0,
        flow_inserts: 0,
        flow_moves: 0,
        quic_steered: 0,
        quic_malformed: 0,
        stalls: [0; MAX_SLOTS as usize],
        turns_lost: 0,
    };
}

/// Hash of a client address, the same on both paths of the program (packet and migrating
/// socket). `words` holds an IPv4 address in `words[0]` (with `v6 == false`) or an IPv6
/// address in network order; an IPv4-mapped IPv6 address hashes like the IPv4 one, so a
/// dual-stack listener keeps a client's slot.
#[inline(always)]
pub fn hash_client(words: [u32; 4], v6: bool) -> u32 {
    if !v6 || (words[0] == 0 && words[1] == 0 && words[2] == u32::to_be(0xffff)) {
        let ip = if v6 { words[3] } else { words[0] };
        return fmix32(ip ^ 0x9e37_79b9);
    }
    let mut h = 0x9e37_79b9u32;
    let mut i = 0;
    while i < 4 {
        h = fmix32(h ^ words[i]);
        i += 1;
    }
    h
}

/// A second, independent hash of the same address: where a client of an empty slot goes
/// while its slot is empty.
#[inline(always)]
pub fn rehash(h: u32) -> u32 {
    fmix32(h ^ 0x85eb_ca6b)
}

/// MurmurHash3's 32-bit finaliser: every input bit affects every output bit.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (all of them): #[repr(C)] structs of plain integers and integer arrays, with no
    // padding the kernel could leak and no invalid bit patterns.
    #[allow(clippy::undocumented_unsafe_blocks)]
    unsafe impl aya::Pod for super::Config {}
    #[allow(clippy::undocumented_unsafe_blocks)]
    unsafe impl aya::Pod for super::LiveSet {}
    #[allow(clippy::undocumented_unsafe_blocks)]
    unsafe impl aya::Pod for super::SlotLoad {}
    #[allow(clippy::undocumented_unsafe_blocks)]
    unsafe impl aya::Pod for super::Counters {}
    #[allow(clippy::undocumented_unsafe_blocks)]
    unsafe impl aya::Pod for super::ClientKey {}
    #[allow(clippy::undocumented_unsafe_blocks)]
    unsafe impl aya::Pod for super::FlowKey {}
    #[allow(clippy::undocumented_unsafe_blocks)]
    unsafe impl aya::Pod for super::Flow {}
}

/// GCRA's decision for one new connection of a client whose theoretical arrival time is
/// `tat` (0 for a new client) at time `now`: `Some(new tat)` to admit it, `None` to refuse
/// it. `interval` is the emission interval `T`, `tolerance` is `(burst - 1) x T`: a fresh
/// client gets `burst` connections at once, then one per `T`.
#[inline(always)]
pub fn gcra(tat: u64, now: u64, interval: u64, tolerance: u64) -> Option<u64> {
    let start = if tat > now { tat } else { now };
    if start - now > tolerance {
        return None;
    }
    Some(start + interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_gives_a_burst_then_the_rate() {
        let t = 20_000_000; // 50/s
        let tolerance = 9 * t; // burst 10
        let mut tat = 0;
        let mut admitted = 0;
        // 2 s of attempts every 1 ms.
        for ms in 0..2000u64 {
            if let Some(next) = gcra(tat, 1_000_000_000 + ms * 1_000_000, t, tolerance) {
                tat = next;
                admitted += 1;
            }
        }
        assert_eq!(admitted, 10 + 100 - 1, "the burst, then one per 20 ms");
        assert_eq!(gcra(0, 5, t, 0), Some(5 + t), "a new client is admitted");
    }

    #[test]
    fn client_key_layout_is_fixed() {
        assert_eq!(size_of::<ClientKey>(), 20);
        assert_eq!(size_of::<Config>() % 8, 0);
    }

    #[test]
    fn ipv4_mapped_ipv6_hashes_like_ipv4() {
        let v4 = u32::from_be_bytes([10, 1, 2, 3]).to_be();
        let mapped = [0, 0, u32::to_be(0xffff), v4];
        assert_eq!(hash_client([v4, 0, 0, 0], false), hash_client(mapped, true));
        assert_ne!(
            hash_client([v4, 0, 0, 0], false),
            hash_client([1, 2, 3, 4], true)
        );
    }

    #[test]
    fn record_layout_is_what_docs_ipc_md_says() {
        assert_eq!(size_of::<SlotLoad>(), 64);
        assert_eq!(core::mem::offset_of!(SlotLoad, steered), record::STEERED);
        assert_eq!(core::mem::offset_of!(SlotLoad, accepted), record::ACCEPTED);
        assert_eq!(core::mem::offset_of!(SlotLoad, active), record::ACTIVE);
        assert_eq!(core::mem::offset_of!(SlotLoad, settled), record::SETTLED);
        assert_eq!(core::mem::offset_of!(SlotLoad, progress), record::PROGRESS);
        assert_eq!(
            core::mem::offset_of!(SlotLoad, waiting_since),
            record::WAITING_SINCE
        );
        assert_eq!(
            core::mem::offset_of!(SlotLoad, steered_at_progress),
            record::STEERED_AT_PROGRESS
        );
        assert_eq!(core::mem::offset_of!(SlotLoad, stalled), record::STALLED);
        assert_eq!(core::mem::offset_of!(SlotLoad, verdict), record::VERDICT);
        assert_eq!(
            core::mem::offset_of!(SlotLoad, generation),
            record::GENERATION
        );
    }

    #[test]
    fn a_record_is_read_only_for_the_generation_it_was_made_for() {
        let record = SlotLoad {
            generation: 3,
            ..SlotLoad::default()
        };
        assert!(record.is_for(3));
        assert!(
            !record.is_for(0),
            "the slot's new socket: the record is its predecessor's"
        );
    }

    #[test]
    fn a_queue_without_an_accept_for_the_threshold_is_a_stall() {
        let ms = 1_000_000;
        let record = SlotLoad {
            steered: 12,
            accepted: 10,
            progress: 10,
            steered_at_progress: 10,
            waiting_since: 100 * ms,
            ..SlotLoad::default()
        };
        assert!(
            !record.is_stalled(100 * ms + STALL_AFTER_NS - 1),
            "not yet: the threshold has not passed"
        );
        assert!(
            record.is_stalled(100 * ms + STALL_AFTER_NS),
            "2 waiting, no accept for the threshold"
        );
        let caught_up = SlotLoad {
            steered_at_progress: 11,
            settled: 0,
            ..record
        };
        assert!(
            !caught_up.is_stalled(500 * ms),
            "one steered since the last accept: drift before it does not count"
        );
        let one_queued = SlotLoad {
            steered: 11,
            ..record
        };
        assert!(
            !one_queued.is_stalled(500 * ms),
            "one waiting connection is no stall"
        );
        let unseen_accept = SlotLoad {
            accepted: 11,
            ..record
        };
        assert!(
            !unseen_accept.is_stalled(500 * ms),
            "an accept the program has not seen yet is progress"
        );
        let settled = SlotLoad {
            settled: 2,
            ..record
        };
        assert!(
            !settled.is_stalled(500 * ms),
            "the primary settled the queue as phantom"
        );
        let silent = SlotLoad {
            steered: 50,
            ..SlotLoad::default()
        };
        assert!(
            !silent.is_stalled(500 * ms),
            "a silent worker is the primary's to judge"
        );
        let judged = SlotLoad {
            verdict: VERDICT_STALLED,
            ..silent
        };
        assert!(judged.is_stalled(0));
    }

    #[test]
    fn load_is_queue_plus_open_and_never_negative() {
        let load = |steered, accepted, active, settled| {
            SlotLoad {
                steered,
                accepted,
                active,
                settled,
                ..SlotLoad::default()
            }
            .load()
        };
        assert_eq!(load(10, 4, 2, 0), 8, "6 queued + 2 open");
        assert_eq!(
            load(10, 4, 2, 6),
            2,
            "the primary settled the 6 that never came"
        );
        assert_eq!(load(10, 12, 1, 0), 1, "more accepted than steered: queue 0");
        // The primary settles with wrapping arithmetic when the worker is ahead.
        let settled = 10u64.wrapping_sub(12).wrapping_sub(0);
        assert_eq!(
            load(11, 12, 0, settled),
            1,
            "one steered since the settlement"
        );
    }
}
