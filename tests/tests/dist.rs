//! Installing Steer: what `cargo xtask dist` puts in `target/dist/`, and what ships beside
//! it (the example settings, `deploy/Dockerfile`).
//!
//! The package tests read `target/dist/`, which `cargo xtask test` fills before it runs
//! the tests (`cargo xtask dist` alone does the same). The `.deb` test installs the
//! package with `dpkg` (root, on Debian) and purges it when it ends, failed or not; it
//! refuses to start on a machine where a `steer` package or `/usr/bin/steer` already is.
//! The image test builds `deploy/Dockerfile` with buildah on the base image `cargo xtask
//! setup` makes, runs it, and removes its image and container when it ends.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use steer_tests::{Cluster, RunOutput, TempFile, run_steer, run_to_completion, status};

/// How long a packaging command (`dpkg`, `tar`, hadolint, `buildah run`) may take.
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
    assert_steer_check_accepts(
        &read("deploy/docker/steer.toml"),
        "deploy/docker/steer.toml",
    );
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

/// One instruction of a Dockerfile: its keyword (upper case) and its arguments, with
/// continuation lines joined.
struct Instruction {
    keyword: String,
    args: String,
}

fn parse_dockerfile(text: &str) -> Vec<Instruction> {
    let mut instructions = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(start) => {
                pending.push_str(start);
                pending.push(' ');
            }
            None => {
                pending.push_str(trimmed);
                let (keyword, args) = pending.split_once(' ').unwrap_or((&pending, ""));
                instructions.push(Instruction {
                    keyword: keyword.to_ascii_uppercase(),
                    args: args.trim().to_owned(),
                });
                pending.clear();
            }
        }
    }
    assert!(
        pending.is_empty(),
        "the Dockerfile ends inside a continuation"
    );
    instructions
}

/// `${NAME}` and `$NAME` replaced by `values`; every variable must be known.
fn substitute(text: &str, values: &[(String, String)]) -> String {
    let mut out = text.to_owned();
    for (name, value) in values {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    assert!(!out.contains('$'), "an unknown variable in {text:?}");
    out
}

/// Whether a `.dockerignore` pattern matches `path` or one of its directories (`*` within
/// one path segment, as Go's `filepath.Match`): a pattern that matches a directory
/// matches everything below it.
fn pattern_matches(pattern: &str, path: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('/').collect();
    let path: Vec<&str> = path.split('/').collect();
    let segment_matches = |p: &str, s: &str| match p.split_once('*') {
        None => p == s,
        Some((before, after)) => {
            s.len() >= before.len() + after.len() && s.starts_with(before) && s.ends_with(after)
        }
    };
    pattern.len() <= path.len()
        && pattern
            .iter()
            .zip(&path)
            .all(|(p, s)| segment_matches(p, s))
}

/// Whether the build context keeps `path`: the last `.dockerignore` pattern that matches
/// it decides (`!` keeps).
fn context_keeps(dockerignore: &str, path: &str) -> bool {
    let mut kept = true;
    for line in dockerignore.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (keep, pattern) = match line.strip_prefix('!') {
            Some(pattern) => (true, pattern),
            None => (false, line),
        };
        if pattern_matches(pattern, path) {
            kept = keep;
        }
    }
    kept
}

