//! Steer's `SK_REUSEPORT` program, attached as `sk_reuseport/migrate` (select-or-migrate).
//!
//! For every new connection to the port, and for every connection migrated out of a
//! closing listener, it picks a slot by the policy in `CONFIG`, then asks the kernel to use
//! the socket the primary registered at that slot (`bpf_sk_select_reuseport`). It returns
//! `SK_PASS` only after a successful selection: `SK_PASS` without one would let the kernel
//! hash over every socket in the group, including other processes' sockets. If the chosen
//! slot is empty it tries the next live slots; if none takes the connection it drops it.
//!
//! The same program steers a UDP listener's group: there every datagram runs it (the data
//! starts at the UDP header), and a selected socket receives it; a dropped datagram gets
//! an ICMP port-unreachable. Policies read the same fields (the client's address, the
//! CPU), so they work alike; the per-client limit counts TCP SYNs only.
//!
//! One SYN is not a connection: the primary's ownership probe. Once per health interval
//! the primary connects from the source in `CONFIG.probe_*` (in a UDP group: sends one
//! datagram from it); the program counts it in `PROBE` and drops it. A probe that is answered, or refused without being counted, was
//! decided by a program other than this one, and the primary attaches this one again.
//!
//! With a per-client limit (`CONFIG.client_interval_ns` not 0), a client SYN is first
//! checked against its prefix's state in `CLIENTS` (GCRA: one theoretical arrival time per
//! prefix, advanced by compare-and-exchange so concurrent SYNs on several CPUs are counted
//! exactly). Over the limit it is dropped before any policy runs: the listener lookup
//! fails and the client gets a reset at once. Only SYNs count (under syncookies the
//! final ACK of a handshake runs the program too), and prefixes in `EXEMPT` never do.
#![no_std]
#![no_main]
// The BPF target has no atomic types, but LLVM lowers this intrinsic to BPF's
// `lock xadd`: the one cross-CPU counter (a record's `steered`) needs it.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_MMAPABLE, bpf_hdr_start_off::BPF_HDR_START_NET, sk_action},
    btf_maps::{Array as BtfArray, ArrayOfMaps},
    helpers::{
        bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_skb_load_bytes,
        bpf_skb_load_bytes_relative,
    },
    macros::{btf_map, map, sk_reuseport},
    maps::{
        Array, LruHashMap, PerCpuArray, ProgramArray, ReusePortSockArray, RingBuf,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::SkReuseportContext,
};
use steer_common::{
    ClientKey, Config, Counters, DEFAULT_CLIENT_TABLE_SIZE, DEFAULT_FLOW_TABLE_SIZE,
    FALLBACK_TRIES, FAMILY_V4, FAMILY_V6, Flow, FlowKey, GENERATIONS, HASH_TABLE_SIZE, LiveSet,
    MAX_CPUS, MAX_EXEMPT, MAX_SLOTS, REFUSED_TABLE_SIZE, SlotLoad, policy,
    quic::{self, Route},
    socket_index,
};

#[map]
static SOCKETS: ReusePortSockArray =
    ReusePortSockArray::with_max_entries(MAX_SLOTS * GENERATIONS, 0);
/// Per slot, `generation % GENERATIONS` of its serving socket: new connections and new
/// flows go to `SOCKETS[socket_index(slot, CURRENT[slot])]`.
#[map]
static CURRENT: Array<u32> = Array::with_max_entries(MAX_SLOTS, 0);
/// UDP flows, by client address and port: the socket each is kept on. Sized by the primary
/// at load (`--udp-flow-table`).
#[map]
static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);
/// Per socket index, when a UDP flow last reached it (ns): the primary lets a draining
/// worker's socket leave once its flows are idle.
#[map]
static LAST_HIT: Array<u64> = Array::with_max_entries(MAX_SLOTS * GENERATIONS, 0);
/// A QUIC group's second program (`steer_select_quic_flow`, at index 0), tail-called for
/// the datagrams that take UDP's path: verified on its own, so the connection-ID reading
/// does not multiply the flow path's states past the verifier's budget.
#[map]
static QUIC_FLOW: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[btf_map]
static LIVE: ArrayOfMaps<BtfArray<LiveSet, 1>, 1> = ArrayOfMaps::new();
#[map]
static MAGLEV: Array<u32> = Array::with_max_entries(HASH_TABLE_SIZE, BPF_F_MMAPABLE);
#[btf_map]
static LOADS: ArrayOfMaps<
    BtfArray<SlotLoad, 1, { BPF_F_MMAPABLE as usize }>,
    { MAX_SLOTS as usize },
