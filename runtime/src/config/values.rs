//! The value types behind the flags and keys, each with the one `FromStr` that both the
//! command line and the file use: policies, counts, addresses, sizes, durations.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::time::Duration;

/// How new connections are spread over the workers (`--balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// `round-robin` when the eBPF program loads, else `kernel` with a warning.
    #[default]
    Auto,
    /// Plain `SO_REUSEPORT`: the kernel hashes the 4-tuple over the listening sockets.
    Kernel,
    /// eBPF: strict rotation over live slots.
    RoundRobin,
    /// eBPF: consistent hash of the client IP.
    Hash,
    /// eBPF: power of two choices on the load workers publish.
    LeastLoaded,
    /// eBPF: the worker pinned to the CPU that handled the SYN.
    Cpu,
    /// Baseline: one socket shared by all workers.
    Shared,
    /// Baseline: the primary accepts and hands connections out.
    Userspace,
}

impl Balance {
    /// Every accepted spelling, for error messages and `--help`.
    pub const NAMES: &'static [&'static str] = &[
        "auto",
        "kernel",
        "round-robin",
        "hash",
        "least-loaded",
        "cpu",
        "shared",
        "userspace",
    ];

    /// Whether Steer's eBPF program runs this policy.
    pub fn is_ebpf(self) -> bool {
        matches!(
            self,
            Balance::RoundRobin | Balance::Hash | Balance::LeastLoaded | Balance::Cpu
        )
    }

    /// The name as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Balance::Auto => "auto",
            Balance::Kernel => "kernel",
            Balance::RoundRobin => "round-robin",
            Balance::Hash => "hash",
            Balance::LeastLoaded => "least-loaded",
            Balance::Cpu => "cpu",
            Balance::Shared => "shared",
            Balance::Userspace => "userspace",
        }
    }
}

impl FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let all = [
            Balance::Auto,
            Balance::Kernel,
            Balance::RoundRobin,
            Balance::Hash,
            Balance::LeastLoaded,
            Balance::Cpu,
            Balance::Shared,
            Balance::Userspace,
        ];
        all.into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("expected one of {}", Balance::NAMES.join(", ")))
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `--workers N|auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerCount {
    /// One worker per available CPU (`std::thread::available_parallelism`).
    #[default]
    Auto,
    /// Exactly this many, `1..=MAX_SLOTS`.
    Fixed(usize),
}

impl WorkerCount {
    /// The count this resolves to on this machine.
    pub fn resolve(self) -> usize {
        match self {
            WorkerCount::Auto => std::thread::available_parallelism().map_or(1, usize::from),
            WorkerCount::Fixed(n) => n,
        }
    }
}

impl FromStr for WorkerCount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let max = steer_common::MAX_SLOTS as usize;
        if s == "auto" {
            return Ok(WorkerCount::Auto);
        }
        match s.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(WorkerCount::Fixed(n)),
            _ => Err(format!("expected a number from 1 to {max}, or auto")),
        }
    }
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected text or json".into()),
        }
    }
}

/// `--worker-output`: where the lines workers write to stdout and stderr go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerOutput {
    /// `journal` when the primary's stderr is the journal (`JOURNAL_STREAM` names it),
    /// `tagged` otherwise.
    #[default]
    Auto,
    /// Each line on the primary's stderr, tagged with the worker's slot and pid (one JSON
    /// object with `--log-format json`).
    Tagged,
    /// Each line to systemd-journald's native socket, with `STEER_SLOT`, `STEER_PID` and
    /// `STEER_GENERATION` fields.
    Journal,
    /// Workers write straight into the primary's stdout and stderr, untagged.
    Inherit,
}

impl WorkerOutput {
    /// The name as written in a flag or the file.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerOutput::Auto => "auto",
            WorkerOutput::Tagged => "tagged",
            WorkerOutput::Journal => "journal",
            WorkerOutput::Inherit => "inherit",
        }
    }
}

impl FromStr for WorkerOutput {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(WorkerOutput::Auto),
            "tagged" => Ok(WorkerOutput::Tagged),
            "journal" => Ok(WorkerOutput::Journal),
            "inherit" => Ok(WorkerOutput::Inherit),
            _ => Err("expected auto, tagged, journal or inherit".into()),
        }
    }
}

/// A TCP listen address: `IP:PORT` or `HOST:PORT` (resolved once, first address wins).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let hint = "expected IP:PORT or HOST:PORT, e.g. 127.0.0.1:8000 or [::]:8000";
    if !s.contains(':') {
        return Err(hint.into());
    }
    match s.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{s} resolves to no address")),
        Err(_) => Err(hint.into()),
    }
}

/// The status listener's address (`--status`): `IP:PORT`, `HOST:PORT`, or a bare `PORT`,
/// which means that port on 127.0.0.1. The listener answers only reads, but `/status`
/// names pids and the binary's layout, so loopback is what a bare port gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusAddr(pub SocketAddr);

impl FromStr for StatusAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_status_addr(s).map(StatusAddr)
    }
}

/// Parses a [`StatusAddr`]: a bare port is a port on 127.0.0.1.
pub fn parse_status_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.trim().parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    parse_listen(s).map_err(|_| {
        "expected IP:PORT, HOST:PORT or a port number (on 127.0.0.1), e.g. 127.0.0.1:8001 or 8001"
            .into()
    })
}

/// A path the status listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusPath {
    /// `/status`: the JSON document (pids, restarts, memory).
    Status,
    /// `/metrics`: Prometheus text (the same counters).
    Metrics,
    /// `/ready`: 200 or 503, and a count of ready workers.
    Ready,
    /// `/live`: 200 while the primary's loop publishes status documents, else 503.
    Live,
}

impl StatusPath {
    /// Every path, in the order they are listed.
    pub const ALL: [StatusPath; 4] = [
        StatusPath::Status,
        StatusPath::Metrics,
        StatusPath::Ready,
        StatusPath::Live,
    ];

    /// The path as requested.
    pub fn as_str(self) -> &'static str {
        match self {
            StatusPath::Status => "/status",
            StatusPath::Metrics => "/metrics",
            StatusPath::Ready => "/ready",
            StatusPath::Live => "/live",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// The status paths served to clients that are not on loopback (`status-public`); a
/// loopback client (`steer status`, `kubectl exec`) is served every path. By default every
/// path is public, as a `status` address other hosts can reach says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusPaths(u8);

impl Default for StatusPaths {
    fn default() -> StatusPaths {
        StatusPaths::ALL
    }
}

impl StatusPaths {
    /// Every path.
    pub const ALL: StatusPaths = StatusPaths(0b1111);

    /// Whether `path` is in the set.
    pub fn contains(self, path: StatusPath) -> bool {
        self.0 & path.bit() != 0
    }

    /// The paths in the set, in [`StatusPath::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = StatusPath> {
        StatusPath::ALL
            .into_iter()
            .filter(move |p| self.contains(*p))
    }
}

