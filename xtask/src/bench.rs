//! `cargo xtask bench [--quick] [--peers]`: Steer's policies against the userspace
//! baselines (and Node cluster and nginx when present), side by side.
//!
//! It builds `steer` and `steer-bench` in release mode and runs `steer-bench suite`, which
//! does the measuring and writes `target/bench/report.{md,json,svg}`. The suite runs from
//! the release build because the load generator shares the machine with the servers it
//! measures: an unoptimised client would take the CPU the servers need (and this xtask is
//! built in debug mode).
//!
//! - `--quick`: one short round, under two minutes on two cores.
//! - `--peers`: install nginx (and Node) with apt when missing, so the peers are measured.

use std::path::Path;
use std::process::Command;

/// Runs the benchmark.
pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let mut quick = false;
    let mut peers = false;
    for arg in args {
        match arg.as_str() {
            "--quick" => quick = true,
            "--peers" => peers = true,
            other => {
                return Err(format!(
                    "bench: unknown argument {other:?}; usage: cargo xtask bench [--quick] [--peers]"
                ));
            }
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
            "--package",
            "steer-bench",
            "--bin",
            "steer-bench",
        ],
    )?;
    let root = crate::workspace_root();
    let runner = root.join("target/release/steer-bench");
    let steer = root.join("target/release/steer");
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
