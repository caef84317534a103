//! Steer as a systemd service: the `sd_notify` messages a `Type=notify` unit relies on,
//! played by a Unix datagram socket standing in for systemd, and the unit file in
//! `deploy/systemd/` checked by `systemd-analyze verify`.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use steer_tests::{Cluster, Signal, TempFile, status, steer_bin};

/// systemd's side of `NOTIFY_SOCKET`: every datagram the primary sends.
struct FakeSystemd {
    socket: UnixDatagram,
    received: Vec<String>,
}

impl FakeSystemd {
    fn bind(addr: &SocketAddr) -> FakeSystemd {
        let socket = UnixDatagram::bind_addr(addr).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        FakeSystemd {
            socket,
            received: Vec::new(),
        }
    }

    /// Waits for a datagram containing the line `line`; returns that datagram. Everything
    /// received stays in `received`.
    fn wait_for(&mut self, line: &str, cluster: &Cluster) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.received.push(message.clone());
                if message.lines().any(|l| l == line) {
                    return message;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {line:?} from the primary; received {:?}\n{}",
                self.received,
                cluster.log()
            );
        }
    }
}

/// Removes a path (the notify socket) when the test ends, passed or not.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn lines_of(messages: &[String]) -> Vec<String> {
    messages
        .iter()
        .flat_map(|m| m.lines())
        .filter(|l| !l.starts_with("STATUS=") && !l.starts_with("MONOTONIC_USEC="))
        .map(str::to_owned)
        .collect()
}

#[test]
fn notify_socket_gets_ready_reloading_ready_and_stopping_in_order() {
    let dir = TempFile::new("d", "");
    let path = dir.path().with_extension("notify");
    let _cleanup = RemoveOnDrop(path.clone());
    let mut systemd = FakeSystemd::bind(&SocketAddr::from_pathname(&path).expect("path"));
    let cluster = Cluster::spawn_with(&["--workers", "2", "--balance", "kernel"], |cmd| {
        cmd.env("NOTIFY_SOCKET", &path);
    });

    let ready = systemd.wait_for("READY=1", &cluster);
    // READY=1 means every slot serves: /status must agree at once.
    let doc = cluster.status();
    assert!(
        status::all_ready(&doc),
        "READY=1 before all slots were ready:\n{doc:#}"
    );
    assert!(ready.contains("STATUS=2 of 2 workers ready"), "{ready:?}");
    // Workers never see the variable: only the primary speaks for the service.
    for pid in cluster.worker_pid_list() {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
        assert!(
            !String::from_utf8_lossy(&environ).contains("NOTIFY_SOCKET="),
            "worker {pid} inherited NOTIFY_SOCKET"
        );
    }

    let before = cluster.worker_pid_list();
    cluster.signal(Signal::SIGUSR2);
    let reloading = systemd.wait_for("RELOADING=1", &cluster);
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"));
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    let now_usec = now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1000;
    assert!(usec <= now_usec, "MONOTONIC_USEC is CLOCK_MONOTONIC");
    systemd.wait_for("READY=1", &cluster);
    let doc = cluster.status();
    assert!(
        status::worker_pids(&doc)
            .iter()
            .all(|(_, pid)| !before.contains(pid)),
        "READY=1 after the roll came before every worker was replaced:\n{doc:#}"
    );

    cluster.signal(Signal::SIGTERM);
    systemd.wait_for("STOPPING=1", &cluster);
    assert_eq!(cluster.wait_exit(Duration::from_secs(15)).code(), Some(0));
    assert_eq!(
        lines_of(&systemd.received),
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"],
        "{:?}",
        systemd.received
    );
    assert!(
        systemd
            .received
            .iter()
            .any(|m| m.contains("STATUS=rolling restart;")),
        "{:?}",
        systemd.received
    );
}

#[test]
fn an_abstract_notify_socket_works_too() {
    let name = format!("steer-test-notify-{}", std::process::id());
    let mut systemd =
        FakeSystemd::bind(&SocketAddr::from_abstract_name(name.as_bytes()).expect("name"));
    let cluster = Cluster::spawn_with(&["--workers", "1", "--balance", "kernel"], |cmd| {
        cmd.env("NOTIFY_SOCKET", format!("@{name}"));
    });
    systemd.wait_for("READY=1", &cluster);
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn a_cluster_that_never_becomes_ready_never_says_ready() {
    let dir = TempFile::new("d", "");
    let path = dir.path().with_extension("notify");
    let _cleanup = RemoveOnDrop(path.clone());
    let mut systemd = FakeSystemd::bind(&SocketAddr::from_pathname(&path).expect("path"));
    // A worker program that cannot be started: the slot never serves and ends `failed`.
    // (A program that starts and exits is briefly ready: it got a listening socket.)
    let cluster = Cluster::spawn_with(
        &[
            "--workers",
            "1",
            "--max-restarts",
            "1",
            "--restart-window",
            "1m",
            "--",
            "/nonexistent/steer-test-worker",
        ],
        |cmd| {
            cmd.env("NOTIFY_SOCKET", &path);
        },
    );
    cluster.wait_until("the slot failed", Duration::from_secs(20), |s| {
        status::count_in_state(s, &steer_tests::SlotState::Failed) == 1
    });
    cluster.signal(Signal::SIGTERM);
    systemd.wait_for("STOPPING=1", &cluster);
    assert_eq!(
        lines_of(&systemd.received),
        ["STOPPING=1"],
        "{:?}",
        systemd.received
    );
}

/// Installs the `systemd` package (for `systemd-analyze`) if this machine lacks it.
fn ensure_systemd_analyze() {
    let present = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return;
    }
    eprintln!("installing the systemd package with apt for systemd-analyze");
    for args in [&["update", "-q"][..], &["install", "-y", "-q", "systemd"]] {
        let status = Command::new("apt-get")
            .args(args)
            .status()
            .expect("apt-get runs");
        assert!(status.success(), "apt-get {args:?} failed");
    }
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    ensure_systemd_analyze();
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/steer.service");
    let text = std::fs::read_to_string(&unit).expect("deploy/systemd/steer.service");
    for needle in [
        "Type=notify",
        "ExecReload=kill -USR2 $MAINPID",
        "KillMode=mixed",
        "CAP_BPF",
        "CAP_KILL",
    ] {
        assert!(text.contains(needle), "the unit lacks {needle}");
    }
    // verify checks that ExecStart's program exists: point it at the binary under test,
    // in a copy named like the original.
    let dir = TempFile::new("d", "");
    let copy_dir = dir.path().with_extension("unit");
    let _cleanup = RemoveOnDrop(copy_dir.clone());
    std::fs::create_dir_all(&copy_dir).expect("temp dir");
    let copy = copy_dir.join("steer.service");
    let steer = steer_bin();
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/steer", &steer.display().to_string()),
    )
    .expect("write the copy");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("steer.service"))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}
