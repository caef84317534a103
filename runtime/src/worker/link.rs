//! The library worker's link to its primary.
//!
//! A reader thread takes what the primary sends: drain requests, user messages, and pings.
//! It never answers a ping itself. It only notes the ping, and the worker's own serving
//! loop answers it ([`Link::answer_ping`], called by `Worker::accept`, the
//! `Worker::heartbeat` future and `Worker::answer_pings`). A loop stuck in user code
//! therefore stops answering, and the primary sees a hung worker instead of a healthy
//! helper thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use serde_json::Value;

use crate::ipc::{Channel, Counters, IpcError, Message};

/// Most user messages waiting for [`crate::Worker::recv`]; more are dropped and counted
/// ([`crate::Worker::dropped_messages`]), so a worker that never reads its messages cannot
/// grow without bound.
pub const INBOX_CAPACITY: usize = 1024;

/// Counters a library worker bumps as it serves; sent to the primary with each heartbeat
/// and shown per slot in `/status`.
#[derive(Debug, Default)]
pub struct WorkerStats {
    accepted: AtomicU64,
    closed: AtomicU64,
    requests: AtomicU64,
}

impl WorkerStats {
    /// Count one accepted connection.
    pub fn connection_accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Count one closed connection.
    pub fn connection_closed(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Count one answered request.
    pub fn request_served(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as the protocol carries them.
    pub(crate) fn snapshot(&self) -> Counters {
        let accepted = self.accepted.load(Ordering::Relaxed);
        let closed = self.closed.load(Ordering::Relaxed);
        Counters {
            accepted,
            active: accepted.saturating_sub(closed),
            requests: self.requests.load(Ordering::Relaxed),
        }
    }
}

/// A message from the primary or, relayed, from another worker.
#[derive(Debug, Clone, PartialEq)]
pub struct UserMessage {
    /// The sending worker's slot; `None` when the primary sent it.
    pub from: Option<usize>,
    /// The JSON payload.
    pub data: Value,
}

/// Set once the primary asks the worker to drain; clone it freely.
#[derive(Debug, Clone, Default)]
pub struct DrainSignal {
    state: Arc<(Mutex<bool>, Condvar)>,
}

impl DrainSignal {
    /// Whether a drain was requested.
    pub fn is_set(&self) -> bool {
        self.state.0.lock().map(|g| *g).unwrap_or(true)
    }

    /// Blocks until a drain is requested.
    pub fn wait(&self) {
        let (lock, cv) = &*self.state;
        let Ok(mut set) = lock.lock() else { return };
        while !*set {
            set = match cv.wait(set) {
                Ok(guard) => guard,
                Err(_) => return,
            };
        }
    }

    fn set(&self) {
        let (lock, cv) = &*self.state;
        if let Ok(mut set) = lock.lock() {
            *set = true;
        }
        cv.notify_all();
    }
}

#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) channel: Channel,
    pub(crate) stats: WorkerStats,
    pub(crate) drain: DrainSignal,
    pub(crate) inbox: Mutex<Receiver<UserMessage>>,
    /// The newest unanswered ping's `seq`; 0 when none is waiting (the primary counts
    /// from 1).
    pending_ping: AtomicU64,
    /// Set when the primary closed the link.
    closed: AtomicBool,
    /// User messages dropped because the inbox was full.
    pub(crate) dropped: AtomicU64,
    /// The [`Heartbeat`] future waiting for the next ping, if one is.
    waker: Mutex<Option<Waker>>,
}

impl Link {
    /// Starts the thread that reads the channel.
    pub(crate) fn start(channel: Channel, slot: usize) -> std::io::Result<Arc<Link>> {
        let (tx, rx) = channel_pair();
        let link = Arc::new(Link {
            channel,
            stats: WorkerStats::default(),
            drain: DrainSignal::default(),
            inbox: Mutex::new(rx),
            pending_ping: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            waker: Mutex::new(None),
        });
        let reader = Arc::clone(&link);
        std::thread::Builder::new()
            .name("steer-link".into())
            .spawn(move || reader.read_loop(&tx, slot))?;
        Ok(link)
    }

