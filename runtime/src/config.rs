//! Validated cluster configuration: defaults, then the TOML file, then flags.
//!
//! Every key in the file is named exactly like its long flag (`shutdown-timeout`, not
//! `shutdown_timeout`), so a flag and its key read the same in the docs and in errors.
//! Each value is parsed by one `FromStr` shared by both sources, so `--workers x` and
//! `workers = "x"` fail with the same words.

mod fields;
pub mod program;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// Why a configuration was refused. Every variant names the flag or key at fault.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    #[error("invalid value {value:?} for {key}: {reason}")]
    Invalid {
        /// The flag (`--workers`) or file key (`workers` in steer.toml) at fault.
        key: String,
        /// The value as given.
        value: String,
        /// What is allowed.
        reason: String,
    },
    /// The configuration file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file named by `--config`.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML for Steer (unknown key, wrong type, ...).
    #[error("config file {path}: {message}")]
    File {
        /// The file named by `--config`.
        path: PathBuf,
        /// The parser's message: it names the key, the line and what was expected.
        message: String,
    },
}

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

/// Smallest `--worker-memory-limit`: below this not even the demo worker maps its
/// executable and libraries.
pub const MIN_WORKER_MEMORY_LIMIT: u64 = 32 << 20;

/// The validated configuration a primary runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address every worker's socket binds.
    pub listen: SocketAddr,
    /// How many worker slots.
    pub workers: usize,
    /// Steering policy.
    pub balance: Balance,
    /// Where `/status` and `/metrics` are served, if anywhere.
    pub status: Option<SocketAddr>,
    /// Graceful drain limit before SIGKILL.
    pub shutdown_timeout: Duration,
    /// Heartbeat period.
    pub health_interval: Duration,
    /// A worker silent this long is hung.
    pub health_timeout: Duration,
    /// A worker that has not registered (or, external, started) within this is replaced.
    pub start_timeout: Duration,
    /// Crashes allowed per `restart_window` before the slot is `failed`.
    pub max_restarts: u32,
    /// The window `max_restarts` counts over.
    pub restart_window: Duration,
    /// Written with the primary's pid at start, removed at exit.
    pub pid_file: Option<PathBuf>,
    /// Log line format.
    pub log_format: LogFormat,
    /// -2 (errors only) ..= 2 (trace); 0 is info.
    pub verbosity: i8,
    /// Enable the demo's fault routes.
    pub demo_faults: bool,
    /// In `kernel` mode, set `net.ipv4.tcp_migrate_req=1` so a closing worker's queue
    /// migrates to the others instead of being reset.
    pub tcp_migrate_req: bool,
    /// Pin slot i's worker to CPU i mod (online CPUs). Implied by `--balance cpu`.
    pub cpu_affinity: bool,
    /// A worker whose resident set passes this many bytes is replaced gracefully.
    pub max_memory: Option<u64>,
    /// The user and group workers run as once their socket is registered.
    pub credentials: Option<Credentials>,
    /// `RLIMIT_NOFILE` of every worker.
    pub worker_nofile: Option<u64>,
    /// `RLIMIT_AS` of every worker, in bytes.
    pub worker_memory_limit: Option<u64>,
    /// External worker program and arguments; `None` runs the built-in demo.
    pub command: Option<Vec<String>>,
    /// The file this came from, for SIGHUP reloads.
    pub config_file: Option<PathBuf>,
    /// What the command line (or the library builder) set. A SIGHUP reload lays these
    /// over the re-read file again, so a flag keeps winning over the file.
    pub overrides: Settings,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            workers: WorkerCount::Auto.resolve(),
            balance: Balance::Auto,
            status: None,
            shutdown_timeout: Duration::from_secs(30),
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_secs(3),
            start_timeout: Duration::from_secs(10),
            max_restarts: 10,
            restart_window: Duration::from_secs(60),
            pid_file: None,
            log_format: LogFormat::Text,
            verbosity: 0,
            demo_faults: false,
            tcp_migrate_req: true,
            cpu_affinity: false,
            max_memory: None,
            credentials: None,
            worker_nofile: None,
            worker_memory_limit: None,
            command: None,
            config_file: None,
            overrides: Settings::default(),
        }
    }
}

