//! Publishes the program's array-of-maps entries (the live set, the load records) from a
//! thread of its own.
//!
//! Replacing an entry of an array of maps makes the kernel wait for an RCU grace period
//! before the update returns (`maybe_wait_bpf_programs` in `kernel/bpf/syscall.c`): when it
//! returns, every program run that could still see the old inner map has finished. That
//! wait is what makes a published live set safe to read, and it takes about 8 ms on an idle
//! 2-CPU host and 60 ms on a busy one. The primary's loop should not stop that long for
//! every change (a status probe waits on it), so it hands the new entries to this
//! thread, which applies them in order and, if they pile up, only the newest of each: one
//! record per slot and one live set. The loop waits ([`Publisher::wait_at_most`], 20 ms at
//! most) only when a slot enters the set.
//!
//! What stays synchronous, in the primary, is `SOCKETS`: a slot's socket is removed before
//! the live set without it is handed over, and added before the set with it. A program run
//! that reads a live set not yet replaced and picks a slot that has left finds no socket
//! there and falls back to the next live slot.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use aya::maps::{Array, ArrayOfMaps, MapData};
use steer_common::LiveSet;

/// One entry to publish.
enum Update {
    /// Place a worker's load record at `LOADS[slot]`.
    Record { slot: u32, map: OwnedFd },
    /// Replace the live set; the number [`Publisher::publish`] gave it.
    Live(Box<LiveSet>, u64),
    /// Answer once everything sent before is applied.
    Sync(mpsc::Sender<()>),
}

/// The publishing thread.
#[derive(Debug)]
pub struct Publisher {
    updates: Option<mpsc::Sender<Update>>,
    thread: Option<JoinHandle<()>>,
    /// The number of the last live set handed over.
    sent: AtomicU64,
    /// The number of the newest live set in `LIVE[0]`, written by the thread once the
    /// update has returned (so once no program run can read an older one).
    applied: Arc<AtomicU64>,
}

impl Publisher {
    /// Starts the thread, which owns `LIVE` and `LOADS` from now on.
    pub fn start(
        live: ArrayOfMaps<MapData, Array<MapData, LiveSet>>,
        loads: ArrayOfMaps<MapData, MapData>,
    ) -> io::Result<Publisher> {
        let (updates, queue) = mpsc::channel();
        let applied = Arc::new(AtomicU64::new(0));
        let published = Arc::clone(&applied);
        let thread = std::thread::Builder::new()
            .name("steer-publish".into())
            .spawn(move || {
                // Signals are the primary loop's (signalfd): this thread must never be the
                // one a process-directed signal is delivered to, whenever it was started.
                let _ = nix::sys::signal::pthread_sigmask(
                    nix::sys::signal::SigmaskHow::SIG_BLOCK,
                    Some(&nix::sys::signal::SigSet::all()),
                    None,
                );
                publish_until_closed(&queue, live, loads, &published);
            })?;
        Ok(Publisher {
            updates: Some(updates),
            thread: Some(thread),
            sent: AtomicU64::new(0),
            applied,
        })
    }

    /// Places `map` (a worker's record) at `LOADS[slot]`, soon.
    pub fn place_record(&self, slot: u32, map: OwnedFd) {
        self.send(Update::Record { slot, map });
    }

    /// Replaces the live set with `set`, soon; returns its number, which
    /// [`Publisher::is_published`] takes.
    pub fn publish(&self, set: Box<LiveSet>) -> u64 {
        let number = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
        self.send(Update::Live(set, number));
        number
    }

    /// Whether the live set numbered `number`, or a newer one, is what program runs read
    /// now.
    pub fn is_published(&self, number: u64) -> bool {
        self.applied.load(Ordering::Acquire) >= number
    }

    /// Waits until everything handed over so far is published.
    pub fn wait(&self) {
        let (done, wait) = mpsc::channel();
        self.send(Update::Sync(done));
        let _published_or_gone = wait.recv();
    }

    /// Waits until everything handed over so far is published, or `limit` has passed;
    /// whether it was published.
    pub fn wait_at_most(&self, limit: std::time::Duration) -> bool {
        let (done, wait) = mpsc::channel();
        self.send(Update::Sync(done));
        wait.recv_timeout(limit).is_ok()
    }

    fn send(&self, update: Update) {
        if let Some(updates) = &self.updates
            && updates.send(update).is_err()
        {
            tracing::error!("the steering publisher thread is gone; the live set is frozen");
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.updates = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn publish_until_closed(
    queue: &mpsc::Receiver<Update>,
    mut live: ArrayOfMaps<MapData, Array<MapData, LiveSet>>,
    mut loads: ArrayOfMaps<MapData, MapData>,
    published: &AtomicU64,
) {
    // The inner maps in place now. Each is let go only after the update that replaced it
    // has returned, that is after a grace period: on kernels before 6.8, which free a
    // replaced inner map at once when the outer map held its last reference, a program
    // run could otherwise still be reading it.
    let mut live_set: Option<Array<MapData, LiveSet>> = None;
    let mut placed: BTreeMap<u32, MapData> = BTreeMap::new();
    while let Ok(first) = queue.recv() {
        let mut records: BTreeMap<u32, OwnedFd> = BTreeMap::new();
        let mut newest: Option<(Box<LiveSet>, u64)> = None;
        let mut waiting = Vec::new();
        for update in std::iter::once(first).chain(queue.try_iter()) {
            match update {
                Update::Record { slot, map } => {
                    records.insert(slot, map);
                }
                Update::Live(set, number) => newest = Some((set, number)),
                Update::Sync(done) => waiting.push(done),
            }
        }
        for (slot, map) in records {
            match place(&mut loads, slot, map) {
                Ok(map) => drop(placed.insert(slot, map)),
                Err(err) => tracing::warn!(
                    slot,
                    "cannot place the worker's load record: {}",
                    crate::errors::error_chain(&err)
                ),
            }
        }
        if let Some((set, number)) = newest {
            match replace_live_set(&mut live, &set) {
                // The set it replaces is let go here, after the update returned.
                Ok(inner) => {
                    drop(live_set.replace(inner));
                    published.store(number, Ordering::Release);
                }
                Err(err) => {
                    tracing::warn!(
                        "cannot publish the live set: {}",
                        crate::errors::error_chain(&err)
                    )
                }
            }
        }
        for done in waiting {
            let _ = done.send(());
        }
    }
}

/// Places `map` at `LOADS[slot]`; returns it, to be held until it is replaced in turn.
fn place(
    loads: &mut ArrayOfMaps<MapData, MapData>,
    slot: u32,
    map: OwnedFd,
) -> Result<MapData, aya::maps::MapError> {
    let map = MapData::from_fd(map)?;
    loads.set(slot, &map, 0)?;
    Ok(map)
}

/// A new one-entry map holding `set`, swapped into `LIVE[0]`; returns it, to be held
/// until it is replaced in turn.
fn replace_live_set(
    live: &mut ArrayOfMaps<MapData, Array<MapData, LiveSet>>,
    set: &LiveSet,
) -> Result<Array<MapData, LiveSet>, aya::maps::MapError> {
    let mut inner: Array<MapData, LiveSet> = Array::create(1, 0)?;
    inner.set(0, set, 0)?;
    live.set(0, &inner, 0)?;
    Ok(inner)
}
