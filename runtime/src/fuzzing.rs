//! The four parsers that read untrusted bytes, each behind one function that runs it the
//! way Steer does and panics if one of its invariants breaks. The fuzz targets in `fuzz/`
//! (cargo-fuzz) call these; `cargo test` replays the kept corpus in `fuzz/corpus/` through
//! them, and the property tests beside each parser check the same invariants on generated
//! input.
//!
//! - [`ipc_message`]: one message from a worker (or the primary), decoded as both framings
//!   of `ipc::Channel` decode it (`ipc::wire::decode`).
//! - [`http_head`]: bytes from a client, as the demo reads a request head: all at once and
//!   as they trickle in, which must agree.
//! - [`config_toml`]: a config file, parsed, validated, and printed back by `steer check`,
//!   which must read back to the same configuration.
//! - [`quic_header`]: a datagram sent to a QUIC listener, routed by its connection ID
//!   (`steer_common::quic::parse`, which the eBPF program mirrors).

use crate::config::Settings;
use crate::demo::http::{self, HeadScan, Rejection, RequestHead};
use crate::ipc::{Encoded, IpcError, MAX_MESSAGE_BYTES};

/// A fuzz target: takes any bytes, panics only if an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target by name: the fuzz crate's binaries and the directories of `fuzz/corpus/`.
pub const TARGETS: [(&str, Target); 4] = [
    ("ipc_message", ipc_message),
    ("http_head", http_head),
    ("config_toml", config_toml),
    ("quic_header", quic_header),
];

/// Decodes `data` as one IPC message. A message that decodes must encode and decode back
/// to itself.
pub fn ipc_message(data: &[u8]) {
    if data.len() > MAX_MESSAGE_BYTES {
        return;
    }
    let Ok(message) = crate::ipc::decode(data) else {
        return;
    };
    let encoded = match Encoded::new(&message) {
        Ok(encoded) => encoded,
        // Written without the input's escapes, it can outgrow the limit the input met.
        Err(IpcError::Oversized) => return,
        Err(err) => panic!("a decoded message does not encode: {err}: {message:?}"),
    };
    let again = crate::ipc::decode(encoded.as_bytes()).unwrap_or_else(|err| {
        panic!(
            "an encoded message does not decode: {err}: {}",
            String::from_utf8_lossy(encoded.as_bytes())
        )
    });
    assert_eq!(
        again,
        message,
        "{}",
        String::from_utf8_lossy(encoded.as_bytes())
    );
}

/// Reads `data` as the start of a request head, whole and in pieces (sizes taken from the
/// data's own bytes), and checks that both readings agree and stay within the limits.
pub fn http_head(data: &[u8]) {
    let whole = http::parse_head(data);
    if let Ok(Some(head)) = &whole {
        assert!(head.len <= data.len() && head.len <= http::MAX_HEAD_BYTES);
        assert!(head.content_length <= http::MAX_BODY_BYTES);
    }
    let pieces = scan_in_pieces(data);
    match (&whole, &pieces) {
        (Ok(Some(a)), Ok(Some(b))) => assert_eq!(a, b),
        (_, Ok(Some(head))) => panic!("only the scan found {head:?}; whole: {whole:?}"),
        (Ok(Some(head)), _) => panic!("only the whole parse found {head:?}; scan: {pieces:?}"),
        (Ok(None), Err(rejection)) => panic!("the scan refused ({rejection:?}) a head in progress"),
        // The whole parse may see a bad header line before the head is complete.
        (Err(_), Ok(None)) | (Err(_), Err(_)) | (Ok(None), Ok(None)) => {}
    }
}

/// Feeds growing prefixes of `data` to one [`HeadScan`], as reads would, until it decides.
fn scan_in_pieces(data: &[u8]) -> Result<Option<RequestHead<'_>>, Rejection> {
    let mut scan = HeadScan::default();
    let mut end = 0;
    let mut sizes = data.iter().cycle().map(|&b| usize::from(b % 16) + 1);
    while end < data.len() {
        end = (end + sizes.next().unwrap_or(1)).min(data.len());
        if let Some(head) = scan.advance(&data[..end])? {
            return Ok(Some(head));
        }
    }
    Ok(None)
}

/// Parses `data` as a config file. One that validates must survive `steer check`'s
/// printout: the summary parses back to the same configuration.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(settings) = Settings::from_toml(text) else {
        return;
    };
    let Ok(config) = settings.into_config() else {
        return;
    };
    let summary = config.summary();
    let again = Settings::from_toml(&summary)
        .unwrap_or_else(|err| panic!("the summary does not parse: {err}\n{summary}"))
        .into_config()
        .unwrap_or_else(|err| panic!("the summary does not validate: {err}\n{summary}"));
    assert_eq!(again, config, "{summary}");
}

