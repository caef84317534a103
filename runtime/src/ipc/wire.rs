//! The JSON form of a [`Message`], both ways, without allocating for the messages the
//! primary exchanges every health interval.
//!
//! serde's internally tagged enums and `#[serde(flatten)]` buffer every message into an
//! allocated `Content` tree before they decode it. Here a message is read into one flat
//! struct that borrows from the received bytes ([`Incoming`]) and then checked against its
//! `type`; it is written field by field into a reused buffer ([`Outgoing`]). A user
//! message's `data` is borrowed as raw JSON on the way in and copied verbatim on the way
//! out, so relaying it never parses or re-serializes it.

use std::borrow::Cow;

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use super::error::IpcError;
use super::message::{Counters, MAX_MESSAGE_BYTES, Message, PROTOCOL_VERSION, Payload, Recipient};
use crate::steering::LoadShare;

/// Writes `message` as one JSON object into `out` (cleared first; its capacity is kept).
pub(crate) fn encode_into(message: &Message, out: &mut Vec<u8>) -> Result<(), IpcError> {
    out.clear();
    serde_json::to_writer(&mut *out, &Outgoing(message)).map_err(|source| IpcError::Malformed {
        preview: message.kind().to_owned(),
        source,
    })?;
    if out.len() > MAX_MESSAGE_BYTES {
        return Err(IpcError::Oversized);
    }
    Ok(())
}

/// Reads one message from the bytes of one datagram or line.
pub(crate) fn decode(bytes: &[u8]) -> Result<Message, IpcError> {
    if bytes.is_empty() {
        return Err(IpcError::Empty);
    }
    match serde_json::from_slice::<Incoming<'_>>(bytes) {
        Ok(incoming) if incoming.v != PROTOCOL_VERSION => {
            Err(IpcError::Version { got: incoming.v })
        }
        Ok(incoming) => incoming.into_message().map_err(|reason| IpcError::Invalid {
            preview: preview(bytes),
            reason,
        }),
        Err(source) => Err(classify(bytes, source)),
    }
}

/// Tells a version mismatch from garbage: a newer peer's message may carry fields or
/// types this build does not know, and deserves the clearer error.
fn classify(bytes: &[u8], source: serde_json::Error) -> IpcError {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) {
        if let Some(v) = value.get("v").and_then(serde_json::Value::as_u64)
            && v != u64::from(PROTOCOL_VERSION)
        {
            return IpcError::Version {
                got: u32::try_from(v).unwrap_or(u32::MAX),
            };
        }
        return IpcError::Invalid {
            preview: preview(bytes),
            reason: source.to_string(),
        };
    }
    IpcError::Malformed {
        preview: preview(bytes),
        source,
    }
}

/// The start of a message, for a log line.
pub(crate) fn preview(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned()
}

/// Every field any message may carry. Which ones a message may have depends on its
/// `type`, checked in [`Incoming::into_message`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Incoming<'a> {
    v: u32,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    fd: Option<i32>,
    #[serde(default)]
    listener: Option<u32>,
    #[serde(default)]
    load: Option<LoadShare>,
    #[serde(default)]
    heartbeats: Option<bool>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    counters: Option<Counters>,
    #[serde(default)]
    to: Option<Recipient>,
    #[serde(default)]
    from: Option<usize>,
    #[serde(default, borrow, deserialize_with = "present")]
    data: Option<&'a RawValue>,
}

/// `data` may be any JSON value, `null` included: present means `Some`.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

impl Incoming<'_> {
    fn into_message(self) -> Result<Message, String> {
        let message = match &*self.kind {
            "register" => Message::Register {
                pid: self.pid.ok_or("register without pid")?,
                fd: self.fd,
                listener: self.listener,
            },
            "registered" => Message::Registered { load: self.load },
            "ready" => Message::Ready {
                heartbeats: self.heartbeats.unwrap_or(false),
            },
            "ping" => Message::Ping {
                seq: self.seq.ok_or("ping without seq")?,
            },
            "pong" => Message::Pong {
                seq: self.seq.ok_or("pong without seq")?,
                counters: self.counters.unwrap_or_default(),
            },
            "drain" => Message::Drain,
            "connection" => Message::Connection,
            "user" => Message::User {
                to: self.to,
                from: self.from,
                data: Payload::from_raw(self.data.ok_or("user message without data")?),
            },
            other => return Err(format!("unknown type {other:?}")),
        };
        self.only(allowed_fields(&message))?;
        Ok(message)
    }

    /// Refuses a field that this message's type does not have (`"ping"` with a `pid`).
    fn only(&self, allowed: &[&str]) -> Result<(), String> {
        let present = [
            ("pid", self.pid.is_some()),
            ("fd", self.fd.is_some()),
            ("listener", self.listener.is_some()),
            ("load", self.load.is_some()),
            ("heartbeats", self.heartbeats.is_some()),
            ("seq", self.seq.is_some()),
            ("counters", self.counters.is_some()),
            ("to", self.to.is_some()),
            ("from", self.from.is_some()),
            ("data", self.data.is_some()),
        ];
        match present
            .iter()
            .find(|(name, there)| *there && !allowed.contains(name))
        {
            Some((name, _)) => Err(format!("unknown field {name:?} for type {:?}", self.kind)),
            None => Ok(()),
        }
    }
}

/// The fields each type may carry besides `v` and `type`.
fn allowed_fields(message: &Message) -> &'static [&'static str] {
    match message {
        Message::Register { .. } => &["pid", "fd", "listener"],
        Message::Registered { .. } => &["load"],
        Message::Ready { .. } => &["heartbeats"],
        Message::Ping { .. } => &["seq"],
        Message::Pong { .. } => &["seq", "counters"],
        Message::Drain | Message::Connection => &[],
        Message::User { .. } => &["to", "from", "data"],
    }
}

