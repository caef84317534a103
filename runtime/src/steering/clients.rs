//! The per-client connection limit's maps, kept by the primary: `CONFIG`'s limit fields,
//! the `EXEMPT` trie, and once per health interval a look at `CLIENTS` (how many clients
//! it tracks) and `REFUSED` (which prefixes were refused, logged when one starts).
//!
//! The program decides alone (see `workspace-ebpf/steer-ebpf`); nothing here is on a
//! connection's path.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd};

use aya::maps::MapData;
use aya::maps::lpm_trie::{Key, LpmTrie};
use steer_common::{ClientKey, Config, FAMILY_V4};

use super::SteeringError;
use crate::config::limits::{mask32, mask128};
use crate::config::{Cidr, ClientLimits};

/// How many of the most-refused prefixes `/status` lists.
pub const TOP_REFUSED: usize = 10;

/// Writes the limit's fields of the program's `CONFIG` (the caller writes it to the map).
/// A program run that reads `CONFIG` while it is being written may see some fields old
/// and some new: that one decision uses a mix of the two limits, nothing worse.
pub fn apply_to_config(limits: &ClientLimits, config: &mut Config) {
    match limits.rate {
        Some(rate) => {
            let interval = rate.interval().as_nanos().min(u128::from(u64::MAX)) as u64;
            config.client_interval_ns = interval.max(1);
            config.client_tolerance_ns = interval.saturating_mul(u64::from(limits.burst) - 1);
        }
        None => {
            config.client_interval_ns = 0;
            config.client_tolerance_ns = 0;
        }
    }
    config.client_prefix_v4 = limits.prefix_v4;
    config.client_prefix_v6 = limits.prefix_v6;
    config.client_mask_v4 = mask32(limits.prefix_v4).to_be();
    let m = mask128(limits.prefix_v6).to_be_bytes();
    config.client_mask_v6 = words(m);
}

/// 16 bytes in network order as the program reads them: four native words.
fn words(bytes: [u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// A [`ClientKey`] as the prefix it stands for (`203.0.113.7/32`).
pub fn prefix_of(key: &ClientKey) -> String {
    let bytes = |w: u32| w.to_ne_bytes();
    let addr = if key.family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::from(bytes(key.addr[0])))
    } else {
        let mut octets = [0u8; 16];
        for (i, word) in key.addr.iter().enumerate() {
            octets[i * 4..i * 4 + 4].copy_from_slice(&bytes(*word));
        }
        IpAddr::V6(Ipv6Addr::from(octets))
    };
    format!("{addr}/{}", key.prefix)
}

/// What the primary last learnt from the client maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientView {
    /// Entries in `CLIENTS` at the last look.
    pub tracked: u64,
    /// The most-refused prefixes (`REFUSED`), most first, at most [`TOP_REFUSED`].
    pub top: Vec<(String, u64)>,
}

/// The maps of the per-client limit.
pub struct ClientTables {
    clients: MapData,
    refused: aya::maps::HashMap<MapData, ClientKey, u64>,
    exempt: LpmTrie<MapData, [u32; 4], u8>,
    exempt_now: Vec<Cidr>,
    /// Each refused prefix's count at the last look, and whether it grew then.
    seen: HashMap<ClientKey, (u64, bool)>,
    view: ClientView,
    /// The limit in force, for the log line.
    rate: String,
}

impl std::fmt::Debug for ClientTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTables")
            .field("exempt", &self.exempt_now)
            .field("view", &self.view)
            .finish_non_exhaustive()
    }
}

impl ClientTables {
    /// Takes the program's `CLIENTS`, `REFUSED` and `EXEMPT` maps.
    pub fn new(
        clients: aya::maps::Map,
        refused: aya::maps::Map,
        exempt: aya::maps::Map,
    ) -> Result<ClientTables, SteeringError> {
        let clients = match clients {
            aya::maps::Map::LruHashMap(data) => data,
            _ => {
                return Err(SteeringError::Load {
                    what: "find the program's maps",
                    detail: "map CLIENTS is not an LRU hash".into(),
                });
            }
        };
        Ok(ClientTables {
            clients,
            refused: aya::maps::HashMap::try_from(refused)
                .map_err(|e| SteeringError::map("use map REFUSED", e))?,
            exempt: LpmTrie::try_from(exempt)
                .map_err(|e| SteeringError::map("use map EXEMPT", e))?,
            exempt_now: Vec::new(),
            seen: HashMap::new(),
            view: ClientView::default(),
            rate: String::new(),
        })
    }

