//! The config file from an operator's side: `steer check` before a deploy, and flags that
//! keep winning over the file across SIGHUP reloads.

use std::time::Duration;

use steer_tests::{Cluster, Signal, TempFile, block_slot, run_steer, status};

#[test]
fn steer_check_accepts_a_good_file_and_prints_the_effective_settings() {
    let file = TempFile::new(
        "toml",
        "listen = \"127.0.0.1:9\"\nworkers = 3\nstatus = \"8001\"\nuser = \"nobody\"\nworker-memory-limit = \"512MiB\"\n",
    );
    let out = run_steer(&["check", "-c", file.as_arg(), "--shutdown-timeout", "5s"]);
    assert_eq!(out.code(), Some(0), "{out}");
    for line in [
        "ok",
        "workers = 3",
        "status = \"127.0.0.1:8001\"",
        "shutdown-timeout = \"5s\"",
        "health-timeout = \"3s\"",
        "user = \"nobody\"  # uid 65534",
        "worker-memory-limit = \"512MiB\"",
    ] {
        assert!(out.stdout.contains(line), "missing {line:?}\n{out}");
    }
    // It started nothing: port 9 was never bound, and it returned at once.
    assert!(out.stderr.is_empty(), "{out}");
}

#[test]
fn steer_check_shows_the_udp_receive_buffer_of_a_cluster_with_a_udp_listener() {
    let out = run_steer(&["check", "--listen", "udp://127.0.0.1:9"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout.contains("udp-receive-buffer = \"4MiB\""),
        "the default is shown\n{out}"
    );
    let out = run_steer(&[
        "check",
        "--listen",
        "udp://127.0.0.1:9",
        "--udp-receive-buffer",
        "16M",
    ]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout.contains("udp-receive-buffer = \"16MiB\""),
        "{out}"
    );
    let out = run_steer(&["check", "--udp-receive-buffer", "1KiB"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("udp-receive-buffer") && out.stderr.contains("64KiB"),
        "{out}"
    );
}

#[test]
fn steer_check_refuses_bad_files_naming_the_key_the_line_and_what_is_allowed() {
    for (text, needles) in [
        (
            "workers = 2\nworkers-count = 3\n",
            &["`workers-count` at line 2", "unknown field"][..],
        ),
        (
            "\n\nmax-restarts = \"many\"\n",
            &["`max-restarts` at line 3", "whole number from 0"],
        ),
        (
            "health-interval = \"2s\"\nhealth-timeout = \"1s\"\n",
            &[
                "`health-timeout` at line 2",
                "at least twice health-interval (2s)",
            ],
        ),
        (
            "user = \"no-such-user-steer\"\n",
            &["`user` at line 1", "no such user"],
        ),
        (
            "worker-nofile = 99999999\n",
            &["`worker-nofile` at line 1", "from 16 to 1048576"],
        ),
        (
            "listen = \"udp://127.0.0.1:9\"\nudp-receive-buffer = \"32KiB\"\n",
            &["`udp-receive-buffer` at line 2", "from 64KiB to 1GiB"],
        ),
        (
            "udp-receive-buffer = \"2GiB\"\n",
            &["`udp-receive-buffer` at line 1", "from 64KiB to 1GiB"],
        ),
        (
            "balance = \"fastest\"\n",
            &["`balance` at line 1", "\"fastest\"", "round-robin"],
        ),
    ] {
        let file = TempFile::new("toml", text);
        let out = run_steer(&["check", "--config", file.as_arg()]);
        assert_eq!(out.code(), Some(2), "{text:?}\n{out}");
        assert!(out.stderr.contains(file.as_arg()), "names the file\n{out}");
        for needle in needles {
            assert!(out.stderr.contains(needle), "{text:?}: {needle:?}\n{out}");
        }
    }
}

/// The bug this guards against: SIGHUP rebuilt the configuration from the file alone, so
/// `--shutdown-timeout 1s` on the command line silently became the file's 30s.
#[test]
fn command_line_flags_keep_winning_over_the_file_after_sighup() {
    let file = TempFile::new(
        "toml",
        "shutdown-timeout = \"30s\"\nmax-restarts = 7\nbalance = \"kernel\"\ndemo-faults = true\n",
    );
    let cluster = Cluster::start(&[
        "--config",
        file.as_arg(),
        "--workers",
        "1",
        "--shutdown-timeout",
        "1s",
    ]);
    let before = cluster.worker_pid_list();
    cluster.signal(Signal::SIGHUP);
    cluster.wait_for_log("SIGHUP: reloaded", Duration::from_secs(10));
    cluster.wait_until("the reload's roll", Duration::from_secs(20), |s| {
        status::all_ready(s)
            && status::worker_pids(s)
                .iter()
                .all(|(_, pid)| !before.contains(pid))
    });
    // A worker stuck in a request outlives the drain; the kill comes after the flag's
    // timeout, and the log names it.
    let _stuck = block_slot(cluster.listen_addr(), 0, 60_000);
    cluster.signal(Signal::SIGTERM);
    let log = cluster.wait_for_log("shutdown timeout", Duration::from_secs(20));
    assert!(
        log.contains("draining every worker (SIGKILL after 1s)")
            && log.contains("shutdown timeout (1s) reached"),
        "the flag's 1s must survive the reload\n{log}"
    );
    assert_eq!(cluster.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

/// The settings shipped in `deploy/kubernetes/steer.yaml` (the ConfigMap's `steer.toml`).
fn kubernetes_config() -> String {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/steer.yaml");
    let yaml = std::fs::read_to_string(&path).expect("deploy/kubernetes/steer.yaml");
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "steer.toml: |");
    let header = lines.next().expect("the ConfigMap has a steer.toml block");
    let indent = header.len() - header.trim_start().len() + 2;
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_kubernetes_config_map_passes_steer_check() {
    let text = kubernetes_config();
    assert!(text.contains("listen = "), "{text}");
    let file = TempFile::new("toml", &text);
    let out = run_steer(&["check", "-c", file.as_arg()]);
    assert_eq!(out.code(), Some(0), "{text}\n{out}");
    assert!(out.stdout.contains("status = \"0.0.0.0:8001\""), "{out}");
    assert!(out.stdout.contains("tcp-migrate-req = false"), "{out}");
}

/// `steer check` refused `--listen 0.0.0.0:P --status [::1]:P`, which never meet (a
/// specific IPv6 address takes no IPv4 connection), while a real clash stays refused.
#[test]
fn steer_check_refuses_only_status_addresses_that_really_clash_with_listen() {
    for (listen, status, clash) in [
        ("0.0.0.0:18080", "[::1]:18080", false),
        ("127.0.0.1:18080", "[::1]:18080", false),
        ("0.0.0.0:18080", "[::]:18080", true),
        ("[::]:18080", "127.0.0.1:18080", true),
        ("0.0.0.0:18080", "127.0.0.1:18080", true),
    ] {
        let out = run_steer(&["check", "--listen", listen, "--status", status]);
        if clash {
            assert_eq!(out.code(), Some(2), "{listen} {status}\n{out}");
            assert!(
                out.stderr.contains("cannot share the workers' address"),
                "{listen} {status}\n{out}"
            );
        } else {
            assert_eq!(out.code(), Some(0), "{listen} {status}\n{out}");
        }
    }
}

/// SIGHUP with `command` removed from the file used to keep the running command without a
/// word, while `steer check` on the same file showed the demo. Now SIGHUP names the key
/// like every other that cannot apply live, the workers keep their command, and
/// `steer check` says what a running primary does with such a file.
#[test]
fn sighup_with_the_command_removed_names_it_and_keeps_the_running_command() {
    let script = format!("{}/fixtures/fd3_worker.py", env!("CARGO_MANIFEST_DIR"));
    let file = TempFile::new(
        "toml",
        format!("balance = \"kernel\"\ncommand = [\"python3\", \"{script}\"]\n"),
    );
    let cluster = Cluster::start(&["--config", file.as_arg(), "--workers", "1"]);
    let external = |cluster: &Cluster| {
        steer_tests::must_get(cluster.listen_addr(), "/")
            .body
            .starts_with("hello from external worker")
    };
    assert!(external(&cluster), "the command runs");
    let before = cluster.worker_pid_list();
    std::fs::write(file.path(), "balance = \"kernel\"\n").expect("rewrite the file");
    cluster.signal(Signal::SIGHUP);
    let log = cluster.wait_for_log("SIGHUP: reloaded", Duration::from_secs(10));
    assert!(
        log.contains("`command` changed") && log.contains("SIGUSR1"),
        "SIGHUP names `command` and says what applies it\n{log}"
    );
    cluster.wait_until("the reload's roll", Duration::from_secs(20), |s| {
        status::all_ready(s)
            && status::worker_pids(s)
                .iter()
                .all(|(_, pid)| !before.contains(pid))
    });
    assert!(
        external(&cluster),
        "the rolled worker still runs the command"
    );
    let out = run_steer(&["check", "-c", file.as_arg()]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout.contains("no command: the demo app")
            && out.stdout.contains("keeps its command until SIGUSR1"),
        "{out}"
    );
    cluster.stop_cleanly(Duration::from_secs(15));
}

/// The manifest, read as lines (no YAML parser: the file is ours and its shape is fixed).
fn kubernetes_manifest() -> String {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/steer.yaml");
    std::fs::read_to_string(&path).expect("deploy/kubernetes/steer.yaml")
}

/// The value after `key:` on the first line at or after the line containing `anchor`.
fn manifest_value<'a>(yaml: &'a str, anchor: &str, key: &str) -> &'a str {
    yaml.lines()
        .skip_while(|l| !l.contains(anchor))
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no `{key}:` after {anchor:?} in the manifest"))
        .trim()
}

/// Runs `body` on a thread of its own in a fresh network namespace whose loopback is up and
/// also holds `extra` (which is not a loopback address): processes it starts are inside.
fn in_network_namespace<T: Send + 'static>(
    extra: std::net::Ipv4Addr,
    body: impl FnOnce() -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare with a flag only; CLONE_NEWNET moves this thread alone.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &format!("{extra}/32"), "dev", "lo"],
        ] {
            let out = std::process::Command::new("ip")
                .args(&args)
                .output()
                .expect("run ip");
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        }
        body()
    })
    .join()
    .expect("the namespace's thread")
}

