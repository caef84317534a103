//! QUIC listeners: what a worker puts in its connection IDs, and the cluster's
//! stateless-reset key.
//!
//! A worker of a cluster with a `quic://` listener gets three variables (docs/ipc.md,
//! "QUIC"), which any QUIC stack can use without this crate:
//!
//! | variable | value |
//! |---|---|
//! | `STEER_QUIC_CID_LEN` | `16`: the length of every connection ID it issues |
//! | `STEER_QUIC_SERVER_ID` | 8 hex digits: slot (`u16` BE) then generation mod 65536 (`u16` BE), the ID's bytes 1-4 |
//! | `STEER_QUIC_RESET_KEY` | 64 hex digits: the cluster's 32-byte stateless-reset key |
//!
//! The layout of an ID is `steer_common::quic`'s: a first octet whose top 3 bits are
//! `000`, the server ID, then 11 bytes from a CSPRNG. The reset key is made once by the
//! primary (`getrandom`), given to every worker, and handed to a successor primary in an
//! upgrade, so any worker can answer a packet for a connection whose process is gone with
//! the stateless reset that connection's peer expects.
//!
//! [`QuicIdentity`] reads the variables. With the `quic` feature, `quinn` gives quinn the
//! [`quinn::SteerCidGenerator`] and an endpoint configured with the key.

use std::fmt;
use std::io;
use std::sync::OnceLock;

pub use steer_common::quic::{CID_LEN, ServerId};

#[cfg(feature = "quic")]
pub mod quinn;

/// `STEER_QUIC_CID_LEN`: the length of the connection IDs a worker issues.
pub const ENV_CID_LEN: &str = "STEER_QUIC_CID_LEN";
/// `STEER_QUIC_SERVER_ID`: 8 hex digits, slot then generation, both `u16` big-endian.
pub const ENV_SERVER_ID: &str = "STEER_QUIC_SERVER_ID";
/// `STEER_QUIC_RESET_KEY`: 64 hex digits, the cluster's stateless-reset key.
pub const ENV_RESET_KEY: &str = "STEER_QUIC_RESET_KEY";

/// Bytes of the stateless-reset key.
pub const RESET_KEY_LEN: usize = 32;

/// The cluster's stateless-reset key: 32 bytes every worker shares, so that any of them
/// derives the reset token of any connection ID the cluster issued.
#[derive(Clone, PartialEq, Eq)]
pub struct ResetKey([u8; RESET_KEY_LEN]);

impl ResetKey {
    /// A fresh key from the kernel's CSPRNG (`getrandom(2)`). Fails only if the kernel
    /// does not offer it.
    pub fn generate() -> io::Result<ResetKey> {
        let mut key = [0u8; RESET_KEY_LEN];
        fill_random(&mut key)?;
        Ok(ResetKey(key))
    }

    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; RESET_KEY_LEN]) -> ResetKey {
        ResetKey(bytes)
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8; RESET_KEY_LEN] {
        &self.0
    }

    /// Its 64 lowercase hex digits (`STEER_QUIC_RESET_KEY`).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads 64 hex digits (either case). `None` for any other text.
    pub fn from_hex(text: &str) -> Option<ResetKey> {
        if text.len() != 2 * RESET_KEY_LEN || !text.is_ascii() {
            return None;
        }
        let mut key = [0u8; RESET_KEY_LEN];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ResetKey(key))
    }
}

impl fmt::Debug for ResetKey {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResetKey(..)")
    }
}

/// Fills `buf` from the kernel's CSPRNG (`getrandom(2)`, retried on `EINTR` and short
/// reads).
pub(crate) fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(())
}

/// What a worker of a QUIC listener puts in its connection IDs and its stateless resets,
/// as its primary gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicIdentity {
    /// Its slot and generation, as they sit in its IDs' bytes 1-4.
    pub server_id: ServerId,
    /// The cluster's stateless-reset key.
    pub reset_key: ResetKey,
}

impl QuicIdentity {
    /// Reads `STEER_QUIC_CID_LEN`, `STEER_QUIC_SERVER_ID` and `STEER_QUIC_RESET_KEY`
    /// through `get` (`std::env::var` in production). The error names the variable.
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Result<QuicIdentity, String> {
        let var = |name: &str| get(name).ok_or_else(|| format!("{name} is not set"));
        let len = var(ENV_CID_LEN)?;
        if len != CID_LEN.to_string() {
            return Err(format!(
                "{ENV_CID_LEN}={len:?}: this library issues {CID_LEN}-byte IDs only"
            ));
        }
        let server = var(ENV_SERVER_ID)?;
        let server_id = ServerId::from_hex(server.as_bytes())
            .ok_or_else(|| format!("{ENV_SERVER_ID}={server:?} is not 8 hex digits"))?;
        let key = var(ENV_RESET_KEY)?;
        let reset_key = ResetKey::from_hex(&key)
            .ok_or_else(|| format!("{ENV_RESET_KEY} is not 64 hex digits"))?;
        Ok(QuicIdentity {
            server_id,
            reset_key,
        })
    }