> = ArrayOfMaps::new();
#[map]
static PROBE: Array<u64> = Array::with_max_entries(1, 0);
/// A slot (`u32`) each time the program starts judging it stalled: wakes the primary,
/// which settles the load records against the real accept queues at once, so that SYNs
/// that never became connections (the estimate's phantoms) hold a healthy slot out for
/// a moment, not until the next health interval.
#[map]
static STALLS: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);
#[map]
static CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
/// Per CPU, the turns round-robin skipped each slot for while it was stalled, at most
/// [`OWED_CAP`]: given back at the slot's next turns, so that a worker the scheduler kept
/// off the CPU for a moment (a stall as far as the program can tell) ends with its exact
/// share, and one that stalled for seconds gets only a few extra connections back.
#[map]
static OWED: PerCpuArray<[u8; MAX_SLOTS as usize]> = PerCpuArray::with_max_entries(1, 0);
#[map]
static CPU_INDEX: Array<u32> = Array::with_max_entries(MAX_CPUS, 0);
/// Sized by the primary at load (`--client-table-size`).
#[map]
static CLIENTS: LruHashMap<ClientKey, u64> =
    LruHashMap::with_max_entries(DEFAULT_CLIENT_TABLE_SIZE, 0);
#[map]
static REFUSED: LruHashMap<ClientKey, u64> = LruHashMap::with_max_entries(REFUSED_TABLE_SIZE, 0);
#[map]
static EXEMPT: LpmTrie<[u32; 4], u8> = LpmTrie::with_max_entries(MAX_EXEMPT, 0);

/// The most turns round-robin owes one slot on one CPU (see `OWED`).
const OWED_CAP: u8 = 8;
/// Compare-and-exchange attempts on one client's state before its SYN is refused. Each
/// failed attempt means another SYN of the same prefix was admitted in between, so a
/// prefix that loses this many races in a row is sending as fast as several CPUs can
/// take its SYNs.
const CAS_TRIES: u32 = 4;
/// Live slots a policy looks at for an available one before it takes its first choice
/// as if none were stalled. Every slot, in a cluster of up to this many.
const STALL_TRIES: u32 = 16;
const BPF_NOEXIST: u64 = 1;
/// How stale a flow's time and a socket's `LAST_HIT` may get before the program writes
/// them again: 1 ms, far below any flow timeout.
const REFRESH_NS: u64 = 1_000_000;
/// TCP's SYN and ACK flags, in the 14th byte of the header.
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// The program of a TCP listener's group.
#[sk_reuseport(migrate)]
pub fn steer_select(ctx: SkReuseportContext) -> u32 {
    steer(&ctx, true, false)
}

/// The program of a UDP listener's group: the same policies, plus the flow table. A program
/// of its own, so that the verifier explores each transport's paths alone (with both in one
/// program the paths multiply past its limit).
#[sk_reuseport(migrate)]
pub fn steer_select_udp(ctx: SkReuseportContext) -> u32 {
    steer(&ctx, false, false)
}

/// The program of a QUIC listener's group: a datagram whose destination connection ID is
/// one of Steer's goes to the socket of the slot and generation it names, while that
/// socket is in `SOCKETS`. Any other datagram that can be QUIC (a client's Initial or
/// 0-RTT, an ID whose process is gone) takes the UDP path through a tail call
/// (`steer_select_quic_flow`); garbage and truncated datagrams are dropped. Its own entry
/// point, as UDP's, for the verifier's sake.
#[sk_reuseport(migrate)]
pub fn steer_select_quic(ctx: SkReuseportContext) -> u32 {
    let Some(counters) = COUNTERS.get_ptr_mut(0) else {
        return sk_action::SK_DROP;
    };
    match quic_route(&ctx) {
        Route::Drop => {
            // SAFETY: a per-CPU array value, exclusively ours for this run.
            unsafe { (*counters).quic_malformed += 1 };
            return sk_action::SK_DROP;
        }
        Route::Steer(server) => {
            let slot = u32::from(server.slot);
            if slot < MAX_SLOTS {
                let index = socket_index(slot, u32::from(server.generation));
                if SOCKETS.select_reuseport(&ctx, index).is_ok() {
                    // SAFETY: as above.
                    let counters = unsafe { &mut *counters };
                    counters.quic_steered += 1;
                    counters.selections[bounded(slot)] += 1;
                    // SAFETY: a helper with no arguments.
                    touch(index, unsafe { bpf_ktime_get_ns() });
                    return sk_action::SK_PASS;
                }
            }
        }
        Route::Flow => {}
    }
    // SAFETY: `ctx` is this program's context; the call does not return on success.
    unsafe { QUIC_FLOW.tail_call(&ctx, 0) };
    // SAFETY: as above.
    unsafe { (*counters).drops += 1 };
    sk_action::SK_DROP
}

/// The UDP path of a QUIC group's datagrams (see `steer_select_quic`): the primary's
/// ownership probe, then the flow table, then the policy among the current generation. A
/// process that is gone is never a flow's home, so a datagram naming one reaches a live
/// worker, which answers with a stateless reset.
#[sk_reuseport(migrate)]
pub fn steer_select_quic_flow(ctx: SkReuseportContext) -> u32 {
    steer(&ctx, false, true)
}