/// The Kubernetes manifest exactly as shipped: its container command, its ConfigMap and its
/// probes. The probes' paths answer from an address that is not loopback (the kubelet's
/// view), `/status` does not (anyone on the pod network), and `/status` still answers
/// over the pod's loopback (`kubectl exec ... steer status`). Ports are the manifest's, in
/// a network namespace of the test's own.
#[test]
fn the_kubernetes_probes_pass_and_status_is_not_served_outside_the_pod() {
    let yaml = kubernetes_manifest();
    let command = manifest_value(&yaml, "- name: steer", "command");
    let argv: Vec<String> =
        serde_json::from_str(command).expect("the command is a JSON-style list");
    assert_eq!(argv[1..3], ["run", "--config"], "{argv:?}");
    assert_eq!(argv.len(), 4, "{argv:?}");
    let status_port: u16 = manifest_value(&yaml, "- name: status", "containerPort")
        .parse()
        .expect("the status port");
    let probes = [
        manifest_value(&yaml, "readinessProbe:", "path").to_owned(),
        manifest_value(&yaml, "livenessProbe:", "path").to_owned(),
    ];
    assert_eq!(manifest_value(&yaml, "readinessProbe:", "port"), "status");
    assert_eq!(manifest_value(&yaml, "livenessProbe:", "port"), "status");
    let config = kubernetes_config();
    let listen_port: u16 = config
        .lines()
        .find_map(|l| l.strip_prefix("listen = \"0.0.0.0:"))
        .and_then(|rest| rest.trim_end_matches('"').parse().ok())
        .expect("listen = \"0.0.0.0:PORT\"");
    assert!(
        config.contains(&format!("status = \"0.0.0.0:{status_port}\"")),
        "the probes' port is the status listener's\n{config}"
    );
    // The ConfigMap's `command` is the image's app (`/app/...`, see deploy/Dockerfile,
    // whose own test builds and runs it): here the demo serves in its place. Every
    // listener setting is the manifest's.
    let config: String = config
        .lines()
        .filter(|l| !l.trim_start().starts_with("command ="))
        .collect::<Vec<_>>()
        .join("\n");
    let file = TempFile::new("toml", &config);
    let outside = std::net::Ipv4Addr::new(10, 77, 0, 1);
    in_network_namespace(outside, move || {
        let loopback = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        // The one flag added to the container's command: this machine's hard open-file
        // limit may be under the manifest's `worker-nofile`, which only CAP_SYS_RESOURCE
        // could raise. The listeners are the manifest's.
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(rc, 0, "getrlimit: {}", std::io::Error::last_os_error());
        let nofile = limit.rlim_max.min(65536).to_string();
        let cluster = Cluster::start_as_given(
            &[&argv[2], file.as_arg(), "--worker-nofile", &nofile],
            loopback(listen_port),
            loopback(status_port),
        );
        let from_outside = |path: &str| {
            steer_tests::http_get_from(outside, (outside, status_port).into(), path)
                .unwrap_or_else(|e| panic!("GET {path} from {outside}: {e}"))
        };
        for path in &probes {
            let answer = from_outside(path);
            assert_eq!(answer.status, 200, "the probe {path}: {answer}");
        }
        let status = from_outside("/status");
        assert_eq!(status.status, 403, "/status from the pod network: {status}");
        assert!(!status.body.contains("pid"), "{status}");
        let local = steer_tests::must_get(loopback(status_port), "/status");
        assert_eq!(local.status, 200, "/status over loopback: {local}");
        assert!(local.body.contains("\"pid\""), "{local}");
        // The service port itself serves from outside.
        let served = steer_tests::http_get_from(outside, (outside, listen_port).into(), "/")
            .expect("GET / from outside");
        assert_eq!(served.status, 200, "{served}");
        cluster.stop_cleanly(Duration::from_secs(25));
    });
}
