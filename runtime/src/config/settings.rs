//! Values as given, by a flag or the file, and their validation into a [`Config`]: the
//! file reader, the overlay that lets flags win, and the checks of one key against another.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use super::fields;
use super::limits::{Cidr, ConnRate};
use super::listeners::Listener;
use super::values::{
    Balance, ByteSize, LogFormat, StatusAddr, StatusPaths, WorkerCount, WorkerOutput,
    parse_duration,
};

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
    /// `listen`: one listener string, or an array of them.
    #[serde(default, deserialize_with = "fields::listeners")]
    pub listen: Option<Vec<Listener>>,
    /// `workers`: a number or "auto".
    #[serde(default, deserialize_with = "fields::workers")]
    pub workers: Option<WorkerCount>,
    /// `balance`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub balance: Option<Parsed<Balance>>,
    /// `status`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub status: Option<Parsed<StatusAddr>>,
    /// `status-public`: the paths other hosts may read, an array such as
    /// `["/ready", "/live"]` (or one comma-separated string).
    #[serde(default, deserialize_with = "fields::status_paths")]
    pub status_public: Option<StatusPaths>,
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
    /// `worker-output`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub worker_output: Option<Parsed<WorkerOutput>>,
    /// `demo-faults`
    #[serde(default, deserialize_with = "fields::boolean")]
    pub demo_faults: Option<bool>,
    /// `demo-header-timeout`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub demo_header_timeout: Option<Parsed<Duration>>,
    /// `demo-idle-timeout`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub demo_idle_timeout: Option<Parsed<Duration>>,
    /// `demo-body-timeout`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub demo_body_timeout: Option<Parsed<Duration>>,
    /// `demo-send-timeout`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub demo_send_timeout: Option<Parsed<Duration>>,
    /// `tls-cert`
    #[serde(default, deserialize_with = "fields::path")]
    pub tls_cert: Option<PathBuf>,
    /// `tls-key`
    #[serde(default, deserialize_with = "fields::path")]
    pub tls_key: Option<PathBuf>,
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
    /// `client-conn-rate`: a rate such as "50/s".
    #[serde(default, deserialize_with = "fields::from_str")]
    pub client_conn_rate: Option<Parsed<ConnRate>>,
    /// `client-conn-burst`: a number of connections.
    #[serde(default, deserialize_with = "fields::client_conn_burst")]
    pub client_conn_burst: Option<u64>,
    /// `client-prefix-v4`: a prefix length.
    #[serde(default, deserialize_with = "fields::client_prefix_v4")]
    pub client_prefix_v4: Option<u64>,
    /// `client-prefix-v6`: a prefix length.
    #[serde(default, deserialize_with = "fields::client_prefix_v6")]
    pub client_prefix_v6: Option<u64>,
    /// `client-exempt`: an array of prefixes such as `["10.0.0.0/8"]`.
    #[serde(default, deserialize_with = "fields::client_exempt")]
    pub client_exempt: Option<Vec<Cidr>>,
    /// `client-table-size`: entries of the client table.
    #[serde(default, deserialize_with = "fields::client_table_size")]
    pub client_table_size: Option<u64>,
    /// `udp-flow-timeout`
    #[serde(default, deserialize_with = "fields::from_str")]
    pub udp_flow_timeout: Option<Parsed<Duration>>,
    /// `udp-flow-table`: entries of each UDP listener's flow table.
    #[serde(default, deserialize_with = "fields::udp_flow_table")]
    pub udp_flow_table: Option<u64>,
    /// `avoid-stalls`
    #[serde(default, deserialize_with = "fields::boolean")]
    pub avoid_stalls: Option<bool>,
    /// `udp-receive-buffer`: a size such as "4MiB".
    #[serde(default, deserialize_with = "fields::from_str")]
    pub udp_receive_buffer: Option<Parsed<ByteSize>>,
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
impl SettingValue for WorkerOutput {
    const EXPECTED: &'static str = "\"auto\", \"tagged\", \"journal\" or \"inherit\"";
    fn parse_setting(s: &str) -> Result<Self, String> {
        s.parse()
    }
}

