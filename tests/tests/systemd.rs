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
    // A worker program whose execve fails (an executable file that is no program): the
    // slot never serves and ends `failed`. An external worker is ready only once its
    // exec succeeded, so nothing is ever reported ready.
    let program = TempFile::executable("bin", b"\x7fnot an executable\n");
    let cluster = Cluster::spawn_with(
        &[
            "--workers",
            "1",
            "--max-restarts",
            "1",
            "--restart-window",
            "1m",
            "--",
            program.as_arg(),
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

/// Capability numbers (linux/capability.h) of the names the unit may list.
const CAPABILITIES: &[(&str, u32)] = &[
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_NET_ADMIN", 12),
    ("CAP_SYS_PTRACE", 19),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
];

/// The unit's `CapabilityBoundingSet=`, as capability numbers.
fn unit_capabilities() -> Vec<u32> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/steer.service");
    let text = std::fs::read_to_string(&unit).expect("deploy/systemd/steer.service");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet=");
    line.split_whitespace()
        .map(|name| {
            CAPABILITIES
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("unknown capability {name} in the unit"))
                .1
        })
        .collect()
}

/// Starts `steer run <args>` the way systemd starts the unit's root service with
/// `CapabilityBoundingSet=`: after `execve` it holds those capabilities and no others.
fn start_with_unit_capabilities(args: &[&str]) -> Cluster {
    use std::os::unix::process::CommandExt;
    let keep = unit_capabilities();
    Cluster::start_with(args, |cmd| {
        // SAFETY: the closure runs in the forked child before exec and makes only prctl
        // calls (async-signal-safe), allocating nothing.
        unsafe {
            cmd.pre_exec(move || {
                for cap in 0..=63u32 {
                    if !keep.contains(&cap)
                        && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                        && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    })
}

#[test]
fn the_units_capabilities_are_enough_for_ebpf_steering_and_the_user_switch() {
    let cluster = start_with_unit_capabilities(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--user",
        "nobody",
    ]);
    let primary =
        std::fs::read_to_string(format!("/proc/{}/status", cluster.pid())).expect("primary status");
    let effective = primary
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("CapEff");
    let expected = unit_capabilities()
        .iter()
        .fold(0u64, |mask, cap| mask | 1 << cap);
    assert_eq!(
        effective, expected,
        "the primary runs with the unit's set only"
    );
    let doc = cluster.status();
    assert_eq!(status::balance(&doc), Some("round-robin"), "eBPF loaded");
    for _ in 0..4 {
        steer_tests::must_get(cluster.listen_addr(), "/");
    }
    let before = cluster.worker_pid_list();
    cluster.signal(Signal::SIGUSR2);
    cluster.wait_until("every worker replaced", Duration::from_secs(30), |s| {
        status::all_ready(s)
            && status::worker_pids(s)
                .iter()
                .all(|(_, pid)| !before.contains(pid))
    });
    cluster.stop_cleanly(Duration::from_secs(15));
    let log = cluster.log();
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "{log}");
}

#[test]
fn the_units_capabilities_let_the_primary_signal_workers_of_another_user() {
    // External workers drain on SIGTERM, sent by a root primary to a `nobody` process:
    // that takes CAP_KILL. Without it the worker would never be told to stop.
    let cluster = start_with_unit_capabilities(&[
        "--workers",
        "1",
        "--balance",
        "kernel",
        "--no-tcp-migrate-req",
        "--user",
        "nobody",
        "--shutdown-timeout",
        "60s",
        "--",
        "sleep",
        "600",
    ]);
    let worker = cluster.worker_pid_list()[0];
    cluster.signal(Signal::SIGTERM);
    cluster.wait_exit(Duration::from_secs(20));
    assert!(
        !steer_tests::pid_alive(worker),
        "the worker got its SIGTERM"
    );
    let log = cluster.log();
    assert!(!log.contains("SIGTERM failed"), "{log}");
}

#[test]
fn the_units_capabilities_let_the_primary_rescue_the_queue_of_a_hung_worker_of_another_user() {
    // Taking a hung worker's listener (pidfd_getfd) needs ptrace access to it; a worker
    // that switched to another user is only reachable with CAP_SYS_PTRACE.
    let cluster = start_with_unit_capabilities(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--user",
        "nobody",
        "--health-interval",
        "100ms",
        "--health-timeout",
        "400ms",
    ]);
    // Only a worker that has answered a heartbeat is watched for hangs: wait until slot
    // 0 was heard from after it became ready (register and ready come before that).
    let ready_at = Instant::now();
    cluster.wait_until("a heartbeat answered", Duration::from_secs(10), |s| {
        let heard_ms = status::worker(s, 0).raw["health_ms"].as_u64();
        heard_ms.is_some_and(|ms| u128::from(ms) + 150 < ready_at.elapsed().as_millis())
    });
    let victim = cluster.worker_pid_list()[0];
    let pid = nix::unistd::Pid::from_raw(i32::try_from(victim).expect("pid"));
    nix::sys::signal::kill(pid, Signal::SIGSTOP).expect("SIGSTOP the worker");
    let log = cluster.wait_for_log("hung worker's listener down", Duration::from_secs(20));
    let _ = nix::sys::signal::kill(pid, Signal::SIGCONT);
    assert!(
        log.contains("shut the hung worker's listener down;"),
        "the primary could not take the hung worker's listener:\n{log}"
    );
    cluster.stop_cleanly(Duration::from_secs(15));
}

/// Every datagram with the pid of the process that sent it (`SO_PASSCRED`).
fn receive_with_sender(socket: &UnixDatagram) -> Option<(u32, String)> {
    use std::io::IoSliceMut;
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .ok()?;
    let pid = msg.cmsgs().ok()?.find_map(|c| match c {
        ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid() as u32),
        _ => None,
    })?;
    let len = msg.bytes;
    Some((pid, String::from_utf8_lossy(&buf[..len]).into_owned()))
}

