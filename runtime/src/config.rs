//! Validated cluster configuration: defaults, then the TOML file, then flags.
//!
//! Every key in the file is named exactly like its long flag (`shutdown-timeout`, not
//! `shutdown_timeout`), so a flag and its key read the same in the docs and in errors.
//! Each value is parsed by one `FromStr` shared by both sources, so `--workers x` and
//! `workers = "x"` fail with the same words.
//!
//! A library user sees the values [`crate::ClusterBuilder`] takes ([`Balance`],
//! [`LogFormat`]) and [`parse_duration`]; the rest is the `steer` program's.
//!
//! Where things are: this file holds the validated `Config` and what a reload may
//! change; `values` the value types and their parsers; `settings` the values as given and
//! the file reader; `checks` their validation into a `Config`; `credentials` the
//! `--user`/`--group` lookup; `program` the check that the COMMAND can run.

mod checks;
mod credentials;
mod fields;
pub(crate) mod limits;
mod listeners;
pub(crate) mod program;
mod settings;
mod values;

pub(crate) use listeners::{FLOW_TABLE_RANGE, UdpFlows};
pub use listeners::{Listener, Protocol};
pub use values::{Balance, LogFormat, parse_duration};

pub(crate) use limits::{Cidr, ClientLimits, ConnRate};

