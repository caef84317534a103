//! Supervision under unusual conditions (issue 11): workers that hang at once or hide
//! behind a chatty thread, process trees, a primary with SIGCHLD ignored or frozen, a low
//! open-file limit, a worker that breaks the protocol at every start, operator mistakes,
//! a broadcast flood and a service manager that never reads.

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use steer_tests::{
    Cluster, Signal, SlotState, TempFile, descendants_of, http_get_timeout, must_get, pid_alive,
    run_steer, run_to_completion, status, steer_bin, wait_for,
};

fn worker_script() -> String {
    format!(
        "{}/fixtures/supervision_worker.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Sends `GET /block?ms=<ms>&slot=<slot>` on new connections until one reaches `slot`,
/// which says so with `102 Processing` before its loop stops (the other slots answer at
/// once). Returns the held connection and when its request was sent.
fn stall(addr: std::net::SocketAddr, slot: usize, ms: u64) -> (std::net::TcpStream, Instant) {
    use std::io::{Read, Write};
    for _ in 0..200 {
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        let sent = Instant::now();
        write!(
            conn,
            "GET /block?ms={ms}&slot={slot} HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        .expect("send");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut head = [0u8; 64];
        let n = conn.read(&mut head).expect("an answer or a 102");
        if head[..n].starts_with(b"HTTP/1.1 102") {
            return (conn, sent);
        }
    }
    panic!("no /block request reached slot {slot}");
}

/// The demo worker answers the primary's first ping at once, so freezing it right after
/// it is ready catches the case the old code missed (watched only after a first pong)
/// only by luck; the Python worker below that never answers catches it for sure.
#[test]
fn a_demo_worker_frozen_right_after_ready_is_out_of_steering_within_interval_plus_timeout() {
    let (interval, timeout) = (Duration::from_millis(200), Duration::from_millis(600));
    let cluster = Cluster::start(&[
        "--workers",
        "4",
        "--balance",
        "round-robin",
        "--health-interval",
        "200ms",
        "--health-timeout",
        "600ms",
    ]);
    let victim = status::worker(&cluster.status(), 1).pid.expect("pid");
    let frozen_at = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGSTOP)
        .expect("SIGSTOP");
    cluster.wait_until(
        "slot 1 out of steering",
        interval + timeout + Duration::from_secs(2),
        |s| {
            status::worker(s, 1).pid != Some(victim)
                || status::worker(s, 1).state != SlotState::Ready
        },
    );
    let took = frozen_at.elapsed();
    eprintln!(
        "frozen worker out of steering after {took:?} (interval + timeout = {:?})",
        interval + timeout
    );
    assert!(
        took <= interval + timeout + Duration::from_millis(500),
        "out of steering after {took:?}"
    );
    for i in 0..100 {
        http_get_timeout(cluster.listen_addr(), "/", Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("new connection {i} after the verdict: {e}"));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGCONT)
        .expect("SIGCONT");
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn a_worker_that_hangs_before_its_first_pong_is_hung_within_interval_plus_timeout() {
    let script = worker_script();
    let started = Instant::now();
    let cluster = Cluster::start(&[
        "--workers",
        "4",
        "--balance",
        "round-robin",
        "--health-interval",
        "200ms",
        "--health-timeout",
        "600ms",
        "--",
        "python3",
        &script,
        "--heartbeats",
        "--hang-after-ready",
        "--slot",
        "2",
        "--generation",
        "1",
    ]);
    let doc = cluster.wait_until("slot 2 declared hung", Duration::from_secs(10), |s| {
        status::worker(s, 2).generation > 1 || status::worker(s, 2).state == SlotState::Hung
    });
    eprintln!("hung verdict within {:?} of start", started.elapsed());
    assert!(cluster.log().contains("hung"), "{}", cluster.log());
    for slot in [0, 1, 3] {
        assert_eq!(
            status::worker(&doc, slot).generation,
            1,
            "slot {slot} untouched"
        );
    }
    for i in 0..40 {
        http_get_timeout(cluster.listen_addr(), "/", Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
    }
}

#[test]
fn a_worker_whose_side_thread_keeps_talking_while_its_loop_is_stuck_is_still_hung() {
    let script = worker_script();
    let cluster = Cluster::start(&[
        "--workers",
        "4",
        "--balance",
        "round-robin",
        "--health-interval",
        "200ms",
        "--health-timeout",
        "600ms",
        "--",
        "python3",
        &script,
        "--heartbeats",
        "--chatter",
    ]);
    let victim = status::worker(&cluster.status(), 1).pid.expect("pid");
    let (_held, stalled) = stall(cluster.listen_addr(), 1, 20_000);
    cluster.wait_until("slot 1 declared hung", Duration::from_secs(5), |s| {
        let w = status::worker(s, 1);
        w.pid != Some(victim) || w.state == SlotState::Hung
    });
    let took = stalled.elapsed();
    eprintln!("chatty but stuck worker out of steering {took:?} after its loop stalled");
    cluster.wait_for_log("hung; taking it out of steering", Duration::from_secs(2));
    assert!(
        took <= Duration::from_millis(200 + 600 + 500),
        "{took:?}: the budget is interval + timeout = 800ms"
    );
}

#[test]
fn a_shell_wrapped_worker_leaves_nothing_behind_after_a_roll_or_a_stop() {
    let script = worker_script();
    let wrapper = format!("python3 {script}; true");
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "kernel",
        "--",
        "sh",
        "-c",
        &wrapper,
    ]);
    let first: Vec<u32> = cluster
        .worker_pids()
        .into_iter()
        .flat_map(|(_, pid)| std::iter::once(pid).chain(descendants_of(pid)))
        .collect();
    assert!(first.len() >= 4, "each sh has its python: {first:?}");
    cluster.rolling_restart(Duration::from_secs(20));
    wait_for(
        "generation 1's processes gone",
        Duration::from_secs(10),
        || first.iter().all(|&pid| !pid_alive(pid)),
    );
    let second: Vec<u32> = cluster
        .worker_pids()
        .into_iter()
        .flat_map(|(_, pid)| std::iter::once(pid).chain(descendants_of(pid)))
        .collect();
    must_get(cluster.listen_addr(), "/");
    let addr = cluster.listen_addr();
    assert!(cluster.stop(Duration::from_secs(15)).success());
    for pid in &second {
        assert!(
            !pid_alive(*pid),
            "process {pid} of the cluster outlived its primary"
        );
    }
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "the port refuses connections once the cluster stopped"
    );
}

#[test]
fn a_primary_started_with_sigchld_ignored_still_sees_every_exit() {
    let cluster = Cluster::start_with(&["--workers", "2", "--balance", "kernel"], |cmd| {
        // SAFETY: between fork and exec, only the async-signal-safe `signal`.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGCHLD, libc::SIG_IGN);
                Ok(())
            });
        }
    });
    let killed_at = Instant::now();
    let victim = cluster.kill_worker(0);
    cluster.wait_until("slot 0 replaced", Duration::from_secs(5), |s| {
        let w = status::worker(s, 0);
        w.state == SlotState::Ready && w.pid.is_some_and(|p| p != victim)
    });
    let replaced = killed_at.elapsed();
    eprintln!("killed worker replaced after {replaced:?}");
    assert!(replaced < Duration::from_secs(1), "{replaced:?}");
    let stopping = Instant::now();
    assert!(cluster.stop(Duration::from_secs(5)).success());
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopping.elapsed()
    );
}

