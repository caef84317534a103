//! QUIC connection IDs that say which worker holds a connection, and the header reading
//! that routes a datagram by them.
//!
//! Every connection ID that a cluster's workers issue is [`CID_LEN`] bytes, laid out in
//! the style of QUIC-LB's plaintext server IDs (draft-ietf-quic-load-balancers):
//!
//! | byte | field |
//! |---|---|
//! | 0 | first octet: top 3 bits the config rotation ([`CONFIG_ROTATION`], `0b000`), low 5 bits random |
//! | 1-2 | slot, `u16` big-endian |
//! | 3-4 | generation mod 65536, `u16` big-endian |
//! | 5-15 | nonce: [`NONCE_LEN`] bytes from a CSPRNG |
//!
//! Bytes 1-4 are the server ID ([`ServerId`]), which the primary hands each worker in
//! `STEER_QUIC_SERVER_ID` as 8 hex digits. QUIC-LB reserves the config rotation `0b111`
//! for IDs that are not routable ([`UNROUTABLE_CONFIG`]); Steer never issues those.
//!
//! [`parse`] reads the start of a datagram sent to a QUIC listener and says where it goes
//! ([`Route`]). It reads at most [`MAX_READ`] bytes, each behind an explicit length check,
//! so the eBPF program can do the same with bounded loads. It never panics, allocates or
//! loops.
//!
//! Why a short header must have the fixed bit set: QUIC's "grease the fixed bit"
//! extension (RFC 9287) lets a peer clear it only if the server advertised the
//! `grease_quic_bit` transport parameter. Steer's workers do not advertise it (the
//! library's endpoint turns it off; other stacks must too), so a short header with the
//! bit clear is not QUIC sent to this cluster.

/// Length of every connection ID a cluster's workers issue (`STEER_QUIC_CID_LEN`).
pub const CID_LEN: usize = 16;

/// Length of the server ID inside a connection ID: slot (2 bytes) and generation (2).
pub const SERVER_ID_LEN: usize = 4;

/// Length of the random nonce that ends a connection ID.
pub const NONCE_LEN: usize = CID_LEN - 1 - SERVER_ID_LEN;

/// The config rotation bits (the first octet's top 3) of Steer's routable IDs.
pub const CONFIG_ROTATION: u8 = 0b000;

/// The config rotation bits that QUIC-LB reserves for unroutable IDs.
pub const UNROUTABLE_CONFIG: u8 = 0b111;

/// How far the config rotation sits in the first octet.
pub const CONFIG_SHIFT: u32 = 5;

/// The first octet's bits that are random.
pub const FIRST_OCTET_RANDOM: u8 = (1 << CONFIG_SHIFT) - 1;

/// Most bytes [`parse`] reads: a long header's first byte, version (4), DCID length (1)
/// and a whole Steer DCID ([`CID_LEN`]). A short header needs fewer (1 + [`CID_LEN`]).
pub const MAX_READ: usize = LONG_DCID_AT + CID_LEN;

/// Bytes of fresh randomness [`encode_server_id`] takes: the first octet's low 5 bits
/// (from byte 0) and the nonce.
pub const ENTROPY_LEN: usize = 1 + NONCE_LEN;

/// Where a long header's DCID starts: after the first byte, the version and the length.
const LONG_DCID_AT: usize = 1 + 4 + 1;

/// Where a short header's DCID starts.
const SHORT_DCID_AT: usize = 1;

/// The first byte's header form bit: 1 for a long header.
const LONG_HEADER: u8 = 0x80;

/// The first byte's fixed bit, always 1 in QUIC v1 and v2 packets that are not greased.
const FIXED_BIT: u8 = 0x40;

/// The worker a connection ID names: its slot and its generation mod 65536.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServerId {
    /// The worker's slot.
    pub slot: u16,
    /// The worker's generation mod 65536.
    pub generation: u16,
}

impl ServerId {
    /// The server ID of a slot's worker of some generation (kept mod 65536). `None` if
    /// the slot does not fit in 16 bits.
    pub fn of(slot: u64, generation: u64) -> Option<ServerId> {
        Some(ServerId {
            slot: u16::try_from(slot).ok()?,
            generation: (generation & 0xffff) as u16,
        })
    }

