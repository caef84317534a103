//! The primary's one writer to stderr: its own log lines and its workers' tagged output go
//! through a bounded queue to a thread that writes them, so a slow or stuck stderr (a full
//! journald pipe, a terminal on hold, a pipe nobody reads) never blocks the primary's loop,
//! its output reader, or any worker.
//!
//! The queue is kept per origin (the primary, or a worker's slot), each with its own
//! bound, and the writer shares the output between the origins by bytes (fair queuing:
//! it always takes the next line of the origin that has been written least since it had
//! something queued). A worker that floods its output fills only its own queue and gets
//! only its share: the primary's lines and the other workers' keep appearing. What an
//! origin's queue cannot take is dropped whole (a line is the unit) and counted by the
//! caller. Lines are written in batches of up to [`BATCH`] bytes, one `write` each.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Bytes one origin may have queued: a burst of thousands of lines, or a 1 MiB line in
/// pieces, while the writer is busy.
pub(crate) const PER_ORIGIN: usize = 1024 * 1024;
/// Bytes written with one `write`: small enough that a slow reader of stderr sees every
/// origin's lines in turn, large enough that a fast one costs few system calls.
const BATCH: usize = 16 * 1024;

/// Whose line it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Origin {
    /// The primary's own log.
    Primary,
    /// A worker's output, by slot.
    Worker(usize),
}

#[derive(Debug, Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Bytes written for this origin since its queue was last empty, counted from the
    /// least-served origin's figure at that moment (its virtual time).
    served: u64,
}

#[derive(Debug, Default)]
struct State {
    queues: BTreeMap<Origin, Queue>,
    /// Lines queued and not yet written, over every origin.
    queued: usize,
    closing: bool,
}

impl State {
    /// The origin to write next: the least served one with a line queued.
    fn next(&self) -> Option<Origin> {
        self.queues
            .iter()
            .filter(|(_, q)| !q.lines.is_empty())
            .min_by_key(|(_, q)| q.served)
            .map(|(&origin, _)| origin)
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when a line is queued (for the writer) and when a batch is written (for
    /// a flush).
    changed: Condvar,
    /// The primary's own lines dropped.
    primary_dropped: AtomicU64,
}

/// A handle on the queue; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Sink {
    shared: Arc<Shared>,
}

impl Sink {
    /// Starts the writer thread on `out`.
    pub(crate) fn start(out: impl Write + Send + 'static) -> std::io::Result<Sink> {
        let shared = Arc::new(Shared::default());
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("steer-log".into())
            .spawn(move || write_out(&writer, out))?;
        Ok(Sink { shared })
    }

    /// Queues one line (with its newline) from `origin`; false if its queue is full and
    /// the line was dropped. Never blocks on the output.
    pub(crate) fn push(&self, origin: Origin, line: Vec<u8>) -> bool {
        let Ok(mut state) = self.shared.state.lock() else {
            return false;
        };
        if state.closing {
            return false;
        }
        if !state.queues.contains_key(&origin) {
            // An origin that starts (again) joins at the others' pace, not ahead of them.
            let pace = state.queues.values().map(|q| q.served).min().unwrap_or(0);
            state.queues.insert(
                origin,
                Queue {
                    served: pace,
                    ..Queue::default()
                },
            );
        }
        let Some(queue) = state.queues.get_mut(&origin) else {
            return false;
        };
        // One line always fits an empty queue, however long (a split line is 16 KiB).
        if queue.bytes > 0 && queue.bytes + line.len() > PER_ORIGIN {
            drop(state);
            if origin == Origin::Primary {
                self.shared.primary_dropped.fetch_add(1, Ordering::Relaxed);
            }
            return false;
        }
        queue.bytes += line.len();
        queue.lines.push_back(line);
        state.queued += 1;
        drop(state);
        self.shared.changed.notify_all();
        true
    }

    /// Whether `origin`'s queue has room for a line of `len` bytes now (a caller may skip
    /// formatting a line that would be dropped).
    pub(crate) fn has_room(&self, origin: Origin, len: usize) -> bool {
        self.shared.state.lock().is_ok_and(|state| {
            state
                .queues
                .get(&origin)
                .is_none_or(|q| q.bytes == 0 || q.bytes + len <= PER_ORIGIN)
        })
    }

