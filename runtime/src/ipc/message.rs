//! The messages of the primary <-> worker protocol (documented for other languages in
//! `docs/ipc.md`).
//!
//! Every message is one JSON object: `{"v": 1, "type": "...", ...}`. How it travels (one
//! datagram, or one line of a stream) is the channel's business; see `channel.rs`.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::steering::LoadShare;

/// The protocol version this build speaks; a message with another `v` is rejected.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest message either side accepts, in bytes of JSON (without the newline that ends a
/// line on a stream channel). A larger one is a protocol violation.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// One protocol message; its `type` on the wire is the variant's name in snake case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Worker -> primary, first message: "here is my socket of listener `listener`" (fd
    /// attached), once per listener in the listeners' order.
    Register {
        /// The worker's pid, as the worker sees it.
        pid: u32,
        /// The fd number the worker holds the socket at, so a primary that must shut a
        /// hung worker's listener down finds it without searching the worker's fd table.
        /// Optional on the wire.
        fd: Option<i32>,
        /// Which listener the socket is for, by its place in the listeners' order. Optional
        /// on the wire: absent means the first.
        listener: Option<u32>,
    },
    /// Primary -> worker: the socket passed the checks and goes into steering once the
    /// worker says `ready`.
    Registered {
        /// Under `least-loaded`: where the worker publishes its load; the program's `LOAD`
        /// map travels beside the message as an fd.
        load: Option<LoadShare>,
    },
    /// Worker -> primary: the accept loop runs; the slot may be marked `ready`.
    Ready {
        /// The worker answers pings from its serving loop, so silence means it is stuck.
        /// Optional on the wire (`"heartbeats":true`), false when absent.
        heartbeats: bool,
    },
    /// Primary -> worker: liveness probe, answered from the worker's event loop.
    Ping {
        /// Echoed in the matching [`Message::Pong`].
        seq: u64,
    },
    /// Worker -> primary: answer to a ping, with the worker's counters.
    Pong {
        /// The `seq` of the ping being answered.
        seq: u64,
        /// What the worker has done so far (each counter optional on the wire).
        counters: Counters,
    },
    /// Primary -> worker: stop accepting, finish in-flight work, then exit 0.
    Drain,
    /// Primary -> worker, `userspace` baseline only: serve this client connection, accepted
    /// by the primary (the socket travels beside the message).
    Connection,
    /// Application message, in either direction (Node's `worker.send` / `process.send`).
    User {
        /// Worker -> primary: who should receive it; absent means the primary itself.
        to: Option<Recipient>,
        /// Primary -> worker: the slot it came from, absent if from the primary.
        from: Option<usize>,
        /// Any JSON value, kept as the text that arrived so relaying it never parses or
        /// re-serializes it.
        data: Payload,
    },
}

impl Message {
    /// The `type` field of this message on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Register { .. } => "register",
            Message::Registered { .. } => "registered",
            Message::Ready { .. } => "ready",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::Drain => "drain",
            Message::Connection => "connection",
            Message::User { .. } => "user",
        }
    }
}

/// Where a worker's user message goes ([`crate::Worker::send_to`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recipient {
    /// The primary's message hook only.
    Primary,
    /// Every other live worker (relayed by the primary).
    All,
    /// The worker of one slot (relayed by the primary).
    Slot(usize),
}

/// Counters a worker reports in every [`Message::Pong`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counters {
    /// Connections accepted since the worker started.
    #[serde(default)]
    pub accepted: u64,
    /// Connections open now.
    #[serde(default)]
    pub active: u64,
    /// Requests answered since the worker started.
    #[serde(default)]
    pub requests: u64,
}

/// The `data` of a [`Message::User`]: one JSON value, held as its text.
///
/// A relayed message copies these bytes into the outgoing message as they are; only a
/// receiver that wants to look inside parses them ([`Payload::to_value`]).
#[derive(Clone)]
pub struct Payload(Box<RawValue>);

/// Equal when the texts are: `[1,2]` and `[1, 2]` differ.
impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.get() == other.get()
    }
}

impl Eq for Payload {}

impl Payload {
    /// Serializes any value (`serde_json::to_string`); fails only for values JSON cannot
    /// hold, such as a map with non-string keys.
    pub fn new(value: &impl Serialize) -> Result<Payload, serde_json::Error> {
        serde_json::value::to_raw_value(value).map(Payload)
    }

    /// Wraps JSON text after checking that it is one well-formed value.
    pub fn from_json(text: &str) -> Result<Payload, serde_json::Error> {
        RawValue::from_string(text.to_owned()).map(Payload)
    }

    /// The JSON text, exactly as it arrived (or as [`Payload::new`] wrote it).
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Parses the text into a [`serde_json::Value`].
    pub fn to_value(&self) -> serde_json::Value {
        // The text was checked to be one JSON value when this payload was made, so this
        // parse cannot fail; `Null` is what a broken invariant would give, not a panic.
        serde_json::from_str(self.get()).unwrap_or(serde_json::Value::Null)
    }

    pub(crate) fn raw(&self) -> &RawValue {
        &self.0
    }

    pub(crate) fn from_raw(raw: &RawValue) -> Payload {
        Payload(raw.to_owned())
    }
}

impl From<serde_json::Value> for Payload {
    fn from(value: serde_json::Value) -> Payload {
        // A `Value` always serializes (its map keys are strings).
        Payload::new(&value).unwrap_or_else(|_| Payload::from_raw(RawValue::NULL))
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}
