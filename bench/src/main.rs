//! `steer-bench`: the load generators on their own (`load` for HTTP/1.1, `udp` for
//! datagrams, `quic` for HTTP/3), the whole benchmark (`suite`), or a `perf` profile of one
//! policy's new-connection path (`profile`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use steer_bench::datagram::{self, Pace, UdpSpec};
use steer_bench::load::{self, LoadSpec, Mode, Stop};
use steer_bench::profile::{self, ProfileConfig};
use steer_bench::quic::{self, QuicMode, QuicSpec};
use steer_bench::suite::{self, SuiteConfig, subject};

/// Steer's benchmark tools.
#[derive(Debug, Parser)]
#[command(name = "steer-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sends HTTP/1.1 GET load to one server and prints what it saw.
    Load(LoadArgs),
    /// Sends UDP datagrams from many client sockets to one loopback server that answers
    /// each (Steer's demo) and prints what it saw.
    Udp(UdpArgs),
    /// Makes QUIC handshakes or HTTP/3 requests against one loopback server and prints
    /// what it saw.
    Quic(QuicArgs),
    /// Runs the whole benchmark (what `cargo xtask bench` starts) and writes the reports.
    Suite(SuiteArgs),
    /// Profiles one policy under new-connection load with `perf` (what `cargo xtask bench
    /// --perf` starts) and writes `perf.md`.
    Profile(ProfileArgs),
}

