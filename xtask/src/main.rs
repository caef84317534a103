//! Project automation, run as `cargo xtask <command>` (an alias in `.cargo/config.toml`).
//!
//! - `setup`: install what building and testing need, idempotently (rustfmt, clippy,
//!   nightly + rust-src and bpf-linker for the eBPF program, python3 and nodejs for the
//!   external-worker tests, systemd-analyze for the unit-file test, cargo-deb for the
//!   package test; hadolint, buildah and a debootstrapped Debian base image for the
//!   Dockerfile test).
//! - `run [-- ARGS]`: build `steer` (release) and start the demo cluster on 127.0.0.1:8000
//!   with status on 127.0.0.1:8001; ARGS are added to `steer run`.
//! - `test`: formatting, clippy, `dist`, then every unit and integration test. What CI runs.
//! - `dist`: the release build packaged in `target/dist/`: `steer_<version>_<arch>.deb`
//!   and a `.tar.gz` for other distributions (see `dist.rs`).
//! - `bench [--quick] [--peers] [--no-datagrams] [--perf [--policy P]]`: every balancing policy against the
//!   userspace baselines and peers, or a `perf` profile of one policy's new-connection
//!   path; reports in `target/bench/` (see `bench.rs`).
//! - `soak [--seconds N]`: load plus a rolling restart every 5 s for N seconds (default
//!   60); fails if a request fails or the primary's fds or memory grow.
//! - `fuzz [--seconds N] [TARGET]...`: run the fuzz targets (`fuzz/`, cargo-fuzz) for N
//!   seconds each (default 60), starting from the kept corpus; fails on a crash, whose input
//!   lands in `fuzz/artifacts/`. `test` runs each for 10 s.

use std::process::{Command, ExitCode};

