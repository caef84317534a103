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
//! | `SOCKETS` (`REUSEPORT_SOCKARRAY`) | slot | a registered worker's listener | primary |
//! | `CONFIG` (array, 1) | 0 | [`Config`] | primary |
//! | `LIVE` (array, 2: double buffer) | [`Config::active`] | [`LiveSet`] | primary |
//! | `MAGLEV` (mmapable array, [`HASH_TABLE_SIZE`]) | `hash % M` | slot | primary, once |
//! | `LOAD` (mmapable array, 2 x [`MAX_SLOTS`]) | [`load_index`] | [`SlotLoad`] | each worker |
//! | `STEERED` (array, 2 x [`MAX_SLOTS`]) | [`load_index`] | `u64` | program (least-loaded) |
//! | `COUNTERS` (per-CPU array, 1) | 0 | [`Counters`] | program |
//! | `CURSOR` (per-CPU array, 1) | 0 | `u32` round-robin cursor | program |
#![no_std]

/// Most worker slots a cluster may have. Sizes the steering maps; `--workers` above it is
/// a configuration error.
pub const MAX_SLOTS: u32 = 1024;

/// Size of one Maglev lookup table: a prime well above 64 x [`MAX_SLOTS`], so every slot owns
/// at least 64 entries and the shares differ by at most one entry.
pub const HASH_TABLE_SIZE: u32 = 65_537;

/// How many further live slots the program tries when the chosen one holds no socket (its
/// worker died a moment ago and the primary has not yet updated the live set). After that it
/// drops the connection rather than let the kernel pick any socket in the group.
pub const FALLBACK_TRIES: u32 = 4;

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

/// Program-wide settings (`CONFIG[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// One of the [`policy`] constants. Anything else drops every connection.
    pub policy: u32,
    /// Which half of the double-buffered `LIVE` map is current (0 or 1). The
    /// primary writes the other half, then flips this word: the program never sees a
    /// half-written set.
    pub active: u32,
    /// Configured slot count (`--workers`): the Maglev table and the `cpu` policy map onto
    /// `0..slots`, live or not.
    pub slots: u32,
    /// Online CPU count, for the `cpu` policy.
    pub cpus: u32,
}

/// The slots in steering, in slot order (`LIVE[Config::active]`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LiveSet {
    /// How many entries of `slots` are valid.
    pub count: u32,
    /// Padding; keeps `slots` 8-byte aligned.
    pub _pad: u32,
    /// Live slot indices; the first `count` are valid.
    pub slots: [u32; MAX_SLOTS as usize],
    /// Generation of the worker in each slot (indexed by slot), to find its load record.
    pub generations: [u32; MAX_SLOTS as usize],
}

impl LiveSet {
    /// A set with no live slot.
    pub const EMPTY: LiveSet = LiveSet {
        count: 0,
        _pad: 0,
        slots: [0; MAX_SLOTS as usize],
        generations: [0; MAX_SLOTS as usize],
    };
}

/// One worker's published load (`LOAD[load_index(slot, generation)]`), written by the worker
/// through a shared mapping of the map: a plain store per accept and close, no system call.
/// One cache line per record so neighbouring workers never share a line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotLoad {
    /// The generation of the worker that wrote the record; the program ignores a record of
    /// another generation (a worker still draining, or not yet started).
    pub generation: u64,
    /// Connections the worker has accepted.
    pub accepted: u64,
    /// Connections the worker has open now.
    pub active: u64,
    /// Pads the record to 64 bytes.
    pub _pad: [u64; 5],
}

/// Index of the load record (and `STEERED` counter) of `slot`'s worker of `generation`. Two
/// records per slot, by generation parity, so a replacement and the worker it replaces
/// never write the same record.
pub const fn load_index(slot: u32, generation: u32) -> u32 {
    slot * 2 + (generation & 1)
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
    /// Connections migrated out of a closing listener (by the `migrate` path).
    pub migrations: u64,
}

impl Counters {
    /// All zero.
    pub const ZERO: Counters = Counters {
        selections: [0; MAX_SLOTS as usize],
        fallbacks: 0,
        drops: 0,
        migrations: 0,
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
    // SAFETY (all four): #[repr(C)] structs of plain integers and integer arrays, with no
    // padding the kernel could leak and no invalid bit patterns.
    #[allow(clippy::undocumented_unsafe_blocks)]
    unsafe impl aya::Pod for super::Config {}
    #[allow(clippy::undocumented_unsafe_blocks)]
    unsafe impl aya::Pod for super::LiveSet {}
    #[allow(clippy::undocumented_unsafe_blocks)]
    unsafe impl aya::Pod for super::SlotLoad {}
    #[allow(clippy::undocumented_unsafe_blocks)]
    unsafe impl aya::Pod for super::Counters {}
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn load_records_alternate_by_generation() {
        assert_eq!(load_index(3, 0), 6);
        assert_eq!(load_index(3, 1), 7);
        assert_eq!(load_index(3, 2), 6);
        assert_eq!(size_of::<SlotLoad>(), 64);
    }
}
