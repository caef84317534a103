//! The `steer` command line: `steer run`, `steer check`, `steer status` and `steer top`.
//!
//! Exit status: 0 clean stop, 2 usage or configuration error (the message names the flag
//! or key and the bad value), 1 runtime failure with a message saying what to do.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{
    Balance, ByteSize, Config, ConfigError, Listener, LogFormat, Parsed, Settings, StatusAddr,
    StatusPaths, WORKER_NOFILE_RANGE, WorkerCount, WorkerOutput, parse_duration, parse_status_addr,
};

use crate::config::FLOW_TABLE_RANGE;
use crate::config::limits::{BURST_RANGE, PREFIX_V4_RANGE, PREFIX_V6_RANGE, TABLE_SIZE_RANGE};
use crate::config::{Cidr, ConnRate};
use crate::exit::EXIT_USAGE;

/// Top-level command line.
#[derive(Debug, Parser)]
#[command(
    name = "steer",
    version,
    about = "Run a network server as N worker processes behind one port, balanced in the kernel."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a primary and its workers (the built-in demo app, or COMMAND).
    Run(Box<RunArgs>),
    /// Validate the flags and the --config file without starting anything (exit 0, or
    /// exit 2 with the key, line and value at fault).
    Check(Box<RunArgs>),
    /// Print a running cluster's status.
    Status(StatusArgs),
    /// A live view of a running cluster, refreshed every second (q quits).
    Top(TopArgs),
}

/// `--listen`'s parser (clap wants a function).
fn parse_listener(s: &str) -> Result<Listener, String> {
    s.parse()
}