    /// Its 4 bytes, as they sit in an ID's bytes 1-4.
    pub fn to_bytes(self) -> [u8; SERVER_ID_LEN] {
        let [s0, s1] = self.slot.to_be_bytes();
        let [g0, g1] = self.generation.to_be_bytes();
        [s0, s1, g0, g1]
    }

    /// Reads the 4 bytes of an ID's bytes 1-4.
    pub fn from_bytes(bytes: [u8; SERVER_ID_LEN]) -> ServerId {
        ServerId {
            slot: u16::from_be_bytes([bytes[0], bytes[1]]),
            generation: u16::from_be_bytes([bytes[2], bytes[3]]),
        }
    }

    /// Its 8 lowercase hex digits (`STEER_QUIC_SERVER_ID`): slot then generation, both
    /// big-endian.
    pub fn to_hex(self) -> [u8; 2 * SERVER_ID_LEN] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 2 * SERVER_ID_LEN];
        for (i, byte) in self.to_bytes().into_iter().enumerate() {
            out[2 * i] = DIGITS[usize::from(byte >> 4)];
            out[2 * i + 1] = DIGITS[usize::from(byte & 0xf)];
        }
        out
    }

    /// Reads 8 hex digits (either case). `None` for any other text.
    pub fn from_hex(text: &[u8]) -> Option<ServerId> {
        fn digit(c: u8) -> Option<u8> {
            match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                b'A'..=b'F' => Some(c - b'A' + 10),
                _ => None,
            }
        }
        if text.len() != 2 * SERVER_ID_LEN {
            return None;
        }
        let mut bytes = [0u8; SERVER_ID_LEN];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = (digit(text[2 * i])? << 4) | digit(text[2 * i + 1])?;
        }
        Some(ServerId::from_bytes(bytes))
    }
}

/// A connection ID for `server`: the first octet's low bits from `entropy[0]`, the nonce
/// from `entropy[1..]`. `entropy` must be fresh CSPRNG output for every ID, or IDs become
/// linkable.
pub fn encode_server_id(server: ServerId, entropy: &[u8; ENTROPY_LEN]) -> [u8; CID_LEN] {
    let mut cid = [0u8; CID_LEN];
    cid[0] = (CONFIG_ROTATION << CONFIG_SHIFT) | (entropy[0] & FIRST_OCTET_RANDOM);
    cid[1..1 + SERVER_ID_LEN].copy_from_slice(&server.to_bytes());
    cid[1 + SERVER_ID_LEN..].copy_from_slice(&entropy[1..]);
    cid
}

/// The server ID in the first [`CID_LEN`] bytes of `cid`, if they are one of Steer's:
/// at least [`CID_LEN`] bytes, with Steer's config rotation. Reads only `cid[..5]`.
pub fn decode_server_id(cid: &[u8]) -> Option<ServerId> {
    if cid.len() < CID_LEN {
        return None;
    }
    let first = *cid.first()?;
    if first >> CONFIG_SHIFT != CONFIG_ROTATION {
        return None;
    }
    match cid.get(1..1 + SERVER_ID_LEN) {
        Some(&[a, b, c, d]) => Some(ServerId::from_bytes([a, b, c, d])),
        _ => None,
    }
}

/// Where a datagram sent to a QUIC listener goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To the worker the DCID names, while it lives (else to a live worker, which
    /// answers with a stateless reset).
    Steer(ServerId),
    /// Through the flow table: kept together per client address and port, steered by
    /// the policy among the current generation. A long header whose DCID the client
    /// chose (Initial, 0-RTT), a version this reading does not know, version negotiation,
    /// or a short header whose DCID is not one of Steer's.
    Flow,
    /// Nowhere: the bytes cannot be a QUIC packet sent to this cluster (empty, a long
    /// header cut before its DCID ends, a short header shorter than a Steer DCID or with
    /// the fixed bit clear).
    Drop,
}