pub(crate) use credentials::Credentials;
pub(crate) use settings::{Parsed, SettingValue, Settings};
pub(crate) use values::{
    ByteSize, StatusAddr, StatusPath, StatusPaths, WORKER_NOFILE_RANGE, WorkerCount, WorkerOutput,
    format_size, parse_status_addr,
};

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Why a configuration was refused. Every variant names the flag or key at fault.
#[derive(Debug, Error)]
pub(crate) enum ConfigError {
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

/// The validated configuration a primary runs with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Config {
    /// The addresses every worker serves, one socket each, in this order (never empty).
    pub listeners: Vec<Listener>,
    /// How many worker slots.
    pub workers: usize,
    /// Steering policy.
    pub balance: Balance,
    /// Where `/status` and `/metrics` are served, if anywhere.
    pub status: Option<SocketAddr>,
    /// The status paths served to clients not on loopback (`status-public`).
    pub status_public: StatusPaths,
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
    /// Where workers' stdout and stderr go.
    pub worker_output: WorkerOutput,
    /// -2 (errors only) ..= 2 (trace); 0 is info.
    pub verbosity: i8,
    /// Enable the demo's fault routes.
    pub demo_faults: bool,
    /// The demo: a request head must be complete this long after it started.
    pub demo_header_timeout: Duration,
    /// The demo: a keep-alive connection may sit idle this long between requests.
    pub demo_idle_timeout: Duration,
    /// The demo: a request body may pause this long between two reads.
    pub demo_body_timeout: Duration,
    /// The demo: a response may wait this long for the client to read any of it.
    pub demo_send_timeout: Duration,
    /// The demo's QUIC listeners: the certificate chain (PEM) they present; `None` makes
    /// a self-signed one at start. Set together with [`Config::tls_key`].
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of [`Config::tls_cert`].
    pub tls_key: Option<PathBuf>,
    /// In `kernel` mode, set `net.ipv4.tcp_migrate_req=1` so a closing worker's queue
    /// migrates to the others instead of being reset.
    pub tcp_migrate_req: bool,
    /// Pin slot i's worker to the (i mod n)-th of the n CPUs the primary may run on.
    /// Implied by `--balance cpu`.
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
    /// The per-client connection limit (`client-*`).
    pub client_limits: ClientLimits,
    /// The UDP flow table (`udp-flow-timeout`, `udp-flow-table`).
    pub udp_flows: UdpFlows,
    /// Every eBPF policy steers around stalled workers (`avoid-stalls`).
    pub avoid_stalls: bool,
    /// Bytes of receive queue asked for on every worker's UDP and QUIC socket
    /// (`udp-receive-buffer`; see [`crate::listener::set_receive_buffer`]).
    pub udp_receive_buffer: u64,
    /// The file this came from, for SIGHUP reloads.
    pub config_file: Option<PathBuf>,
    /// What the command line (or the library builder) set. A SIGHUP reload lays these
    /// over the re-read file again, so a flag keeps winning over the file.
    pub overrides: Settings,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listeners: vec![Listener::tcp(SocketAddr::from(([127, 0, 0, 1], 8000)))],
            workers: WorkerCount::Auto.resolve(),
            balance: Balance::Auto,
            status: None,
            status_public: StatusPaths::ALL,
            shutdown_timeout: Duration::from_secs(30),
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_secs(3),
            start_timeout: Duration::from_secs(10),
            max_restarts: 10,
            restart_window: Duration::from_secs(60),
            pid_file: None,
            log_format: LogFormat::Text,
            worker_output: WorkerOutput::Auto,
            verbosity: 0,
            demo_faults: false,
            demo_header_timeout: Duration::from_secs(10),
            demo_idle_timeout: Duration::from_secs(30),
            demo_body_timeout: Duration::from_secs(30),
            demo_send_timeout: Duration::from_secs(30),
            tls_cert: None,
            tls_key: None,
            tcp_migrate_req: true,
            cpu_affinity: false,
            max_memory: None,
            credentials: None,
            worker_nofile: None,
            worker_memory_limit: None,
            command: None,
            client_limits: ClientLimits::default(),
            udp_flows: UdpFlows::default(),
            avoid_stalls: true,
            udp_receive_buffer: listeners::DEFAULT_UDP_RECEIVE_BUFFER,
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
        // TOML's own quoting: Rust's `{:?}` writes `\u{1}`, which TOML cannot read back.
        let q = |v: &dyn fmt::Display| toml::Value::String(v.to_string()).to_string();
        let listen: Vec<toml::Value> = self
            .listeners
            .iter()
            .map(|l| toml::Value::String(l.to_string()))
            .collect();
        let mut lines: Vec<(&str, String)> = vec![
            ("listen", toml::Value::Array(listen).to_string()),
            ("workers", self.workers.to_string()),
            ("balance", q(&self.balance)),
        ];
        if let Some(status) = self.status {
            lines.push(("status", q(&status)));
            let public: Vec<toml::Value> = self
                .status_public
                .iter()
                .map(|p| toml::Value::String(p.as_str().into()))
                .collect();
            lines.push(("status-public", toml::Value::Array(public).to_string()));
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
            (
                "worker-output",
                format!("\"{}\"", self.worker_output.as_str()),
            ),
            ("demo-faults", self.demo_faults.to_string()),
            ("avoid-stalls", self.avoid_stalls.to_string()),
            ("demo-header-timeout", d(self.demo_header_timeout)),
            ("demo-idle-timeout", d(self.demo_idle_timeout)),
            ("demo-body-timeout", d(self.demo_body_timeout)),
            ("demo-send-timeout", d(self.demo_send_timeout)),
            ("tcp-migrate-req", self.tcp_migrate_req.to_string()),
            ("cpu-affinity", self.cpu_affinity.to_string()),
        ]);
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            lines.push(("tls-cert", q(&cert.display())));
            lines.push(("tls-key", q(&key.display())));
        }
        if let Some(bytes) = self.max_memory {
            lines.push(("max-memory", format!("\"{}\"", format_size(bytes))));
        }
        if let Some(c) = &self.credentials {
            lines.push(("user", format!("{}  # uid {}", q(&c.user), c.uid)));
            lines.push(("group", format!("{}  # gid", c.gid)));
        }
        if let Some(n) = self.worker_nofile {
            lines.push(("worker-nofile", n.to_string()));
        }
        if let Some(bytes) = self.worker_memory_limit {
            lines.push(("worker-memory-limit", format!("\"{}\"", format_size(bytes))));
        }
        if let Some(command) = &self.command {
            let argv = command.iter().cloned().map(toml::Value::String).collect();
            lines.push(("command", toml::Value::Array(argv).to_string()));
        }
        let limits = &self.client_limits;
        if let Some(rate) = limits.rate {
            let exempt = limits
                .exempt
                .iter()
                .map(|c| toml::Value::String(c.to_string()))
                .collect();
            lines.extend([
                ("client-conn-rate", q(&rate)),
                ("client-conn-burst", limits.burst.to_string()),
                ("client-prefix-v4", limits.prefix_v4.to_string()),
                ("client-prefix-v6", limits.prefix_v6.to_string()),
                ("client-exempt", toml::Value::Array(exempt).to_string()),
                ("client-table-size", limits.table_size.to_string()),
            ]);
        }
        if self.listeners.iter().any(|l| l.protocol.is_datagram()) {
            lines.extend([
                ("udp-flow-timeout", d(self.udp_flows.timeout)),
                ("udp-flow-table", self.udp_flows.table_size.to_string()),
                (
                    "udp-receive-buffer",
                    format!("\"{}\"", format_size(self.udp_receive_buffer)),
                ),
            ]);
        }
        let mut out = String::new();
        for (key, value) in lines {
            let _ = writeln!(out, "{key} = {value}");
        }
        if self.command.is_none() {
            // What SIGHUP does with a file that lost its `command`: it agrees with this
            // file only from the next primary on.
            out.push_str(
                "# no command: the demo app (a running primary keeps its command until SIGUSR1)\n",
            );
        }
        out
    }
}