impl Config {
    /// The effective configuration, defaults included, as TOML a file could hold (what
    /// `steer check` prints).
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let d = |v: Duration| format!("\"{}\"", humantime::format_duration(v));
        let q = |v: &dyn fmt::Display| format!("{:?}", v.to_string());
        let mut lines: Vec<(&str, String)> = vec![
            ("listen", q(&self.listen)),
            ("workers", self.workers.to_string()),
            ("balance", q(&self.balance)),
        ];
        if let Some(status) = self.status {
            lines.push(("status", q(&status)));
        }
        lines.extend([
            ("shutdown-timeout", d(self.shutdown_timeout)),
            ("health-interval", d(self.health_interval)),
            ("health-timeout", d(self.health_timeout)),
            ("start-timeout", d(self.start_timeout)),
            ("max-restarts", self.max_restarts.to_string()),
            ("restart-window", d(self.restart_window)),
        ]);
        if let Some(path) = &self.pid_file {
            lines.push(("pid-file", q(&path.display())));
        }
        let format = match self.log_format {
            LogFormat::Text => "\"text\"",
            LogFormat::Json => "\"json\"",
        };
        lines.extend([
            ("log-format", format.to_string()),
            ("demo-faults", self.demo_faults.to_string()),
            ("tcp-migrate-req", self.tcp_migrate_req.to_string()),
            ("cpu-affinity", self.cpu_affinity.to_string()),
        ]);
        if let Some(bytes) = self.max_memory {
            lines.push(("max-memory", format!("\"{}\"", format_size(bytes))));
        }
        if let Some(c) = &self.credentials {
            lines.push(("user", format!("{:?}  # uid {}", c.user, c.uid)));
            lines.push(("group", format!("{}  # gid", c.gid)));
        }
        if let Some(n) = self.worker_nofile {
            lines.push(("worker-nofile", n.to_string()));
        }
        if let Some(bytes) = self.worker_memory_limit {
            lines.push(("worker-memory-limit", format!("\"{}\"", format_size(bytes))));
        }
        if let Some(command) = &self.command {
            lines.push(("command", format!("{command:?}")));
        }
        let mut out = String::new();
        for (key, value) in lines {
            let _ = writeln!(out, "{key} = {value}");
        }
        out
    }
}

/// The keys whose change a SIGHUP cannot apply to the running primary, each named once.
/// (`workers` and `balance` apply live; see the primary's reload.)
pub fn keys_needing_restart(running: &Config, reloaded: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut changed = |key, differs: bool| {
        if differs {
            keys.push(key);
        }
    };
    changed("listen", running.listen != reloaded.listen);
    changed("workers", running.workers != reloaded.workers);
    changed("balance", running.balance != reloaded.balance);
    changed("status", running.status != reloaded.status);
    changed(
        "cpu-affinity",
        running.cpu_affinity != reloaded.cpu_affinity,
    );
    changed("pid-file", running.pid_file != reloaded.pid_file);
    changed("log-format", running.log_format != reloaded.log_format);
    changed(
        "tcp-migrate-req",
        running.tcp_migrate_req != reloaded.tcp_migrate_req,
    );
    keys
}

impl Config {
    /// Keeps the running values of the keys a reload cannot change
    /// ([`keys_needing_restart`]), and what never comes from the file. `balance` stays
    /// too: the primary switches it, and records it, only if the switch succeeds.
    pub fn keep_unreloadable(&mut self, running: &Config) {
        self.listen = running.listen;
        self.balance = running.balance;
        self.status = running.status;
        self.pid_file = running.pid_file.clone();
        self.log_format = running.log_format;
        self.tcp_migrate_req = running.tcp_migrate_req;
        self.verbosity = running.verbosity;
        self.config_file = running.config_file.clone();
        self.overrides = running.overrides.clone();
    }
}

/// The user and group a worker drops to (`--user`, `--group`), resolved to ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user as given (name or id), for messages.
    pub user: String,
    /// Its uid.
    pub uid: u32,
    /// The group's gid: `--group`, else the user's primary group.
    pub gid: u32,
}