/// Where a datagram to a QUIC group goes: `quic::parse` of its first
/// `quic::read_len(length)` bytes, each read a load of constant size.
#[inline(always)]
fn quic_route(ctx: &SkReuseportContext) -> Route {
    // The data starts at the UDP header; QUIC after its 8 bytes.
    const UDP_HEADER: u32 = 8;
    let len = ctx.len().saturating_sub(UDP_HEADER as usize);
    let mut buf = [0u8; quic::MAX_READ];
    let n = quic::read_len(len);
    // SAFETY: `buf` has room for each length read, all at most `MAX_READ`.
    let ret = unsafe {
        let to = buf.as_mut_ptr().cast();
        let ctx = ctx.as_ptr();
        match n {
            quic::MAX_READ => bpf_skb_load_bytes(ctx, UDP_HEADER, to, quic::MAX_READ as u32),
            17 => bpf_skb_load_bytes(ctx, UDP_HEADER, to, 17),
            6 => bpf_skb_load_bytes(ctx, UDP_HEADER, to, 6),
            _ => return Route::Drop,
        }
    };
    if ret != 0 {
        return Route::Drop;
    }
    match n {
        quic::MAX_READ => quic::parse(&buf),
        17 => quic::parse(&buf[..17]),
        _ => quic::parse(&buf[..6]),
    }
}

/// Steers one TCP connection (`tcp`) or UDP datagram (of a QUIC group: `quic`).
#[inline(always)]
fn steer(ctx: &SkReuseportContext, tcp: bool, quic: bool) -> u32 {
    let Some(counters) = COUNTERS.get_ptr_mut(0) else {
        return sk_action::SK_DROP;
    };
    // SAFETY: a per-CPU array value, exclusively ours for this run (no preemption inside
    // a socket program on one CPU).
    let counters = unsafe { &mut *counters };
    let Some(config) = CONFIG.get(0) else {
        return sk_action::SK_DROP;
    };
    let migrating = ctx.migrating_sk().is_some();
    if !migrating && is_probe(ctx, config) {
        return sk_action::SK_DROP;
    }
    // A UDP datagram of a flow the table knows goes to the socket that took the flow.
    // Otherwise it starts a flow: steered by the policy (to the slot it was on, if its
    // socket has left), then entered in the table.
    let mut flow = None;
    let mut home = None;
    if !tcp && !migrating && config.flow_timeout_ns != 0 {
        match known_flow(ctx, config, counters, quic) {
            Known::Passed => return sk_action::SK_PASS,
            Known::New(key) => flow = Some(key),
            Known::Moved(key, slot) => {
                flow = Some(key);
                home = Some(slot);
            }
            Known::Unreadable => {}
        }
    }
    // The per-client limit counts new connections (TCP SYNs) and new flows.
    let new_client = if tcp {
        is_syn(ctx)
    } else {
        flow.is_some() && home.is_none()
    };
    if !migrating && new_client && config.client_interval_ns != 0 && !admit(ctx, config, counters) {
        counters.client_refusals += 1;
        return sk_action::SK_DROP;
    }
    let mut chosen = None;
    if let Some(slot) = home {
        chosen = try_slot(ctx, slot, counters, false);
    }
    if chosen.is_none() {
        chosen = select(ctx, config, counters, tcp);
    }
    match chosen {
        Some(index) => {
            if migrating {
                counters.migrations += 1;
            }
            if let Some(key) = flow {
                enter_flow(&key, index, counters);
            }
            sk_action::SK_PASS
        }
        None => {
            counters.drops += 1;
            sk_action::SK_DROP
        }
    }
}

/// Whether this SYN (or, in a UDP group, this datagram) is the primary's ownership probe
/// (then it is counted in `PROBE`). The probe's source is a local address, which no packet
/// from outside may carry.
#[inline(always)]
fn is_probe(ctx: &SkReuseportContext, config: &Config) -> bool {
    let protocol = ctx.ip_protocol();
    if config.probe_port == 0 || (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP) {
        return false;
    }
    // The packet data starts at the TCP or UDP header; both begin with the source port.
    let data = ctx.data();
    if data + 2 > ctx.data_end() {
        return false;
    }
    // SAFETY: the verifier sees the bounds check above; two bytes of packet data.
    let port = u32::from(unsafe { core::ptr::read_unaligned(data as *const u16) });
    if port != config.probe_port || !from_probe_source(ctx, config) {
        return false;
    }
    if let Some(seen) = PROBE.get_ptr_mut(0) {
        // SAFETY: a valid u64 in an array map; the primary sends one probe at a time.
        unsafe { *seen += 1 };
    }
    true
}

/// What the flow table says of a UDP datagram.
enum Known {
    /// Its flow's socket took it.
    Passed,
    /// A new flow (or one idle past the timeout): steer it and enter it.
    New(FlowKey),
    /// A known flow whose socket has left: steer it, to this slot's serving socket first.
    Moved(FlowKey, u32),
    /// No client address to key it by: steer it on its own.
    Unreadable,
}