/// What a reload would change in the listener set, by name: `added "dns" (udp://...)`,
/// `removed "web"`, `changed "api"`; empty if it stays the same.
pub(crate) fn listener_changes(running: &[Listener], reloaded: &[Listener]) -> Vec<String> {
    let mut changes = Vec::new();
    for l in reloaded {
        match running.iter().find(|r| r.name == l.name) {
            None => changes.push(format!("added {:?} ({}://{})", l.name, l.protocol, l.addr)),
            Some(r) if r != l => changes.push(format!(
                "changed {:?} ({}://{} -> {}://{})",
                l.name, r.protocol, r.addr, l.protocol, l.addr
            )),
            Some(_) => {}
        }
    }
    for r in running {
        if !reloaded.iter().any(|l| l.name == r.name) {
            changes.push(format!("removed {:?}", r.name));
        }
    }
    if changes.is_empty() && running != reloaded {
        changes.push("reordered".into());
    }
    changes
}

/// The keys whose change a SIGHUP cannot apply to the running primary, each named once.
/// (`workers` and `balance` apply live, and `cpu-affinity` and another `command` with the
/// roll that follows; see the primary's reload. Adding or removing `command` would switch
/// between the demo and an external program: that waits for a new primary.)
pub(crate) fn keys_needing_restart(running: &Config, reloaded: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut changed = |key, differs: bool| {
        if differs {
            keys.push(key);
        }
    };
    changed("listen", running.listeners != reloaded.listeners);
    changed("status", running.status != reloaded.status);
    changed(
        "status-public",
        running.status_public != reloaded.status_public,
    );
    changed("pid-file", running.pid_file != reloaded.pid_file);
    changed("log-format", running.log_format != reloaded.log_format);
    changed(
        "worker-output",
        running.worker_output != reloaded.worker_output,
    );
    changed(
        "tcp-migrate-req",
        running.tcp_migrate_req != reloaded.tcp_migrate_req,
    );
    // Another command applies with the roll, but a command added to a demo (or library)
    // cluster, or removed from an external one, changes what kind of worker runs.
    changed(
        "command",
        running.command.is_some() != reloaded.command.is_some(),
    );
    // The kernel fixes a map's size when it creates it; the other `client-*` keys apply
    // live (one write of the program's CONFIG and EXEMPT).
    changed(
        "client-table-size",
        running.client_limits.table_size != reloaded.client_limits.table_size,
    );
    changed(
        "udp-flow-table",
        running.udp_flows.table_size != reloaded.udp_flows.table_size,
    );
    keys
}