/// The upgrade as systemd sees it: the old primary says RELOADING=1, then names its
/// successor with MAINPID=, then says nothing more (no STOPPING=1: the service is not
/// stopping); the successor, once it is the main process, says READY=1.
#[test]
fn an_upgrade_hands_systemd_the_new_main_pid() {
    use nix::sys::socket::{setsockopt, sockopt};
    // SAFETY: prctl with integer arguments: the successor is re-parented here.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let name = format!("steer-test-notify-upgrade-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
    let socket = UnixDatagram::bind_addr(&addr).expect("bind");
    setsockopt(&socket, sockopt::PassCred, &true).expect("SO_PASSCRED");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let dir = TempFile::new("d", "");
    let pid_file = dir.path().with_extension("pid");
    let pid_arg = pid_file.to_string_lossy().into_owned();
    let cluster = Cluster::spawn_with(
        &[
            "--workers",
            "2",
            "--balance",
            "round-robin",
            "--pid-file",
            &pid_arg,
        ],
        |cmd| {
            cmd.env("NOTIFY_SOCKET", format!("@{name}"));
        },
    );
    let old = cluster.pid();
    let mut heard: Vec<(u32, String)> = Vec::new();
    let wait_for = |line: &str, heard: &mut Vec<(u32, String)>| -> u32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((pid, message)) = receive_with_sender(&socket) {
                heard.push((pid, message.clone()));
                if message.lines().any(|l| l.starts_with(line)) {
                    return pid;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {line:?}; heard {heard:?}\n{}",
                cluster.log()
            );
        }
    };
    assert_eq!(wait_for("READY=1", &mut heard), old);
    cluster.signal(Signal::SIGUSR1);
    assert_eq!(wait_for("RELOADING=1", &mut heard), old);
    assert_eq!(
        wait_for("MAINPID=", &mut heard),
        old,
        "the old main process names the new one"
    );
    let named: u32 = heard
        .last()
        .and_then(|(_, m)| m.lines().find_map(|l| l.strip_prefix("MAINPID=")))
        .and_then(|p| p.parse().ok())
        .expect("MAINPID=<pid>");
    let from = wait_for("READY=1", &mut heard);
    assert_eq!(from, named, "READY=1 comes from the new main process");
    assert_eq!(cluster.wait_exit(Duration::from_secs(30)).code(), Some(0));
    let content = std::fs::read_to_string(&pid_file).expect("pid file");
    assert_eq!(content.trim(), named.to_string());
    assert!(
        !heard
            .iter()
            .any(|(pid, m)| *pid == old && m.contains("STOPPING=1")),
        "the old primary never says the service is stopping: {heard:?}"
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(named as i32), Signal::SIGTERM)
        .expect("SIGTERM");
    assert_eq!(wait_for("STOPPING=1", &mut heard), named);
    let deadline = Instant::now() + Duration::from_secs(30);
    while steer_tests::pid_alive(named) {
        let mut status = 0;
        // SAFETY: waitpid on the successor, re-parented to this subreaper.
        unsafe { libc::waitpid(named as i32, &mut status, libc::WNOHANG) };
        assert!(Instant::now() < deadline, "the successor did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 21, point 4: a roll onto a release that never becomes ready ends, bounded by
/// three start attempts on the first slot (3 x --start-timeout + backoff); the old
/// generation serves throughout, `/status` names the slot, and systemd hears `READY=1`
/// after `RELOADING=1` with a `STATUS=` that names the problem.
#[test]
fn a_roll_onto_a_release_that_never_becomes_ready_ends_and_the_old_generation_serves() {
    let name = format!("steer-test-roll-never-ready-{}", std::process::id());
    let mut systemd =
        FakeSystemd::bind(&SocketAddr::from_abstract_name(name.as_bytes()).expect("name"));
    let fixture = format!("{}/fixtures/python_app.py", env!("CARGO_MANIFEST_DIR"));
    let app = TempFile::new(
        "py",
        format!(
            "import runpy, sys\nsys.argv[0] = {fixture:?}\nrunpy.run_path({fixture:?}, run_name='__main__')\n"
        ),
    );
    let cluster = Cluster::start_with(
        &[
            "--workers",
            "2",
            "--balance",
            "round-robin",
            "--start-timeout",
            "2s",
            "--",
            "python3",
            app.as_arg(),
        ],
        |cmd| {
            cmd.env("NOTIFY_SOCKET", format!("@{name}"));
        },
    );
    cluster.wait_until("both workers said ready", Duration::from_secs(20), |s| {
        status::workers(s)
            .iter()
            .all(|w| w.raw["health_ms"].is_u64())
            && status::all_ready(s)
    });
    systemd.wait_for("READY=1", &cluster);
    let before = cluster.worker_pid_list();
    let load = steer_tests::Load::new_connections(cluster.listen_addr(), 2);
    load.wait_for_ok(100, Duration::from_secs(10));
    // The release on disk now blocks before it serves (its database is unreachable).
    let next = app.path().with_extension("next");
    std::fs::write(&next, "import time\ntime.sleep(3600)\n").expect("write");
    std::fs::rename(&next, app.path()).expect("replace the app");
    let started = Instant::now();
    cluster.signal(Signal::SIGUSR2);
    systemd.wait_for("RELOADING=1", &cluster);
    let doc = cluster.wait_until("the roll to give up", Duration::from_secs(30), |s| {
        s["primary"]["roll_abandoned"]["slot"] == 0 && s["primary"]["phase"] == "running"
    });
    let took = started.elapsed();
    let ready = systemd.wait_for("READY=1", &cluster);
    assert!(
        ready.contains("rolling restart abandoned: slot 0's"),
        "systemd is told why: {ready:?}"
    );
    assert_eq!(
        doc["primary"]["roll_abandoned"]["reason"], "not ready within 2s",
        "{doc:#}"
    );
    load.wait_for_ok(load.ok() + 100, Duration::from_secs(10));
    let report = load.stop();
    eprintln!("a roll onto a release that never becomes ready ended after {took:?}: {report}");
    report.assert_all_succeeded();
    assert_eq!(
        cluster.worker_pid_list(),
        before,
        "the old generation still serves, every slot of it"
    );
    assert!(status::all_ready(&cluster.status()));
    let log = cluster.log();
    assert!(log.contains("rolling restart abandoned"), "{log}");
    assert!(
        !log.contains("slot=1 generation=2"),
        "the roll did not go on to slot 1: {log}"
    );
    // Stop without rolling: the app on disk would never start.
    cluster.stop_cleanly(Duration::from_secs(15));
}