/// Looks the datagram's flow up in `FLOWS`; a live flow's datagram is selected to its
/// socket here, and the flow's time and its socket's `LAST_HIT` are brought up to date
/// (at most once a millisecond each, so that a busy flow does not write a shared cache
/// line per datagram).
#[inline(always)]
fn known_flow(
    ctx: &SkReuseportContext,
    config: &Config,
    counters: &mut Counters,
    quic: bool,
) -> Known {
    let Some(key) = flow_key(ctx) else {
        return Known::Unreadable;
    };
    let Some(entry) = FLOWS.get_ptr_mut(key) else {
        return Known::New(key);
    };
    // SAFETY: a valid `Flow` in an LRU hash value; fields are read once each. Another CPU
    // may write `last_ns` meanwhile: a time a moment older or newer.
    let seen = unsafe { core::ptr::read_volatile(entry) };
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(seen.last_ns) > config.flow_timeout_ns {
        return Known::New(key);
    }
    // In a QUIC group a flow only keeps one handshake's first datagrams together (the
    // client's next ones carry the server's ID): a flow whose socket is no longer its
    // slot's serving one is a new connection, which goes to the current generation.
    let stale = quic && CURRENT.get(seen.slot).copied().unwrap_or(0) != seen.index / MAX_SLOTS;
    if stale
        || seen.index >= MAX_SLOTS * GENERATIONS
        || SOCKETS.select_reuseport(ctx, seen.index).is_err()
    {
        counters.flow_moves += 1;
        return Known::Moved(key, seen.slot);
    }
    counters.flow_hits += 1;
    counters.selections[bounded(seen.slot)] += 1;
    if now.saturating_sub(seen.last_ns) > REFRESH_NS {
        // SAFETY: as above; a plain store of the flow's own time.
        unsafe { (*entry).last_ns = now };
    }
    touch(seen.index, now);
    Known::Passed
}

/// Enters a new flow, kept on the socket at `index` from now on.
#[inline(always)]
fn enter_flow(key: &FlowKey, index: u32, counters: &mut Counters) {
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let flow = Flow {
        index,
        slot: index % MAX_SLOTS,
        last_ns: now,
    };
    if FLOWS.insert(key, flow, 0).is_ok() {
        counters.flow_inserts += 1;
    }
    touch(index, now);
}

/// Records in `LAST_HIT` that a flow reached the socket at `index` at `now`.
#[inline(always)]
fn touch(index: u32, now: u64) {
    if let Some(last) = LAST_HIT.get_ptr_mut(index) {
        // SAFETY: a valid u64 in an array map; stale by a millisecond at most is fine, and
        // racing CPUs store times a moment apart.
        unsafe {
            if now.saturating_sub(core::ptr::read_volatile(last)) > REFRESH_NS {
                *last = now;
            }
        }
    }
}

/// The datagram's client address and port; `None` if they cannot be read.
#[inline(always)]
fn flow_key(ctx: &SkReuseportContext) -> Option<FlowKey> {
    let protocol = u32::from(u16::from_be(ctx.eth_protocol() as u16));
    let (offset, len, family) = match protocol {
        ETH_P_IP => (12, 4, FAMILY_V4),
        ETH_P_IPV6 => (8, 16, FAMILY_V6),
        _ => return None,
    };
    // The packet data starts at the UDP header: the source port first.
    let data = ctx.data();
    if data + 2 > ctx.data_end() {
        return None;
    }
    // SAFETY: the verifier sees the bounds check above; two bytes of packet data.
    let port = unsafe { core::ptr::read_unaligned(data as *const u16) };
    let mut key = FlowKey {
        addr: [0; 4],
        port,
        family,
        _pad: 0,
    };
    // SAFETY: `key.addr` has room for `len` (<= 16) bytes.
    let ret = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.as_ptr(),
            offset,
            key.addr.as_mut_ptr().cast(),
            len,
            BPF_HDR_START_NET,
        )
    };
    (ret == 0).then_some(key)
}

/// Whether this TCP segment is a SYN (not a SYN-ACK, not the final ACK that syncookies
/// also run the program for).
#[inline(always)]
fn is_syn(ctx: &SkReuseportContext) -> bool {
    // The packet data starts at the TCP header; byte 13 holds the flags.
    let data = ctx.data();
    if data + 14 > ctx.data_end() {
        return false;
    }
    // SAFETY: the verifier sees the bounds check above; one byte of packet data.
    let flags = unsafe { *((data + 13) as *const u8) };
    flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The per-client limit: whether this new connection (a TCP SYN) or new UDP flow may go on
/// to a worker. A client in `EXEMPT` goes on uncounted.
#[inline(always)]
fn admit(ctx: &SkReuseportContext, config: &Config, counters: &mut Counters) -> bool {
    let Some(key) = limited_client(ctx, config) else {
        return true;
    };
    let interval = config.client_interval_ns;
    let tolerance = config.client_tolerance_ns;
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let state = match CLIENTS.get_ptr_mut(key) {
        Some(state) => state,
        None => {
            // A new client: this SYN is its first connection.
            if CLIENTS.insert(key, now + interval, BPF_NOEXIST).is_ok() {
                counters.client_inserts += 1;
                return true;
            }
            // Another CPU entered it first, or the map is full of entries being updated.
            match CLIENTS.get_ptr_mut(key) {
                Some(state) => state,
                None => return true,
            }
        }
    };
    let mut i = 0;
    while i < CAS_TRIES {
        // SAFETY: a valid, 8-byte aligned u64 in a hash map value; every write to it is
        // the compare-and-exchange below.
        let tat = unsafe { core::ptr::read_volatile(state) };
        let Some(next) = steer_common::gcra(tat, now, interval, tolerance) else {
            break;
        };
        // SAFETY: as above.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                state, tat, next,
            )
        };
        if swapped {
            return true;
        }
        i += 1;
    }
    count_refusal(&key);
    false
}

