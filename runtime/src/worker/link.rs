//! The library worker's link to its primary: a thread that answers pings and queues user
//! messages while the user's code serves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};

use serde_json::Value;

use crate::ipc::{Channel, Counters, IpcError, Message};

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
    pub fn snapshot(&self) -> Counters {
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
        });
        let reader = Arc::clone(&link);
        std::thread::Builder::new()
            .name("steer-link".into())
            .spawn(move || reader.read_loop(&tx, slot))?;
        Ok(link)
    }

    fn read_loop(&self, inbox: &Sender<UserMessage>, slot: usize) {
        loop {
            match self.channel.recv() {
                Ok(Some(received)) => match received.message {
                    Message::Ping { seq } => {
                        let pong = Message::Pong {
                            seq,
                            counters: self.stats.snapshot(),
                        };
                        if let Err(err) = self.channel.send(&pong) {
                            tracing::warn!(slot, "cannot answer heartbeat: {err}");
                        }
                    }
                    Message::Drain => self.drain.set(),
                    Message::User { from, data, .. } => {
                        let _receiver_gone = inbox.send(UserMessage { from, data });
                    }
                    other => tracing::debug!(slot, "ignoring unexpected message {other:?}"),
                },
                Ok(None) => continue,
                Err(IpcError::Closed) => {
                    // The primary is gone: a worker without a primary must not linger.
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

fn channel_pair() -> (Sender<UserMessage>, Receiver<UserMessage>) {
    channel()
}