/// `steer-bench profile`.
#[derive(Debug, clap::Args)]
struct ProfileArgs {
    /// The `steer` binary to profile (a release build).
    #[arg(long)]
    steer: PathBuf,
    /// The `--balance` policy.
    #[arg(long, default_value = "round-robin")]
    policy: String,
    /// Length of the profiled run.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    duration: Duration,
    /// Where perf.data and perf.md go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

/// `steer-bench suite`.
#[derive(Debug, clap::Args)]
struct SuiteArgs {
    /// The `steer` binary to measure (a release build).
    #[arg(long)]
    steer: PathBuf,
    /// Where report.md, report.json and report.svg go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// The Node cluster script (bench/peers/node_cluster.js).
    #[arg(long)]
    node_script: PathBuf,
    /// One short round (under two minutes on two cores) instead of the full run.
    #[arg(long)]
    quick: bool,
    /// Add the Node comparison: the Node app (app.js beside --node-script) under Steer,
    /// the cluster module and PM2 (installed with npm into <out>/pm2 when missing).
    #[arg(long)]
    peers: bool,
    /// Run only these subjects (comma-separated names, e.g. steer-node,pm2).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Leave out the UDP and QUIC subjects.
    #[arg(long)]
    no_datagrams: bool,
}

/// `steer-bench udp`.
#[derive(Debug, clap::Args)]
struct UdpArgs {
    /// The server, a loopback address, e.g. 127.0.0.1:9000.
    target: SocketAddr,
    /// Client sockets.
    #[arg(short, long, default_value_t = 64)]
    flows: usize,
    /// Closed loop: datagrams in flight per flow (the default pace).
    #[arg(short, long, default_value_t = 2, conflicts_with = "rate")]
    window: usize,
    /// Open loop: datagrams per second, all flows together.
    #[arg(short, long)]
    rate: Option<f64>,
    /// Client threads.
    #[arg(short, long, default_value_t = 2)]
    threads: usize,
    /// Send for this long.
    #[arg(short, long, value_parser = parse_duration, default_value = "5s")]
    duration: Duration,
    /// Stop sending after this many datagrams (at the latest at --duration).
    #[arg(short = 'n', long)]
    datagrams: Option<u64>,
    /// Loopback source addresses to spread the flows over (127.0.0.1..N).
    #[arg(long, default_value_t = 1)]
    sources: u8,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `steer-bench quic`.
#[derive(Debug, clap::Args)]
struct QuicArgs {
    /// The server, a loopback address.
    target: SocketAddr,
    /// handshakes (a fresh socket and a full handshake each) or requests (on established
    /// connections).
    #[arg(long, default_value = "requests")]
    mode: String,
    /// Concurrent handshakes, or connections.
    #[arg(short, long, default_value_t = 16)]
    lanes: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Client threads.
    #[arg(short, long, default_value_t = 2)]
    threads: usize,
    /// Run this long.
    #[arg(short, long, value_parser = parse_duration, default_value = "5s")]
    duration: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `steer-bench load`.
#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// The server, e.g. 127.0.0.1:8000.
    target: SocketAddr,
    /// keepalive (persistent connections) or connect (a new connection per request).
    #[arg(long, default_value = "keepalive")]
    mode: Mode,
    /// Concurrent connections.
    #[arg(short, long, default_value_t = 64)]
    connections: usize,
    /// Client threads.
    #[arg(short, long, default_value_t = 2)]
    threads: usize,
    /// Run this long (e.g. 10s); the default unless --requests is given.
    #[arg(short, long, value_parser = parse_duration, default_value = "5s")]
    duration: Duration,
    /// Stop after this many requests instead of after --duration.
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Request target.
    #[arg(long, default_value = "/")]
    path: String,
    /// Loopback source addresses to spread connections over (127.0.0.1..N).
    #[arg(long, default_value_t = 1)]
    sources: u8,
    /// Per-request timeout.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    timeout: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a duration such as 500ms or 10s"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{text:?}: unit must be ms, s or m")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// Prints the markdown report a run wrote, or its error.
fn print_report(result: Result<PathBuf, String>) -> ExitCode {
    match result {
        Ok(report) => {
            if let Ok(text) = std::fs::read_to_string(&report) {
                println!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("steer-bench: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a load report (as JSON with `json`), or its error.
fn print_outcome<R: std::fmt::Display + serde::Serialize>(
    outcome: std::io::Result<R>,
    json: bool,
) -> ExitCode {
    match outcome {
        Ok(report) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("steer-bench: {err}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Suite(args) => {
            let node = subject::find_program("node");
            let pm2 = if args.peers && node.is_some() {
                match subject::install_pm2(&args.out.join("pm2")) {
                    Ok(package) => Some(package),
                    Err(err) => {
                        eprintln!("steer-bench: {err}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                None
            };
            let programs = subject::Programs {
                steer: args.steer,
                node,
                node_script: args.node_script,
                pm2,
                nginx: subject::find_program("nginx"),
                scratch: args.out.join("scratch"),
            };
            let mut config = SuiteConfig::new(programs, args.out, args.quick, args.peers);
            if args.no_datagrams {
                config.datagrams = false;
                config.subjects = config.default_subjects();
            }
            if !args.only.is_empty() {
                config.subjects.retain(|s| args.only.contains(&s.name()));
            }
            print_report(suite::run(&config))
        }
        Command::Profile(args) => {
            let config = ProfileConfig {
                programs: subject::Programs {
                    steer: args.steer,
                    node: None,
                    node_script: PathBuf::new(),
                    pm2: None,
                    nginx: None,
                    scratch: args.out.join("scratch"),
                },
                policy: args.policy,
                workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
                length: args.duration,
                out_dir: args.out,
            };
            print_report(profile::run(&config))
        }
        Command::Udp(args) => {
            let pace = args.rate.map_or(Pace::Window(args.window), Pace::Rate);
            let mut spec = UdpSpec::new(args.target, args.flows, pace, args.duration);
            spec.threads = args.threads;
            spec.limit = args.datagrams;
            spec.sources = args.sources;
            print_outcome(datagram::run(&spec), args.json)
        }
        Command::Quic(args) => {
            let mode = match args.mode.as_str() {
                "handshakes" => QuicMode::Handshakes,
                "requests" => QuicMode::Requests,
                other => {
                    eprintln!("steer-bench: --mode {other:?}: expected handshakes or requests");
                    return ExitCode::FAILURE;
                }
            };
            let mut spec = QuicSpec::new(args.target, mode, args.lanes, args.duration);
            spec.streams = args.streams;
            spec.threads = args.threads;
            print_outcome(quic::run(&spec), args.json)
        }
        Command::Load(args) => {
            let mut spec = LoadSpec::new(
                args.target,
                args.mode,
                args.connections,
                args.requests
                    .map_or(Stop::After(args.duration), Stop::Requests),
            );
            spec.threads = args.threads;
            spec.path = args.path;
            spec.sources = args.sources;
            spec.timeout = args.timeout;
            match load::run(&spec) {
                Ok(report) if args.json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&report).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("steer-bench: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