/// `ulimit -n 64` lowers both limits: the primary cannot hold 16 workers and says so.
#[test]
fn sixteen_workers_under_an_open_file_limit_of_64_are_refused_naming_the_limit() {
    let mut cmd = std::process::Command::new(steer_bin());
    cmd.args([
        "run",
        "--workers",
        "16",
        "--balance",
        "kernel",
        "--listen",
        "127.0.0.1:0",
    ]);
    // SAFETY: between fork and exec, only the async-signal-safe `setrlimit`.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            Ok(())
        });
    }
    let out = run_to_completion(&mut cmd, Duration::from_secs(20));
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains("RLIMIT_NOFILE") && out.stderr.contains("is 64"),
        "{out}"
    );
    assert!(!out.stderr.contains("protocol violation"), "{out}");
}

/// `ulimit -Sn 64` lowers only the soft limit: the primary raises it, and every worker
/// starts with the limit it was given.
#[test]
fn sixteen_workers_under_a_soft_open_file_limit_of_64_all_become_ready() {
    let cluster = Cluster::start_with(&["--workers", "16", "--balance", "kernel"], |cmd| {
        // SAFETY: between fork and exec, only the async-signal-safe `setrlimit`.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 64,
                    rlim_max: 8192,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                Ok(())
            });
        }
    });
    let log = cluster.log();
    assert!(!log.contains("protocol violation"), "{log}");
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", cluster.pid())).expect("limits");
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains("8192                 8192")),
        "the primary raised its soft limit:\n{limits}"
    );
    let (_, worker) = cluster.worker_pids()[0];
    let limits = std::fs::read_to_string(format!("/proc/{worker}/limits")).expect("limits");
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 64 ")),
        "a worker gets the limit the primary was given:\n{limits}"
    );
    cluster.rolling_restart(Duration::from_secs(60));
    assert!(!cluster.log().contains("protocol violation"));
}

