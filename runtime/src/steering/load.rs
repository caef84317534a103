//! The worker side of `least-loaded`: publishing this worker's load to the program.
//!
//! The primary hands each worker (with `registered`) an fd of the program's `LOAD` map and
//! the index of the worker's own record. The worker maps it once and, on every accept and
//! close, stores its counts there: two plain stores into shared memory, no system call, read
//! by the program on the next SYN. The program adds what it has steered to the worker but
//! the worker has not yet accepted, so a worker whose loop is stuck looks busier with every
//! connection queued on it, although it publishes nothing.

use std::os::fd::{AsFd, OwnedFd};

use serde::{Deserialize, Serialize};
use steer_common::SlotLoad;

use super::shared::SharedArray;

/// Where a worker's load record is, sent in the `registered` message beside the map's fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadShare {
    /// Index of this worker's record in the map.
    pub index: u32,
    /// Number of records in the map.
    pub entries: u32,
    /// The worker's generation, written into the record so the program can tell a record of
    /// this worker from one left by an older one.
    pub generation: u32,
}

/// Publishes one worker's load. Cheap to call on every accept and close.
#[derive(Debug)]
pub struct LoadReporter {
    memory: SharedArray,
    offset: usize,
}

const RECORD: usize = size_of::<SlotLoad>();
const GENERATION: usize = std::mem::offset_of!(SlotLoad, generation);
const ACCEPTED: usize = std::mem::offset_of!(SlotLoad, accepted);
const ACTIVE: usize = std::mem::offset_of!(SlotLoad, active);

impl LoadReporter {
    /// Maps the record described by `share` from the map `fd`.
    pub fn new(fd: OwnedFd, share: LoadShare) -> std::io::Result<LoadReporter> {
        if share.index >= share.entries {
            return Err(std::io::Error::other("load record index out of range"));
        }
        let memory = SharedArray::map(fd.as_fd(), RECORD, share.entries as usize)?;
        let offset = memory.offset_of(share.index as usize);
        let reporter = LoadReporter { memory, offset };
        reporter.publish(0, 0);
        reporter
            .memory
            .store_u64(offset + GENERATION, u64::from(share.generation));
        Ok(reporter)
    }

    /// Publishes the connections accepted so far and those open now.
    pub fn publish(&self, accepted: u64, active: u64) {
        self.memory.store_u64(self.offset + ACCEPTED, accepted);
        self.memory.store_u64(self.offset + ACTIVE, active);
    }

    /// Clears the record (the primary does this before a new worker takes it).
    pub(crate) fn reset(memory: &SharedArray, index: u32) {
        let offset = memory.offset_of(index as usize);
        for field in [GENERATION, ACCEPTED, ACTIVE] {
            memory.store_u64(offset + field, 0);
        }
    }
}