/// A message as written: `v`, `type`, then the variant's fields, absent ones left out.
struct Outgoing<'a>(&'a Message);

impl Serialize for Outgoing<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("v", &PROTOCOL_VERSION)?;
        map.serialize_entry("type", self.0.kind())?;
        match self.0 {
            Message::Register { pid, fd, listener } => {
                map.serialize_entry("pid", pid)?;
                if let Some(fd) = fd {
                    map.serialize_entry("fd", fd)?;
                }
                if let Some(listener) = listener {
                    map.serialize_entry("listener", listener)?;
                }
            }
            Message::Registered { load } => {
                if let Some(load) = load {
                    map.serialize_entry("load", load)?;
                }
            }
            Message::Ready { heartbeats } => {
                if *heartbeats {
                    map.serialize_entry("heartbeats", &true)?;
                }
            }
            Message::Ping { seq } => map.serialize_entry("seq", seq)?,
            Message::Pong { seq, counters } => {
                map.serialize_entry("seq", seq)?;
                map.serialize_entry("counters", counters)?;
            }
            Message::Drain | Message::Connection => {}
            Message::User { to, from, data } => {
                if let Some(to) = to {
                    map.serialize_entry("to", to)?;
                }
                if let Some(from) = from {
                    map.serialize_entry("from", from)?;
                }
                map.serialize_entry("data", data.raw())?;
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(message: &Message) -> String {
        let mut out = Vec::new();
        encode_into(message, &mut out).expect("encode");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn wire_form_is_flat_json_with_version() {
        assert_eq!(
            text(&Message::Ping { seq: 7 }),
            r#"{"v":1,"type":"ping","seq":7}"#
        );
        assert_eq!(
            text(&Message::User {
                to: Some(Recipient::Slot(2)),
                from: None,
                data: Payload::from_json(r#"{"hi": [1, 2]}"#).expect("json"),
            }),
            r#"{"v":1,"type":"user","to":{"slot":2},"data":{"hi": [1, 2]}}"#,
            "data is copied as it came, spaces and all"
        );
        assert_eq!(
            text(&Message::Ready { heartbeats: true }),
            r#"{"v":1,"type":"ready","heartbeats":true}"#
        );
        assert_eq!(
            text(&Message::Ready { heartbeats: false }),
            r#"{"v":1,"type":"ready"}"#
        );
    }

    #[test]
    fn every_message_survives_a_round_trip() {
        let messages = [
            Message::Register {
                pid: 9,
                fd: None,
                listener: None,
            },
            Message::Register {
                pid: 9,
                fd: Some(5),
                listener: Some(1),
            },
            Message::Registered { load: None },
            Message::Registered {
                load: Some(LoadShare::RECORD),
            },
            Message::Ready { heartbeats: true },
            Message::Ready { heartbeats: false },
            Message::Ping { seq: u64::MAX },
            Message::Pong {
                seq: 3,
                counters: Counters {
                    accepted: 1,
                    active: 2,
                    requests: 3,
                },
            },
            Message::Drain,
            Message::Connection,
            Message::User {
                to: Some(Recipient::All),
                from: Some(3),
                data: Payload::from_json("null").expect("json"),
            },
        ];
        for message in messages {
            let encoded = text(&message);
            assert_eq!(decode(encoded.as_bytes()).expect(&encoded), message);
        }
    }

    #[test]
    fn ready_without_heartbeats_and_pong_without_counters_take_defaults() {
        assert_eq!(
            decode(br#"{"v":1,"type":"ready"}"#).expect("decode"),
            Message::Ready { heartbeats: false }
        );
        assert_eq!(
            decode(br#"{"v":1,"type":"pong","seq":3}"#).expect("decode"),
            Message::Pong {
                seq: 3,
                counters: Counters::default()
            }
        );
    }

    #[test]
    fn fields_of_another_type_and_unknown_fields_are_refused() {
        for bad in [
            &br#"{"v":1,"type":"ping","seq":1,"pid":3}"#[..],
            br#"{"v":1,"type":"ready","extra":1}"#,
            br#"{"v":1,"type":"pong","seq":1,"counters":{"bogus":1}}"#,
            br#"{"v":1,"type":"warp"}"#,
            br#"{"v":1,"type":"user"}"#,
            br#"{"type":"ready"}"#,
            br#"{"cmd":"NODE_HANDLE","type":"net.Server","msg":{}}"#,
        ] {
            let got = decode(bad);
            assert!(
                matches!(got, Err(IpcError::Invalid { .. })),
                "{}: {got:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn garbage_empty_and_other_versions_are_told_apart() {
        assert!(matches!(
            decode(b"\x00\xffnot json"),
            Err(IpcError::Malformed { .. })
        ));
        assert!(matches!(decode(b""), Err(IpcError::Empty)));
        assert!(matches!(
            decode(br#"{"v":9,"type":"warp","x":1}"#),
            Err(IpcError::Version { got: 9 })
        ));
        assert!(matches!(
            decode(br#"{"v":2,"type":"ready"}"#),
            Err(IpcError::Version { got: 2 })
        ));
    }

    #[test]
    fn user_data_may_be_null_and_escaped_types_still_decode() {
        assert_eq!(
            decode(br#"{"v":1,"type":"user","data":null}"#).expect("decode"),
            Message::User {
                to: None,
                from: None,
                data: Payload::from_json("null").expect("json"),
            }
        );
        assert_eq!(
            decode(br#"{"v":1,"type":"p\u0069ng","seq":1}"#).expect("decode"),
            Message::Ping { seq: 1 }
        );
    }
}