#[test]
fn a_worker_violating_the_protocol_at_every_start_is_backed_off_counted_and_failed() {
    let script = worker_script();
    let started = Instant::now();
    let cluster = Cluster::spawn(&[
        "--workers",
        "2",
        "--balance",
        "kernel",
        "--max-restarts",
        "5",
        "--restart-window",
        "1m",
        "--",
        "python3",
        &script,
        "--garbage",
        "--slot",
        "0",
    ]);
    let doc = cluster.wait_until("slot 0 failed", Duration::from_secs(15), |s| {
        status::worker(s, 0).state == SlotState::Failed
    });
    let failed_after = started.elapsed();
    let spawns = cluster
        .log()
        .lines()
        .filter(|l| l.contains("worker spawned") && l.contains("slot=0"))
        .count();
    eprintln!("{spawns} spawns of the violating slot; failed after {failed_after:?}");
    assert!(spawns <= 12, "{spawns} spawns: not backed off");
    assert_eq!(doc["workers"][0]["restarts"], 5, "{}", doc["workers"][0]);
    assert_eq!(status::worker(&doc, 1).state, SlotState::Ready);
    must_get(cluster.listen_addr(), "/");
}

#[test]
fn a_primary_stopped_for_three_seconds_replaces_no_worker() {
    let cluster = Cluster::start(&[
        "--workers",
        "4",
        "--balance",
        "round-robin",
        "--health-interval",
        "200ms",
        "--health-timeout",
        "600ms",
    ]);
    let before = cluster.worker_pids();
    cluster.signal(Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(3));
    cluster.signal(Signal::SIGCONT);
    // Long enough for any verdict the stall could have caused to show.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cluster.worker_pids(), before, "{}", cluster.log());
    let log = cluster.log();
    assert!(!log.contains("hung"), "{log}");
    assert!(log.contains("no worker is blamed"), "{log}");
    assert!(cluster.status()["primary"]["stalls"].as_u64() >= Some(1));
}