/// Reads the start of a datagram (at least its first `min(len, MAX_READ)` bytes) and says
/// where it goes.
///
/// - Long header (first bit 1): at least the 6-byte invariant prefix (first byte, version,
///   DCID length), else [`Route::Drop`]. A DCID of [`CID_LEN`] bytes, all present, with
///   Steer's config rotation is [`Route::Steer`]; a DCID of Steer's length cut short is
///   [`Route::Drop`]; any other is [`Route::Flow`], whatever the version (an unknown
///   version needs a worker to answer with version negotiation, and RFC 8999 lets other
///   versions use DCIDs of up to 255 bytes).
/// - Short header (first bit 0): the fixed bit set and [`CID_LEN`] DCID bytes present,
///   else [`Route::Drop`]. A DCID with Steer's config rotation is [`Route::Steer`], any
///   other [`Route::Flow`].
///
/// A client-chosen Initial DCID of 16 bytes starting with `0b000` decodes as Steer's:
/// it goes to the worker it happens to name if that one lives (QUIC-LB has the same
/// property); every datagram of that handshake carries the same DCID, so they stay together.
pub fn parse(datagram_prefix: &[u8]) -> Route {
    let Some(&first) = datagram_prefix.first() else {
        return Route::Drop;
    };
    if first & LONG_HEADER != 0 {
        let Some(&dcid_len) = datagram_prefix.get(LONG_DCID_AT - 1) else {
            return Route::Drop;
        };
        if usize::from(dcid_len) != CID_LEN {
            return Route::Flow;
        }
        match datagram_prefix.get(LONG_DCID_AT..LONG_DCID_AT + CID_LEN) {
            Some(dcid) => decode_server_id(dcid).map_or(Route::Flow, Route::Steer),
            None => Route::Drop,
        }
    } else {
        if first & FIXED_BIT == 0 {
            return Route::Drop;
        }
        match datagram_prefix.get(SHORT_DCID_AT..SHORT_DCID_AT + CID_LEN) {
            Some(dcid) => decode_server_id(dcid).map_or(Route::Flow, Route::Steer),
            None => Route::Drop,
        }
    }
}