impl Credentials {
    /// Looks up `user` (a name, or a numeric uid) and `group` (a name or gid; default the
    /// user's primary group) in the system's user database (`getpwnam`, `getgrnam`).
    pub fn resolve(user: &str, group: Option<&str>) -> Result<Credentials, (&'static str, String)> {
        use nix::unistd::{Gid, Group, Uid, User};
        let numeric = user.parse::<u32>().ok();
        let entry = match numeric {
            Some(uid) => User::from_uid(Uid::from_raw(uid)),
            None => User::from_name(user),
        }
        .map_err(|e| ("user", format!("cannot look up the user: {e}")))?;
        let uid = match (&entry, numeric) {
            (Some(entry), _) => entry.uid.as_raw(),
            (None, Some(uid)) => uid,
            (None, None) => {
                return Err((
                    "user",
                    "no such user on this system (see /etc/passwd, or give a numeric uid)".into(),
                ));
            }
        };
        let gid = match group {
            Some(group) => match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => Group::from_name(group)
                    .map_err(|e| ("group", format!("cannot look up the group: {e}")))?
                    .map(|g| g.gid.as_raw())
                    .ok_or((
                        "group",
                        "no such group on this system (see /etc/group, or give a numeric gid)"
                            .to_string(),
                    ))?,
            },
            None => entry.map(|e| Gid::as_raw(e.gid)).ok_or((
                "group",
                "the user has no entry in /etc/passwd: give --group as well".to_string(),
            ))?,
        };
        Ok(Credentials {
            user: user.to_owned(),
            uid,
            gid,
        })
    }
}

/// Where the file-given values of a [`Settings`] came from, so checks made after parsing
/// (one value against another) can still name the file and the line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Origin {
    /// The file, if the settings came from one.
    pub path: Option<PathBuf>,
    /// The line of each key in it.
    pub lines: BTreeMap<String, usize>,
}

/// A value as given (flag or file), before it is validated into a [`Config`].
///
/// Both the command line and the file fill one of these; [`Settings::overlay`] lets the
/// flags win, and [`Settings::into_config`] validates the result.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// `listen`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub listen: Option<Parsed<SocketAddr>>,
    /// `workers`: a number or "auto".
    #[serde(default, deserialize_with = "fields::workers")]
    pub workers: Option<WorkerCount>,
    /// `balance`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub balance: Option<Parsed<Balance>>,
    /// `status`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub status: Option<Parsed<StatusAddr>>,
    /// `shutdown-timeout`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub shutdown_timeout: Option<Parsed<Duration>>,
    /// `health-interval`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub health_interval: Option<Parsed<Duration>>,
    /// `health-timeout`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub health_timeout: Option<Parsed<Duration>>,
    /// `start-timeout`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub start_timeout: Option<Parsed<Duration>>,
    /// `max-restarts`
    #[serde(default, deserialize_with = "fields::max_restarts")]
    pub max_restarts: Option<u32>,
    /// `restart-window`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub restart_window: Option<Parsed<Duration>>,
    /// `pid-file`
    #[serde(default, deserialize_with = "fields::path")]
    pub pid_file: Option<PathBuf>,
    /// `log-format`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub log_format: Option<Parsed<LogFormat>>,
    /// `demo-faults`
    #[serde(default, deserialize_with = "fields::boolean")]
    pub demo_faults: Option<bool>,
    /// `tcp-migrate-req`
    #[serde(default, deserialize_with = "fields::boolean")]
    pub tcp_migrate_req: Option<bool>,
    /// `cpu-affinity`
    #[serde(default, deserialize_with = "fields::boolean")]
    pub cpu_affinity: Option<bool>,
    /// `max-memory`: a size such as "256MiB".
    #[serde(default, deserialize_with = "fields::from_str")]
    pub max_memory: Option<Parsed<ByteSize>>,
    /// `user`: a name or a numeric uid.
    #[serde(default, deserialize_with = "fields::account")]
    pub user: Option<String>,
    /// `group`: a name or a numeric gid.
    #[serde(default, deserialize_with = "fields::account")]
    pub group: Option<String>,
    /// `worker-nofile`: a number of file descriptors.
    #[serde(default, deserialize_with = "fields::worker_nofile")]
    pub worker_nofile: Option<u64>,
    /// `worker-memory-limit`: a size such as "1GiB".
    #[serde(default, deserialize_with = "fields::from_str")]
    pub worker_memory_limit: Option<Parsed<ByteSize>>,
    /// `command`: argv of an external worker program.
    #[serde(default, deserialize_with = "fields::command")]
    pub command: Option<Vec<String>>,
    /// Where the file-given values came from (not a key).
    #[serde(skip)]
    pub origin: Origin,
}

/// A value parsed by its `FromStr` (newtype so serde can reuse the flag parsers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Parsed<T>(pub T);

/// Parsers for the string-valued settings, shared by clap and serde.
pub trait SettingValue: Sized {
    /// What is allowed, for the message about a value of the wrong type.
    const EXPECTED: &'static str;
    /// Parses the text form; the error says what is allowed.
    fn parse_setting(s: &str) -> Result<Self, String>;
}

