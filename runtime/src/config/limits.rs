//! The per-client connection limit's settings (`client-conn-rate`, `client-conn-burst`,
//! `client-prefix-v4`, `client-prefix-v6`, `client-exempt`, `client-table-size`): their
//! value types, parsers, and the validated [`ClientLimits`] the program's maps are written
//! from.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::time::Duration;

use super::settings::SettingValue;

/// Allowed `client-prefix-v4` lengths.
pub const PREFIX_V4_RANGE: std::ops::RangeInclusive<u64> = 0..=32;
/// Allowed `client-prefix-v6` lengths.
pub const PREFIX_V6_RANGE: std::ops::RangeInclusive<u64> = 0..=128;
/// Allowed `client-conn-burst` values.
pub const BURST_RANGE: std::ops::RangeInclusive<u64> = 1..=1_000_000;
/// Allowed `client-table-size` values: below 1024 the kernel's LRU (which keeps up to
/// 128 free entries per CPU aside) evicts well before the table is full.
pub const TABLE_SIZE_RANGE: std::ops::RangeInclusive<u64> = 1024..=16_777_216;

/// `--client-conn-rate`: so many new connections per second, minute or hour (`50/s`,
/// `600/m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRate {
    /// Connections per `per`.
    pub count: u32,
    /// The unit: one second, minute or hour.
    pub per: Duration,
}

impl ConnRate {
    /// GCRA's emission interval: the time one connection uses up (at least 1 ns).
    pub fn interval(self) -> Duration {
        (self.per / self.count.max(1)).max(Duration::from_nanos(1))
    }

    /// The default burst: one second's worth of connections, at least 1.
    pub fn default_burst(self) -> u32 {
        let per_second = u64::from(self.count) * 1_000_000_000;
        let per = self.per.as_nanos().max(1) as u64;
        per_second.div_ceil(per).clamp(1, *BURST_RANGE.end()) as u32
    }
}

impl FromStr for ConnRate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let expected = "expected connections per second, minute or hour, such as 50/s or 600/m";
        let (count, unit) = s.trim().split_once('/').ok_or(expected)?;
        let count: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{expected} (a whole number above 0 before the /)"))?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(expected.into()),
        };
        Ok(ConnRate { count, per })
    }
}

impl fmt::Display for ConnRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            60 => "m",
            3600 => "h",
            _ => "s",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl SettingValue for ConnRate {
    const EXPECTED: &'static str = "a rate string such as \"50/s\" or \"600/m\"";
    fn parse_setting(s: &str) -> Result<Self, String> {
        s.parse()
    }
}

/// An address prefix (`--client-exempt 10.0.0.0/8`); a bare address is the whole address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// The address, with the bits past the prefix cleared. An IPv4-mapped IPv6 prefix is
    /// kept as the IPv4 one it carries.
    pub addr: IpAddr,
    /// The prefix length.
    pub len: u8,
}

impl Cidr {
    /// As an IPv6 prefix: IPv4 as IPv4-mapped (`::ffff:a.b.c.d/(96 + n)`), the way the
    /// program's `EXEMPT` trie holds both families.
    pub fn as_v6(self) -> (Ipv6Addr, u8) {
        match self.addr {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped(), 96 + self.len),
            IpAddr::V6(v6) => (v6, self.len),
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let expected = "expected an address or a prefix such as 10.0.0.0/8 or 2001:db8::/32";
        let (addr, len) = match s.trim().split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s.trim(), None),
        };
        let given: IpAddr = addr.parse().map_err(|_| expected.to_owned())?;
        let given_max: u8 = if given.is_ipv4() { 32 } else { 128 };
        let len: u8 = match len {
            Some(len) => len
                .trim()
                .parse()
                .ok()
                .filter(|n| *n <= given_max)
                .ok_or_else(|| format!("{expected} (a prefix length from 0 to {given_max})"))?,
            None => given_max,
        };
        let mut addr = given.to_canonical();
        // `::ffff:10.0.0.0/104` is 10.0.0.0/8.
        let len = if given.is_ipv6() && addr.is_ipv4() {
            len.checked_sub(96)
                .ok_or_else(|| format!("{expected} (an IPv4-mapped prefix of 96 or more)"))?
        } else {
            len
        };
        addr = match addr {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4) & mask32(len);
                IpAddr::V4(bits.into())
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & mask128(len);
                IpAddr::V6(bits.into())
            }
        };
        Ok(Cidr { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl SettingValue for Cidr {
    const EXPECTED: &'static str = "a prefix string such as \"10.0.0.0/8\"";
    fn parse_setting(s: &str) -> Result<Self, String> {
        s.parse()
    }
}

/// The first `len` bits set.
pub fn mask32(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

/// The first `len` bits set.
pub fn mask128(len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0)
}

/// The validated per-client limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLimits {
    /// `client-conn-rate`; `None`: no limit (the program counts nothing).
    pub rate: Option<ConnRate>,
    /// `client-conn-burst` (its default: one second's worth of `rate`).
    pub burst: u32,
    /// `client-prefix-v4`.
    pub prefix_v4: u8,
    /// `client-prefix-v6`.
    pub prefix_v6: u8,
    /// `client-exempt`, sorted, without duplicates.
    pub exempt: Vec<Cidr>,
    /// `client-table-size`: entries of the program's client table.
    pub table_size: u32,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            rate: None,
            burst: 1,
            prefix_v4: 32,
            prefix_v6: 64,
            exempt: Vec::new(),
            table_size: steer_common::DEFAULT_CLIENT_TABLE_SIZE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_print() {
        let r: ConnRate = "50/s".parse().expect("50/s");
        assert_eq!(r.interval(), Duration::from_millis(20));
        assert_eq!(r.default_burst(), 50);
        assert_eq!(r.to_string(), "50/s");
        let m: ConnRate = "600/m".parse().expect("600/m");
        assert_eq!(m.interval(), Duration::from_millis(100));
        assert_eq!(m.default_burst(), 10);
        assert_eq!("1/h".parse::<ConnRate>().map(|r| r.default_burst()), Ok(1));
        for bad in ["50", "0/s", "50/d", "x/s", "/s"] {
            assert!(bad.parse::<ConnRate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes_parse_masked_and_mapped_as_ipv4() {
        let c: Cidr = "10.1.2.3/8".parse().expect("v4");
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert_eq!("127.0.0.9".parse::<Cidr>().map(|c| c.len), Ok(32));
        assert_eq!(
            "::ffff:10.1.0.0/112".parse::<Cidr>().map(|c| c.to_string()),
            Ok("10.1.0.0/16".into())
        );
        assert_eq!(
            "2001:db8::1/32".parse::<Cidr>().map(|c| c.to_string()),
            Ok("2001:db8::/32".into())
        );
        let (v6, len) = "10.0.0.0/8".parse::<Cidr>().expect("v4").as_v6();
        assert_eq!((v6.to_string().as_str(), len), ("::ffff:10.0.0.0", 104));
        for bad in ["10.0.0.0/33", "nope", "::/129", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(mask32(0), 0);
        assert_eq!(mask32(24), 0xffff_ff00);
        assert_eq!(mask128(128), u128::MAX);
    }
}