#[test]
fn operator_mistakes_exit_2_from_check_and_from_run_naming_the_setting() {
    let script = TempFile::new("sh", "#!/bin/sh\nexit 0\n");
    let only_root = TempFile::executable("sh", "#!/bin/sh\nexit 0\n");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(only_root.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
    }
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--listen", "127.0.0.1:18231", "--status", "127.0.0.1:18231"],
            "status",
        ),
        (
            vec!["--listen", "127.0.0.1:18232", "--status", "0.0.0.0:18232"],
            "status",
        ),
        (vec!["--", "/nonexistent/steer-app"], "COMMAND"),
        (vec!["--", "no-such-program-for-steer"], "not found on PATH"),
        (vec!["--", script.as_arg()], "not executable"),
        (
            vec!["--user", "nobody", "--", only_root.as_arg()],
            "not executable by uid 65534",
        ),
        (
            vec!["--pid-file", "/nonexistent-dir/steer.pid"],
            "--pid-file",
        ),
        (
            vec!["--health-interval", "1s", "--health-timeout", "1500ms"],
            "at least twice health-interval",
        ),
        (
            vec!["--health-interval", "1ms", "--health-timeout", "1s"],
            "--health-interval",
        ),
        (
            vec!["--health-interval", "20ms", "--health-timeout", "50ms"],
            "at least 100ms",
        ),
    ];
    for (args, needle) in cases {
        for command in ["check", "run"] {
            let mut full = vec![command];
            full.extend(&args);
            let out = run_steer(&full);
            assert_eq!(out.code(), Some(2), "steer {full:?}\n{out}");
            assert!(
                out.stderr.contains(needle),
                "steer {full:?}: {needle:?}\n{out}"
            );
        }
    }
}

#[test]
fn the_pid_file_of_a_running_primary_survives_a_second_one() {
    let dir = TempFile::new("d", "");
    let pid_file = dir.path().with_extension("pid");
    let pid_arg = pid_file.to_string_lossy().into_owned();
    let cluster = Cluster::start(&[
        "--workers",
        "1",
        "--balance",
        "kernel",
        "--pid-file",
        &pid_arg,
    ]);
    let mine = format!("{}\n", cluster.pid());
    assert_eq!(std::fs::read_to_string(&pid_file).expect("pid file"), mine);
    for command in ["check", "run"] {
        let out = run_steer(&[
            command,
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--pid-file",
            &pid_arg,
        ]);
        assert_eq!(out.code(), Some(2), "{command}: {out}");
        assert!(
            out.stderr.contains("held by a running primary")
                && out.stderr.contains(&cluster.pid().to_string()),
            "{command}: {out}"
        );
        assert_eq!(
            std::fs::read_to_string(&pid_file).expect("pid file"),
            mine,
            "after {command}"
        );
    }
    assert!(cluster.try_exit_status().is_none());
    assert!(cluster.stop(Duration::from_secs(10)).success());
    assert!(!pid_file.exists(), "removed at a clean exit");
}

