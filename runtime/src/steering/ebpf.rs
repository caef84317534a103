//! The eBPF side of steering: loads Steer's `SK_REUSEPORT` program (built from
//! `workspace-ebpf/steer-ebpf` and embedded in this binary) and keeps its maps true.
//!
//! Upkeep, all from the primary's event loop:
//! - a worker's socket enters `SOCKETS` at its slot when the worker is ready (the program is
//!   attached through that socket first: harmless if it already is, and it covers a group
//!   re-created after all its sockets closed);
//! - it leaves the moment the slot stops serving (exit, drain at shutdown). A replacement
//!   (rolling restart, a worker replaced after a protocol violation or a missed heartbeat)
//!   overwrites its slot's entry, which takes the old socket out in the same instant;
//! - the live set is double-buffered: the inactive half is written, then `CONFIG.active`
//!   flips, so the program never reads a half-written set.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use aya::maps::{Array, Map, MapData, PerCpuArray, ReusePortSockArray};
use aya::programs::SkReuseport;
use aya::{Ebpf, EbpfError, EbpfLoader};
use steer_common::{
    Config, Counters, HASH_TABLE_SIZE, LiveSet, MAX_SLOTS, SlotLoad, load_index, policy,
};

use super::load::{LoadReporter, LoadShare};
use super::shared::SharedArray;
use super::{SteeringCounters, SteeringError};
use crate::config::Balance;

/// The program's `CONFIG.policy` code for `policy`.
fn policy_code(policy: Balance) -> Result<u32, String> {
    match policy {
        Balance::RoundRobin => Ok(policy::ROUND_ROBIN),
        Balance::Hash => Ok(policy::HASH),
        Balance::LeastLoaded => Ok(policy::LEAST_LOADED),
        Balance::Cpu => Ok(policy::CPU),
        other => Err(format!("{other} is not an eBPF policy")),
    }
}

/// The program object, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer-ebpf"));

const PROGRAM: &str = "steer_select";

/// The loaded program and its maps.
pub struct EbpfSteering {
    ebpf: Ebpf,
    policy: Balance,
    sockets: ReusePortSockArray<MapData>,
    config_map: Array<MapData, Config>,
    live_map: Array<MapData, LiveSet>,
    steered: Array<MapData, u64>,
    counters: PerCpuArray<MapData, Counters>,
    load: SharedArray,
    load_fd: OwnedFd,
    config: Config,
    /// Slot -> generation of the worker serving it.
    live: BTreeMap<u32, u32>,
    /// While the program is held back ([`EbpfSteering::hold`]), the last socket put into
    /// steering, to attach it through at [`EbpfSteering::release`]; `None` otherwise.
    /// Held only for the seconds a successor primary starts: a copy kept any longer would
    /// keep a dead worker's socket (and its queue) in the group.
    held: Option<Option<OwnedFd>>,
}

impl std::fmt::Debug for EbpfSteering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfSteering")
            .field("policy", &self.policy)
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