/// Counts a refused SYN against its prefix in `REFUSED`.
#[inline(always)]
fn count_refusal(key: &ClientKey) {
    match REFUSED.get_ptr_mut(key) {
        // SAFETY: a valid, 8-byte aligned u64 in a hash map value; only atomic adds
        // write it once it exists.
        Some(count) => unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, 1);
        },
        None => {
            let _ = REFUSED.insert(key, 1, BPF_NOEXIST);
        }
    }
}

/// The client's prefix, from the packet's network header; `None` for a client in an
/// `--client-exempt` prefix (or a packet without a readable source address). The trie
/// holds IPv6 prefixes, and IPv4 ones as IPv4-mapped IPv6 (`::ffff:a.b.c.d/(96 + n)`).
#[inline(always)]
fn limited_client(ctx: &SkReuseportContext, config: &Config) -> Option<ClientKey> {
    let protocol = u32::from(u16::from_be(ctx.eth_protocol() as u16));
    let (offset, len) = match protocol {
        ETH_P_IP => (12, 4),
        ETH_P_IPV6 => (8, 16),
        _ => return None,
    };
    if ctx.is_empty() {
        return None;
    }
    let mut words = [0u32; 4];
    // SAFETY: `words` has room for `len` (<= 16) bytes.
    let ret = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.as_ptr(),
            offset,
            words.as_mut_ptr().cast(),
            len,
            BPF_HDR_START_NET,
        )
    };
    if ret != 0 {
        return None;
    }
    let mapped =
        protocol == ETH_P_IPV6 && words[0] == 0 && words[1] == 0 && words[2] == u32::to_be(0xffff);
    // The exemption trie is keyed by the whole address, IPv4 as IPv4-mapped IPv6.
    let whole = if protocol == ETH_P_IP {
        [0, 0, u32::to_be(0xffff), words[0]]
    } else {
        words
    };
    if EXEMPT.get(LpmKey::new(128, whole)).is_some() {
        return None;
    }
    let key = if protocol == ETH_P_IP || mapped {
        ClientKey {
            family: FAMILY_V4,
            prefix: config.client_prefix_v4,
            _reserved: [0; 2],
            addr: [whole[3] & config.client_mask_v4, 0, 0, 0],
        }
    } else {
        let m = &config.client_mask_v6;
        ClientKey {
            family: FAMILY_V6,
            prefix: config.client_prefix_v6,
            _reserved: [0; 2],
            addr: [
                words[0] & m[0],
                words[1] & m[1],
                words[2] & m[2],
                words[3] & m[3],
            ],
        }
    };
    Some(key)
}

/// Whether the packet's source address is the probe's, compared whole.
#[inline(always)]
fn from_probe_source(ctx: &SkReuseportContext, config: &Config) -> bool {
    // skb->protocol: a big-endian u16 widened to u32.
    let protocol = u32::from(u16::from_be(ctx.eth_protocol() as u16));
    let (offset, len, v6) = match protocol {
        ETH_P_IP => (12, 4, 0),
        ETH_P_IPV6 => (8, 16, 1),
        _ => return false,
    };
    if v6 != config.probe_v6 || ctx.is_empty() {
        return false;
    }
    let mut words = [0u32; 4];
    // SAFETY: `words` has room for `len` (<= 16) bytes.
    let ret = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.as_ptr(),
            offset,
            words.as_mut_ptr().cast(),
            len,
            BPF_HDR_START_NET,
        )
    };
    let want = &config.probe_addr;
    ret == 0
        && words[0] == want[0]
        && words[1] == want[1]
        && words[2] == want[2]
        && words[3] == want[3]
}