/// `steer run` flags. Every flag left out falls back to the `--config` file, then to
/// its default.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// An address every worker serves: [NAME=][tcp|udp://]HOST:PORT, no scheme meaning TCP;
    /// repeat for several listeners [default: 127.0.0.1:8000].
    #[arg(short, long, value_name = "LISTENER", value_parser = parse_listener)]
    pub listen: Vec<Listener>,
    /// Worker count, or `auto` for one per available CPU [default: auto].
    #[arg(short, long, value_name = "N|auto")]
    pub workers: Option<WorkerCount>,
    /// Steering policy [default: auto]: auto, kernel, round-robin, hash, least-loaded, cpu,
    /// shared, userspace.
    #[arg(short, long, value_name = "POLICY")]
    pub balance: Option<Balance>,
    /// Serve GET /status (JSON) and GET /metrics on this address (a bare PORT means
    /// 127.0.0.1:PORT).
    #[arg(long, value_name = "ADDR", value_parser = parse_status_addr)]
    pub status: Option<SocketAddr>,
    /// The status paths served to clients that are not on loopback, comma-separated
    /// (e.g. /ready,/live); loopback clients get every path [default: all of /status,
    /// /metrics, /ready and /live].
    #[arg(long, value_name = "PATHS")]
    pub status_public: Option<StatusPaths>,
    /// TOML file; flags override it. Keys are the long flag names.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Graceful drain limit before workers are SIGKILLed [default: 30s].
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// Heartbeat period [default: 1s].
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub health_interval: Option<Duration>,
    /// A worker that has not answered heartbeats for this long is hung [default: 3s].
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub health_timeout: Option<Duration>,
    /// A worker that has not registered within this is killed and replaced [default: 10s].
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub start_timeout: Option<Duration>,
    /// Crashes allowed per --restart-window before the slot is `failed` [default: 10].
    #[arg(long, value_name = "N")]
    pub max_restarts: Option<u32>,
    /// The window --max-restarts counts over [default: 60s].
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub restart_window: Option<Duration>,
    /// Write the primary's pid here (removed on exit).
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    /// Log format: text or json [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Workers' stdout and stderr: auto, tagged, journal or inherit [default: auto:
    /// journal when stderr is the journal, else tagged].
    #[arg(long, value_name = "WHERE")]
    pub worker_output: Option<WorkerOutput>,
    /// More logging (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less logging (-q warnings, -qq errors).
    #[arg(short, long, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
    /// The demo's QUIC listeners present this certificate chain (PEM) [default: a
    /// self-signed one made at start]. Needs --tls-key.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Enable the demo app's fault routes (/block, /crash, /alloc).
    #[arg(long)]
    pub demo_faults: bool,
    /// The demo closes a connection whose request head is not complete this long after it
    /// started [default: 10s].
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub demo_header_timeout: Option<Duration>,
    /// The demo closes a keep-alive connection idle this long between requests
    /// [default: 30s].
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub demo_idle_timeout: Option<Duration>,
    /// The demo closes a connection whose request body pauses this long [default: 30s].
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub demo_body_timeout: Option<Duration>,
    /// The demo closes a connection that reads none of its response for this long
    /// [default: 30s].
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub demo_send_timeout: Option<Duration>,
    /// Do not set net.ipv4.tcp_migrate_req=1 in kernel mode (queued connections of a
    /// closing worker are then reset instead of migrated).
    #[arg(long)]
    pub no_tcp_migrate_req: bool,
    /// Pin slot i's worker to the (i mod n)-th of the n CPUs the primary may run on
    /// (implied by --balance cpu).
    #[arg(long)]
    pub cpu_affinity: bool,
    /// Replace a worker gracefully once its resident memory passes SIZE (e.g. 256MiB).
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<ByteSize>,
    /// Workers switch to this user (name or uid) once their socket is registered.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Workers switch to this group (name or gid) [default: the user's group].
    #[arg(long, value_name = "GROUP", requires = "user")]
    pub group: Option<String>,
    /// Limit each worker's open files (RLIMIT_NOFILE).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(*WORKER_NOFILE_RANGE.start()..=*WORKER_NOFILE_RANGE.end()))]
    pub worker_nofile: Option<u64>,
    /// Limit each worker's address space (RLIMIT_AS), e.g. 2GiB.
    #[arg(long, value_name = "SIZE")]
    pub worker_memory_limit: Option<ByteSize>,
    /// Refuse a client's new connections over RATE, per client prefix, in the kernel
    /// before any worker wakes (e.g. 50/s, 600/m; eBPF policies only).
    #[arg(long, value_name = "RATE")]
    pub client_conn_rate: Option<ConnRate>,
    /// Connections a client may open at once on top of its rate [default: one second's
    /// worth of --client-conn-rate].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(*BURST_RANGE.start()..=*BURST_RANGE.end()))]
    pub client_conn_burst: Option<u64>,
    /// IPv4 clients sharing this prefix length share one limit [default: 32].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(*PREFIX_V4_RANGE.start()..=*PREFIX_V4_RANGE.end()))]
    pub client_prefix_v4: Option<u64>,
    /// IPv6 clients sharing this prefix length share one limit [default: 64].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(*PREFIX_V6_RANGE.start()..=*PREFIX_V6_RANGE.end()))]
    pub client_prefix_v6: Option<u64>,
    /// Never limit clients in this prefix (e.g. your load balancer, health checkers);
    /// repeat for more.
    #[arg(long, value_name = "CIDR")]
    pub client_exempt: Vec<Cidr>,
    /// Clients the kernel tracks at most; the least recently seen are evicted first
    /// [default: 65536].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(*TABLE_SIZE_RANGE.start()..=*TABLE_SIZE_RANGE.end()))]
    pub client_table_size: Option<u64>,
    /// A UDP flow idle this long leaves the flow table: its next datagram is a new flow;
    /// 0 turns flow tracking off (every datagram steered on its own) [default: 30s].
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub udp_flow_timeout: Option<Duration>,
    /// UDP flows the kernel tracks at most, per UDP listener; the least recently seen are
    /// evicted first [default: 65536].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(*FLOW_TABLE_RANGE.start()..=*FLOW_TABLE_RANGE.end()))]
    pub udp_flow_table: Option<u64>,
    /// Every eBPF policy steers new connections and new UDP flows around a stalled worker
    /// (connections waiting, no accept for 0.5 ms) [default: on].
    #[arg(long, overrides_with = "no_avoid_stalls")]
    pub avoid_stalls: bool,
    /// Turns stall avoidance off: a stalled worker keeps its share until it is hung.
    #[arg(long, overrides_with = "avoid_stalls")]
    pub no_avoid_stalls: bool,
    /// Receive queue of every worker's UDP and QUIC socket, past `net.core.rmem_max` when
    /// the primary has CAP_NET_ADMIN: what a worker that stops reading for a moment can
    /// hold before datagrams are dropped [default: 4MiB].
    #[arg(long, value_name = "SIZE")]
    pub udp_receive_buffer: Option<ByteSize>,
    /// External worker program; gets its listening socket as fd 3 (LISTEN_FDS=1).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `steer status` flags.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Address of the cluster's status listener (a bare PORT means 127.0.0.1:PORT).
    #[arg(long, value_name = "ADDR", value_parser = parse_status_addr, default_value = "127.0.0.1:8001")]
    pub status: SocketAddr,
    /// Print the raw JSON document.
    #[arg(long)]
    pub json: bool,
}