    fn read_loop(&self, inbox: &SyncSender<UserMessage>, slot: usize) {
        loop {
            match self.channel.recv() {
                Ok(Some(received)) => match received.message {
                    Message::Ping { seq } => {
                        // Answered by the serving loop, never here (see the module doc).
                        self.pending_ping.store(seq, Ordering::Release);
                        self.wake();
                    }
                    Message::Drain => self.drain.set(),
                    Message::User { from, data, .. } => {
                        let data = data.to_value();
                        match inbox.try_send(UserMessage { from, data }) {
                            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                            Err(TrySendError::Full(_)) => {
                                if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                                    tracing::warn!(
                                        slot,
                                        "user message inbox full ({INBOX_CAPACITY}): dropping messages until it is read"
                                    );
                                }
                            }
                        }
                    }
                    other => tracing::debug!(slot, "ignoring unexpected message {other:?}"),
                },
                Ok(None) => continue,
                Err(IpcError::Closed) => {
                    // The primary is gone: a worker without a primary must not linger.
                    self.closed.store(true, Ordering::Release);
                    self.wake();
                    std::process::exit(0);
                }
                Err(err) => {
                    tracing::error!(slot, "IPC link failed: {err}");
                    std::process::exit(1);
                }
            }
        }
    }
}

impl Link {
    /// Answers the waiting ping, if any, with the current counters. Called from the
    /// worker's serving loop; one atomic load when nothing waits.
    pub(crate) fn answer_ping(&self) {
        let seq = self.pending_ping.swap(0, Ordering::AcqRel);
        if seq == 0 {
            return;
        }
        let pong = Message::Pong {
            seq,
            counters: self.stats.snapshot(),
        };
        if let Err(err) = self.channel.send(&pong) {
            tracing::warn!("cannot answer heartbeat: {err}");
        }
    }

    fn wake(&self) {
        let waker = self.waker.lock().ok().and_then(|mut w| w.take());
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// A future that answers the primary's heartbeats from the async runtime it is spawned
/// on; returned by [`crate::Worker::heartbeat`].
///
/// It completes only when the link to the primary closes. Because it runs as a task of
/// the worker's own runtime, a runtime whose threads are all stuck stops answering, and
/// the primary replaces the worker as hung. It works with any executor (tokio, smol, ...)
/// and needs no timer: the link's reader thread wakes it when a ping arrives.
#[derive(Debug)]
#[must_use = "a heartbeat does nothing unless spawned or awaited"]
pub struct Heartbeat {
    pub(crate) link: Arc<Link>,
}

impl Future for Heartbeat {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let link = &self.link;
        loop {
            link.answer_ping();
            if link.closed.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            if let Ok(mut waker) = link.waker.lock() {
                *waker = Some(cx.waker().clone());
            }
            // A ping that arrived between the answer and the registration must not wait
            // for the next one.
            if link.pending_ping.load(Ordering::Acquire) == 0 {
                return Poll::Pending;
            }
        }
    }
}

fn channel_pair() -> (SyncSender<UserMessage>, Receiver<UserMessage>) {
    sync_channel(INBOX_CAPACITY)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn an_unread_inbox_is_bounded_and_counts_what_it_drops() {
        let (primary, worker) = Channel::pair().expect("socketpair");
        let link = Link::start(worker, 0).expect("link");
        let sent = INBOX_CAPACITY + 500;
        for i in 0..sent {
            primary
                .send(&Message::User {
                    to: None,
                    from: Some(1),
                    data: Value::from(i).into(),
                })
                .expect("send");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while link.dropped.load(Ordering::Relaxed) < 500 {
            assert!(Instant::now() < deadline, "the reader thread keeps up");
            std::thread::sleep(Duration::from_millis(5));
        }
        let inbox = link.inbox.lock().expect("inbox");
        let kept = std::iter::from_fn(|| inbox.try_recv().ok()).count();
        assert_eq!(kept, INBOX_CAPACITY);
        assert_eq!(link.dropped.load(Ordering::Relaxed), 500);
        // The link's reader exits the process when the primary's end closes (a worker
        // without a primary must not linger): keep it open for the test binary's life.
        std::mem::forget(primary);
    }
}
