//! Installing Steer: what `cargo xtask dist` puts in `target/dist/`, and the example
//! settings that ship with it.
//!
//! The package tests read `target/dist/`, which `cargo xtask test` fills before it runs
//! the tests (`cargo xtask dist` alone does the same). The `.deb` test installs the
//! package with `dpkg` (root, on Debian) and purges it when it ends, failed or not; it
//! refuses to start on a machine where a `steer` package or `/usr/bin/steer` already is.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use steer_tests::{Cluster, RunOutput, TempFile, run_steer, run_to_completion, status};

/// How long a packaging command (`dpkg`, `tar`) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = workspace_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs a command to completion (bounded by [`COMMAND_TIMEOUT`]).
fn run(program: &str, args: &[&str]) -> RunOutput {
    run_to_completion(Command::new(program).args(args), COMMAND_TIMEOUT)
}

/// Runs a command that must succeed; returns its stdout.
fn must_run(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(out.status.success(), "{program} {args:?}: {out}");
    out.stdout
}

/// The `steer` crate's version, from `runtime/Cargo.toml`.
fn steer_version() -> String {
    read("runtime/Cargo.toml")
        .lines()
        .find_map(|line| line.strip_prefix("version = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("runtime/Cargo.toml has a version line")
        .to_owned()
}

fn debian_architecture() -> String {
    must_run("dpkg", &["--print-architecture"])
        .trim()
        .to_owned()
}

/// `target/dist/<name>`, which must exist.
fn dist_file(name: &str) -> PathBuf {
    let path = workspace_root().join("target/dist").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask dist` (`cargo xtask test` runs it first)",
        path.display()
    );
    path
}

fn deb_path() -> PathBuf {
    dist_file(&format!(
        "steer_{}_{}.deb",
        steer_version(),
        debian_architecture()
    ))
}

/// Lines of a TOML file that are an example setting: `# key = value`.
fn is_example_setting(line: &str) -> bool {
    line.strip_prefix("# ").is_some_and(|rest| {
        rest.split_once(" = ").is_some_and(|(key, _)| {
            !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '-')
        })
    })
}

fn assert_steer_check_accepts(settings: &str, what: &str) {
    let file = TempFile::new("toml", settings);
    let out = run_steer(&["check", "--config", file.as_arg()]);
    assert!(
        out.status.success(),
        "steer check refuses {what}: {out}\n{settings}"
    );
}

#[test]
fn the_example_settings_pass_steer_check_as_shipped_and_with_every_example_enabled() {
    let shipped = read("deploy/steer.toml");
    assert_steer_check_accepts(&shipped, "deploy/steer.toml as shipped");
    let examples = shipped.lines().filter(|l| is_example_setting(l)).count();
    assert!(
        examples >= 5,
        "deploy/steer.toml shows its examples as `# key = value`"
    );
    let enabled: String = shipped
        .lines()
        .map(|line| {
            if is_example_setting(line) {
                &line[2..]
            } else {
                line
            }
        })
        .fold(String::new(), |all, line| all + line + "\n");
    assert_steer_check_accepts(&enabled, "deploy/steer.toml with every example enabled");
}

/// Purges the package when dropped, so a failed test leaves no `steer` installed.
struct PurgeOnDrop;

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        let out = run("dpkg", &["--purge", "steer"]);
        if !out.status.success() {
            eprintln!("dpkg --purge steer after the test: {out}");
        }
    }
}

/// `dpkg`'s status of the package (`install ok installed`, `deinstall ok config-files`),
/// or `None` when dpkg knows nothing of it.
fn package_status() -> Option<String> {
    let out = run(
        "dpkg-query",
        &["--show", "--showformat", "${Status}", "steer"],
    );
    out.status.success().then(|| out.stdout.trim().to_owned())
}

/// The files the package installs, as paths on the system.
const INSTALLED: [&str; 6] = [
    "/usr/bin/steer",
    "/usr/lib/systemd/system/steer.service",
    "/etc/steer/steer.toml",
    "/usr/share/doc/steer/README.md",
    "/usr/share/doc/steer/docs/config.md",
    "/usr/share/doc/steer/docs/operations.md",
];