/// Picks a slot and selects its serving socket; the socket's index, or `None` if no
/// registered socket took the connection. `tcp`: a TCP connection, which the slot's load
/// record counts (a UDP datagram is not an accept the worker will publish).
#[inline(always)]
fn select(
    ctx: &SkReuseportContext,
    config: &Config,
    counters: &mut Counters,
    tcp: bool,
) -> Option<u32> {
    let Some(live) = LIVE.get_value(0, &0) else {
        counters.fallbacks += 1;
        return any_registered(ctx, config, counters, tcp);
    };
    let count = live.count;
    if count == 0 || count > MAX_SLOTS {
        counters.fallbacks += 1;
        return any_registered(ctx, config, counters, tcp);
    }
    // With stall avoidance off, `now` 0: `available` says yes to every slot.
    let now = if config.avoid_stalls != 0 {
        // SAFETY: a helper with no arguments.
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    // `first` is the slot the policy wants, among the available ones when it can; `spill`
    // is where in the live list to start if that slot holds no socket.
    let (first, spill) = match config.policy {
        policy::ROUND_ROBIN => round_robin(live, count, now, counters)?,
        policy::HASH => {
            let h = client_hash(ctx)?;
            let slot = *MAGLEV.get(h % HASH_TABLE_SIZE)?;
            // A stalled slot's clients go to their second choice, the one they would take
            // if the slot were empty; every other client stays where it is.
            let spill = steer_common::rehash(h) % count;
            (avoid_stall(live, count, slot, spill, now, counters), spill)
        }
        policy::LEAST_LOADED => {
            let a = random() % count;
            let mut b = random() % count;
            if b == a && count > 1 {
                b = (a + 1) % count;
            }
            let slot_a = live_slot(live, a)?;
            let slot_b = live_slot(live, b)?;
            let (slot, other) = if load(slot_b) < load(slot_a) {
                ((slot_b, b), a)
            } else {
                ((slot_a, a), b)
            };
            (
                avoid_stall(live, count, slot.0, other, now, counters),
                slot.1 + 1,
            )
        }
        policy::CPU => {
            let cpus = config.cpus.max(1);
            let slots = config.slots.max(1);
            // SAFETY: a helper with no arguments.
            let cpu = unsafe { bpf_get_smp_processor_id() };
            // The CPU's place among those the workers run on (slot i is pinned to the
            // (i mod cpus)-th). A CPU outside that set (interrupts ignore cpusets) has
            // none: its number spreads its SYNs instead.
            let local = match CPU_INDEX.get(cpu) {
                Some(&index) if index > 0 => index - 1,
                _ => cpu,
            };
            let slot = if slots <= cpus {
                local % slots
            } else {
                // Several slots share this CPU: rotate among them.
                let local = local % cpus;
                let on_this_cpu = (slots - local).div_ceil(cpus);
                local + cpus * (next_cursor() % on_this_cpu.max(1))
            };
            // A stalled slot's SYNs go to the nearest available worker: first another
            // one pinned to this CPU (slot + cpus, ...), then the one on the next CPU.
            // Spilling to the next CPU while this one has an idle worker would leave this
            // CPU's share of the work to the other CPU's workers.
            let nearest = if slots > cpus { slot + cpus } else { slot };
            (avoid_stall(live, count, slot, nearest, now, counters), slot)
        }
        _ => return None,
    };
    if let Some(index) = try_slot(ctx, first, counters, tcp) {
        return Some(index);
    }
    counters.fallbacks += 1;
    let mut i = 0;
    while i < FALLBACK_TRIES {
        let slot = live_slot(live, (spill + i) % count)?;
        if slot != first
            && let Some(index) = try_slot(ctx, slot, counters, tcp)
        {
            return Some(index);
        }
        i += 1;
    }
    any_registered(ctx, config, counters, tcp)
}

/// Round-robin over the available live slots: the next position whose slot is not
/// stalled, and the cursor moves past every position it looked at, so the rest stay in
/// exact turn. A slot skipped while stalled is owed the turn (`OWED`, capped): when its
/// turn comes and it is available, it takes the turns it is owed one after another
/// before the cursor moves on. If every slot it looks at is stalled, the one of them with
/// the fewest connections waiting (the first such from the cursor), and the cursor moves
/// on one. Returns the slot and where to spill if it holds no socket.
#[inline(always)]
fn round_robin(
    live: &LiveSet,
    count: u32,
    now: u64,
    counters: &mut Counters,
) -> Option<(u32, u32)> {
    // `select` checked it; LLVM loses that across the loop and would keep a panic path.
    let count = count.max(1);
    let Some(cursor) = CURSOR.get_ptr_mut(0) else {
        return Some((live_slot(live, 0)?, 1));
    };
    // SAFETY: per-CPU value, exclusively ours for this run.
    let cursor = unsafe { &mut *cursor };
    let start = *cursor;
    let tries = if count < STALL_TRIES {
        count
    } else {
        STALL_TRIES
    };
    // SAFETY: per-CPU value, exclusively ours for this run.
    let mut owed = OWED.get_ptr_mut(0).map(|owed| unsafe { &mut *owed });
    // With every slot stalled, the one with the fewest connections waiting: a worker the
    // scheduler kept off the CPU for a moment has 2, a blocked one more with each turn it
    // gets, so the blocked one is not handed more clients to catch than the others.
    let mut least = (u64::MAX, start % count);
    let mut i = 0;
    while i < tries {
        let position = start.wrapping_add(i) % count;
        let slot = live_slot(live, position)?;
        let waiting = stalled_wait(slot, now, counters);
        if waiting < least.0 {
            least = (waiting, position);
        }
        if waiting == 0 {
            let repaying = match owed.as_deref_mut() {
                Some(owed) if owed[bounded(slot)] > 0 => {
                    owed[bounded(slot)] -= 1;
                    true
                }
                _ => false,
            };
            // Repaying a turn, the cursor stays on this slot for the next connection.
            *cursor = start.wrapping_add(if repaying { i } else { i + 1 });
            return Some((slot, position + 1));
        }
        if let Some(owed) = owed.as_deref_mut() {
            if owed[bounded(slot)] < OWED_CAP {
                owed[bounded(slot)] += 1;
            } else {
                counters.turns_lost += 1;
            }
        }
        i += 1;
    }
    // Every slot looked at is stalled. The cursor moves on one, so only the slot at
    // `start` loses its turn: the others looked at keep theirs, and the loop's count of
    // them is taken back (from one already owed the most, a turn the loop counted lost).
    *cursor = start.wrapping_add(1);
    if let Some(owed) = owed.as_deref_mut() {
        let mut j = 1;
        while j < tries {
            if let Some(slot) = live_slot(live, start.wrapping_add(j) % count)
                && owed[bounded(slot)] > 0
            {
                owed[bounded(slot)] -= 1;
            }
            j += 1;
        }
    }
    let position = least.1 % count;
    let slot = live_slot(live, position)?;
    // The slot at `start` taking its own turn is not owed it (the loop counted it); any
    // other takes a turn not its own, which pays back one it is owed, or is one too many.
    if let Some(owed) = owed {
        if owed[bounded(slot)] > 0 {
            owed[bounded(slot)] -= 1;
        } else if position != start % count {
            counters.turns_lost += 1;
        }
    }
    Some((slot, position + 1))
}

/// `wanted` if it is available; else the first available slot in the live list from
/// position `from` on (at most [`STALL_TRIES`] looked at); else, with every slot it
/// looked at stalled, `wanted` anyway: the host is more likely overloaded than every
/// worker stalled.
#[inline(always)]
fn avoid_stall(
    live: &LiveSet,
    count: u32,
    wanted: u32,
    from: u32,
    now: u64,
    counters: &mut Counters,
) -> u32 {
    if available(wanted, now, counters) {
        return wanted;
    }
    // `select` checked it; LLVM loses that across the loop and would keep a panic path.
    let count = count.max(1);
    let tries = if count < STALL_TRIES {
        count
    } else {
        STALL_TRIES
    };
    let mut i = 0;
    while i < tries {
        let Some(slot) = live_slot(live, (from + i) % count) else {
            return wanted;
        };
        if slot != wanted && available(slot, now, counters) {
            return slot;
        }
        i += 1;
    }
    wanted
}

/// Whether `slot` may take a new connection: not stalled (see `SlotLoad::is_stalled`).
#[inline(always)]
fn available(slot: u32, now: u64, counters: &mut Counters) -> bool {
    stalled_wait(slot, now, counters) == 0
}

/// 0 if `slot` may take a new connection; else, stalled, how many connections wait for it
/// (at least 1). Keeps the slot's stall watch on the way: an accept seen restarts the
/// wait, and the `stalled` flag follows the verdict, each 0 -> 1 counted in
/// `COUNTERS.stalls`. A slot whose worker has no record (none placed yet) is available.
#[inline(always)]
fn stalled_wait(slot: u32, now: u64, counters: &mut Counters) -> u64 {
    if now == 0 {
        return 0;
    }
    let Some(record) = LOADS.get_value_ptr_mut(slot, &0) else {
        return 0;
    };
    // SAFETY: a valid, 8-byte aligned record in an array map shared by all CPUs and the
    // worker's mapping. Each field is read once; a torn view across fields is at worst one
    // connection's wrong guess, put right by the next look.
    let mut seen = unsafe { core::ptr::read_volatile(record) };
    // A replaced worker's record, still placed while its successor's is on its way: it
    // says nothing of the serving socket, which has just started.
    if !seen.is_for(CURRENT.get(slot).copied().unwrap_or(0)) {
        return 0;
    }
    if seen.accepted != seen.progress {
        // SAFETY: as above; program-only fields, plain stores (a race between CPUs
        // writes the same values, or one a moment newer).
        unsafe {
            (*record).progress = seen.accepted;
            (*record).waiting_since = now;
            (*record).steered_at_progress = seen.steered;
        }
        seen.progress = seen.accepted;
        seen.waiting_since = now;
        seen.steered_at_progress = seen.steered;
    }
    let stalled = seen.is_stalled(now);
    if stalled != (seen.stalled != 0) {
        // SAFETY: as above; the compare-and-exchange makes one CPU the one that counts.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u32, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                &raw mut (*record).stalled,
                seen.stalled,
                u32::from(stalled),
            )
        };
        if swapped && stalled {
            counters.stalls[bounded(slot)] += 1;
            // Full (the primary is behind): it settles every record when it wakes anyway.
            let _ = STALLS.output::<u32>(slot, 0);
        }
    }
    if stalled {
        let waiting = seen.waiting();
        if waiting == 0 { 1 } else { waiting }
    } else {
        0
    }
}