    /// The primary's own lines dropped so far.
    pub(crate) fn primary_dropped(&self) -> u64 {
        self.shared.primary_dropped.load(Ordering::Relaxed)
    }

    /// Waits until everything queued is written, or `patience` has passed (a sink that
    /// never drains must not keep the process from exiting); nothing is queued after.
    pub(crate) fn flush(&self, patience: Duration) {
        let deadline = Instant::now() + patience;
        let Ok(mut state) = self.shared.state.lock() else {
            return;
        };
        state.closing = true;
        self.shared.changed.notify_all();
        while state.queued > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.shared.changed.wait_timeout(state, left) {
                Ok((next, _)) => state = next,
                Err(_) => return,
            }
        }
    }
}

/// The writer thread: takes a batch from the origins in turn and writes it. Errors (a
/// closed stderr) drop the batch: nobody would read it.
fn write_out(shared: &Shared, mut out: impl Write) {
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH);
    loop {
        let mut written = 0;
        {
            let Ok(mut state) = shared.state.lock() else {
                return;
            };
            while state.queued == 0 {
                match shared.changed.wait(state) {
                    Ok(next) => state = next,
                    Err(_) => return,
                }
            }
            // The least served origin's next line, until the batch is full.
            while batch.len() < BATCH && state.queued > 0 {
                let Some(origin) = state.next() else {
                    break;
                };
                let Some(queue) = state.queues.get_mut(&origin) else {
                    break;
                };
                let Some(line) = queue.lines.pop_front() else {
                    break;
                };
                queue.bytes -= line.len();
                queue.served += line.len() as u64;
                batch.extend_from_slice(&line);
                written += 1;
                state.queued -= 1;
            }
            // Forget origins with nothing queued (slots come and go).
            state.queues.retain(|_, q| !q.lines.is_empty());
        }
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if written > 0 {
            shared.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that blocks until told, recording what it got.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cv) = &*self.open;
            let mut open = lock.lock().expect("gate");
            while !*open {
                open = cv.wait(open).expect("gate");
            }
            self.got.lock().expect("got").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Gate {
        fn open(&self) {
            let (lock, cv) = &*self.open;
            *lock.lock().expect("gate") = true;
            cv.notify_all();
        }
    }

    #[test]
    fn a_flooding_origin_fills_only_its_own_queue_and_the_others_take_turns() {
        let gate = Gate::default();
        let sink = Sink::start(gate.clone()).expect("start");
        let line = vec![b'x'; 1023]
            .into_iter()
            .chain([b'\n'])
            .collect::<Vec<u8>>();
        let mut dropped = 0;
        for _ in 0..2000 {
            if !sink.push(Origin::Worker(0), line.clone()) {
                dropped += 1;
            }
        }
        assert!(
            dropped >= 2000 - PER_ORIGIN / 1024 - BATCH / 1024,
            "dropped {dropped}"
        );
        assert!(sink.push(Origin::Worker(1), b"quiet\n".to_vec()));
        assert!(sink.push(Origin::Primary, b"primary\n".to_vec()));
        gate.open();
        sink.flush(Duration::from_secs(5));
        let got = gate.got.lock().expect("got").clone();
        let text = String::from_utf8_lossy(&got);
        let quiet = text.find("quiet").expect("the quiet worker's line");
        // It is written in the next batch, not after the flooder's whole backlog.
        assert!(quiet < 2 * BATCH + 1024, "at byte {quiet}");
        assert!(text.contains("primary"));
        assert_eq!(sink.primary_dropped(), 0);
    }

    #[test]
    fn a_sink_that_never_drains_does_not_hold_up_a_flush() {
        let gate = Gate::default();
        let sink = Sink::start(gate.clone()).expect("start");
        assert!(sink.push(Origin::Primary, b"stuck\n".to_vec()));
        let started = Instant::now();
        sink.flush(Duration::from_millis(100));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!sink.push(Origin::Primary, b"after\n".to_vec()), "closed");
        gate.open();
    }
}
