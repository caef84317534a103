//! The messages of the primary <-> worker protocol (documented for other languages in
//! `docs/ipc.md`).
//!
//! Every datagram on the IPC socket is one JSON object: `{"v": 1, "type": "...", ...}`.
//! A listening socket travels beside a `register` message as `SCM_RIGHTS` ancillary data.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this build speaks; a message with another `v` is rejected.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest datagram either side accepts. A larger one is a protocol violation.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// One protocol message, tagged by its `type` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// Worker -> primary, first message: "here is my listening socket" (fd attached).
    Register {
        /// The worker's pid, as the worker sees it.
        pid: u32,
        /// The fd number the worker holds the socket at, so a primary that must shut a
        /// hung worker's listener down finds it without searching the worker's fd table.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fd: Option<i32>,
    },
    /// Primary -> worker: the socket passed the checks and goes into steering once the
    /// worker says `ready`.
    Registered {
        /// Under `least-loaded`: where the worker publishes its load; the program's `LOAD`
        /// map travels beside the message as an fd.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        load: Option<crate::steering::LoadShare>,
    },
    /// Worker -> primary: the accept loop runs; the slot may be marked `ready`.
    Ready {
        /// The worker answers pings from its serving loop: from now on, only `pong`
        /// counts as its sign of life, and silence means it is stuck.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
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
        /// What the worker has done so far.
        #[serde(default)]
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
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<Recipient>,
        /// Primary -> worker: the slot it came from, absent if from the primary.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<usize>,
        /// Any JSON value.
        data: Value,
    },
}

/// Where a worker's [`Message::User`] goes.
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

/// The wire form: the version beside the flattened message.
#[derive(Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub(crate) v: u32,
    #[serde(flatten)]
    pub(crate) message: Message,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_flat_json_with_version() {
        let env = Envelope {
            v: PROTOCOL_VERSION,
            message: Message::Ping { seq: 7 },
        };
        let text = serde_json::to_string(&env).expect("serialize");
        assert_eq!(text, r#"{"v":1,"type":"ping","seq":7}"#);
        let user = Envelope {
            v: 1,
            message: Message::User {
                to: Some(Recipient::Slot(2)),
                from: None,
                data: Value::from("hi"),
            },
        };
        assert_eq!(
            serde_json::to_string(&user).expect("serialize"),
            r#"{"v":1,"type":"user","to":{"slot":2},"data":"hi"}"#
        );
    }

    #[test]
    fn ready_declares_heartbeats_only_when_it_says_so() {
        let plain: Envelope = serde_json::from_str(r#"{"v":1,"type":"ready"}"#).expect("parse");
        assert_eq!(plain.message, Message::Ready { heartbeats: false });
        let beating: Envelope =
            serde_json::from_str(r#"{"v":1,"type":"ready","heartbeats":true}"#).expect("parse");
        assert_eq!(beating.message, Message::Ready { heartbeats: true });
        let text = serde_json::to_string(&Envelope {
            v: 1,
            message: Message::Ready { heartbeats: true },
        })
        .expect("serialize");
        assert_eq!(text, r#"{"v":1,"type":"ready","heartbeats":true}"#);
    }

    #[test]
    fn pong_counters_default_when_absent() {
        let env: Envelope =
            serde_json::from_str(r#"{"v":1,"type":"pong","seq":3}"#).expect("parse");
        assert_eq!(
            env.message,
            Message::Pong {
                seq: 3,
                counters: Counters::default()
            }
        );
    }
}
