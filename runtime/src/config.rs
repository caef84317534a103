//! Validated cluster configuration: defaults, then the TOML file, then flags.
//!
//! Every key in the file is named exactly like its long flag (`shutdown-timeout`, not
//! `shutdown_timeout`), so a flag and its key read the same in the docs and in errors.
//! Each value is parsed by one `FromStr` shared by both sources, so `--workers x` and
//! `workers = "x"` fail with the same words.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
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
    /// External worker program and arguments; `None` runs the built-in demo.
    pub command: Option<Vec<String>>,
    /// The file this came from, for SIGHUP reloads.
    pub config_file: Option<PathBuf>,
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
            command: None,
            config_file: None,
        }
    }
}

/// A value as given (flag or file), before it is validated into a [`Config`].
///
/// Both the command line and the file fill one of these; [`Settings::overlay`] lets the
/// flags win, and [`Settings::into_config`] validates the result.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// `listen`
    #[serde(default, deserialize_with = "from_str_field")]
    pub listen: Option<Parsed<SocketAddr>>,
    /// `workers`: a number or "auto".
    #[serde(default, deserialize_with = "workers_field")]
    pub workers: Option<WorkerCount>,
    /// `balance`
    #[serde(default, deserialize_with = "from_str_field")]
    pub balance: Option<Parsed<Balance>>,
    /// `status`
    #[serde(default, deserialize_with = "from_str_field")]
    pub status: Option<Parsed<SocketAddr>>,
    /// `shutdown-timeout`
    #[serde(default, deserialize_with = "from_str_field")]
    pub shutdown_timeout: Option<Parsed<Duration>>,
    /// `health-interval`
    #[serde(default, deserialize_with = "from_str_field")]
    pub health_interval: Option<Parsed<Duration>>,
    /// `health-timeout`
    #[serde(default, deserialize_with = "from_str_field")]
    pub health_timeout: Option<Parsed<Duration>>,
    /// `start-timeout`
    #[serde(default, deserialize_with = "from_str_field")]
    pub start_timeout: Option<Parsed<Duration>>,
    /// `max-restarts`
    pub max_restarts: Option<u32>,
    /// `restart-window`
    #[serde(default, deserialize_with = "from_str_field")]
    pub restart_window: Option<Parsed<Duration>>,
    /// `pid-file`
    pub pid_file: Option<PathBuf>,
    /// `log-format`
    #[serde(default, deserialize_with = "from_str_field")]
    pub log_format: Option<Parsed<LogFormat>>,
    /// `demo-faults`
    pub demo_faults: Option<bool>,
    /// `tcp-migrate-req`
    pub tcp_migrate_req: Option<bool>,
    /// `cpu-affinity`
    pub cpu_affinity: Option<bool>,
    /// `max-memory`: a size such as "256MiB".
    #[serde(default, deserialize_with = "from_str_field")]
    pub max_memory: Option<Parsed<ByteSize>>,
    /// `command`: argv of an external worker program.
    pub command: Option<Vec<String>>,
}

/// A value parsed by its `FromStr` (newtype so serde can reuse the flag parsers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Parsed<T>(pub T);

/// Parsers for the string-valued settings, shared by clap and serde.
pub trait SettingValue: Sized {
    /// Parses the text form; the error says what is allowed.
    fn parse_setting(s: &str) -> Result<Self, String>;
}

impl SettingValue for SocketAddr {
    fn parse_setting(s: &str) -> Result<Self, String> {
        parse_listen(s)
    }
}
impl SettingValue for Duration {
    fn parse_setting(s: &str) -> Result<Self, String> {
        parse_duration(s)
    }
}
impl SettingValue for Balance {
    fn parse_setting(s: &str) -> Result<Self, String> {
        s.parse()
    }
}
impl SettingValue for ByteSize {
    fn parse_setting(s: &str) -> Result<Self, String> {
        s.parse()
    }
}
impl SettingValue for LogFormat {
    fn parse_setting(s: &str) -> Result<Self, String> {
        s.parse()
    }
}

