//! Load records: one per worker process under every eBPF policy, written by three parties,
//! each its own fields (see [`steer_common::SlotLoad`]). `least-loaded` weighs them; every
//! policy reads them to steer around a stalled worker.
//!
//! Each worker gets a record of its own: a one-entry `BPF_F_MMAPABLE` array map created
//! for it when it registers (or, for an external program, when it is spawned). The worker
//! receives the fd of that map only, so it can write its own record and nothing else. The
//! primary puts the map into the program's `LOADS` array at the worker's slot when the
//! worker starts serving, and a replacement's record takes its place: a worker that is
//! draining, or one that was replaced, writes into a record nobody reads.
//!
//! The worker stores `accepted` and `active` on every accept and close: two plain stores
//! into shared memory, no system call. The program adds one to `steered` per connection it
//! hands over. That alone would count SYNs that never become a connection for as long as
//! the worker lives (half-open scans, retransmits, SYNs dropped on a full queue), so once
//! per health interval the primary reads the listener's real accept queue with
//! `sock_diag` and writes `settled = steered - accepted - queue`: phantom load is gone
//! within one interval. A worker that never publishes (`accepted` stays 0) is balanced on
//! its real queue plus what was steered to it since the last interval.
//!
//! The same records say when a worker is stalled (queued connections, no accept for
//! 0.5 ms; [`steer_common::SlotLoad::is_stalled`]). The program judges that on every SYN;
//! the settlement also ends a "stall" made of phantom SYNs within one interval. A worker
//! that has never published an accept is judged by the primary ([`super::stalls`]).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;

use aya::maps::MapData;
use aya_obj::generated::{BPF_F_MMAPABLE, bpf_map_type::BPF_MAP_TYPE_ARRAY};
use serde::{Deserialize, Serialize};
use steer_common::{SlotLoad, record};

use super::shared::SharedArray;

/// Sent with `registered` beside the record's fd: how many bytes the record has (map one
/// page from offset 0; the layout is [`steer_common::SlotLoad`], docs/ipc.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadShare {
    /// Size of the record in bytes (64).
    pub record_bytes: u32,
}

impl LoadShare {
    /// The one layout there is.
    pub const RECORD: LoadShare = LoadShare {
        record_bytes: size_of::<SlotLoad>() as u32,
    };
}

/// The layout of the record in `STEER_LOAD_LAYOUT` for external workers: `name:offset`
/// pairs of native-endian `u64` fields.
pub const LAYOUT: &str = "steered:0,accepted:8,active:16,settled:24";

/// Publishes one worker's load. Cheap to call on every accept and close.
#[derive(Debug)]
pub struct LoadReporter {
    memory: SharedArray,
}

impl LoadReporter {
    /// Maps the record behind `fd` (this worker's own map).
    pub fn new(fd: OwnedFd, share: LoadShare) -> io::Result<LoadReporter> {
        if share != LoadShare::RECORD {
            return Err(io::Error::other(format!(
                "unknown load record layout {share:?}"
            )));
        }
        let memory = SharedArray::map(fd.as_fd(), size_of::<SlotLoad>(), 1)?;
        Ok(LoadReporter { memory })
    }

    /// Publishes the connections accepted so far and those open now.
    pub fn publish(&self, accepted: u64, active: u64) {
        self.memory.store_u64(record::ACCEPTED, accepted);
        self.memory.store_u64(record::ACTIVE, active);
    }
}

/// A worker's record as every group of the cluster holds it: one map, placed in each
/// listener's `LOADS` at the worker's slot.
pub type SharedRecord = std::sync::Arc<LoadRecord>;

/// The primary's handle on one worker's record.
#[derive(Debug)]
pub struct LoadRecord {
    map: MapData,
    memory: SharedArray,
}

impl LoadRecord {
    /// Creates a fresh, zeroed record (`BPF_MAP_CREATE`).
    pub fn create() -> Result<LoadRecord, aya::maps::MapError> {
        let definition = aya_obj::Map::new_from_params(
            BPF_MAP_TYPE_ARRAY as u32,
            size_of::<u32>() as u32,
            size_of::<SlotLoad>() as u32,
            1,
            BPF_F_MMAPABLE,
        );
        let map = MapData::create(definition, "steer_load", None)?;
        let memory =
            SharedArray::map(map.fd().as_fd(), size_of::<SlotLoad>(), 1).map_err(|io_error| {
                aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "mmap",
                    io_error,
                })
            })?;
        Ok(LoadRecord { map, memory })
    }

    /// A copy of the map's fd for the worker.
    pub fn share(&self) -> io::Result<OwnedFd> {
        self.map.fd().as_fd().try_clone_to_owned()
    }

    /// A copy of the record, field by field.
    pub fn view(&self) -> SlotLoad {
        let field = |offset| self.memory.u64_at(offset).load(Ordering::Relaxed);
        SlotLoad {
            steered: field(record::STEERED),
            accepted: field(record::ACCEPTED),
            active: field(record::ACTIVE),
            settled: field(record::SETTLED),
            progress: field(record::PROGRESS),
            waiting_since: field(record::WAITING_SINCE),
            steered_at_progress: field(record::STEERED_AT_PROGRESS),
            stalled: self.memory.u32_at(record::STALLED).load(Ordering::Relaxed),
            verdict: self.memory.u16_at(record::VERDICT).load(Ordering::Relaxed),
            generation: self
                .memory
                .u16_at(record::GENERATION)
                .load(Ordering::Relaxed),
        }
    }

    /// The primary's judgement of a worker that has never published an accept.
    pub fn set_verdict(&self, stalled: bool) {
        let verdict = if stalled {
            steer_common::VERDICT_STALLED
        } else {
            0
        };
        self.memory
            .u16_at(record::VERDICT)
            .store(verdict, Ordering::Relaxed);
    }

    /// Says whose record this is: the worker of `generation` (stored modulo
    /// `GENERATIONS`, as `CURRENT` holds it). Before the worker starts.
    pub fn set_generation(&self, generation: u32) {
        let current = (generation % steer_common::GENERATIONS) as u16;
        self.memory
            .u16_at(record::GENERATION)
            .store(current, Ordering::Relaxed);
    }

    /// Settles the estimate against the listener's real accept queue: what was steered
    /// and is neither accepted nor queued never became a connection.
    pub fn settle(&self, queued: u64) {
        let steered = self.memory.u64_at(record::STEERED).load(Ordering::Relaxed);
        let accepted = self.memory.u64_at(record::ACCEPTED).load(Ordering::Relaxed);
        self.memory.store_u64(
            record::SETTLED,
            steered.wrapping_sub(accepted).wrapping_sub(queued),
        );
    }
}