#[test]
fn the_dockerfile_lints_clean_and_copies_what_the_context_holds() {
    let root = workspace_root();
    let hadolint = root.join("target/tools/hadolint/bin/hadolint");
    assert!(
        hadolint.is_file(),
        "{} is missing: run `cargo xtask setup`",
        hadolint.display()
    );
    let lint = run(
        &hadolint.display().to_string(),
        &[
            "--failure-threshold",
            "style",
            &root.join("deploy/Dockerfile").display().to_string(),
        ],
    );
    assert!(
        lint.status.success() && lint.stdout.trim().is_empty(),
        "hadolint: {lint}"
    );

    let instructions = parse_dockerfile(&read("deploy/Dockerfile"));
    // The base is the Debian release the .deb was built on (here): its libc6 is the one
    // the package's dependencies name.
    let os_release = std::fs::read_to_string("/etc/os-release").expect("/etc/os-release");
    let codename = os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .expect("VERSION_CODENAME in /etc/os-release");
    let from: Vec<&str> = instructions
        .iter()
        .filter(|i| i.keyword == "FROM")
        .map(|i| i.args.as_str())
        .collect();
    assert_eq!(from, [format!("debian:{codename}-slim")]);

    // ARG defaults, TARGETARCH as BuildKit sets it (the Debian architecture).
    let mut values: Vec<(String, String)> = instructions
        .iter()
        .filter(|i| i.keyword == "ARG")
        .filter_map(|i| i.args.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    assert!(
        values.contains(&("STEER_VERSION".to_owned(), steer_version())),
        "the Dockerfile's STEER_VERSION is the crate's version, {}",
        steer_version()
    );
    values.push(("TARGETARCH".to_owned(), debian_architecture()));

    let dockerignore = read(".dockerignore");
    let mut copied = Vec::new();
    for copy in instructions.iter().filter(|i| i.keyword == "COPY") {
        assert!(
            !copy.args.starts_with("--"),
            "COPY from the context only: {}",
            copy.args
        );
        let args = substitute(&copy.args, &values);
        let paths: Vec<&str> = args.split_whitespace().collect();
        let (destination, sources) = paths.split_last().expect("COPY <src>... <dest>");
        for source in sources {
            assert!(
                root.join(source).is_file(),
                "COPY {source}: not in the repository"
            );
            assert!(
                context_keeps(&dockerignore, source),
                "COPY {source}: .dockerignore leaves it out of the build context"
            );
            let name = Path::new(source).file_name().expect("a file name");
            copied.push(if destination.ends_with('/') {
                Path::new(destination).join(name)
            } else {
                PathBuf::from(destination)
            });
        }
    }
    assert!(
        context_keeps(
            &dockerignore,
            &format!(
                "target/dist/steer_{}_{}.deb",
                steer_version(),
                debian_architecture()
            )
        ) && !context_keeps(&dockerignore, "target/release/steer"),
        ".dockerignore keeps the package and leaves the rest of target/ out"
    );

    // The packages apt installs in the image exist in Debian (as far as this machine's
    // dpkg or apt knows), and the image's entry point is the package's binary.
    let run_lines: Vec<String> = instructions
        .iter()
        .filter(|i| i.keyword == "RUN")
        .map(|i| substitute(&i.args, &values))
        .collect();
    let install = run_lines
        .iter()
        .flat_map(|r| r.split("&&"))
        .find(|command| command.trim().starts_with("apt-get install"))
        .expect("the image installs packages with apt-get install");
    let packages: Vec<&str> = install
        .split_whitespace()
        .skip(2)
        .filter(|word| !word.starts_with('-'))
        .map(|word| word.trim_matches('"'))
        .collect();
    assert!(
        packages
            .iter()
            .any(|p| p.starts_with("/tmp/steer_") && p.ends_with(".deb")),
        "apt installs the copied .deb: {packages:?}"
    );
    for package in packages.iter().filter(|p| !p.starts_with('/')) {
        let known = run("dpkg-query", &["--show", package]).status.success()
            || run("apt-cache", &["show", "--no-all-versions", package])
                .status
                .success();
        assert!(
            known,
            "the image installs {package}, which Debian does not know"
        );
    }
    let deb_contents = must_run(
        "dpkg-deb",
        &["--contents", &deb_path().display().to_string()],
    );
    let entrypoint = instructions
        .iter()
        .find(|i| i.keyword == "ENTRYPOINT")
        .map(|i| i.args.clone())
        .expect("an ENTRYPOINT");
    assert_eq!(entrypoint, r#"["/usr/bin/steer"]"#);
    assert!(
        deb_contents.contains(" ./usr/bin/steer\n"),
        "{deb_contents}"
    );

    // The Kubernetes manifest runs this image: the same binary, and a command the image
    // holds.
    let manifest = read("deploy/kubernetes/steer.yaml");
    assert!(
        manifest
            .contains(r#"command: ["/usr/bin/steer", "run", "--config", "/etc/steer/steer.toml"]"#),
        "deploy/kubernetes/steer.yaml runs the image's /usr/bin/steer"
    );
    let app = Path::new("/app/examples/node/hello.mjs");
    assert!(
        copied.iter().any(|c| c == app),
        "the image holds {}: {copied:?}",
        app.display()
    );
    assert!(
        manifest.contains(&format!(r#"command = ["node", "{}"]"#, app.display())),
        "the manifest's settings run the image's app"
    );
}

/// Removes the test's image and container when dropped, passed or failed.
struct BuildahCleanup {
    image: String,
    container: String,
}

impl Drop for BuildahCleanup {
    fn drop(&mut self) {
        let _ = run("buildah", &["rm", &self.container]);
        let _ = run("buildah", &["rmi", &self.image]);
    }
}

/// How long `buildah bud` may take: apt installs Node.js from Debian's mirror inside.
const IMAGE_BUILD_TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn the_image_builds_and_serves_the_node_app_with_ebpf_steering() {
    let root = workspace_root();
    deb_path();
    // The base `cargo xtask setup` made with debootstrap, for the Dockerfile's release: no
    // registry to pull `debian:<codename>-slim` from is reachable here.
    let dockerfile = read("deploy/Dockerfile");
    let codename = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM debian:"))
        .and_then(|tag| tag.trim().strip_suffix("-slim"))
        .expect("FROM debian:<codename>-slim");
    let base = format!("localhost/debian-minbase:{codename}");
    let images = run("buildah", &["images", "--quiet", &base]);
    assert!(
        images.status.success() && !images.stdout.trim().is_empty(),
        "no {base}: run `cargo xtask setup`\n{images}"
    );
    let cleanup = BuildahCleanup {
        image: format!("localhost/steer-dist-test:{}", std::process::id()),
        container: format!("steer-dist-test-{}", std::process::id()),
    };
    let build = run_to_completion(
        Command::new("buildah").args([
            "bud",
            "--pull=never",
            "--from",
            &base,
            "--isolation",
            "chroot",
            "--network",
            "host",
            "--file",
            &root.join("deploy/Dockerfile").display().to_string(),
            "--tag",
            &cleanup.image,
            &root.display().to_string(),
        ]),
        IMAGE_BUILD_TIMEOUT,
    );
    assert!(build.status.success(), "buildah bud: {build}");

    let inspected: steer_tests::Value = serde_json::from_str(&must_run(
        "buildah",
        &["inspect", "--type", "image", &cleanup.image],
    ))
    .expect("buildah inspect prints JSON");
    let config = &inspected["OCIv1"]["config"];
    assert_eq!(config["Entrypoint"], serde_json::json!(["/usr/bin/steer"]));
    assert_eq!(
        config["Cmd"],
        serde_json::json!(["run", "--config", "/etc/steer/steer.toml"])
    );

    // The container may load the program, as the manifest lets the pod.
    must_run(
        "buildah",
        &[
            "from",
            "--pull-never",
            "--name",
            &cleanup.container,
            "--cap-add",
            "CAP_BPF",
            "--cap-add",
            "CAP_PERFMON",
            "--security-opt",
            "seccomp=unconfined",
            &cleanup.image,
        ],
    );
    let listen = steer_tests::free_local_addr();
    let status_addr = steer_tests::free_local_addr();
    let mut cmd = Command::new("buildah");
    cmd.args([
        "run",
        "--isolation",
        "chroot",
        "--network",
        "host",
        &cleanup.container,
        "--",
        // The image's entry point and command, on the test's addresses.
        "/usr/bin/steer",
        "run",
        "--config",
        "/etc/steer/steer.toml",
        "--listen",
        &listen.to_string(),
        "--status",
        &status_addr.to_string(),
        "--workers",
        "2",
    ]);
    let cluster = Cluster::start_command(cmd, listen, status_addr);
    let doc = cluster.status();
    assert_eq!(
        status::balance(&doc),
        Some("round-robin"),
        "the image's steer loads its embedded program\n{}",
        cluster.log()
    );
    let pids = status::worker_pids(&doc);
    for _ in 0..4 {
        let answer = steer_tests::must_get(listen, "/");
        assert!(
            pids.iter().any(|(slot, pid)| answer
                .body
                .contains(&format!("Hello from worker {slot} (pid {pid})"))),
            "the Node app answers, from a worker of the slot table: {:?}",
            answer.body
        );
    }
    // buildah does not pass SIGTERM on: stop the primary itself, which then drains.
    let primary = status::primary_pid(&doc).expect("the primary's pid");
    let primary = nix::unistd::Pid::from_raw(i32::try_from(primary).expect("pid"));
    nix::sys::signal::kill(primary, steer_tests::Signal::SIGTERM).expect("SIGTERM the primary");
    assert!(
        cluster.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        cluster.log()
    );
}
