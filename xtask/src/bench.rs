//! `cargo xtask bench [--quick] [--peers] [--no-datagrams] [--perf [--policy P]]`: Steer's
//! policies against the userspace baselines (and Node cluster and nginx when present), side
//! by side, then UDP and QUIC.
//!
//! It builds `steer` and `steer-bench` in release mode and runs `steer-bench suite`, which
//! does the measuring and writes `target/bench/report.{md,json,svg}`. The suite runs from
//! the release build because the load generator shares the machine with the servers it
//! measures: an unoptimised client would take the CPU the servers need (and this xtask is
//! built in debug mode).
//!
//! - `--quick`: one short round, under two minutes on two cores.
//! - `--peers`: install nginx (and Node, npm) with apt when missing, so the peers are
//!   measured, and run the Node comparison: one Node app under Steer, Node's cluster
//!   module and PM2 (which `steer-bench` installs, pinned, with npm into `target/bench/pm2`).
//! - UDP and QUIC run in every mode (about 30 s of `--quick`): Steer's program on a `udp://`
//!   listener against plain `SO_REUSEPORT` and one socket, flows across a roll, and HTTP/3
//!   handshakes and requests against one quinn process. `--no-datagrams` leaves them out.
//! - `--perf`: instead of the suite, profile one policy's new-connection path with `perf`
//!   (installed with apt when missing) into `target/bench/perf.md`: where the server's and
//!   the client's microseconds go, and the steering program's own cost. `--policy`
//!   (default round-robin) picks the policy.

use std::path::Path;
use std::process::Command;

/// Runs the benchmark.
pub(crate) fn run(args: &[String]) -> Result<(), String> {
    const USAGE: &str =
        "usage: cargo xtask bench [--quick] [--peers] [--no-datagrams] [--perf [--policy P]]";
    let mut quick = false;
    let mut datagrams = true;
    let mut peers = false;
    let mut perf = false;
    let mut policy = "round-robin".to_owned();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--peers" => peers = true,
            "--no-datagrams" => datagrams = false,
            "--perf" => perf = true,
            "--policy" => match args.next() {
                Some(value) => policy.clone_from(value),
                None => return Err(format!("bench: --policy needs a value; {USAGE}")),
            },
            other => return Err(format!("bench: unknown argument {other:?}; {USAGE}")),
        }
    }
    if !crate::setup::is_root() {
        return Err(
            "bench: the eBPF policies need CAP_BPF; run `cargo xtask bench` as root".into(),
        );
    }
    crate::setup::run()?;
    if peers {
        ensure_peer("nginx", "nginx", "-v")?;
        ensure_peer("node", "nodejs", "--version")?;
        ensure_peer("npm", "npm", "--version")?;
    }
    if perf {
        ensure_peer("perf", "linux-perf", "--version")?;
    }
    crate::step(
        "cargo",
        &[
            "build",
            "--release",
            "--package",
            "steer",
            "--bin",
            "steer",
            "--features",
            crate::QUIC,
            "--package",
            "steer-bench",
            "--bin",
            "steer-bench",
        ],
    )?;
    let root = crate::workspace_root();
    let runner = root.join("target/release/steer-bench");
    let steer = root.join("target/release/steer");
    if perf {
        let out = root.join("target/bench").display().to_string();
        let steer = steer.display().to_string();
        return crate::step(
            &runner.display().to_string(),
            &[
                "profile", "--steer", &steer, "--policy", &policy, "--out", &out,
            ],
        );
    }
    let mut suite = vec![
        "suite".to_owned(),
        "--steer".into(),
        steer.display().to_string(),
        "--node-script".into(),
        root.join("bench/peers/node_cluster.js")
            .display()
            .to_string(),
        "--out".into(),
        root.join("target/bench").display().to_string(),
    ];
    if quick {
        suite.push("--quick".into());
    }
    if peers {
        suite.push("--peers".into());
    }
    if !datagrams {
        suite.push("--no-datagrams".into());
    }
    let args: Vec<&str> = suite.iter().map(String::as_str).collect();
    crate::step(&runner.display().to_string(), &args)
}

/// Installs `debian_package` when `program` is not found (`program version_flag` fails).
fn ensure_peer(program: &str, debian_package: &str, version_flag: &str) -> Result<(), String> {
    let found = ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"]
        .iter()
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file());
    if let Some(path) = found
        && Command::new(&path)
            .arg(version_flag)
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!("xtask bench: installing {debian_package} with apt (a peer to measure against)");
    crate::step("apt-get", &["update", "-q"])?;
    crate::step("apt-get", &["install", "-y", "-q", debian_package])
}