#[test]
fn the_deb_installs_runs_passes_its_own_checks_and_removes_cleanly() {
    let deb = deb_path();
    assert_eq!(
        package_status(),
        None,
        "a steer package is already known to dpkg; this test installs and purges one, so it \
         runs only where none is"
    );
    for path in ["/usr/bin/steer", "/etc/steer"] {
        assert!(
            !Path::new(path).exists(),
            "{path} exists; this test installs and purges the package, so it runs only \
             where Steer is not installed"
        );
    }
    let _purge = PurgeOnDrop;
    must_run("dpkg", &["--install", &deb.display().to_string()]);
    assert_eq!(package_status().as_deref(), Some("install ok installed"));
    for path in INSTALLED {
        assert!(Path::new(path).is_file(), "the package installs {path}");
    }
    let conffiles = must_run(
        "dpkg-query",
        &["--show", "--showformat", "${Conffiles}", "steer"],
    );
    assert!(
        conffiles.contains("/etc/steer/steer.toml"),
        "steer.toml is a conffile: {conffiles:?}"
    );

    let version = must_run("/usr/bin/steer", &["--version"]);
    assert_eq!(version.trim(), format!("steer {}", steer_version()));
    must_run(
        "/usr/bin/steer",
        &["check", "--config", "/etc/steer/steer.toml"],
    );

    // The unit runs the package's binary, and systemd accepts it (verify also checks that
    // ExecStart='s program exists).
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/steer.service").expect("the unit");
    let settings: Vec<&str> = unit.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(
        settings
            .iter()
            .any(|l| l.starts_with("ExecStart=/usr/bin/steer run --config /etc/steer/steer.toml"))
            && settings
                .contains(&"ExecStartPre=/usr/bin/steer check --config /etc/steer/steer.toml")
            && !settings.iter().any(|l| l.contains("/usr/local/bin")),
        "the installed unit runs /usr/bin/steer:\n{unit}"
    );
    let verify = run(
        "systemd-analyze",
        &["verify", "/usr/lib/systemd/system/steer.service"],
    );
    let complaints: Vec<&str> = verify
        .stderr
        .lines()
        .filter(|l| l.contains("steer.service"))
        .collect();
    assert!(
        verify.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {verify}"
    );

    // The installed binary carries the eBPF program: it steers with round-robin, with no
    // toolchain or object file involved.
    {
        let cluster = Cluster::start_binary(
            Path::new("/usr/bin/steer"),
            &["--workers", "2", "--balance", "round-robin"],
        );
        assert_eq!(status::balance(&cluster.status()), Some("round-robin"));
        steer_tests::must_get(cluster.listen_addr(), "/");
        assert!(cluster.stop(Duration::from_secs(15)).success());
    }

    // Removed: everything but the conffile goes; purged: that too.
    must_run("dpkg", &["--remove", "steer"]);
    assert_eq!(
        package_status().as_deref(),
        Some("deinstall ok config-files")
    );
    for path in INSTALLED.iter().filter(|p| !p.starts_with("/etc/")) {
        assert!(!Path::new(path).exists(), "dpkg --remove leaves {path}");
    }
    assert!(
        Path::new("/etc/steer/steer.toml").is_file(),
        "dpkg --remove keeps the conffile"
    );
    must_run("dpkg", &["--purge", "steer"]);
    assert_eq!(package_status(), None, "purged, dpkg forgets the package");
    assert!(
        !Path::new("/etc/steer").exists(),
        "dpkg --purge removes /etc/steer"
    );
    assert!(!Path::new("/usr/share/doc/steer").exists());
    // deb-systemd-helper masks the unit on removal (so a leftover enablement cannot start
    // a binary that is gone) and unmasks it on purge.
    assert!(
        std::fs::symlink_metadata("/etc/systemd/system/steer.service").is_err(),
        "dpkg --purge leaves systemd's mask of steer.service"
    );
}

#[test]
fn the_tarball_holds_a_working_binary_the_unit_and_the_settings() {
    let name = format!("steer-{}-{}-linux", steer_version(), std::env::consts::ARCH);
    let tarball = dist_file(&format!("{name}.tar.gz"));
    let listing = must_run(
        "tar",
        &["--list", "--gzip", "--file", &tarball.display().to_string()],
    );
    let mut files: Vec<&str> = listing.lines().filter(|l| !l.ends_with('/')).collect();
    files.sort_unstable();
    let expected: Vec<String> = ["README.md", "steer", "steer.service", "steer.toml"]
        .iter()
        .map(|file| format!("{name}/{file}"))
        .collect();
    assert_eq!(files, expected);
    let dir = TempFile::new("d", "");
    let into = dir.path().with_extension("untar");
    std::fs::create_dir_all(&into).expect("a directory to unpack into");
    let unpacked = run(
        "tar",
        &[
            "--extract",
            "--gzip",
            "--file",
            &tarball.display().to_string(),
            "--directory",
            &into.display().to_string(),
        ],
    );
    let steer = into.join(&name).join("steer");
    let version = run(&steer.display().to_string(), &["--version"]);
    let unit = std::fs::read_to_string(into.join(&name).join("steer.service"));
    let _ = std::fs::remove_dir_all(&into);
    assert!(unpacked.status.success(), "{unpacked}");
    assert_eq!(
        version.stdout.trim(),
        format!("steer {}", steer_version()),
        "{version}"
    );
    assert_eq!(
        unit.expect("the unit"),
        read("deploy/systemd/steer.service"),
        "the tarball's unit is the repository's (for /usr/local/bin/steer)"
    );
}