impl EbpfSteering {
    /// Loads the program for `policy` over `slots` configured slots.
    pub fn load(policy: Balance, slots: u32) -> Result<EbpfSteering, SteeringError> {
        let code = policy_code(policy).map_err(SteeringError::Other)?;
        if slots == 0 || slots > MAX_SLOTS {
            return Err(SteeringError::Other(format!(
                "{slots} slots (1..={MAX_SLOTS})"
            )));
        }
        // Without kernel BTF: the program has no CO-RE relocations to resolve against it.
        // `Ebpf::load` parses /sys/kernel/btf/vmlinux twice and keeps both copies until the
        // object is loaded (32 MiB of heap at peak); the maps and program allocated in
        // between pin that heap, and glibc keeps it resident once freed (the primary's RSS
        // was 21 MiB, 7 MiB now). `new()` still parses it once; `btf(None)` drops it first.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .load(OBJECT)
            .map_err(|e| classify("load the eBPF maps", &e))?;
        {
            let program: &mut SkReuseport = ebpf
                .program_mut(PROGRAM)
                .ok_or_else(|| SteeringError::Other(format!("program {PROGRAM} missing")))?
                .try_into()
                .map_err(|e| SteeringError::Other(format!("program {PROGRAM}: {e}")))?;
            program
                .load()
                .map_err(|e| classify("load the eBPF program", &e))?;
        }
        let sockets = ReusePortSockArray::try_from(take(&mut ebpf, "SOCKETS")?)
            .map_err(|e| SteeringError::Other(format!("map SOCKETS: {e}")))?;
        let config_map = Array::try_from(take(&mut ebpf, "CONFIG")?)
            .map_err(|e| SteeringError::Other(format!("map CONFIG: {e}")))?;
        let live_map = Array::try_from(take(&mut ebpf, "LIVE")?)
            .map_err(|e| SteeringError::Other(format!("map LIVE: {e}")))?;
        let steered = Array::try_from(take(&mut ebpf, "STEERED")?)
            .map_err(|e| SteeringError::Other(format!("map STEERED: {e}")))?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?)
            .map_err(|e| SteeringError::Other(format!("map COUNTERS: {e}")))?;
        let load_fd = map_fd(&ebpf, "LOAD")?;
        let load = SharedArray::map(
            load_fd.as_fd(),
            size_of::<SlotLoad>(),
            2 * MAX_SLOTS as usize,
        )
        .map_err(|e| SteeringError::Other(format!("cannot map LOAD: {e}")))?;
        // The Maglev table depends only on the slot count, so it is written once, before
        // any socket is in steering, through a shared mapping (65,537 entries would be as
        // many system calls through the map API).
        let maglev_fd = map_fd(&ebpf, "MAGLEV")?;
        let maglev = SharedArray::map(maglev_fd.as_fd(), 4, HASH_TABLE_SIZE as usize)
            .map_err(|e| SteeringError::Other(format!("cannot map MAGLEV: {e}")))?;
        let mut table = vec![0u32; HASH_TABLE_SIZE as usize];
        super::maglev::build(slots, &mut table);
        for (i, slot) in table.iter().enumerate() {
            maglev
                .u32_at(maglev.offset_of(i))
                .store(*slot, std::sync::atomic::Ordering::Relaxed);
        }
        let mut steering = EbpfSteering {
            ebpf,
            policy,
            sockets,
            config_map,
            live_map,
            steered,
            counters,
            load,
            load_fd,
            config: Config {
                policy: code,
                active: 0,
                slots,
                cpus: super::online_cpus() as u32,
            },
            live: BTreeMap::new(),
            held: None,
        };
        steering.publish_live()?;
        Ok(steering)
    }

    /// The policy the program runs.
    pub fn policy(&self) -> Balance {
        self.policy
    }

    /// Switches the policy the program runs: one write of `CONFIG`, read by the very next
    /// program run. Workers and the live set stay as they are.
    pub fn set_policy(&mut self, policy: Balance) -> Result<(), String> {
        self.config.policy = policy_code(policy)?;
        self.config_map
            .set(0, self.config, 0)
            .map_err(|e| format!("cannot write CONFIG: {e}"))?;
        self.policy = policy;
        Ok(())
    }

    /// Attaches the program to the group through `socket` (any socket of the group).
    pub fn attach_through(&self, socket: BorrowedFd<'_>) -> Result<(), String> {
        let program: &SkReuseport = self
            .ebpf
            .program(PROGRAM)
            .ok_or("program missing")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        program
            .attach(socket)
            .map_err(|e| format!("cannot attach the program through the socket: {e}"))?;
        Ok(())
    }

    /// See [`super::Steering::hold`].
    pub fn hold(&mut self) {
        self.held.get_or_insert(None);
    }

    /// See [`super::Steering::release`].
    pub fn release(&mut self) -> Result<(), String> {
        match self.held.take() {
            Some(Some(socket)) => self.attach_through(socket.as_fd()),
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
    pub fn resize(&mut self, slots: u32) -> Result<(), String> {
        if slots == 0 || slots > MAX_SLOTS {
            return Err(format!("{slots} slots (1..={MAX_SLOTS})"));
        }
        let maglev_fd = map_fd(&self.ebpf, "MAGLEV").map_err(|e| e.to_string())?;
        let maglev = SharedArray::map(maglev_fd.as_fd(), 4, HASH_TABLE_SIZE as usize)
            .map_err(|e| format!("cannot map MAGLEV: {e}"))?;
        let mut table = vec![0u32; HASH_TABLE_SIZE as usize];
        super::maglev::build(slots, &mut table);
        for (i, slot) in table.iter().enumerate() {
            maglev
                .u32_at(maglev.offset_of(i))
                .store(*slot, std::sync::atomic::Ordering::Relaxed);
        }
        self.config.slots = slots;
        self.config_map
            .set(0, self.config, 0)
            .map_err(|e| format!("cannot write CONFIG: {e}"))
    }

    /// Puts `fd` into steering at `slot` for the worker of `generation`.
    pub fn activate(&mut self, slot: u32, generation: u32, fd: &OwnedFd) -> Result<(), String> {
        match &mut self.held {
            Some(held) => {
                *held = Some(
                    fd.try_clone()
                        .map_err(|e| format!("cannot keep the socket: {e}"))?,
                )
            }
            None => self.attach_through(fd.as_fd())?,
        }

        self.sockets
            .set(slot, &fd.as_raw_fd(), 0)
            .map_err(|e| format!("cannot put the socket into SOCKETS[{slot}]: {e}"))?;
        self.live.insert(slot, generation);
        self.publish_live().map_err(|e| e.to_string())
    }

    /// Takes `slot` out of steering: no new connection reaches its socket from now on.
    pub fn deactivate(&mut self, slot: u32) -> Result<(), String> {
        let was_live = self.live.remove(&slot).is_some();
        match self.sockets.clear_index(&slot) {
            Ok(()) => {}
            // Already gone: the kernel removes a socket from the map when it closes.
            Err(aya::maps::MapError::SyscallError(err))
                if err.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(err) => return Err(format!("cannot clear SOCKETS[{slot}]: {err}")),
        }
        if was_live {
            self.publish_live().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Where the worker of `slot`/`generation` publishes its load, and the map to map.
    /// Called when the worker registers: its record (and the program's count of what it
    /// steered there) start from zero, before the worker maps the record and long before
    /// its socket enters steering.
    pub fn load_share(
        &mut self,
        slot: u32,
        generation: u32,
    ) -> Result<(BorrowedFd<'_>, LoadShare), String> {
        let index = load_index(slot, generation);
        self.steered
            .set(index, 0, 0)
            .map_err(|e| format!("cannot reset STEERED[{index}]: {e}"))?;
        LoadReporter::reset(&self.load, index);
        Ok((
            self.load_fd.as_fd(),
            LoadShare {
                index,
                entries: 2 * MAX_SLOTS,
                generation,
            },
        ))
    }

    /// The program's counters, summed over CPUs, for the first `slots` slots.
    pub fn counters(&self, slots: usize) -> Result<SteeringCounters, String> {
        let per_cpu = self
            .counters
            .get(&0, 0)
            .map_err(|e| format!("cannot read COUNTERS: {e}"))?;
        let mut total = SteeringCounters {
            policy: self.policy,
            selections: vec![0; slots],
            fallbacks: 0,
            drops: 0,
            migrations: 0,
        };
        for cpu in per_cpu.iter() {
            for (sum, value) in total.selections.iter_mut().zip(cpu.selections.iter()) {
                *sum += value;
            }
            total.fallbacks += cpu.fallbacks;
            total.drops += cpu.drops;
            total.migrations += cpu.migrations;
        }
        Ok(total)
    }

    /// Writes the live set into the inactive half, then flips `CONFIG.active` to it.
    fn publish_live(&mut self) -> Result<(), SteeringError> {
        let mut set = Box::new(LiveSet::EMPTY);
        for (i, (slot, generation)) in self.live.iter().enumerate() {
            set.slots[i] = *slot;
            set.generations[*slot as usize] = *generation;
        }
        set.count = self.live.len() as u32;
        let next = self.config.active ^ 1;
        self.live_map
            .set(next, set.as_ref(), 0)
            .map_err(|e| SteeringError::Other(format!("cannot write LIVE[{next}]: {e}")))?;
        self.config.active = next;
        self.config_map
            .set(0, self.config, 0)
            .map_err(|e| SteeringError::Other(format!("cannot write CONFIG: {e}")))
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map, SteeringError> {
    ebpf.take_map(name)
        .ok_or_else(|| SteeringError::Other(format!("map {name} missing from the program")))
}

fn map_fd(ebpf: &Ebpf, name: &str) -> Result<OwnedFd, SteeringError> {
    let map = ebpf
        .map(name)
        .ok_or_else(|| SteeringError::Other(format!("map {name} missing from the program")))?;
    let data = match map {
        Map::Array(data) => data,
        _ => return Err(SteeringError::Other(format!("map {name} is not an array"))),
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| SteeringError::Other(format!("cannot dup the fd of {name}: {e}")))
}

/// Turns a load failure into a [`SteeringError`]: a permission error says which
/// capability is missing.
fn classify(what: &str, err: &(dyn std::error::Error + 'static)) -> SteeringError {
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
    let mut text = format!("cannot {what}: {err}");
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(&format!(": {e}"));
        source = e.source();
    }
    SteeringError::Other(text)
}