impl Config {
    /// Keeps the running values of the keys a reload cannot change
    /// ([`keys_needing_restart`]), and what never comes from the file. `balance` stays
    /// too: the primary switches it, and records it, only if the switch succeeds.
    pub fn keep_unreloadable(&mut self, running: &Config) {
        self.listeners = running.listeners.clone();
        self.balance = running.balance;
        self.status = running.status;
        self.status_public = running.status_public;
        self.pid_file = running.pid_file.clone();
        self.log_format = running.log_format;
        self.worker_output = running.worker_output;
        self.tcp_migrate_req = running.tcp_migrate_req;
        if self.command.is_some() != running.command.is_some() {
            self.command = running.command.clone();
        }
        self.client_limits.table_size = running.client_limits.table_size;
        self.udp_flows.table_size = running.udp_flows.table_size;
        self.verbosity = running.verbosity;
        self.config_file = running.config_file.clone();
        self.overrides = running.overrides.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::values::{parse_listen, parse_size};
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
        assert_eq!(
            config.listeners,
            [Listener::tcp(SocketAddr::from(([127, 0, 0, 1], 9000)))]
        );
        assert_eq!(config.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(config.balance, Balance::Kernel);
    }

    #[test]
    fn a_reload_names_only_the_keys_it_cannot_apply() {
        let running = Config::default();
        let live = Config {
            workers: running.workers + 2,
            balance: Balance::Hash,
            cpu_affinity: !running.cpu_affinity,
            shutdown_timeout: running.shutdown_timeout * 2,
            ..running.clone()
        };
        assert_eq!(
            keys_needing_restart(&running, &live),
            Vec::<&str>::new(),
            "workers, balance and cpu-affinity apply with SIGHUP"
        );
        let moved = Config {
            listeners: vec![Listener::tcp(SocketAddr::from(([127, 0, 0, 1], 9999)))],
            status: Some(SocketAddr::from(([127, 0, 0, 1], 9998))),
            ..live
        };
        assert_eq!(keys_needing_restart(&running, &moved), ["listen", "status"]);
    }

    #[test]
    fn a_reload_names_the_listeners_it_adds_removes_or_moves() {
        let parse = |items: &[&str]| -> Vec<Listener> {
            items.iter().map(|s| s.parse().expect("listener")).collect()
        };
        let running = parse(&["web=127.0.0.1:80", "api=127.0.0.1:81"]);
        let reloaded = parse(&["web=127.0.0.1:8080", "dns=udp://127.0.0.1:53"]);
        assert_eq!(
            listener_changes(&running, &reloaded),
            [
                "changed \"web\" (tcp://127.0.0.1:80 -> tcp://127.0.0.1:8080)",
                "added \"dns\" (udp://127.0.0.1:53)",
                "removed \"api\"",
            ]
        );
        assert!(listener_changes(&running, &running).is_empty());
    }

    #[test]
    fn listen_takes_a_string_or_a_list() {
        let one = Settings::from_toml("listen = \"127.0.0.1:9000\"").expect("string");
        assert_eq!(one.listen.expect("set")[0].name, "tcp-9000");
        let two =
            Settings::from_toml("listen = [\"web=127.0.0.1:9000\", \"dns=udp://127.0.0.1:9053\"]")
                .expect("list")
                .into_config()
                .expect("valid");
        let shown: Vec<String> = two.listeners.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["web=tcp://127.0.0.1:9000", "dns=udp://127.0.0.1:9053"]
        );
        assert!(
            two.summary()
                .contains("listen = [\"web=tcp://127.0.0.1:9000\", \"dns=udp://127.0.0.1:9053\"]"),
            "{}",
            two.summary()
        );
        for (text, needle) in [
            ("listen = []", "an array of them"),
            ("listen = [5]", "invalid element"),
            ("listen = [\"x=ftp://a:1\"]", "unknown scheme"),
        ] {
            let err = Settings::from_toml(text).expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn conflicting_quic_and_baseline_listeners_are_refused_by_name() {
        for (text, needle) in [
            (
                "listen = [\"a=127.0.0.1:9000\", \"a=udp://127.0.0.1:9001\"]",
                "two listeners are named \"a\"",
            ),
            (
                "listen = [\"a=0.0.0.0:9000\", \"b=127.0.0.1:9000\"]",
                "wildcard",
            ),
            (
                "balance = \"shared\"\nlisten = \"udp://127.0.0.1:9000\"",
                "exactly one TCP listener",
            ),
            (
                "balance = \"userspace\"\nlisten = [\"127.0.0.1:9000\", \"127.0.0.1:9001\"]",
                "exactly one TCP listener",
            ),
        ] {
            let err = Settings::from_toml(text)
                .expect("parses")
                .into_config()
                .expect_err(text)
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn a_reload_cannot_remove_or_add_the_command_but_can_change_it() {
        let external = Config {
            command: Some(vec!["python3".into(), "app.py".into()]),
            ..Config::default()
        };
        let other = Config {
            command: Some(vec!["node".into(), "app.js".into()]),
            ..Config::default()
        };
        assert_eq!(keys_needing_restart(&external, &other), Vec::<&str>::new());
        let mut removed = Config::default();
        assert_eq!(keys_needing_restart(&external, &removed), ["command"]);
        removed.keep_unreloadable(&external);
        assert_eq!(
            removed.command, external.command,
            "the running command stays"
        );
        let mut added = other.clone();
        assert_eq!(
            keys_needing_restart(&Config::default(), &added),
            ["command"]
        );
        added.keep_unreloadable(&Config::default());
        assert_eq!(added.command, None, "the demo stays");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Settings::from_toml("workers = 2\nwrokers = 3\n").expect_err("unknown key");
        assert!(err.contains("wrokers"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn a_max_memory_no_worker_can_stay_under_is_refused() {
        for (text, ok) in [
            ("max-memory = \"1\"", false),
            ("max-memory = \"7MiB\"", false),
            ("max-memory = \"8MiB\"", true),
        ] {
            let checked = Settings::from_toml(text).expect("parses").into_config();
            match (checked, ok) {
                (Ok(_), true) => {}
                (Err(err), false) => assert!(err.to_string().contains("max-memory"), "{err}"),
                (other, _) => panic!("{text}: {other:?}"),
            }
        }
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