impl SettingValue for SocketAddr {
    const EXPECTED: &'static str = "an address string such as \"127.0.0.1:8000\"";
    fn parse_setting(s: &str) -> Result<Self, String> {
        parse_listen(s)
    }
}
impl SettingValue for StatusAddr {
    const EXPECTED: &'static str =
        "an address string such as \"127.0.0.1:8001\", or a port number string (\"8001\")";
    fn parse_setting(s: &str) -> Result<Self, String> {
        s.parse()
    }
}
impl SettingValue for Duration {
    const EXPECTED: &'static str = "a duration string such as \"30s\" or \"500ms\"";
    fn parse_setting(s: &str) -> Result<Self, String> {
        parse_duration(s)
    }
}
impl SettingValue for Balance {
    const EXPECTED: &'static str =
        "a policy string: auto, kernel, round-robin, hash, least-loaded, cpu, shared or userspace";
    fn parse_setting(s: &str) -> Result<Self, String> {
        s.parse()
    }
}
impl SettingValue for ByteSize {
    const EXPECTED: &'static str = "a size string such as \"256MiB\" or \"1GiB\"";
    fn parse_setting(s: &str) -> Result<Self, String> {
        s.parse()
    }
}
impl SettingValue for LogFormat {
    const EXPECTED: &'static str = "\"text\" or \"json\"";
    fn parse_setting(s: &str) -> Result<Self, String> {
        s.parse()
    }
}