    /// Reads the process environment: what a worker of a QUIC listener was given.
    pub fn from_env() -> Result<QuicIdentity, String> {
        QuicIdentity::read(|name| std::env::var(name).ok())
    }

    /// The variables that give a worker this identity, in order: `STEER_QUIC_CID_LEN`,
    /// `STEER_QUIC_SERVER_ID`, `STEER_QUIC_RESET_KEY`.
    pub fn env(&self) -> [(&'static str, String); 3] {
        let server = String::from_utf8_lossy(&self.server_id.to_hex()).into_owned();
        [
            (ENV_CID_LEN, CID_LEN.to_string()),
            (ENV_SERVER_ID, server),
            (ENV_RESET_KEY, self.reset_key.to_hex()),
        ]
    }
}

/// The cluster's reset key, once [`init_cluster_reset_key`] has made or inherited it.
static CLUSTER_RESET_KEY: OnceLock<ResetKey> = OnceLock::new();

/// Makes the cluster's reset key once, at the primary's start: the predecessor's in an
/// upgrade (`inherited`, read from the hand-over's environment), else a fresh one. Later
/// calls return the first key.
pub(crate) fn init_cluster_reset_key(inherited: Option<ResetKey>) -> io::Result<&'static ResetKey> {
    if let Some(key) = CLUSTER_RESET_KEY.get() {
        return Ok(key);
    }
    let key = match inherited {
        Some(key) => key,
        None => ResetKey::generate()?,
    };
    Ok(CLUSTER_RESET_KEY.get_or_init(|| key))
}

/// The cluster's reset key, once made.
pub(crate) fn cluster_reset_key() -> Option<&'static ResetKey> {
    CLUSTER_RESET_KEY.get()
}

/// The variables for the worker of `slot` and `generation` in a cluster with a QUIC
/// listener; none before [`init_cluster_reset_key`] or for a slot above 65535 (both
/// ruled out by the primary's start and `--workers`' bound).
pub(crate) fn worker_env(slot: usize, generation: u64) -> Vec<(&'static str, String)> {
    let (Some(reset_key), Some(server_id)) = (
        CLUSTER_RESET_KEY.get(),
        ServerId::of(slot as u64, generation),
    ) else {
        return Vec::new();
    };
    QuicIdentity {
        server_id,
        reset_key: reset_key.clone(),
    }
    .env()
    .into()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn an_identity_reads_back_from_its_variables_and_names_a_bad_one() {
        let identity = QuicIdentity {
            server_id: ServerId {
                slot: 3,
                generation: 0xbeef,
            },
            reset_key: ResetKey::generate().expect("getrandom"),
        };
        let mut vars: HashMap<&str, String> = identity.env().into_iter().collect();
        assert_eq!(vars[ENV_CID_LEN], "16");
        assert_eq!(vars[ENV_SERVER_ID], "0003beef");
        assert_eq!(vars[ENV_RESET_KEY].len(), 64);
        let read = |vars: &HashMap<&str, String>| QuicIdentity::read(|k| vars.get(k).cloned());
        assert_eq!(read(&vars), Ok(identity));
        for (name, bad) in [
            (ENV_CID_LEN, "8"),
            (ENV_SERVER_ID, "3beef"),
            (ENV_RESET_KEY, "00"),
        ] {
            let mut broken = vars.clone();
            broken.insert(name, bad.into());
            let err = read(&broken).expect_err(bad);
            assert!(err.contains(name), "{err}");
        }
        vars.remove(ENV_RESET_KEY);
        assert!(read(&vars).expect_err("missing").contains(ENV_RESET_KEY));
    }

    #[test]
    fn reset_keys_are_fresh_read_back_from_hex_and_never_printed() {
        let a = ResetKey::generate().expect("getrandom");
        let b = ResetKey::generate().expect("getrandom");
        assert_ne!(a, b);
        assert_eq!(ResetKey::from_hex(&a.to_hex()), Some(a.clone()));
        assert_eq!(
            ResetKey::from_hex(&a.to_hex().to_uppercase()),
            Some(a.clone())
        );
        assert_eq!(ResetKey::from_hex(&"g".repeat(64)), None);
        assert_eq!(ResetKey::from_hex(&"é".repeat(32)), None);
        assert_eq!(format!("{a:?}"), "ResetKey(..)");
    }
}
