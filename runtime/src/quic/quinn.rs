//! quinn on a Steer QUIC listener: connection IDs that carry the worker's slot and
//! generation, and the cluster's stateless-reset key.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let server_config: quinn::ServerConfig = unimplemented!();
//! # let socket: std::net::UdpSocket = unimplemented!();
//! // In a worker of `steer run --listen quic://0.0.0.0:443 -- ./prog`: its socket is
//! // `steer::InheritedSockets`' (fd 3), its identity the primary's variables.
//! let identity = steer::quic::QuicIdentity::from_env()?;
//! let endpoint = quinn::Endpoint::new(
//!     steer::quic::quinn::endpoint_config(&identity),
//!     Some(server_config),
//!     socket,
//!     quinn::default_runtime().ok_or("no async runtime")?,
//! )?;
//! # Ok(()) }
//! ```

use std::sync::Arc;

use quinn::{ConnectionIdGenerator, EndpointConfig};
use quinn_proto::{ConnectionId, InvalidCid};
use steer_common::quic::{self, ServerId};

use super::QuicIdentity;

/// A quinn [`ConnectionIdGenerator`] that issues Steer's IDs: [`quic::CID_LEN`] bytes, the
/// config rotation `0b000`, the worker's server ID, and fresh randomness (`getrandom(2)`)
/// in the rest.
#[derive(Debug, Clone, Copy)]
pub struct SteerCidGenerator {
    server_id: ServerId,
}

impl SteerCidGenerator {
    /// A generator for the worker `server_id` names.
    pub fn new(server_id: ServerId) -> SteerCidGenerator {
        SteerCidGenerator { server_id }
    }

    /// A generator for the worker of `slot` and `generation` (kept mod 65536); `None`
    /// if the slot does not fit in 16 bits.
    pub fn for_worker(slot: usize, generation: u64) -> Option<SteerCidGenerator> {
        ServerId::of(slot as u64, generation).map(SteerCidGenerator::new)
    }

    /// The server ID its IDs carry.
    pub fn server_id(&self) -> ServerId {
        self.server_id
    }
}

impl ConnectionIdGenerator for SteerCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut entropy = [0u8; quic::ENTROPY_LEN];
        // getrandom(2) does not fail on a kernel that runs Steer (3.17+), once the pool
        // is initialised, which it is by the time a worker serves; should it fail, an ID
        // must still be unlinkable, so there is no fallback to weaker randomness.
        if let Err(err) = super::fill_random(&mut entropy) {
            panic!("getrandom for a QUIC connection ID: {err}");
        }
        ConnectionId::new(&quic::encode_server_id(self.server_id, &entropy))
    }

    /// Any ID of the cluster's, whoever issued it: a worker that receives a packet for a
    /// connection whose process is gone must find it valid, so that it answers with a
    /// stateless reset.
    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        if cid.len() == quic::CID_LEN && quic::decode_server_id(cid).is_some() {
            Ok(())
        } else {
            Err(InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        quic::CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// A quinn [`EndpointConfig`] for a worker of a QUIC listener: its IDs from
/// [`SteerCidGenerator`], the cluster's stateless-reset key (HMAC-SHA256), and the fixed
/// bit never greased, since Steer's program routes a short header only if its fixed bit
/// is set.
pub fn endpoint_config(identity: &QuicIdentity) -> EndpointConfig {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, identity.reset_key.as_bytes());
    let mut config = EndpointConfig::new(Arc::new(key));
    let server_id = identity.server_id;
    config
        .cid_generator(move || Box::new(SteerCidGenerator::new(server_id)))
        .grease_quic_bit(false);
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quic::ResetKey;

    #[test]
    fn issued_ids_carry_the_server_id_differ_and_validate_anywhere_in_the_cluster() {
        let server_id = ServerId {
            slot: 7,
            generation: 3,
        };
        let mut generator = SteerCidGenerator::new(server_id);
        let a = generator.generate_cid();
        let b = generator.generate_cid();
        assert_eq!(a.len(), 16);
        assert_ne!(a, b, "fresh nonces");
        assert_eq!(quic::decode_server_id(&a), Some(server_id));
        assert_eq!(
            quic::parse(&[&[0x41][..], &a[..]].concat()),
            quic::Route::Steer(server_id)
        );
        let other = SteerCidGenerator::for_worker(1, 65_536 + 9).expect("fits");
        assert_eq!(
            other.server_id(),
            ServerId {
                slot: 1,
                generation: 9
            }
        );
        assert!(other.validate(&a).is_ok(), "another worker's ID");
        assert!(
            other.validate(&ConnectionId::new(&[0xe0; 16])).is_err(),
            "unroutable"
        );
        assert!(
            other.validate(&ConnectionId::new(&[0; 8])).is_err(),
            "length"
        );
    }

    #[test]
    fn an_endpoint_config_takes_the_identity() {
        let identity = QuicIdentity {
            server_id: ServerId {
                slot: 2,
                generation: 1,
            },
            reset_key: ResetKey::generate().expect("getrandom"),
        };
        let config = endpoint_config(&identity);
        assert_eq!(config.get_max_udp_payload_size(), 1472);
    }
}