impl Settings {
    /// Every key a file may hold, as written in it (the long flag names).
    pub const KEYS: &'static [&'static str] = &[
        "listen",
        "workers",
        "balance",
        "status",
        "shutdown-timeout",
        "health-interval",
        "health-timeout",
        "start-timeout",
        "max-restarts",
        "restart-window",
        "pid-file",
        "log-format",
        "demo-faults",
        "tcp-migrate-req",
        "cpu-affinity",
        "max-memory",
        "user",
        "group",
        "worker-nofile",
        "worker-memory-limit",
        "command",
    ];

    /// Reads and parses a TOML file. Unknown keys and bad values are errors that name the
    /// key and the line.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut settings = Settings::from_toml(&text).map_err(|message| ConfigError::File {
            path: path.to_owned(),
            message,
        })?;
        settings.origin.path = Some(path.to_owned());
        Ok(settings)
    }

    /// Parses TOML text. The error names the key and its line:
    /// ``key `workers` at line 2: invalid value "0": expected a number from 1 to 1024, or auto``.
    pub fn from_toml(text: &str) -> Result<Settings, String> {
        let lines = fields::key_lines(text);
        let mut settings: Settings =
            toml::from_str(text).map_err(|e| fields::describe_error(text, &lines, &e))?;
        settings.origin.lines = lines;
        Ok(settings)
    }

    /// Whether `key` (as in [`Settings::KEYS`]) has a value here.
    fn has(&self, key: &str) -> bool {
        match key {
            "listen" => self.listen.is_some(),
            "workers" => self.workers.is_some(),
            "balance" => self.balance.is_some(),
            "status" => self.status.is_some(),
            "shutdown-timeout" => self.shutdown_timeout.is_some(),
            "health-interval" => self.health_interval.is_some(),
            "health-timeout" => self.health_timeout.is_some(),
            "start-timeout" => self.start_timeout.is_some(),
            "max-restarts" => self.max_restarts.is_some(),
            "restart-window" => self.restart_window.is_some(),
            "pid-file" => self.pid_file.is_some(),
            "log-format" => self.log_format.is_some(),
            "demo-faults" => self.demo_faults.is_some(),
            "tcp-migrate-req" => self.tcp_migrate_req.is_some(),
            "cpu-affinity" => self.cpu_affinity.is_some(),
            "max-memory" => self.max_memory.is_some(),
            "user" => self.user.is_some(),
            "group" => self.group.is_some(),
            "worker-nofile" => self.worker_nofile.is_some(),
            "worker-memory-limit" => self.worker_memory_limit.is_some(),
            "command" => self.command.is_some(),
            _ => false,
        }
    }

    /// Fills every value `self` lacks from `base` (flags overlay the file). The result
    /// remembers the file's lines for the keys that still come from it.
    pub fn overlay(self, base: Settings) -> Settings {
        let mut origin = base.origin.clone();
        origin.lines.retain(|key, _| !self.has(key));
        Settings {
            listen: self.listen.or(base.listen),
            workers: self.workers.or(base.workers),
            balance: self.balance.or(base.balance),
            status: self.status.or(base.status),
            shutdown_timeout: self.shutdown_timeout.or(base.shutdown_timeout),
            health_interval: self.health_interval.or(base.health_interval),
            health_timeout: self.health_timeout.or(base.health_timeout),
            start_timeout: self.start_timeout.or(base.start_timeout),
            max_restarts: self.max_restarts.or(base.max_restarts),
            restart_window: self.restart_window.or(base.restart_window),
            pid_file: self.pid_file.or(base.pid_file),
            log_format: self.log_format.or(base.log_format),
            demo_faults: self.demo_faults.or(base.demo_faults),
            tcp_migrate_req: self.tcp_migrate_req.or(base.tcp_migrate_req),
            cpu_affinity: self.cpu_affinity.or(base.cpu_affinity),
            max_memory: self.max_memory.or(base.max_memory),
            user: self.user.or(base.user),
            group: self.group.or(base.group),
            worker_nofile: self.worker_nofile.or(base.worker_nofile),
            worker_memory_limit: self.worker_memory_limit.or(base.worker_memory_limit),
            command: self.command.or(base.command),
            origin,
        }
    }

    /// The error for a value that parsed but does not fit: it names the file and line
    /// when the value came from the file, else the flag.
    fn invalid(
        &self,
        key: &str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> ConfigError {
        let (value, reason) = (value.into(), reason.into());
        match (&self.origin.path, self.origin.lines.get(key)) {
            (Some(path), Some(line)) => ConfigError::File {
                path: path.clone(),
                message: format!(
                    "invalid value {value:?} for key `{key}` at line {line}: {reason}"
                ),
            },
            (None, Some(line)) => ConfigError::Invalid {
                key: format!("`{key}` (line {line})"),
                value,
                reason,
            },
            (_, None) => ConfigError::Invalid {
                key: format!("--{key}"),
                value,
                reason,
            },
        }
    }

    /// Applies defaults and cross-field checks.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let d = Config::default();
        let positive = |key: &str, value: Option<Parsed<Duration>>| match value {
            Some(Parsed(v)) if v.is_zero() => {
                Err(self.invalid(key, "0s", "must be more than zero"))
            }
            _ => Ok(()),
        };
        positive("health-interval", self.health_interval)?;
        positive("health-timeout", self.health_timeout)?;
        positive("start-timeout", self.start_timeout)?;
        positive("restart-window", self.restart_window)?;
        let health_interval = self.health_interval.map_or(d.health_interval, |p| p.0);
        let health_timeout = self.health_timeout.map_or(d.health_timeout, |p| p.0);
        self.check_health_timings(health_interval, health_timeout)?;
        let workers = self.workers.unwrap_or_default().resolve();
        let max = steer_common::MAX_SLOTS as usize;
        if !(1..=max).contains(&workers) {
            return Err(self.invalid(
                "workers",
                workers.to_string(),
                format!("expected a number from 1 to {max}, or auto"),
            ));
        }
        if let Some(Parsed(ByteSize(limit))) = self.worker_memory_limit
            && limit < MIN_WORKER_MEMORY_LIMIT
        {
            return Err(self.invalid(
                "worker-memory-limit",
                format_size(limit),
                format!(
                    "must be at least {}MiB: a worker cannot start in less",
                    MIN_WORKER_MEMORY_LIMIT >> 20
                ),
            ));
        }
        if let Some(n) = self.worker_nofile
            && !WORKER_NOFILE_RANGE.contains(&n)
        {
            return Err(self.invalid(
                "worker-nofile",
                n.to_string(),
                format!(
                    "expected a whole number from {} to {}",
                    WORKER_NOFILE_RANGE.start(),
                    WORKER_NOFILE_RANGE.end()
                ),
            ));
        }
        let credentials = match (&self.user, &self.group) {
            (None, None) => None,
            (None, Some(group)) => {
                return Err(self.invalid(
                    "group",
                    group.clone(),
                    "needs `user` as well: workers drop to a user and its group together",
                ));
            }
            (Some(user), group) => Some(Credentials::resolve(user, group.as_deref()).map_err(
                |(key, reason)| {
                    let value = if key == "user" {
                        user
                    } else {
                        group.as_deref().unwrap_or(user)
                    };
                    self.invalid(key, value.to_owned(), reason)
                },
            )?),
        };
        let config = Config {
            listen: self.listen.map_or(d.listen, |p| p.0),
            workers,
            balance: self.balance.map_or(d.balance, |p| p.0),
            status: self.status.map(|p| p.0.0),
            shutdown_timeout: self.shutdown_timeout.map_or(d.shutdown_timeout, |p| p.0),
            health_interval,
            health_timeout,
            start_timeout: self.start_timeout.map_or(d.start_timeout, |p| p.0),
            max_restarts: self.max_restarts.unwrap_or(d.max_restarts),
            restart_window: self.restart_window.map_or(d.restart_window, |p| p.0),
            pid_file: self.pid_file.clone(),
            log_format: self.log_format.map_or(d.log_format, |p| p.0),
            verbosity: 0,
            demo_faults: self.demo_faults.unwrap_or(false),
            tcp_migrate_req: self.tcp_migrate_req.unwrap_or(d.tcp_migrate_req),
            cpu_affinity: self.cpu_affinity.unwrap_or(false)
                || self.balance.is_some_and(|b| b.0 == Balance::Cpu),
            max_memory: self.max_memory.map(|p| p.0.0),
            credentials,
            worker_nofile: self.worker_nofile,
            worker_memory_limit: self.worker_memory_limit.map(|p| p.0.0),
            command: self.command.clone().filter(|c| !c.is_empty()),
            config_file: None,
            overrides: Settings::default(),
        };
        self.check_addresses(&config)?;
        self.check_environment(&config)?;
        Ok(config)
    }

    /// Heartbeat timings that can work: an interval the loop can keep, and a timeout that
    /// gives a worker at least two pings to answer.
    fn check_health_timings(
        &self,
        interval: Duration,
        timeout: Duration,
    ) -> Result<(), ConfigError> {
        let shown = |d: Duration| humantime::format_duration(d).to_string();
        if interval < MIN_HEALTH_INTERVAL {
            return Err(self.invalid(
                "health-interval",
                shown(interval),
                format!(
                    "must be at least {}: the primary pings every worker this often",
                    shown(MIN_HEALTH_INTERVAL)
                ),
            ));
        }
        if timeout < interval * 2 {
            let key = if self.health_timeout.is_some() {
                "health-timeout"
            } else {
                "health-interval"
            };
            let value = if key == "health-timeout" {
                timeout
            } else {
                interval
            };
            return Err(self.invalid(
                key,
                shown(value),
                format!(
                    "health-timeout ({}) must be at least twice health-interval ({}): a worker must get two pings to answer before it is judged",
                    shown(timeout),
                    shown(interval)
                ),
            ));
        }
        if timeout < MIN_HEALTH_TIMEOUT {
            return Err(self.invalid(
                "health-timeout",
                shown(timeout),
                format!(
                    "must be at least {}: shorter, ordinary scheduling delays on a busy host read as hangs",
                    shown(MIN_HEALTH_TIMEOUT)
                ),
            ));
        }
        Ok(())
    }

    /// The status listener cannot share the workers' address: the workers would bind
    /// (and crash-loop) against Steer's own status socket.
    fn check_addresses(&self, config: &Config) -> Result<(), ConfigError> {
        let Some(status) = config.status else {
            return Ok(());
        };
        let listen = config.listen;
        let overlaps = status.port() == listen.port()
            && listen.port() != 0
            && (status.ip() == listen.ip()
                || status.ip().is_unspecified()
                || listen.ip().is_unspecified());
        if overlaps {
            return Err(self.invalid(
                "status",
                status.to_string(),
                format!(
                    "the status listener cannot share the workers' address (listen = {listen}); choose another port"
                ),
            ));
        }
        Ok(())
    }

    /// What must hold on this machine: the worker program exists and may be executed
    /// (by `user`, if set), and the pid file's directory exists.
    fn check_environment(&self, config: &Config) -> Result<(), ConfigError> {
        if let Some(command) = &config.command
            && let Some(program) = command.first()
        {
            let credentials = config.credentials.as_ref().map(|c| (c.uid, c.gid));
            if let Err(reason) = program::check(std::ffi::OsStr::new(program), credentials) {
                return Err(if self.origin.lines.contains_key("command") {
                    self.invalid("command", program.clone(), reason)
                } else {
                    ConfigError::Invalid {
                        key: "COMMAND (after --)".into(),
                        value: program.clone(),
                        reason,
                    }
                });
            }
        }
        if let Some(path) = &config.pid_file {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(self.invalid(
                    "pid-file",
                    path.display().to_string(),
                    format!("its directory {} does not exist", parent.display()),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_match_flag_names_and_flags_win() {
        let file = Settings::from_toml(
            "listen = \"127.0.0.1:9000\"\nworkers = 3\nshutdown-timeout = \"5s\"\nbalance = \"kernel\"\n",
        )
        .expect("valid file");
        let flags = Settings {
            workers: Some(WorkerCount::Fixed(7)),
            ..Settings::default()
        };
        let config = flags.overlay(file).into_config().expect("valid");
        assert_eq!(config.workers, 7, "flag overrides file");
        assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 9000)));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(config.balance, Balance::Kernel);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Settings::from_toml("workers = 2\nwrokers = 3\n").expect_err("unknown key");
        assert!(err.contains("wrokers"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn bad_values_name_the_value_and_what_is_allowed() {
        for (text, needle) in [
            ("workers = 0", "invalid value 0"),
            ("workers = \"x\"", "\"x\""),
            ("balance = \"foo\"", "round-robin"),
            ("listen = \"nope\"", "\"nope\""),
            ("shutdown-timeout = \"soon\"", "\"soon\""),
            ("max-restarts = -1", "max-restarts"),
        ] {
            let err = Settings::from_toml(text).expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn value_parsers() {
        assert_eq!("auto".parse::<WorkerCount>(), Ok(WorkerCount::Auto));
        assert_eq!("4".parse::<WorkerCount>(), Ok(WorkerCount::Fixed(4)));
        assert!("0".parse::<WorkerCount>().is_err());
        assert!("100000".parse::<WorkerCount>().is_err());
        assert_eq!(
            parse_listen("[::1]:80"),
            Ok(SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 80)))
        );
        assert!(parse_listen("localhost:8000").is_ok());
        assert!(parse_listen("nope").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for name in Balance::NAMES {
            assert_eq!(name.parse::<Balance>().map(Balance::name), Ok(*name));
        }
    }

    #[test]
    fn sizes_use_binary_units_for_short_and_iec_suffixes() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        assert_eq!(parse_size("2KB"), Ok(2_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 3 G "), Ok(3 << 30));
        assert!(
            parse_size("0MiB")
                .expect_err("refused")
                .contains("more than zero")
        );
        assert!(
            parse_size("12parsecs")
                .expect_err("refused")
                .contains("unknown unit")
        );
        assert!(parse_size("MiB").is_err());
        assert!(
            parse_size("99999999999T")
                .expect_err("refused")
                .contains("too large")
        );
        let s = Settings::from_toml("max-memory = \"64MiB\"").expect("parses");
        assert_eq!(s.into_config().expect("valid").max_memory, Some(64 << 20));
        let e = Settings::from_toml("\nmax-memory = \"lots\"").expect_err("refused");
        assert!(e.contains("max-memory") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn keys_are_exactly_the_fields_the_file_accepts() {
        let err = Settings::from_toml("nope = 1").expect_err("unknown key");
        let listed: Vec<&str> = err
            .split("expected one of ")
            .nth(1)
            .expect("serde lists the fields")
            .split(", ")
            .map(|k| k.trim_matches('`'))
            .collect();
        assert_eq!(listed, Settings::KEYS);
        for key in Settings::KEYS {
            assert!(!Settings::default().has(key), "{key}");
        }
    }

    #[test]
    fn wrong_types_name_the_key_the_line_and_what_is_allowed() {
        for (text, needles) in [
            (
                "\nworkers = true",
                &["key `workers` at line 2", "from 1 to"][..],
            ),
            (
                "max-restarts = \"x\"",
                &["`max-restarts` at line 1", "whole number from 0"],
            ),
            (
                "demo-faults = \"yes\"",
                &["`demo-faults`", "expected true or false"],
            ),
            (
                "listen = 5",
                &["`listen`", "the integer 5", "127.0.0.1:8000"],
            ),
            ("shutdown-timeout = 30", &["`shutdown-timeout`", "30s"]),
            ("command = \"app\"", &["`command`", "array of strings"]),
            (
                "worker-nofile = 3",
                &["`worker-nofile`", "from 16 to 1048576"],
            ),
            (
                "worker-memory-limit = 5",
                &["`worker-memory-limit`", "256MiB"],
            ),
            ("user = true", &["`user`", "numeric id"]),
            ("balance = \"fast\"", &["`balance`", "least-loaded"]),
            ("status = \"x\"", &["`status`", "port number"]),
        ] {
            let err = Settings::from_toml(text).expect_err(text);
            for needle in needles {
                assert!(err.contains(needle), "{text:?}: {err}");
            }
        }
    }

    #[test]
    fn checks_across_keys_name_the_file_and_line() {
        let dir = std::env::temp_dir().join(format!("steer-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("steer.toml");
        std::fs::write(&path, "workers = 2\nhealth-interval = \"5s\"\n").expect("write");
        let err = Settings::from_file(&path)
            .expect("parses")
            .into_config()
            .expect_err("refused")
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("`health-interval` at line 2"), "{err}");
        assert!(
            err.contains("must be at least twice health-interval (5s)"),
            "{err}"
        );
        // The same value given as a flag is named as the flag.
        let flags = Settings {
            health_interval: Some(Parsed(Duration::from_secs(5))),
            ..Settings::default()
        };
        let file = Settings::from_file(&path).expect("parses");
        let err = flags
            .overlay(file)
            .into_config()
            .expect_err("refused")
            .to_string();
        assert!(err.contains("--health-interval"), "{err}");
        std::fs::write(&path, "user = \"nobody\"\ngroup = \"no-such-group-x\"\n").expect("write");
        let err = Settings::from_file(&path)
            .expect("parses")
            .into_config()
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("`group` at line 2") && err.contains("no-such-group-x"),
            "{err}"
        );
        std::fs::write(&path, "\n\nworker-memory-limit = \"1MiB\"\n").expect("write");
        let err = Settings::from_file(&path)
            .expect("parses")
            .into_config()
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("\"1MiB\" for key `worker-memory-limit` at line 3"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn flags_kept_as_overrides_win_over_a_reloaded_file() {
        let flags = Settings {
            shutdown_timeout: Some(Parsed(Duration::from_secs(1))),
            ..Settings::default()
        };
        let first =
            Settings::from_toml("shutdown-timeout = \"30s\"\nmax-restarts = 3").expect("ok");
        let edited =
            Settings::from_toml("shutdown-timeout = \"40s\"\nmax-restarts = 5").expect("ok");
        for (file, restarts) in [(first, 3), (edited, 5)] {
            let config = flags.clone().overlay(file).into_config().expect("valid");
            assert_eq!(
                config.shutdown_timeout,
                Duration::from_secs(1),
                "the flag wins"
            );
            assert_eq!(config.max_restarts, restarts, "the file is re-read");
        }
    }

    #[test]
    fn users_groups_and_limits_resolve() {
        let s = Settings::from_toml(
            "user = \"nobody\"\ngroup = \"nogroup\"\nworker-nofile = 1024\nworker-memory-limit = \"1GiB\"",
        )
        .expect("parses");
        let config = s.into_config().expect("nobody and nogroup exist");
        let c = config.credentials.clone().expect("credentials");
        assert_eq!((c.uid, c.gid), (65534, 65534));
        assert_eq!(config.worker_nofile, Some(1024));
        assert_eq!(config.worker_memory_limit, Some(1 << 30));
        let summary = config.summary();
        assert!(
            summary.contains("worker-memory-limit = \"1GiB\""),
            "{summary}"
        );
        let numeric = Settings::from_toml("user = 4242\ngroup = 4343").expect("parses");
        let c = numeric
            .into_config()
            .expect("ids need no entry")
            .credentials;
        assert_eq!(c.map(|c| (c.uid, c.gid)), Some((4242, 4343)));
        let no_group = Settings::from_toml("user = 4242").expect("parses");
        let err = no_group
            .into_config()
            .expect_err("no primary group")
            .to_string();
        assert!(err.contains("group"), "{err}");
    }

    #[test]
    fn a_bare_status_port_is_loopback() {
        assert_eq!(
            parse_status_addr("8001"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 8001)))
        );
        assert_eq!(
            parse_status_addr("0.0.0.0:8001"),
            Ok(SocketAddr::from(([0, 0, 0, 0], 8001)))
        );
        assert!(parse_status_addr("nope").is_err());
        assert_eq!(format_size(256 << 20), "256MiB");
        assert_eq!(format_size(1000), "1000");
    }

    #[test]
    fn health_timeout_shorter_than_interval_is_refused() {
        let s = Settings::from_toml("health-interval = \"2s\"\nhealth-timeout = \"1s\"")
            .expect("parses");
        let err = s.into_config().expect_err("refused").to_string();
        assert!(err.contains("health-timeout"), "{err}");
    }
}