/// The first slot whose registered socket takes the connection. `SOCKETS` holds exactly
/// the sockets of serving workers (the primary adds one before the live set naming it is
/// published, and removes it before it stops serving), so this is the last resort while a
/// new live set is on its way: a cluster that has just started, or a slot that has just
/// left while the set still names it.
#[inline(always)]
fn any_registered(
    ctx: &SkReuseportContext,
    config: &Config,
    counters: &mut Counters,
    tcp: bool,
) -> Option<u32> {
    let slots = config.slots.min(MAX_SLOTS);
    let mut slot = 0;
    while slot < slots {
        if let Some(index) = try_slot(ctx, slot, counters, tcp) {
            return Some(index);
        }
        slot += 1;
    }
    None
}

/// Selects `slot`'s serving socket (the generation in `CURRENT`); counts the selection on
/// success and returns the socket's index. `tcp`: count the connection in the slot's load
/// record too.
#[inline(always)]
fn try_slot(
    ctx: &SkReuseportContext,
    slot: u32,
    counters: &mut Counters,
    tcp: bool,
) -> Option<u32> {
    if slot >= MAX_SLOTS {
        return None;
    }
    let generation = CURRENT.get(slot).copied().unwrap_or(0);
    let index = socket_index(slot, generation);
    if SOCKETS.select_reuseport(ctx, index).is_err() {
        return None;
    }
    let slot = bounded(slot);
    counters.selections[slot] += 1;
    if !tcp {
        return Some(index);
    }
    if let Some(record) = LOADS.get_value_ptr_mut(slot as u32, &0)
        // SAFETY: a valid, 8-byte aligned record; a plain read of a primary-only field.
        // Not the serving socket's record (see `available`): nothing to count in it.
        && u32::from(unsafe { (*record).generation }) == generation
    {
        // SAFETY: a valid, 8-byte aligned u64 in an array map shared by all CPUs and the
        // worker's mapping; the atomic add is the only write anyone makes to it.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*record).steered, 1)
        };
        // The count before this connection, read after the add: LLVM lowers a relaxed
        // add whose result is used to BPF's `lock xadd` without `BPF_FETCH`, and hands
        // back the operand, not the old value.
        // SAFETY: as above; plain reads of the fields.
        let (before, accepted, settled, mark) = unsafe {
            (
                (*record).steered.wrapping_sub(1),
                (*record).accepted,
                (*record).settled,
                (*record).steered_at_progress,
            )
        };
        if before.wrapping_sub(accepted).wrapping_sub(settled) as i64 <= 0
            || before.wrapping_sub(mark) as i64 <= 0
        {
            // The queue was empty: the wait for an accept starts now, not at the last
            // accept, however long ago that was.
            // SAFETY: as above; a program-only field.
            unsafe { (*record).waiting_since = bpf_ktime_get_ns() };
        }
    }
    Some(index)
}