fn from_str_field<'de, D, T>(d: D) -> Result<Option<Parsed<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: SettingValue,
{
    let text = String::deserialize(d)?;
    T::parse_setting(&text)
        .map(|v| Some(Parsed(v)))
        .map_err(|reason| serde::de::Error::custom(format!("invalid value {text:?}: {reason}")))
}

fn workers_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<WorkerCount>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(i64),
        Text(String),
    }
    let text = match Raw::deserialize(d)? {
        Raw::Number(n) => n.to_string(),
        Raw::Text(s) => s,
    };
    text.parse::<WorkerCount>()
        .map(Some)
        .map_err(|reason| serde::de::Error::custom(format!("invalid value {text:?}: {reason}")))
}

impl Settings {
    /// Reads and parses a TOML file. Unknown keys and bad values are errors that name the
    /// key and the line.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Settings::from_toml(&text).map_err(|message| ConfigError::File {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text (the error message names the key and line).
    pub fn from_toml(text: &str) -> Result<Settings, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().replace('\n', " "))
    }

    /// Fills every value `self` lacks from `base` (flags overlay the file).
    pub fn overlay(self, base: Settings) -> Settings {
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
            command: self.command.or(base.command),
        }
    }

    /// Applies defaults and cross-field checks.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let d = Config::default();
        let config = Config {
            listen: self.listen.map_or(d.listen, |p| p.0),
            workers: self.workers.unwrap_or_default().resolve(),
            balance: self.balance.map_or(d.balance, |p| p.0),
            status: self.status.map(|p| p.0),
            shutdown_timeout: self.shutdown_timeout.map_or(d.shutdown_timeout, |p| p.0),
            health_interval: self.health_interval.map_or(d.health_interval, |p| p.0),
            health_timeout: self.health_timeout.map_or(d.health_timeout, |p| p.0),
            start_timeout: self.start_timeout.map_or(d.start_timeout, |p| p.0),
            max_restarts: self.max_restarts.unwrap_or(d.max_restarts),
            restart_window: self.restart_window.map_or(d.restart_window, |p| p.0),
            pid_file: self.pid_file,
            log_format: self.log_format.map_or(d.log_format, |p| p.0),
            verbosity: 0,
            demo_faults: self.demo_faults.unwrap_or(false),
            tcp_migrate_req: self.tcp_migrate_req.unwrap_or(d.tcp_migrate_req),
            cpu_affinity: self.cpu_affinity.unwrap_or(false)
                || self.balance.is_some_and(|b| b.0 == Balance::Cpu),
            max_memory: self.max_memory.map(|p| p.0.0),
            command: self.command.filter(|c| !c.is_empty()),
            config_file: None,
        };
        let positive = |key: &str, value: Duration| {
            if value.is_zero() {
                Err(ConfigError::Invalid {
                    key: key.into(),
                    value: "0".into(),
                    reason: "must be more than zero".into(),
                })
            } else {
                Ok(())
            }
        };
        let max = steer_common::MAX_SLOTS as usize;
        if !(1..=max).contains(&config.workers) {
            return Err(ConfigError::Invalid {
                key: "workers".into(),
                value: config.workers.to_string(),
                reason: format!("expected a number from 1 to {max}, or auto"),
            });
        }
        positive("health-interval", config.health_interval)?;
        positive("health-timeout", config.health_timeout)?;
        positive("start-timeout", config.start_timeout)?;
        positive("restart-window", config.restart_window)?;
        if config.health_timeout < config.health_interval {
            return Err(ConfigError::Invalid {
                key: "health-timeout".into(),
                value: humantime::format_duration(config.health_timeout).to_string(),
                reason: format!(
                    "must be at least health-interval ({})",
                    humantime::format_duration(config.health_interval)
                ),
            });
        }
        Ok(config)
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
            ("workers = 0", "\"0\""),
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
    fn health_timeout_shorter_than_interval_is_refused() {
        let s = Settings::from_toml("health-interval = \"2s\"\nhealth-timeout = \"1s\"")
            .expect("parses");
        let err = s.into_config().expect_err("refused").to_string();
        assert!(err.contains("health-timeout"), "{err}");
    }
}