#[test]
fn a_broadcast_flood_from_one_worker_is_budgeted_and_the_others_stay_healthy() {
    let script = worker_script();
    let interval = Duration::from_secs(1);
    let cluster = Cluster::start(&[
        "--workers",
        "3",
        "--balance",
        "kernel",
        "--health-interval",
        "1s",
        "--health-timeout",
        "3s",
        "--",
        "python3",
        &script,
        "--heartbeats",
        "--flood",
        "--slot",
        "0",
    ]);
    let flood = Duration::from_secs(4);
    let end = Instant::now() + flood;
    let mut worst = [0u64; 3];
    let mut requests = 0u64;
    while Instant::now() < end {
        must_get(cluster.listen_addr(), "/");
        requests += 1;
        let doc = cluster.status();
        for (slot, worst) in worst.iter_mut().enumerate() {
            if let Some(ms) = status::worker(&doc, slot).raw["health_ms"].as_u64() {
                *worst = (*worst).max(ms);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The pongs kept coming during the flood: they carry the request counts.
    let doc = cluster.wait_for_reported_requests(requests, 3 * interval);
    eprintln!(
        "worst heartbeat owed during a 4 s flood: {worst:?} ms; {requests} requests reported by pongs; slot 0 dropped {}",
        doc["workers"][0]["messages_dropped"]
    );
    for slot in [1, 2] {
        assert!(
            u128::from(worst[slot]) < interval.as_millis(),
            "slot {slot} owed a ping for {} ms during the flood",
            worst[slot]
        );
        assert_eq!(
            status::worker(&doc, slot).generation,
            1,
            "slot {slot} never replaced"
        );
    }
    assert!(
        doc["workers"][0]["messages_dropped"].as_u64() > Some(0),
        "drops are counted"
    );
    let warnings = cluster
        .log()
        .lines()
        .filter(|l| l.contains("dropped"))
        .count();
    let bound = (flood.as_millis() / interval.as_millis()) as usize + 10;
    assert!(
        warnings <= bound,
        "{warnings} log lines about drops (bound {bound})"
    );
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn a_service_manager_that_never_reads_cannot_stall_supervision() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let name = format!("steer-notify-full-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
    let manager = UnixDatagram::bind_addr(&addr).expect("bind");
    // Its queue is full before the primary says anything, and nobody reads it.
    let filler = UnixDatagram::unbound().expect("socket");
    filler.set_nonblocking(true).expect("nonblocking");
    let mut queued = 0;
    while filler.send_to_addr(b"X=1", &addr).is_ok() {
        queued += 1;
        assert!(queued < 1_000_000, "the queue never filled");
    }
    let cluster = Cluster::start_with(&["--workers", "2", "--balance", "kernel"], |cmd| {
        cmd.env("NOTIFY_SOCKET", format!("@{name}"));
    });
    let killed_at = Instant::now();
    let victim = cluster.kill_worker(1);
    cluster.wait_until("slot 1 replaced", Duration::from_secs(5), |s| {
        let w = status::worker(s, 1);
        w.state == SlotState::Ready && w.pid.is_some_and(|p| p != victim)
    });
    assert!(
        killed_at.elapsed() < Duration::from_secs(1),
        "{:?}",
        killed_at.elapsed()
    );
    assert!(cluster.stop(Duration::from_secs(10)).success());
    drop(manager);
}

/// The main thread's context switches (each one a wake-up of the event loop).
fn loop_wakeups(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status")).expect("status");
    status
        .lines()
        .filter(|l| {
            l.starts_with("voluntary_ctxt_switches") || l.starts_with("nonvoluntary_ctxt_switches")
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// With no traffic the primary wakes for its heartbeat round and the answers to it, and
/// for nothing else: its timers are one deadline, recomputed each turn. On a quiet host
/// the four answers come in one batch, about two wake-ups a round; on a busy one they come
/// apart, at most one wake-up each (4.8 a round with a busy loop beside the test). A poll
/// of its own (every 10 ms, say) would be 50 a round.
#[test]
fn an_idle_primary_wakes_only_for_its_heartbeat_rounds() {
    let interval = Duration::from_millis(500);
    let cluster = Cluster::start(&[
        "--workers",
        "4",
        "--balance",
        "round-robin",
        "--health-interval",
        "500ms",
        "--health-timeout",
        "2s",
    ]);
    std::thread::sleep(Duration::from_secs(1));
    let window = Duration::from_secs(5);
    let before = loop_wakeups(cluster.pid());
    std::thread::sleep(window);
    let wakeups = loop_wakeups(cluster.pid()) - before;
    let rounds = (window.as_millis() / interval.as_millis()) as u64;
    eprintln!(
        "idle primary, 4 workers, {interval:?} heartbeats: {wakeups} wake-ups in {window:?} ({:.1} per round)",
        wakeups as f64 / rounds as f64
    );
    // The round's timer, and each worker's answer.
    let most = (1 + 4) * rounds + 5;
    assert!(
        wakeups <= most,
        "{wakeups} wake-ups in {rounds} heartbeat rounds (at most {most})"
    );
}

/// A primary started outside the harness. Killed if a test panics before stopping it (its
/// workers die with it: parent-death signal), so a failure leaves nothing running.
struct Bare(std::process::Child);

impl Drop for Bare {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `steer run ARGS --listen L --status S` outside the harness, which owns the primary's
/// stdio: for what it cannot set up (a closed log pipe, a signal during start). stdin and
/// stdout are `/dev/null`; returns the primary, its listen address and its status address.
fn spawn_bare(
    args: &[&str],
    stderr: std::process::Stdio,
) -> (Bare, std::net::SocketAddr, std::net::SocketAddr) {
    let (listen, status) = (
        steer_tests::free_local_addr(),
        steer_tests::free_local_addr(),
    );
    let child = std::process::Command::new(steer_bin())
        .arg("run")
        .args(args)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--status")
        .arg(status.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn steer");
    (Bare(child), listen, status)
}

/// SIGTERM to the primary, then its exit status (panics if it has not exited within 15 s).
fn terminate(Bare(child): &mut Bare) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "the primary did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_closed_log_pipe_does_not_stop_the_workers_serving() {
    // `steer run ... 2>&1 | head -c 10`: once the reader is gone, every log line meets
    // EPIPE. The workers' logger used to report that with `eprintln!`, which panics on a
    // closed stderr: every worker crash-looped and the port refused connections.
    let (mut child, listen, status_addr) =
        spawn_bare(&["--workers", "2", "-v"], std::process::Stdio::piped());
    drop(child.0.stderr.take());
    wait_for("the cluster is ready", Duration::from_secs(20), || {
        http_get_timeout(status_addr, "/ready", Duration::from_secs(1))
            .is_ok_and(|r| r.status == 200)
    });
    // Serving makes the workers log (-v), each line into the closed pipe.
    for i in 0..50 {
        let answer = http_get_timeout(listen, "/", Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("request {i} with the log pipe closed: {e}"));
        assert_eq!(answer.status, 200);
    }
    let doc: steer_tests::Value = serde_json::from_str(
        &http_get_timeout(status_addr, "/status", Duration::from_secs(2))
            .expect("/status")
            .body,
    )
    .expect("json");
    for worker in status::workers(&doc) {
        assert_eq!(
            worker.raw["restarts"], 0,
            "no worker died of its closed stderr: {doc}"
        );
    }
    assert_eq!(
        terminate(&mut child).code(),
        Some(0),
        "a clean stop, log pipe closed or not"
    );
}

#[test]
fn a_sigterm_while_the_primary_is_still_starting_is_a_clean_stop() {
    // The program's load takes a few hundred ms in a debug build. A SIGTERM meanwhile used
    // to meet the default action: the primary died with no log line and status 143.
    use std::os::unix::process::ExitStatusExt;
    let mut codes = Vec::new();
    for delay_ms in [30, 80, 150] {
        let (mut child, _, _) = spawn_bare(
            &["--workers", "2", "--balance", "round-robin"],
            std::process::Stdio::null(),
        );
        std::thread::sleep(Duration::from_millis(delay_ms));
        let status = terminate(&mut child);
        codes.push((delay_ms, status.code(), status.signal()));
    }
    println!("SIGTERM during start (delay ms, exit code, signal): {codes:?}");
    for (delay_ms, code, signal) in codes {
        assert_eq!(
            (code, signal),
            (Some(0), None),
            "SIGTERM {delay_ms} ms after the start: a clean stop, not death by the signal"
        );
    }
}

#[test]
fn a_second_primary_on_a_served_port_warns_that_it_shares_it() {
    // An operator who starts the same cluster twice: the second one's bind succeeds (same
    // user, SO_REUSEPORT), so it must say that the port is already served; and the first,
    // which found the port free, says so of the second's worker once it listens.
    let first = Cluster::start(&["--workers", "1", "--balance", "kernel"]);
    let listen = first.listen_addr().to_string();
    assert!(
        !first.log().contains("foreign listener"),
        "the first primary found the port free: {}",
        first.log()
    );
    let second = Cluster::start(&["--workers", "1", "--balance", "kernel", "--listen", &listen]);
    let log = second.wait_for_log("foreign listener", Duration::from_secs(5));
    assert!(log.contains("the same cluster started twice"), "{log}");
    first.wait_for_log("foreign listener", Duration::from_secs(5));
    second.stop_cleanly(Duration::from_secs(15));
    first.stop_cleanly(Duration::from_secs(15));
}