/// Routes `data` as a datagram on a QUIC listener. The route depends only on the first
/// [`steer_common::quic::MAX_READ`] bytes; a `Route::Steer` names the server ID in the DCID's
/// bytes 1-4, and encoding that server ID with the DCID's own random bytes gives the DCID
/// back; and a datagram that is not dropped is at least as long as its header's invariant
/// prefix.
pub fn quic_header(data: &[u8]) {
    use steer_common::quic::{self, Route};
    let route = quic::parse(data);
    let prefix = &data[..data.len().min(quic::MAX_READ)];
    assert_eq!(
        route,
        quic::parse(prefix),
        "a prefix routes like the datagram"
    );
    match route {
        Route::Steer(server) => {
            let at = if data[0] & 0x80 != 0 { 6 } else { 1 };
            let dcid = &data[at..at + quic::CID_LEN];
            assert_eq!(quic::decode_server_id(dcid), Some(server));
            let mut entropy = [0u8; quic::ENTROPY_LEN];
            entropy[0] = dcid[0];
            entropy[1..].copy_from_slice(&dcid[1 + quic::SERVER_ID_LEN..]);
            assert_eq!(quic::encode_server_id(server, &entropy), dcid);
        }
        Route::Flow => assert!(
            data.len() >= 6 || (data.len() > quic::CID_LEN && data[0] & 0x80 == 0),
            "a flow has a whole invariant prefix: {data:?}"
        ),
        Route::Drop => {}
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;
    use crate::ipc::{Counters, Message, Payload, Recipient};

    /// A well-formed request head: its method, target, and the bytes.
    fn request_head() -> impl Strategy<Value = (String, String, Vec<u8>)> {
        let method = prop::sample::select(vec!["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]);
        let target = "/[a-z0-9/._-]{0,24}(\\?[a-z]{1,4}=[0-9]{1,6})?";
        let header = ("[A-Za-z][A-Za-z0-9-]{0,12}", "[ -~]{0,40}");
        let headers = prop::collection::vec(header, 0..8);
        let eol = prop::sample::select(vec!["\r\n", "\n"]);
        let blank = prop::sample::select(vec!["", "\r\n", "\n\r\n"]);
        (method, target, headers, eol, blank).prop_map(|(method, target, headers, eol, blank)| {
            let mut text = format!("{blank}{method} {target} HTTP/1.1{eol}");
            for (name, value) in headers {
                // Framing headers are left to the cases that test them.
                if ["content-length", "transfer-encoding"]
                    .contains(&name.to_ascii_lowercase().as_str())
                {
                    continue;
                }
                text.push_str(&format!("{name}: {}{eol}", value.trim()));
            }
            text.push_str(eol);
            (method.to_owned(), target, text.into_bytes())
        })
    }

    fn message() -> impl Strategy<Value = Message> {
        let json = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e300f64..1e300).prop_map(Value::from),
            ".{0,16}".prop_map(Value::from),
        ];
        let data = json.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(".{0,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        let recipient = prop_oneof![
            Just(Recipient::Primary),
            Just(Recipient::All),
            any::<usize>().prop_map(Recipient::Slot),
        ];
        prop_oneof![
            (any::<u32>(), prop::option::of(any::<i32>())).prop_map(|(pid, fd)| {
                Message::Register {
                    pid,
                    fd,
                    listener: None,
                }
            }),
            Just(Message::Registered { load: None }),
            any::<bool>().prop_map(|heartbeats| Message::Ready { heartbeats }),
            any::<u64>().prop_map(|seq| Message::Ping { seq }),
            (any::<u64>(), any::<[u64; 3]>()).prop_map(|(seq, [accepted, active, requests])| {
                Message::Pong {
                    seq,
                    counters: Counters {
                        accepted,
                        active,
                        requests,
                    },
                }
            }),
            Just(Message::Drain),
            Just(Message::Connection),
            (
                prop::option::of(recipient),
                prop::option::of(any::<usize>()),
                data
            )
                .prop_map(|(to, from, data)| Message::User {
                    to,
                    from,
                    data: Payload::from(data),
                }),
        ]
    }

    /// A config file of valid values (some keys left out), with strings that need quoting.
    fn config_file() -> impl Strategy<Value = String> {
        let duration = (1u64..100_000, prop::sample::select(vec!["ms", "s", "m"]))
            .prop_map(|(n, unit)| format!("\"{n}{unit}\""));
        let text = "[ -~\\t\u{1}\u{7f}é]{1,12}";
        let lines = (
            prop::option::of(1usize..=64),
            prop::option::of(prop::sample::select(vec![
                "kernel",
                "round-robin",
                "hash",
                "cpu",
            ])),
            prop::option::of(duration.clone()),
            prop::option::of(duration.clone()),
            prop::option::of(duration),
            prop::option::of(prop::collection::vec(text, 1..4)),
            prop::option::of("/[a-z]{1,8}/[ -~é\u{1}]{1,8}"),
            prop::option::of(1u64..=4096),
        );
        lines.prop_map(
            |(workers, balance, header, idle, shutdown, command, pid_file, memory)| {
                let mut file = String::new();
                let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
                if let Some(n) = workers {
                    file += &format!("workers = {n}\n");
                }
                if let Some(b) = balance {
                    file += &format!("balance = \"{b}\"\n");
                }
                if let Some(d) = header {
                    file += &format!("demo-header-timeout = {d}\n");
                }
                if let Some(d) = idle {
                    file += &format!("demo-idle-timeout = {d}\n");
                }
                if let Some(d) = shutdown {
                    file += &format!("shutdown-timeout = {d}\n");
                }
                if let Some(argv) = command {
                    let argv: Vec<String> = argv.iter().map(|a| quote(a)).collect();
                    file += &format!("command = [{}]\n", argv.join(", "));
                }
                if let Some(path) = pid_file {
                    file += &format!("pid-file = {}\n", quote(&path));
                }
                if let Some(mb) = memory {
                    file += &format!("max-memory = \"{mb}MiB\"\n");
                }
                file
            },
        )
    }

    proptest! {
        /// A head read in any pieces is the head read whole, and every field is what was sent.
        #[test]
        fn a_head_in_pieces_is_the_head_whole(
            (method, target, bytes) in request_head(),
            tail in prop::collection::vec(any::<u8>(), 0..64),
            cuts in prop::collection::vec(1usize..32, 1..64),
        ) {
            let mut data = bytes.clone();
            data.extend_from_slice(&tail);
            let whole = http::parse_head(&data).expect("valid").expect("complete");
            prop_assert_eq!(whole.method, method.as_str());
            prop_assert_eq!(whole.target, target.as_str());
            prop_assert_eq!(whole.len, bytes.len());
            let mut scan = HeadScan::default();
            let mut end = 0;
            let mut cuts = cuts.into_iter().cycle();
            let found = loop {
                end = (end + cuts.next().unwrap_or(1)).min(data.len());
                if let Some(head) = scan.advance(&data[..end]).expect("valid") {
                    break head;
                }
                prop_assert!(end < data.len(), "never complete");
            };
            prop_assert_eq!(found, whole);
            http_head(&data);
        }

        /// Any bytes, and any well-formed head with bytes flipped: the readings agree.
        #[test]
        fn any_bytes_read_whole_and_in_pieces_agree(
            noise in prop::collection::vec(any::<u8>(), 0..256),
            (_, _, mut bytes) in request_head(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        ) {
            http_head(&noise);
            for (at, byte) in flips {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            http_head(&bytes);
        }

        /// Every message survives the wire, and decodes to what was sent.
        #[test]
        fn every_message_survives_the_wire(message in message()) {
            let encoded = Encoded::new(&message).expect("encodes");
            let decoded = crate::ipc::decode(encoded.as_bytes()).expect("decodes");
            prop_assert_eq!(&decoded, &message);
            ipc_message(encoded.as_bytes());
        }

        /// Any bytes, and headers around Steer's IDs with bytes flipped: routes agree with
        /// the IDs they name.
        #[test]
        fn any_datagram_routes_consistently(
            noise in prop::collection::vec(any::<u8>(), 0..64),
            (slot, generation) in (any::<u16>(), any::<u16>()),
            entropy in any::<[u8; steer_common::quic::ENTROPY_LEN]>(),
            long in any::<bool>(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        ) {
            use steer_common::quic::{self, Route, ServerId};
            quic_header(&noise);
            let server = ServerId { slot, generation };
            let cid = quic::encode_server_id(server, &entropy);
            let mut d = if long {
                let mut d = vec![0xc0, 0, 0, 0, 1, 16];
                d.extend_from_slice(&cid);
                d
            } else {
                let mut d = vec![0x41];
                d.extend_from_slice(&cid);
                d
            };
            d.extend_from_slice(&noise);
            prop_assert_eq!(quic::parse(&d), Route::Steer(server));
            for (at, byte) in flips {
                let i = at.index(d.len());
                d[i] = byte;
            }
            quic_header(&d);
        }

        /// A valid file prints (`steer check`) as TOML that reads back to the same settings.
        #[test]
        fn a_valid_config_reads_back_from_its_summary(file in config_file()) {
            prop_assert!(Settings::from_toml(&file).is_ok(), "{}", file);
            config_toml(file.as_bytes());
        }
    }

    /// Every input kept in `fuzz/corpus/<target>/` still passes: the fuzzers' findings stay
    /// fixed without nightly or cargo-fuzz.
    #[test]
    fn the_kept_corpus_passes() {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        for (target, check) in TARGETS {
            let dir = corpus.join(target);
            let entries =
                std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
            let mut count = 0;
            for entry in entries {
                let path = entry.expect("a corpus entry").path();
                let data = std::fs::read(&path).expect("a corpus file");
                check(&data);
                count += 1;
            }
            assert!(count >= 3, "{target}: only {count} inputs kept");
        }
    }
}