/// The bytes of a datagram of `len` payload bytes that the eBPF program reads before it
/// calls [`parse`]: [`MAX_READ`], 17 (a short header's first byte and DCID), 6 (a long
/// header's invariant prefix) or 0, the most of these that the datagram holds. Reading
/// one of four constant lengths keeps every load's size known to the verifier, and
/// [`parse`] of that prefix routes exactly as [`parse`] of the whole datagram (a property
/// the tests check over every length).
pub const fn read_len(len: usize) -> usize {
    if len >= MAX_READ {
        MAX_READ
    } else if len >= SHORT_DCID_AT + CID_LEN {
        SHORT_DCID_AT + CID_LEN
    } else if len >= LONG_DCID_AT {
        LONG_DCID_AT
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: ServerId = ServerId {
        slot: 0x0102,
        generation: 0xa0b0,
    };

    fn entropy(seed: u8) -> [u8; ENTROPY_LEN] {
        let mut e = [0u8; ENTROPY_LEN];
        for (i, b) in e.iter_mut().enumerate() {
            *b = seed
                .wrapping_mul(31)
                .wrapping_add(i as u8)
                .wrapping_mul(167);
        }
        e
    }

    /// A long header: first byte, version, DCID, SCID, then padding.
    fn long(first: u8, version: u32, dcid: &[u8], total: usize) -> [u8; 64] {
        let mut d = [0u8; 64];
        d[0] = first;
        d[1..5].copy_from_slice(&version.to_be_bytes());
        d[5] = dcid.len() as u8;
        d[6..6 + dcid.len()].copy_from_slice(dcid);
        let scid = 6 + dcid.len();
        d[scid] = 8;
        assert!(total <= 64);
        d
    }

    fn short(dcid: &[u8]) -> [u8; 40] {
        let mut d = [0x5au8; 40];
        d[0] = 0x40 | 0x01;
        d[1..1 + dcid.len()].copy_from_slice(dcid);
        d
    }

    #[test]
    fn the_layout_is_byte_for_byte_as_documented() {
        let e = entropy(7);
        let cid = encode_server_id(SERVER, &e);
        assert_eq!(cid[0] >> 5, 0b000, "config rotation");
        assert_eq!(cid[0] & 0x1f, e[0] & 0x1f, "random low bits");
        assert_eq!(&cid[1..5], &[0x01, 0x02, 0xa0, 0xb0], "slot, generation BE");
        assert_eq!(&cid[5..], &e[1..], "nonce");
        assert_eq!(NONCE_LEN, 11);
        assert_eq!(MAX_READ, 22);
    }

    #[test]
    fn every_id_decodes_to_its_server_and_ids_differ_by_their_entropy() {
        for seed in 0..=255u8 {
            let server = ServerId {
                slot: u16::from(seed) * 257,
                generation: u16::from(seed).wrapping_mul(4099),
            };
            let cid = encode_server_id(server, &entropy(seed));
            assert_eq!(decode_server_id(&cid), Some(server));
            assert_ne!(
                cid,
                encode_server_id(server, &entropy(seed.wrapping_add(1)))
            );
        }
    }

    #[test]
    fn server_ids_read_back_from_hex_and_refuse_other_text() {
        assert_eq!(&SERVER.to_hex(), b"0102a0b0");
        assert_eq!(ServerId::from_hex(b"0102a0b0"), Some(SERVER));
        assert_eq!(ServerId::from_hex(b"0102A0B0"), Some(SERVER));
        for bad in [
            &b""[..],
            b"0102a0b",
            b"0102a0b00",
            b"0102a0bg",
            b"+102a0b0",
            b" 102a0b0",
        ] {
            assert_eq!(ServerId::from_hex(bad), None, "{bad:?}");
        }
        assert_eq!(
            ServerId::of(3, 65_537),
            Some(ServerId {
                slot: 3,
                generation: 1
            })
        );
        assert_eq!(ServerId::of(65_536, 0), None);
    }

    #[test]
    fn only_steers_config_rotation_decodes() {
        let mut cid = encode_server_id(SERVER, &entropy(1));
        for config in 1..=0b111u8 {
            cid[0] = (config << 5) | (cid[0] & 0x1f);
            assert_eq!(decode_server_id(&cid), None, "config {config:03b}");
        }
        assert_eq!(decode_server_id(&cid[..15]), None, "too short");
    }

    #[test]
    fn a_long_header_with_steers_dcid_goes_to_its_server_in_any_packet_type() {
        let cid = encode_server_id(SERVER, &entropy(2));
        // Initial, 0-RTT, Handshake, Retry; v1, v2 and an unknown version alike.
        for first in [0xc0u8, 0xd0, 0xe0, 0xf0, 0xc3] {
            for version in [1u32, 0x6b33_43cf, 0x1a2a_3a4a] {
                let d = long(first, version, &cid, 64);
                assert_eq!(parse(&d), Route::Steer(SERVER));
                assert_eq!(
                    parse(&d[..MAX_READ]),
                    Route::Steer(SERVER),
                    "prefix is enough"
                );
            }
        }
    }

    #[test]
    fn a_long_header_with_a_client_chosen_dcid_goes_through_the_flow_table() {
        let cid = encode_server_id(SERVER, &entropy(3));
        // quinn's clients choose 20 bytes, Chrome 8; zero is legal too.
        for len in [0usize, 1, 8, 15, 17, 20] {
            let dcid = [0u8; 20];
            let d = long(0xc0, 1, &dcid[..len], 64);
            assert_eq!(parse(&d), Route::Flow, "length {len}");
            assert_eq!(
                parse(&d[..6]),
                Route::Flow,
                "only the invariant prefix: {len}"
            );
        }
        // 16 bytes whose config rotation is not Steer's.
        let mut other = cid;
        other[0] |= 0xe0;
        assert_eq!(parse(&long(0xc0, 1, &other, 64)), Route::Flow);
        // Version negotiation (version 0) and unknown versions with long DCIDs (RFC 8999).
        assert_eq!(parse(&long(0x80, 0, &[7; 20], 64)), Route::Flow);
        let mut huge = [0u8; 64];
        huge[0] = 0x80;
        huge[1..5].copy_from_slice(&0x0a0a_0a0au32.to_be_bytes());
        huge[5] = 255;
        assert_eq!(parse(&huge), Route::Flow);
    }

    #[test]
    fn a_short_header_with_steers_dcid_goes_to_its_server() {
        let cid = encode_server_id(SERVER, &entropy(4));
        let d = short(&cid);
        assert_eq!(parse(&d), Route::Steer(SERVER));
        assert_eq!(
            parse(&d[..17]),
            Route::Steer(SERVER),
            "the DCID and nothing more"
        );
        // Key phase and spin bits do not matter.
        let mut flipped = d;
        flipped[0] |= 0x3f;
        assert_eq!(parse(&flipped), Route::Steer(SERVER));
        let mut other = cid;
        other[0] |= 0xe0;
        assert_eq!(parse(&short(&other)), Route::Flow, "unroutable config");
    }

    #[test]
    fn garbage_and_truncated_datagrams_are_dropped() {
        let cid = encode_server_id(SERVER, &entropy(5));
        assert_eq!(parse(&[]), Route::Drop);
        let l = long(0xc0, 1, &cid, 64);
        for cut in 0..6 {
            assert_eq!(parse(&l[..cut]), Route::Drop, "long header cut at {cut}");
        }
        for cut in 6..MAX_READ {
            assert_eq!(parse(&l[..cut]), Route::Drop, "Steer's DCID cut at {cut}");
        }
        let s = short(&cid);
        for cut in 0..17 {
            assert_eq!(parse(&s[..cut]), Route::Drop, "short header cut at {cut}");
        }
        let mut greased = s;
        greased[0] &= !0x40;
        assert_eq!(parse(&greased), Route::Drop, "fixed bit clear");
        assert_eq!(parse(&[0u8; 1500]), Route::Drop, "zeros");
    }

    #[test]
    fn every_route_agrees_with_reencoding_for_all_short_prefixes() {
        // Every first byte with every DCID first byte: what decodes re-encodes to the
        // same server ID bytes.
        for first in 0..=255u8 {
            for cid0 in 0..=255u8 {
                let mut d = [0u8; MAX_READ];
                d[0] = first;
                d[1] = cid0;
                d[5] = if cid0 & 1 == 0 { 16 } else { cid0 };
                d[6] = cid0;
                d[2] = 0x33;
                d[7] = 0x44;
                check_consistent(&d);
            }
        }
    }

    #[test]
    fn the_programs_bounded_prefix_routes_as_the_whole_datagram() {
        // Every length up to past MAX_READ, with headers of every kind: the program reads
        // `read_len(len)` bytes and must decide what `parse` of the whole datagram decides.
        let cid = encode_server_id(SERVER, &entropy(9));
        let mut other = cid;
        other[0] |= 0xe0;
        let mut corpus: [[u8; 64]; 8] = [[0u8; 64]; 8];
        corpus[0] = long(0xc0, 1, &cid, 64);
        corpus[1] = long(0xc0, 1, &[3; 20], 64);
        corpus[2] = long(0x80, 0, &[7; 8], 64);
        corpus[3] = long(0xe0, 1, &other, 64);
        corpus[4][..40].copy_from_slice(&short(&cid));
        corpus[5][..40].copy_from_slice(&short(&other));
        corpus[6] = [0xff; 64];
        corpus[7][0] = 0x40;
        for d in &corpus {
            for len in 0..=d.len() {
                let whole = parse(&d[..len]);
                let n = read_len(len);
                assert!(n <= len && n <= MAX_READ);
                assert_eq!(parse(&d[..n]), whole, "length {len}, read {n}: {d:02x?}");
            }
        }
        // And over every first byte and DCID length byte, at each length.
        for first in 0..=255u8 {
            for dcid_len in [0u8, 8, 15, 16, 17, 20, 255] {
                let mut d = [0x21u8; 40];
                d[0] = first;
                d[5] = dcid_len;
                for len in 0..=d.len() {
                    assert_eq!(parse(&d[..read_len(len)]), parse(&d[..len]));
                }
            }
        }
    }

    /// The fuzz target's invariant: a [`Route::Steer`] names the server ID that sits in the
    /// DCID's bytes 1-4, and re-encoding it keeps the bytes.
    fn check_consistent(d: &[u8]) {
        if let Route::Steer(server) = parse(d) {
            let at = if d[0] & 0x80 != 0 { 6 } else { 1 };
            let dcid = &d[at..at + CID_LEN];
            let mut entropy = [0u8; ENTROPY_LEN];
            entropy[0] = dcid[0];
            entropy[1..].copy_from_slice(&dcid[5..]);
            assert_eq!(encode_server_id(server, &entropy), dcid);
        }
    }
}