impl FromStr for StatusPaths {
    type Err = String;
    /// A comma-separated list such as `/ready,/live,/metrics`; an empty string is no path.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut set = 0;
        for item in s.split(',').map(str::trim).filter(|item| !item.is_empty()) {
            let path = StatusPath::ALL
                .into_iter()
                .find(|p| p.as_str() == item)
                .ok_or_else(|| {
                    format!(
                        "unknown path {item:?}: expected some of /status, /metrics, /ready, /live"
                    )
                })?;
            set |= path.bit();
        }
        Ok(StatusPaths(set))
    }
}

impl fmt::Display for StatusPaths {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let paths: Vec<&str> = self.iter().map(StatusPath::as_str).collect();
        f.write_str(&paths.join(","))
    }
}

/// A byte size such as `256MiB`, `1GiB`, `64M` or `1048576`.
///
/// `KiB`/`MiB`/`GiB`/`TiB` and the short `K`/`M`/`G`/`T` are powers of 1024 (as in
/// systemd's `MemoryMax=`); `KB`/`MB`/`GB`/`TB` are powers of 1000. Case is ignored, so
/// `256mib` reads as `256MiB`. The result must be more than zero and fit in 64 bits.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let hint = "expected a size such as 256MiB, 1GiB or 64M";
    let text = s.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().map_err(|_| hint.to_string())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(format!("unknown unit {unit:?}; {hint}")),
    };
    let bytes = number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("too large; {hint}"))?;
    if bytes == 0 {
        return Err("must be more than zero".into());
    }
    Ok(bytes)
}

/// Writes `bytes` in the largest binary unit that divides it: `1GiB`, `256MiB`, `1000`.
pub fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// A size in bytes, parsed by [`parse_size`] (`--max-memory 256MiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_size(s).map(ByteSize)
    }
}

/// A duration such as `30s`, `500ms`, `2m` (humantime syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{e}; expected a duration such as 30s or 500ms"))
}

/// Allowed values of `--worker-nofile`: enough fds for a worker to start, and at most the
/// kernel's default `fs.nr_open`.
pub const WORKER_NOFILE_RANGE: std::ops::RangeInclusive<u64> = 16..=1_048_576;

/// Shortest `health-interval`: the primary pings every worker this often.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(10);

/// Shortest `health-timeout`: below it, ordinary scheduling delays read as hangs.
pub const MIN_HEALTH_TIMEOUT: Duration = Duration::from_millis(100);

/// Smallest `--max-memory`: the demo worker alone is 4 MiB resident, so a threshold below
/// this replaces every worker as soon as it starts, forever.
pub const MIN_MAX_MEMORY: u64 = 8 << 20;

/// Smallest `--worker-memory-limit`: below this not even the demo worker maps its
/// executable and libraries.
pub const MIN_WORKER_MEMORY_LIMIT: u64 = 32 << 20;