    /// Makes `EXEMPT` hold exactly `limits.exempt`: the new prefixes go in before the old
    /// ones leave, so a client exempt before and after is never limited in between.
    pub fn apply(&mut self, limits: &ClientLimits) -> Result<(), SteeringError> {
        let key = |cidr: &Cidr| {
            let (v6, len) = cidr.as_v6();
            Key::new(u32::from(len), words(v6.octets()))
        };
        for cidr in limits
            .exempt
            .iter()
            .filter(|c| !self.exempt_now.contains(c))
        {
            self.exempt
                .insert(&key(cidr), 1, 0)
                .map_err(|e| SteeringError::map(format!("add {cidr} to EXEMPT"), e))?;
        }
        for cidr in self
            .exempt_now
            .iter()
            .filter(|c| !limits.exempt.contains(c))
        {
            self.exempt
                .remove(&key(cidr))
                .map_err(|e| SteeringError::map(format!("remove {cidr} from EXEMPT"), e))?;
        }
        self.exempt_now = limits.exempt.clone();
        self.rate = match limits.rate {
            Some(rate) => format!("{rate}, burst {}", limits.burst),
            None => "none".into(),
        };
        Ok(())
    }

    /// Once per health interval: counts the tracked clients and reads the refusals per
    /// prefix. A prefix refused in this interval that was not in the one before is logged
    /// (so at most one line per prefix per interval).
    pub fn survey(&mut self) -> Result<(), SteeringError> {
        self.view.tracked = count_entries(&self.clients, size_of::<ClientKey>(), 8)
            .map_err(|e| SteeringError::io("count the entries of CLIENTS", e))?;
        let mut all = Vec::new();
        for entry in self.refused.iter() {
            let (key, count) = entry.map_err(|e| SteeringError::map("read REFUSED", e))?;
            all.push((key, count));
        }
        let mut next = HashMap::with_capacity(all.len());
        for (key, count) in &all {
            let (before, was_growing) = self.seen.get(key).copied().unwrap_or((0, false));
            let growing = *count > before;
            if growing && !was_growing {
                tracing::warn!(
                    prefix = %prefix_of(key),
                    refused = count,
                    limit = %self.rate,
                    "client prefix over --client-conn-rate: its new connections are refused"
                );
            }
            next.insert(*key, (*count, growing));
        }
        self.seen = next;
        all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        self.view.top = all
            .iter()
            .take(TOP_REFUSED)
            .map(|(key, count)| (prefix_of(key), *count))
            .collect();
        Ok(())
    }

    /// What the last survey found.
    pub fn view(&self) -> &ClientView {
        &self.view
    }
}

/// `BPF_MAP_LOOKUP_BATCH` (Linux 5.6).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `bpf_attr` for the batch commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// How many entries a hash map holds, read in batches of 4096 (16 system calls for a
/// table of 65,536, rather than one per entry).
fn count_entries(map: &MapData, key_size: usize, value_size: usize) -> io::Result<u64> {
    const BATCH: usize = 4096;
    let mut keys = vec![0u8; BATCH * key_size];
    let mut values = vec![0u8; BATCH * value_size];
    let (mut token_in, mut token_out) = (0u32, 0u32);
    let mut total = 0u64;
    let fd = map.fd().as_fd().as_raw_fd();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                (&raw const token_in) as u64
            },
            out_batch: (&raw mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `count` keys and values and a 4-byte token,
        // all alive for the call; the kernel writes only within them.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (ret < 0).then(io::Error::last_os_error);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            None => total += u64::from(attr.count),
            // The end of the map: `count` holds the last batch.
            Some(libc::ENOENT) => return Ok(total + u64::from(attr.count)),
            Some(_) => return Err(err.unwrap_or_else(io::Error::last_os_error)),
        }
        token_in = token_out;
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_print_as_their_prefix() {
        let v4 = ClientKey {
            family: FAMILY_V4,
            prefix: 24,
            _reserved: [0; 2],
            addr: [u32::from_ne_bytes([203, 0, 113, 0]), 0, 0, 0],
        };
        assert_eq!(prefix_of(&v4), "203.0.113.0/24");
        let v6 = ClientKey {
            family: steer_common::FAMILY_V6,
            prefix: 64,
            _reserved: [0; 2],
            addr: words("2001:db8::".parse::<Ipv6Addr>().expect("v6").octets()),
        };
        assert_eq!(prefix_of(&v6), "2001:db8::/64");
    }

    #[test]
    fn config_gets_the_interval_tolerance_and_masks() {
        let limits = ClientLimits {
            rate: Some("50/s".parse().expect("rate")),
            burst: 10,
            prefix_v4: 24,
            ..ClientLimits::default()
        };
        let mut config = Config::default();
        apply_to_config(&limits, &mut config);
        assert_eq!(config.client_interval_ns, 20_000_000);
        assert_eq!(config.client_tolerance_ns, 9 * 20_000_000);
        assert_eq!(config.client_mask_v4.to_ne_bytes(), [255, 255, 255, 0]);
        assert_eq!(config.client_mask_v6, [u32::MAX, u32::MAX, 0, 0]);
        apply_to_config(&ClientLimits::default(), &mut config);
        assert_eq!(config.client_interval_ns, 0, "no rate: no limit");
    }
}
