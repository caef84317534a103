//! `cargo xtask setup`: make this machine able to build and test Steer. Idempotent: each
//! step checks first and says what it does.

use std::process::Command;

/// Installs what is missing.
pub(crate) fn run() -> Result<(), String> {
    ensure_rustup_components(&["rustfmt", "clippy"])?;
    ensure_command(
        "python3",
        "python3",
        "the external-worker tests run a Python fd-3 worker",
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
