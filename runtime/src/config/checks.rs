//! The checks that turn [`Settings`] into a [`Config`]: defaults for what is missing, then
//! each value against its range and against the others (health timings, addresses, the
//! environment the primary will run in). Every refusal names the flag, or the file and line.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::listeners::UDP_RECEIVE_BUFFER_RANGE;
use super::values::{
    Balance, ByteSize, MIN_HEALTH_INTERVAL, MIN_HEALTH_TIMEOUT, MIN_MAX_MEMORY,
    MIN_WORKER_MEMORY_LIMIT, WORKER_NOFILE_RANGE, format_size,
};
use super::{ClientLimits, Config, ConfigError, Credentials, Parsed, Protocol, Settings, program};

impl Settings {
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
        positive("demo-header-timeout", self.demo_header_timeout)?;
        positive("demo-idle-timeout", self.demo_idle_timeout)?;
        positive("demo-body-timeout", self.demo_body_timeout)?;
        positive("demo-send-timeout", self.demo_send_timeout)?;
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
        if let Some(Parsed(ByteSize(bytes))) = self.udp_receive_buffer
            && !UDP_RECEIVE_BUFFER_RANGE.contains(&bytes)
        {
            return Err(self.invalid(
                "udp-receive-buffer",
                format_size(bytes),
                format!(
                    "expected a size from {} to {}",
                    format_size(*UDP_RECEIVE_BUFFER_RANGE.start()),
                    format_size(*UDP_RECEIVE_BUFFER_RANGE.end())
                ),
            ));
        }
        if let Some(Parsed(ByteSize(limit))) = self.max_memory
            && limit < MIN_MAX_MEMORY
        {
            return Err(self.invalid(
                "max-memory",
                format_size(limit),
                format!(
                    "must be at least {}MiB: below it every worker is over the threshold \
                     as soon as it starts, and is replaced every health interval",
                    MIN_MAX_MEMORY >> 20
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
        let client_limits = self.client_limits()?;
        let config = Config {
            listeners: self.listen.clone().unwrap_or(d.listeners),
            workers,
            balance: self.balance.map_or(d.balance, |p| p.0),
            status: self.status.map(|p| p.0.0),
            status_public: self.status_public.unwrap_or_default(),
            shutdown_timeout: self.shutdown_timeout.map_or(d.shutdown_timeout, |p| p.0),
            health_interval,
            health_timeout,
            start_timeout: self.start_timeout.map_or(d.start_timeout, |p| p.0),
            max_restarts: self.max_restarts.unwrap_or(d.max_restarts),
            restart_window: self.restart_window.map_or(d.restart_window, |p| p.0),
            pid_file: self.pid_file.clone(),
            log_format: self.log_format.map_or(d.log_format, |p| p.0),
            worker_output: self.worker_output.map_or(d.worker_output, |p| p.0),
            verbosity: 0,
            demo_faults: self.demo_faults.unwrap_or(false),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            demo_header_timeout: self
                .demo_header_timeout
                .map_or(d.demo_header_timeout, |p| p.0),
            demo_idle_timeout: self.demo_idle_timeout.map_or(d.demo_idle_timeout, |p| p.0),
            demo_body_timeout: self.demo_body_timeout.map_or(d.demo_body_timeout, |p| p.0),
            demo_send_timeout: self.demo_send_timeout.map_or(d.demo_send_timeout, |p| p.0),
            tcp_migrate_req: self.tcp_migrate_req.unwrap_or(d.tcp_migrate_req),
            cpu_affinity: self.cpu_affinity.unwrap_or(false)
                || self.balance.is_some_and(|b| b.0 == Balance::Cpu),
            max_memory: self.max_memory.map(|p| p.0.0),
            credentials,
            worker_nofile: self.worker_nofile,
            worker_memory_limit: self.worker_memory_limit.map(|p| p.0.0),
            command: self.command.clone().filter(|c| !c.is_empty()),
            client_limits,
            avoid_stalls: self.avoid_stalls.unwrap_or(true),
            udp_receive_buffer: self
                .udp_receive_buffer
                .map_or(d.udp_receive_buffer, |p| p.0.0),
            udp_flows: crate::config::UdpFlows {
                timeout: self.udp_flow_timeout.map_or(d.udp_flows.timeout, |p| p.0),
                table_size: self
                    .udp_flow_table
                    .map_or(d.udp_flows.table_size, |n| n as u32),
                quic: false,
            },
            config_file: None,
            overrides: Settings::default(),
        };
        self.check_listeners(&config)?;
        self.check_addresses(&config)?;
        self.check_environment(&config)?;
        Ok(config)
    }

    /// The per-client limit, with its defaults. A `client-*` key under a policy without
    /// Steer's program (`kernel`, `shared`, `userspace`) is an error naming the key: there
    /// is nothing to enforce it.
    fn client_limits(&self) -> Result<ClientLimits, ConfigError> {
        let d = ClientLimits::default();
        let given = [
            (
                "client-conn-rate",
                self.client_conn_rate.map(|r| r.0.to_string()),
            ),
            (
                "client-conn-burst",
                self.client_conn_burst.map(|n| n.to_string()),
            ),
            (
                "client-prefix-v4",
                self.client_prefix_v4.map(|n| n.to_string()),
            ),
            (
                "client-prefix-v6",
                self.client_prefix_v6.map(|n| n.to_string()),
            ),
            (
                "client-exempt",
                self.client_exempt.as_ref().map(|list| {
                    list.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                }),
            ),
            (
                "client-table-size",
                self.client_table_size.map(|n| n.to_string()),
            ),
        ];
        if let Some(Parsed(balance)) = self.balance
            && matches!(
                balance,
                Balance::Kernel | Balance::Shared | Balance::Userspace
            )
            && let Some((key, value)) = given.iter().find_map(|(k, v)| Some((*k, v.clone()?)))
        {
            return Err(self.invalid(
                key,
                value,
                format!(
                    "a per-client limit needs Steer's eBPF program, which --balance {balance} \
                     does not run: choose round-robin, hash, least-loaded or cpu (or auto), \
                     or remove the client-* settings"
                ),
            ));
        }
        if self.client_conn_rate.is_none()
            && let Some(burst) = self.client_conn_burst
        {
            return Err(self.invalid(
                "client-conn-burst",
                burst.to_string(),
                "a burst needs a rate: set client-conn-rate too",
            ));
        }
        let rate = self.client_conn_rate.map(|r| r.0);
        let mut exempt = self.client_exempt.clone().unwrap_or_default();
        exempt.sort();
        exempt.dedup();
        if exempt.len() > steer_common::MAX_EXEMPT as usize {
            return Err(self.invalid(
                "client-exempt",
                format!("{} prefixes", exempt.len()),
                format!("at most {} prefixes", steer_common::MAX_EXEMPT),
            ));
        }
        // The ranges were checked by the parsers (flag and file alike).
        Ok(ClientLimits {
            rate,
            burst: match (self.client_conn_burst, rate) {
                (Some(n), _) => n as u32,
                (None, Some(rate)) => rate.default_burst(),
                (None, None) => d.burst,
            },
            prefix_v4: self.client_prefix_v4.map_or(d.prefix_v4, |n| n as u8),
            prefix_v6: self.client_prefix_v6.map_or(d.prefix_v6, |n| n as u8),
            exempt,
            table_size: self.client_table_size.map_or(d.table_size, |n| n as u32),
        })
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

    /// Listeners that can run together: no two in conflict
    /// ([`super::listeners::conflict`]), and the baselines' single TCP socket.
    fn check_listeners(&self, config: &Config) -> Result<(), ConfigError> {
        let shown = || {
            config
                .listeners
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        #[cfg(not(feature = "quic"))]
        if let Some(quic) = config
            .listeners
            .iter()
            .find(|l| l.protocol == Protocol::Quic && config.command.is_none())
        {
            return Err(self.invalid(
                "listen",
                quic.to_string(),
                "this steer was built without the quic feature: the demo serves quic:// \
                 listeners only with it (an external COMMAND can serve them)",
            ));
        }
        if let Some(conflict) = super::listeners::conflict(&config.listeners) {
            return Err(self.invalid("listen", shown(), conflict));
        }
        if matches!(config.balance, Balance::Shared | Balance::Userspace)
            && !matches!(&config.listeners[..], [one] if one.protocol == Protocol::Tcp)
        {
            return Err(self.invalid(
                "listen",
                shown(),
                format!(
                    "--balance {} serves exactly one TCP listener (its single socket is                      balanced in userspace); choose round-robin, hash, least-loaded, cpu or                      kernel for several listeners or UDP",
                    config.balance
                ),
            ));
        }
        Ok(())
    }

    /// The status listener cannot share the workers' address: the workers would bind
    /// (and crash-loop) against Steer's own status socket.
    fn check_addresses(&self, config: &Config) -> Result<(), ConfigError> {
        let Some(status) = config.status else {
            if let Some(public) = self.status_public {
                return Err(self.invalid(
                    "status-public",
                    public.to_string(),
                    "there is no status listener to serve it: set `status` too",
                ));
            }
            return Ok(());
        };
        for listener in config
            .listeners
            .iter()
            .filter(|l| l.protocol == Protocol::Tcp)
        {
            let listen = listener.addr;
            if addresses_clash(status, listen) {
                return Err(self.invalid(
                    "status",
                    status.to_string(),
                    format!(
                        "the status listener cannot share the workers' address (listener {:?} = {listen}); choose another port",
                        listener.name
                    ),
                ));
            }
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
        self.check_tls(config)?;
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

impl Settings {
    /// `tls-cert` and `tls-key` come together, and each is a readable PEM file.
    fn check_tls(&self, config: &Config) -> Result<(), ConfigError> {
        let (cert, key) = match (&config.tls_cert, &config.tls_key) {
            (None, None) => return Ok(()),
            (Some(cert), Some(key)) => (cert, key),
            (Some(cert), None) => {
                return Err(self.invalid(
                    "tls-cert",
                    cert.display().to_string(),
                    "needs tls-key, the certificate's private key",
                ));
            }
            (None, Some(key)) => {
                return Err(self.invalid(
                    "tls-key",
                    key.display().to_string(),
                    "needs tls-cert, the certificate it is the key of",
                ));
            }
        };
        for (name, path, label) in [
            ("tls-cert", cert, "CERTIFICATE"),
            ("tls-key", key, "PRIVATE KEY"),
        ] {
            let text = std::fs::read_to_string(path).map_err(|err| {
                self.invalid(
                    name,
                    path.display().to_string(),
                    format!("cannot read it: {err}"),
                )
            })?;
            if !text.contains("-----BEGIN ") || !text.contains(label) {
                return Err(self.invalid(
                    name,
                    path.display().to_string(),
                    format!("expected PEM with a {label} block"),
                ));
            }
        }
        Ok(())
    }
}

/// Whether two TCP listeners on `a` and `b` would take the same connections, so the second
/// `bind` fails (or, with `SO_REUSEPORT`, joins the first one's group): the same port and
/// the same address, or an unspecified address of the other's family. An unspecified IPv6
/// address is dual-stack (Steer's listeners clear `IPV6_V6ONLY`), so `[::]:P` also takes
/// every IPv4 address; a specific IPv6 address and an IPv4 one never meet. IPv4-mapped IPv6
/// addresses count as the IPv4 address they carry.
fn addresses_clash(a: SocketAddr, b: SocketAddr) -> bool {
    use std::net::IpAddr;
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    match (a.ip().to_canonical(), b.ip().to_canonical()) {
        (IpAddr::V4(x), IpAddr::V4(y)) => x == y || x.is_unspecified() || y.is_unspecified(),
        (IpAddr::V6(x), IpAddr::V6(y)) => x == y || x.is_unspecified() || y.is_unspecified(),
        (IpAddr::V6(v6), IpAddr::V4(_)) | (IpAddr::V4(_), IpAddr::V6(v6)) => v6.is_unspecified(),
    }
}

#[cfg(test)]
mod tests {
    use super::addresses_clash;

    #[test]
    fn listeners_clash_only_where_the_kernel_would_share_their_connections() {
        for (a, b, clash) in [
            ("0.0.0.0:8000", "[::1]:8000", false),
            ("127.0.0.1:8000", "[::1]:8000", false),
            ("127.0.0.1:8000", "127.0.0.2:8000", false),
            ("127.0.0.1:8000", "127.0.0.1:8001", false),
            ("127.0.0.1:0", "127.0.0.1:0", false),
            ("0.0.0.0:8000", "[::]:8000", true),
            ("127.0.0.1:8000", "[::]:8000", true),
            ("0.0.0.0:8000", "127.0.0.1:8000", true),
            ("[::]:8000", "[::1]:8000", true),
            ("[::1]:8000", "[::1]:8000", true),
            ("[::ffff:127.0.0.1]:8000", "127.0.0.1:8000", true),
            ("[::ffff:127.0.0.1]:8000", "0.0.0.0:8000", true),
        ] {
            let (a, b) = (a.parse().expect("a"), b.parse().expect("b"));
            assert_eq!(addresses_clash(a, b), clash, "{a} and {b}");
            assert_eq!(addresses_clash(b, a), clash, "{b} and {a}");
        }
    }
}