mod bench;
mod dist;
mod setup;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("run") => run(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("dist") => dist::run(&args[1..]),
        Some("soak") => soak(&args[1..]),
        Some("fuzz") => fuzz(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            println!(
                "usage: cargo xtask <setup | run [-- STEER_RUN_ARGS] | test [-- CARGO_TEST_ARGS] | \
                 dist | bench [--quick] [--peers] [--no-datagrams] [--perf [--policy P]] | soak [--seconds N] | \
                 fuzz [--seconds N] [TARGET]...>"
            );
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(format!("unknown command {other:?}; try `cargo xtask help`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command, echoing it first; fails with its exit status.
pub(crate) fn step(program: &str, args: &[&str]) -> Result<(), String> {
    eprintln!("xtask: $ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{program} {}` failed ({status})", args.join(" ")))
    }
}

pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

fn passthrough(args: &[String]) -> Vec<&str> {
    let args = match args.first().map(String::as_str) {
        Some("--") => &args[1..],
        _ => args,
    };
    args.iter().map(String::as_str).collect()
}

fn run(args: &[String]) -> Result<(), String> {
    setup::run()?;
    step(
        "cargo",
        &[
            "build",
            "--release",
            "--package",
            "steer",
            "--bin",
            "steer",
            "--features",
            QUIC,
        ],
    )?;
    let steer = workspace_root().join("target/release/steer");
    let mut run_args = vec![
        "run",
        "--listen",
        "127.0.0.1:8000",
        "--status",
        "127.0.0.1:8001",
        "--demo-faults",
    ];
    run_args.extend(passthrough(args));
    eprintln!(
        "\nxtask: starting the demo cluster. Try, from another terminal:\n\
         \x20 curl -i http://127.0.0.1:8000/            # answered by one worker (X-Steer-Worker)\n\
         \x20 {steer} status                            # the slot table\n\
         \x20 curl http://127.0.0.1:8001/metrics        # Prometheus metrics\n\
         \x20 kill -USR2 $(pgrep -of 'steer run')       # zero-downtime rolling restart\n\
         \x20 curl http://127.0.0.1:8000/crash          # a worker crashes and is restarted\n\
         Stop with Ctrl-C (graceful drain).\n",
        steer = steer.display()
    );
    let status = Command::new(&steer)
        .args(&run_args)
        .status()
        .map_err(|e| format!("cannot start {}: {e}", steer.display()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("steer exited with {status}"))
    }
}

fn test(args: &[String]) -> Result<(), String> {
    setup::run()?;
    // Tests that set sysctls need root; say so up front instead of failing obscurely.
    if !setup::is_root() {
        eprintln!(
            "xtask: warning: not running as root; tests that set net.ipv4.tcp_migrate_req will fail"
        );
    }
    step("cargo", &["fmt", "--all", "--check"])?;
    // The fuzz crate is outside the workspace, so `cargo fmt --all` does not see it.
    let fuzz_sources: Vec<String> = FUZZ_TARGETS
        .iter()
        .map(|target| format!("fuzz/fuzz_targets/{target}.rs"))
        .collect();
    let mut rustfmt = vec!["--edition", "2024", "--check"];
    rustfmt.extend(fuzz_sources.iter().map(String::as_str));
    step("rustfmt", &rustfmt)?;
    step(
        "cargo",
        &["clippy", "--all-targets", "--", "-D", "warnings"],
    )?;
    // The eBPF program, linted for its own target (nightly, build-std).
    step(
        "rustup",
        &[
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "steer-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // The integration tests drive the binaries, so build them (and the examples) first.
    // Plain cargo commands act on the workspace's default members: everything but the
    // eBPF crate, which runtime/build.rs builds for its own target.
    // With QUIC (the demo's HTTP/3, the quinn example), which tests/quic.rs drives.
    step(
        "cargo",
        &["build", "--bins", "--examples", "--features", QUIC],
    )?;
    // And the release primary, whose memory a test holds to the budget users see,
    // packaged: tests/tests/dist.rs installs the .deb.
    dist::build()?;
    // Every test binary runs even after one fails: a CI log shows every failure at once.
    // With QUIC too: `cargo test` builds the `steer` binary again, with the features of
    // this command, and the QUIC tests drive that binary.
    let mut test_args = vec!["test", "--no-fail-fast", "--features", QUIC];
    let extra = passthrough(args);
    if !extra.is_empty() {
        test_args.push("--");
        test_args.extend(extra);
    }
    step("cargo", &test_args)?;
    // Every fuzz target, briefly, from the kept corpus: a smoke run, not a campaign.
    run_fuzz(&FUZZ_TARGETS, FUZZ_SECONDS_IN_TEST, Build::Quick)
}

/// The feature that builds QUIC into `steer` (the demo's HTTP/3, `steer::quic::quinn`): off
/// by default, so that a TCP-only demo worker stays within its memory budget; on in what
/// xtask builds to run, test, package and measure. tests/lifecycle.rs builds the release
/// binary without it, for the budget.
pub(crate) const QUIC: &str = "steer/quic";

/// The fuzz targets: the binaries of `fuzz/` and the directories of `fuzz/corpus/`.
const FUZZ_TARGETS: [&str; 4] = ["ipc_message", "http_head", "config_toml", "quic_header"];

/// Seconds each fuzz target runs in `cargo xtask test`.
const FUZZ_SECONDS_IN_TEST: u32 = 10;

fn fuzz(args: &[String]) -> Result<(), String> {
    let mut seconds = 60;
    let mut targets = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|value| value.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--seconds: expected a whole number of seconds, at least 1")?;
            }
            target if FUZZ_TARGETS.contains(&target) => targets.push(target),
            other => {
                return Err(format!(
                    "fuzz: unknown argument {other:?}; targets are {}",
                    FUZZ_TARGETS.join(", ")
                ));
            }
        }
    }
    if targets.is_empty() {
        targets.extend(FUZZ_TARGETS);
    }
    setup::run()?;
    run_fuzz(&targets, seconds, Build::Optimized)
}

/// How the fuzz targets are built. Either way with overflow checks and debug assertions,
/// and without a sanitizer: the parsers are safe Rust, so the bugs to find are panics and
/// broken invariants.
#[derive(Clone, Copy, PartialEq)]
enum Build {
    /// Unoptimized: half the build time (1 min 45 s against 3 min 18 s from clean), and
    /// still about 20,000 inputs a second per target: `test`'s 10 s smoke run.
    Quick,
    /// Optimized (`-O -a`), about 15 times the inputs per second: `fuzz`, a campaign.
    Optimized,
}

/// Runs each target for `seconds` (libFuzzer's `-max_total_time`), reading the kept corpus
/// and writing what it finds to `target/fuzz-corpus/`, so the repository stays untouched.
fn run_fuzz(targets: &[&str], seconds: u32, build: Build) -> Result<(), String> {
    let profile: &[&str] = match build {
        Build::Quick => &["--dev"],
        Build::Optimized => &["-O", "-a"],
    };
    let root = workspace_root();
    for target in targets {
        let found = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&found)
            .map_err(|e| format!("cannot create {}: {e}", found.display()))?;
        let found = found.display().to_string();
        let kept = format!("fuzz/corpus/{target}");
        let time = format!("-max_total_time={seconds}");
        let mut args = vec![
            "run",
            "nightly",
            "cargo",
            "fuzz",
            "run",
            "--fuzz-dir",
            "fuzz",
        ];
        args.extend(profile);
        args.extend([
            "--sanitizer",
            "none",
            target,
            &found,
            &kept,
            "--",
            &time,
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ]);
        step("rustup", &args)?;
    }
    Ok(())
}

fn soak(args: &[String]) -> Result<(), String> {
    let seconds = match args {
        [] => "60".to_owned(),
        [flag, value] if flag == "--seconds" => match value.parse::<u64>() {
            Ok(n) if n >= 5 => n.to_string(),
            _ => {
                return Err(format!(
                    "--seconds {value:?}: expected a whole number, at least 5"
                ));
            }
        },
        _ => return Err("usage: cargo xtask soak [--seconds N]".into()),
    };
    setup::run()?;
    step("cargo", &["build", "--bins"])?;
    eprintln!(
        "xtask: $ STEER_SOAK_SECONDS={seconds} cargo test -p steer-tests --test soak -- --nocapture"
    );
    let status = Command::new("cargo")
        .args([
            "test",
            "--package",
            "steer-tests",
            "--test",
            "soak",
            "--",
            "--nocapture",
        ])
        .env("STEER_SOAK_SECONDS", &seconds)
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the soak failed ({status})"))
    }
}