/// The `position`-th live slot.
#[inline(always)]
fn live_slot(live: &LiveSet, position: u32) -> Option<u32> {
    Some(live.slots[bounded(position)])
}

/// `value` as an index below `MAX_SLOTS` that the verifier can see is in bounds. Callers have
/// already checked the bound, so the mask changes nothing; but LLVM knows that too and
/// would drop a plain check, leaving the verifier with an unbounded index. The volatile
/// read hides the value from the optimiser, so the mask stays in the code.
#[inline(always)]
fn bounded(value: u32) -> usize {
    const { assert!(MAX_SLOTS.is_power_of_two()) };
    // SAFETY: reads a local.
    (unsafe { core::ptr::read_volatile(&value) } & (MAX_SLOTS - 1)) as usize
}

/// Outstanding connections of `slot`: queued (steered, not accepted nor settled) plus
/// open. A slot whose worker has no record (not under least-loaded) weighs nothing.
#[inline(always)]
fn load(slot: u32) -> u64 {
    match LOADS.get_value(slot, &0) {
        // A replaced worker's record (see `available`): the new worker has just started.
        Some(record) if record.is_for(CURRENT.get(slot).copied().unwrap_or(0)) => record.load(),
        _ => 0,
    }
}

/// This CPU's round-robin cursor, post-incremented.
#[inline(always)]
fn next_cursor() -> u32 {
    match CURSOR.get_ptr_mut(0) {
        Some(cursor) => {
            // SAFETY: per-CPU value, exclusively ours for this run.
            let cursor = unsafe { &mut *cursor };
            let value = *cursor;
            *cursor = value.wrapping_add(1);
            value
        }
        None => 0,
    }
}

#[inline(always)]
fn random() -> u32 {
    // SAFETY: a helper with no arguments.
    unsafe { bpf_get_prandom_u32() }
}

/// Hash of the client's IP address: from the packet's network header when there is one,
/// else (the migrate path may pass an empty packet) from the migrating socket.
#[inline(always)]
fn client_hash(ctx: &SkReuseportContext) -> Option<u32> {
    // skb->protocol: a big-endian u16 widened to u32.
    let protocol = u32::from(u16::from_be(ctx.eth_protocol() as u16));
    let header = match protocol {
        ETH_P_IP => Some((12, 4, false)),
        ETH_P_IPV6 => Some((8, 16, true)),
        _ => None,
    };
    if let Some((offset, len, v6)) = header
        && !ctx.is_empty()
    {
        let mut words = [0u32; 4];
        // SAFETY: `words` has room for `len` (<= 16) bytes.
        let ret = unsafe {
            bpf_skb_load_bytes_relative(
                ctx.as_ptr(),
                offset,
                words.as_mut_ptr().cast(),
                len,
                BPF_HDR_START_NET,
            )
        };
        if ret == 0 {
            return Some(steer_common::hash_client(words, v6));
        }
    }
    let sock = ctx.migrating_sk()?;
    // SAFETY: the verifier checked `migrating_sk` is a valid sock_common pointer; these
    // fields are readable from it.
    let sock = unsafe { &*sock.sock };
    if sock.family == AF_INET6 {
        let words = [
            sock.dst_ip6[0],
            sock.dst_ip6[1],
            sock.dst_ip6[2],
            sock.dst_ip6[3],
        ];
        return Some(steer_common::hash_client(words, true));
    }
    Some(steer_common::hash_client([sock.dst_ip4, 0, 0, 0], false))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