/// `steer top` flags.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Address of the cluster's status listener (a bare PORT means 127.0.0.1:PORT).
    #[arg(long, value_name = "ADDR", value_parser = parse_status_addr, default_value = "127.0.0.1:8001")]
    pub status: SocketAddr,
    /// Time between refreshes.
    #[arg(long, value_name = "D", value_parser = parse_duration, default_value = "1s")]
    pub interval: Duration,
}

impl RunArgs {
    /// The flags as [`Settings`], to overlay on the file's.
    fn settings(&self) -> Settings {
        Settings {
            listen: (!self.listen.is_empty()).then(|| self.listen.clone()),
            workers: self.workers,
            balance: self.balance.map(Parsed),
            status: self.status.map(|addr| Parsed(StatusAddr(addr))),
            status_public: self.status_public,
            shutdown_timeout: self.shutdown_timeout.map(Parsed),
            health_interval: self.health_interval.map(Parsed),
            health_timeout: self.health_timeout.map(Parsed),
            start_timeout: self.start_timeout.map(Parsed),
            max_restarts: self.max_restarts,
            restart_window: self.restart_window.map(Parsed),
            pid_file: self.pid_file.clone(),
            log_format: self.log_format.map(Parsed),
            worker_output: self.worker_output.map(Parsed),
            demo_faults: self.demo_faults.then_some(true),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            demo_header_timeout: self.demo_header_timeout.map(Parsed),
            demo_idle_timeout: self.demo_idle_timeout.map(Parsed),
            demo_body_timeout: self.demo_body_timeout.map(Parsed),
            demo_send_timeout: self.demo_send_timeout.map(Parsed),
            tcp_migrate_req: self.no_tcp_migrate_req.then_some(false),
            cpu_affinity: self.cpu_affinity.then_some(true),
            max_memory: self.max_memory.map(Parsed),
            user: self.user.clone(),
            group: self.group.clone(),
            worker_nofile: self.worker_nofile,
            worker_memory_limit: self.worker_memory_limit.map(Parsed),
            command: (!self.command.is_empty()).then(|| self.command.clone()),
            client_conn_rate: self.client_conn_rate.map(Parsed),
            client_conn_burst: self.client_conn_burst,
            client_prefix_v4: self.client_prefix_v4,
            client_prefix_v6: self.client_prefix_v6,
            client_exempt: (!self.client_exempt.is_empty()).then(|| self.client_exempt.clone()),
            client_table_size: self.client_table_size,
            udp_flow_timeout: self.udp_flow_timeout.map(Parsed),
            udp_flow_table: self.udp_flow_table,
            avoid_stalls: if self.no_avoid_stalls {
                Some(false)
            } else {
                self.avoid_stalls.then_some(true)
            },
            udp_receive_buffer: self.udp_receive_buffer.map(Parsed),
            origin: Default::default(),
        }
    }

    /// Flags over file over defaults, validated.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        let flags = self.settings();
        let mut config = flags.clone().overlay(file).into_config()?;
        config.overrides = flags;
        config.verbosity = i8::try_from(self.verbose)
            .unwrap_or(i8::MAX)
            .saturating_sub_unsigned(self.quiet);
        config.config_file = self.config.clone();
        Ok(config)
    }
}

/// Entry point of the `steer` binary.
pub fn main() -> ExitCode {
    if let Some(code) = crate::demo::run_worker_if_requested() {
        return code;
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|command| command == "run")
    {
        // Before anything that takes time (parsing, reading the config, starting the log
        // writer): a SIGTERM from here on waits for the primary's loop.
        crate::primary::hold_signals();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let config = match args.config() {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("steer: {}", crate::errors::error_chain(&err));
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            crate::logging::init(config.log_format, config.verbosity);
            let program = match &config.command {
                Some(argv) => crate::primary::WorkerProgram::External(argv.clone()),
                None => crate::primary::WorkerProgram::Demo,
            };
            crate::primary::run(config, program, crate::primary::Hooks::default())
        }
        Command::Check(args) => check(&args),
        Command::Status(args) => crate::status::client::print(args.status, args.json),
        Command::Top(args) => crate::top::run(args.status, args.interval),
    }
}