impl Settings {
    /// Every key a file may hold, as written in it (the long flag names). The tests hold
    /// the flags, the file reader and [`Settings::has`] to it.
    #[cfg(test)]
    pub const KEYS: &'static [&'static str] = &[
        "listen",
        "workers",
        "balance",
        "status",
        "status-public",
        "shutdown-timeout",
        "health-interval",
        "health-timeout",
        "start-timeout",
        "max-restarts",
        "restart-window",
        "pid-file",
        "log-format",
        "worker-output",
        "demo-faults",
        "demo-header-timeout",
        "demo-idle-timeout",
        "demo-body-timeout",
        "demo-send-timeout",
        "tls-cert",
        "tls-key",
        "tcp-migrate-req",
        "cpu-affinity",
        "max-memory",
        "user",
        "group",
        "worker-nofile",
        "worker-memory-limit",
        "command",
        "client-conn-rate",
        "client-conn-burst",
        "client-prefix-v4",
        "client-prefix-v6",
        "client-exempt",
        "client-table-size",
        "udp-flow-timeout",
        "udp-flow-table",
        "avoid-stalls",
        "udp-receive-buffer",
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

    /// Whether `key` (a file key, as in `Settings::KEYS`) has a value here.
    pub(super) fn has(&self, key: &str) -> bool {
        match key {
            "listen" => self.listen.is_some(),
            "workers" => self.workers.is_some(),
            "balance" => self.balance.is_some(),
            "status" => self.status.is_some(),
            "status-public" => self.status_public.is_some(),
            "shutdown-timeout" => self.shutdown_timeout.is_some(),
            "health-interval" => self.health_interval.is_some(),
            "health-timeout" => self.health_timeout.is_some(),
            "start-timeout" => self.start_timeout.is_some(),
            "max-restarts" => self.max_restarts.is_some(),
            "restart-window" => self.restart_window.is_some(),
            "pid-file" => self.pid_file.is_some(),
            "log-format" => self.log_format.is_some(),
            "worker-output" => self.worker_output.is_some(),
            "demo-faults" => self.demo_faults.is_some(),
            "demo-header-timeout" => self.demo_header_timeout.is_some(),
            "demo-idle-timeout" => self.demo_idle_timeout.is_some(),
            "demo-body-timeout" => self.demo_body_timeout.is_some(),
            "demo-send-timeout" => self.demo_send_timeout.is_some(),
            "tls-cert" => self.tls_cert.is_some(),
            "tls-key" => self.tls_key.is_some(),
            "tcp-migrate-req" => self.tcp_migrate_req.is_some(),
            "cpu-affinity" => self.cpu_affinity.is_some(),
            "max-memory" => self.max_memory.is_some(),
            "user" => self.user.is_some(),
            "group" => self.group.is_some(),
            "worker-nofile" => self.worker_nofile.is_some(),
            "worker-memory-limit" => self.worker_memory_limit.is_some(),
            "command" => self.command.is_some(),
            "client-conn-rate" => self.client_conn_rate.is_some(),
            "client-conn-burst" => self.client_conn_burst.is_some(),
            "client-prefix-v4" => self.client_prefix_v4.is_some(),
            "client-prefix-v6" => self.client_prefix_v6.is_some(),
            "client-exempt" => self.client_exempt.is_some(),
            "client-table-size" => self.client_table_size.is_some(),
            "udp-flow-timeout" => self.udp_flow_timeout.is_some(),
            "udp-flow-table" => self.udp_flow_table.is_some(),
            "avoid-stalls" => self.avoid_stalls.is_some(),
            "udp-receive-buffer" => self.udp_receive_buffer.is_some(),
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
            status_public: self.status_public.or(base.status_public),
            shutdown_timeout: self.shutdown_timeout.or(base.shutdown_timeout),
            health_interval: self.health_interval.or(base.health_interval),
            health_timeout: self.health_timeout.or(base.health_timeout),
            start_timeout: self.start_timeout.or(base.start_timeout),
            max_restarts: self.max_restarts.or(base.max_restarts),
            restart_window: self.restart_window.or(base.restart_window),
            pid_file: self.pid_file.or(base.pid_file),
            log_format: self.log_format.or(base.log_format),
            worker_output: self.worker_output.or(base.worker_output),
            demo_faults: self.demo_faults.or(base.demo_faults),
            demo_header_timeout: self.demo_header_timeout.or(base.demo_header_timeout),
            demo_idle_timeout: self.demo_idle_timeout.or(base.demo_idle_timeout),
            demo_body_timeout: self.demo_body_timeout.or(base.demo_body_timeout),
            demo_send_timeout: self.demo_send_timeout.or(base.demo_send_timeout),
            tls_cert: self.tls_cert.or(base.tls_cert),
            tls_key: self.tls_key.or(base.tls_key),
            tcp_migrate_req: self.tcp_migrate_req.or(base.tcp_migrate_req),
            cpu_affinity: self.cpu_affinity.or(base.cpu_affinity),
            max_memory: self.max_memory.or(base.max_memory),
            user: self.user.or(base.user),
            group: self.group.or(base.group),
            worker_nofile: self.worker_nofile.or(base.worker_nofile),
            worker_memory_limit: self.worker_memory_limit.or(base.worker_memory_limit),
            command: self.command.or(base.command),
            client_conn_rate: self.client_conn_rate.or(base.client_conn_rate),
            client_conn_burst: self.client_conn_burst.or(base.client_conn_burst),
            client_prefix_v4: self.client_prefix_v4.or(base.client_prefix_v4),
            client_prefix_v6: self.client_prefix_v6.or(base.client_prefix_v6),
            client_exempt: self.client_exempt.or(base.client_exempt),
            client_table_size: self.client_table_size.or(base.client_table_size),
            udp_flow_timeout: self.udp_flow_timeout.or(base.udp_flow_timeout),
            udp_flow_table: self.udp_flow_table.or(base.udp_flow_table),
            avoid_stalls: self.avoid_stalls.or(base.avoid_stalls),
            udp_receive_buffer: self.udp_receive_buffer.or(base.udp_receive_buffer),
            origin,
        }
    }
}
