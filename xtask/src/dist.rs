//! `cargo xtask dist`: what a server needs to run Steer, in `target/dist/`.
//!
//! - `steer_<version>_<arch>.deb` (cargo-deb, from `[package.metadata.deb]` in
//!   `runtime/Cargo.toml`): `/usr/bin/steer`, the systemd unit, `/etc/steer/steer.toml`
//!   as a conffile, and the documentation under `/usr/share/doc/steer/`.
//! - `steer-<version>-<arch>-linux.tar.gz`, for other distributions: the binary, the unit
//!   as it is in `deploy/systemd/` (it expects `/usr/local/bin/steer`), the example
//!   `steer.toml` and the README.
//!
//! Both hold the release build, stripped, which embeds the eBPF program: the target
//! machine needs no toolchain. The unit in the `.deb` is derived here from
//! `deploy/systemd/steer.service`, so there is one unit to maintain.
//!
//! `cargo xtask test` runs this before the tests: `tests/tests/dist.rs` installs the
//! package. From a warm target directory it takes a few seconds (the release build is
//! the one `test` makes anyway).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::{setup, step, workspace_root};

/// Where the binary lives in `deploy/systemd/steer.service` (for a hand install).
const UNIT_BINARY: &str = "/usr/local/bin/steer";
/// Where the package puts it.
const PACKAGE_BINARY: &str = "/usr/bin/steer";

/// Builds the package and the tarball.
pub(crate) fn run(args: &[String]) -> Result<(), String> {
    if let Some(arg) = args.first() {
        return Err(format!(
            "dist: unknown argument {arg:?}; usage: cargo xtask dist"
        ));
    }
    setup::ensure_ebpf_toolchain()?;
    setup::ensure_cargo_deb()?;
    build()
}

/// Builds the release binary, then the `.deb` and the tarball from it. Assumes the tools
/// are installed (`setup`).
pub(crate) fn build() -> Result<(), String> {
    let started = Instant::now();
    let root = workspace_root();
    let dist = root.join("target/dist");
    let version = steer_version(&root)?;
    write_package_unit(&root, &dist)?;
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
            crate::QUIC,
        ],
    )?;
    let deb = build_deb(&dist)?;
    let tarball = build_tarball(&root, &dist, &version)?;
    eprintln!(
        "xtask dist: in {:.1?}:\n  {} ({})\n  {} ({})",
        started.elapsed(),
        deb.display(),
        size(&deb),
        tarball.display(),
        size(&tarball)
    );
    Ok(())
}

/// `target/dist/debian/`, cargo-deb's `maintainer-scripts`: the unit the package installs
/// (the repository's, running `/usr/bin/steer`) and `deploy/debian/postinst`.
fn write_package_unit(root: &Path, dist: &Path) -> Result<(), String> {
    let source = root.join("deploy/systemd/steer.service");
    let unit = read(&source)?;
    let runs_the_binary = |prefix: &str| {
        unit.lines()
            .any(|line| line.starts_with(&format!("{prefix}={UNIT_BINARY} ")))
    };
    if !runs_the_binary("ExecStart") || !runs_the_binary("ExecStartPre") {
        return Err(format!(
            "{}: ExecStart= and ExecStartPre= no longer run {UNIT_BINARY}; update \
             xtask/src/dist.rs, which rewrites that path to {PACKAGE_BINARY} for the package",
            source.display()
        ));
    }
    let dir = dist.join("debian");
    create_dir(&dir)?;
    // The settings' lines only: the comments keep describing an install by hand.
    let packaged: String = unit
        .lines()
        .map(|line| {
            if line.starts_with('#') {
                line.to_owned()
            } else {
                line.replace(UNIT_BINARY, PACKAGE_BINARY)
            }
        })
        .fold(String::new(), |all, line| all + &line + "\n");
    write(&dir.join("steer.service"), &packaged)?;
    // And the maintainer script cargo-deb completes with its systemd lines.
    let postinst = root.join("deploy/debian/postinst");
    fs::copy(&postinst, dir.join("postinst"))
        .map(|_| ())
        .map_err(|e| format!("cannot copy {}: {e}", postinst.display()))
}

/// `cargo deb` on the release build just made; returns the package's path.
fn build_deb(dist: &Path) -> Result<PathBuf, String> {
    let out = dist.display().to_string();
    // --strip: without the line tables `[profile.release]` keeps for profiling (28 of the
    // binary's 34 MB) and without symbols, as Debian ships its binaries: a panic still
    // says where, its backtrace no longer names functions.
    let args = [
        "deb",
        "--package",
        "steer",
        "--no-build",
        "--strip",
        "--output",
        &out,
    ];
    eprintln!("xtask: $ cargo {}", args.join(" "));
    let output = Command::new("cargo")
        .args(args)
        .current_dir(workspace_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo deb: {e}"))?;
    if !output.status.success() {
        return Err(format!("`cargo deb` failed ({})", output.status));
    }
    // cargo-deb prints the path of the package it wrote, and nothing else, on stdout.
    let printed = String::from_utf8_lossy(&output.stdout);
    let deb = printed
        .lines()
        .last()
        .map(|line| PathBuf::from(line.trim()))
        .filter(|path| path.is_file())
        .ok_or_else(|| format!("cargo deb printed no package path: {printed:?}"))?;
    Ok(deb)
}

/// `steer-<version>-<arch>-linux.tar.gz`: one directory of that name holding the binary,
/// the unit (for `/usr/local/bin/steer`), the example settings and the README.
fn build_tarball(root: &Path, dist: &Path, version: &str) -> Result<PathBuf, String> {
    let name = format!("steer-{version}-{}-linux", std::env::consts::ARCH);
    let staging = dist.join(&name);
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .map_err(|e| format!("cannot remove {}: {e}", staging.display()))?;
    }
    create_dir(&staging)?;
    for (from, to) in [
        ("target/release/steer", "steer"),
        ("deploy/systemd/steer.service", "steer.service"),
        ("deploy/steer.toml", "steer.toml"),
        ("README.md", "README.md"),
    ] {
        fs::copy(root.join(from), staging.join(to))
            .map_err(|e| format!("cannot copy {from} to {}: {e}", staging.display()))?;
    }
    // The package's binary: cargo-deb strips with these arguments.
    step(
        "strip",
        &[
            "--strip-unneeded",
            "--remove-section=.comment",
            "--remove-section=.note",
            &staging.join("steer").display().to_string(),
        ],
    )?;
    let tarball = dist.join(format!("{name}.tar.gz"));
    step(
        "tar",
        &[
            "--create",
            "--gzip",
            "--file",
            &tarball.display().to_string(),
            "--directory",
            &dist.display().to_string(),
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--sort=name",
            &name,
        ],
    )?;
    Ok(tarball)
}

/// The `steer` crate's version, from `runtime/Cargo.toml`.
pub(crate) fn steer_version(root: &Path) -> Result<String, String> {
    let manifest = root.join("runtime/Cargo.toml");
    read(&manifest)?
        .lines()
        .find_map(|line| line.strip_prefix("version = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .map(str::to_owned)
        .ok_or_else(|| format!("{}: no `version = \"...\"` line", manifest.display()))
}

fn size(path: &Path) -> String {
    fs::metadata(path).map_or_else(
        |e| format!("size unknown: {e}"),
        |m| format!("{:.1} MiB", m.len() as f64 / (1024.0 * 1024.0)),
    )
}

fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn create_dir(path: &Path) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
}