/// `steer check`: validate, print what would run, start nothing.
fn check(args: &RunArgs) -> ExitCode {
    match args.config() {
        Ok(config) => {
            if let Some(path) = &config.pid_file
                && let Err(err) = crate::primary::pidfile::PidFile::probe(path)
            {
                eprintln!("steer: --pid-file: {}", crate::errors::error_chain(&err));
                return ExitCode::from(EXIT_USAGE);
            }
            let source = config
                .config_file
                .as_ref()
                .map_or_else(|| "the flags".to_owned(), |p| p.display().to_string());
            println!("{source}: ok");
            print!("{}", config.summary());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("steer: {}", crate::errors::error_chain(&err));
            ExitCode::from(EXIT_USAGE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("steer").chain(args.iter().copied()))
    }

    #[test]
    fn bad_flag_values_are_usage_errors_naming_flag_and_value() {
        for (args, flag, value) in [
            (&["run", "--workers", "0"][..], "--workers", "0"),
            (&["run", "--workers", "x"], "--workers", "x"),
            (&["run", "--listen", "nope"], "--listen", "nope"),
            (&["run", "--balance", "foo"], "--balance", "foo"),
            (
                &["run", "--shutdown-timeout", "forever"],
                "--shutdown-timeout",
                "forever",
            ),
        ] {
            let err = parse(args).expect_err("must be refused");
            assert_eq!(err.exit_code(), 2);
            let text = err.to_string();
            assert!(
                text.contains(flag) && text.contains(value),
                "{args:?}: {text}"
            );
        }
    }

    #[test]
    fn command_after_double_dash_is_kept_verbatim() {
        let cli = parse(&[
            "run",
            "-w",
            "2",
            "--",
            "python3",
            "-m",
            "http.server",
            "--bind",
        ])
        .expect("valid");
        let Command::Run(args) = cli.command else {
            panic!("run expected")
        };
        assert_eq!(args.command, ["python3", "-m", "http.server", "--bind"]);
        let config = args.config().expect("valid config");
        assert_eq!(config.workers, 2);
        assert_eq!(config.command.as_deref(), Some(&args.command[..]));
    }

    #[test]
    fn every_run_flag_has_a_config_key_and_every_key_is_documented() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let run = cli.find_subcommand("run").expect("run");
        // Flags that are not settings: the file itself, and the log level counters.
        let not_settings = ["config", "verbose", "quiet", "help", "command"];
        for arg in run.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if not_settings.contains(&long) {
                continue;
            }
            let key = long.strip_prefix("no-").unwrap_or(long);
            assert!(Settings::KEYS.contains(&key), "--{long} has no config key");
        }
        let docs = include_str!("../../docs/config.md");
        for key in Settings::KEYS {
            assert!(
                docs.contains(&format!("| `{key}` |")),
                "docs/config.md has no row for `{key}`"
            );
        }
    }

    #[test]
    fn check_validates_the_same_way_as_run() {
        let Command::Check(args) = parse(&["check", "--worker-nofile", "4096", "--user", "nobody"])
            .expect("valid")
            .command
        else {
            panic!("check expected")
        };
        let config = args.config().expect("valid");
        assert_eq!(config.worker_nofile, Some(4096));
        assert_eq!(config.overrides.user.as_deref(), Some("nobody"));
        let err = parse(&["check", "--worker-nofile", "2"]).expect_err("out of range");
        assert!(err.to_string().contains("16..=1048576"), "{err}");
        let err = parse(&["run", "--group", "nogroup"]).expect_err("needs --user");
        assert!(err.to_string().contains("--user"), "{err}");
    }

    #[test]
    fn verbosity_counts() {
        let Command::Run(args) = parse(&["run", "-vv"]).expect("valid").command else {
            panic!()
        };
        assert_eq!(args.config().expect("valid").verbosity, 2);
        let Command::Run(args) = parse(&["run", "-q"]).expect("valid").command else {
            panic!()
        };
        assert_eq!(args.config().expect("valid").verbosity, -1);
    }
}
