//! Zero downtime for the primary itself and for every setting (issue 14): SIGUSR1
//! upgrades under load, upgrades that fail, live resizes (SIGHUP, SIGTTIN, SIGTTOU) and a
//! live policy switch.
//!
//! A successor primary outlives the one the harness started, so this test process is a
//! subreaper: successors are re-parented here, and the harness remembers every primary it
//! sees in `/status`, so a failing test leaves none behind.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use steer_tests::{
    Cluster, Load, Signal, SlotState, TempFile, http_get, http_get_from, pid_alive, status,
    steer_bin, wait_for,
};

fn subreaper() {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
}

fn send(pid: u32, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
        .unwrap_or_else(|e| panic!("{signal} to {pid}: {e}"));
}

fn pid_in(file: &Path) -> u32 {
    std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("the pid file {} holds no pid: {e}", file.display()))
}

/// Reaps a successor re-parented to this process once it exits (never the primary the
/// harness started: the harness reaps that one).
fn reap(cluster: &Cluster, pid: u32) {
    if pid == cluster.pid() {
        let _ = cluster.try_exit_status();
        return;
    }
    let mut status = 0;
    // SAFETY: waitpid on a pid that may or may not be our child; WNOHANG never blocks.
    unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
}

/// `/status` from whoever answers, every few milliseconds, counting what fails.
struct StatusWatch {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl StatusWatch {
    fn start(addr: std::net::SocketAddr) -> StatusWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let mut errors = Vec::new();
            let end = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                match http_get(addr, "/ready") {
                    Ok(r) if r.status == 200 => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        f.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("{} {}", r.status, r.body.trim()));
                    }
                    Err(e) => {
                        f.fetch_add(1, Ordering::Relaxed);
                        errors.push(e.to_string());
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            errors
        });
        StatusWatch {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self
            .thread
            .take()
            .map(|t| t.join().expect("status watcher"))
            .unwrap_or_default();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

/// SIGUSR1 to the primary named in `pid_file`; waits until its successor holds the pid
/// file, answers `/status` with every worker ready, and the old primary has exited.
/// Returns the successor's pid and how long the hand-over took.
fn upgrade(cluster: &Cluster, pid_file: &Path) -> (u32, Duration) {
    let old = pid_in(pid_file);
    let started = Instant::now();
    send(old, Signal::SIGUSR1);
    // Not `Cluster::wait_until`: the primary the harness started exits here, as it should.
    let deadline = Instant::now() + Duration::from_secs(30);
    let new = loop {
        if let Ok(doc) = cluster.try_status()
            && let Some(new) = status::primary_pid(&doc).filter(|&p| p != old)
            && status::all_ready(&doc)
        {
            break new;
        }
        assert!(
            Instant::now() < deadline,
            "no successor took over: {}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    wait_for("the old primary to exit", Duration::from_secs(30), || {
        reap(cluster, old);
        !pid_alive(old)
    });
    let took = started.elapsed();
    assert_eq!(pid_in(pid_file), new, "the pid file names the new primary");
    (new, took)
}

/// Stops the primary named in `pid_file` and waits for it to be gone.
fn stop(cluster: &Cluster, pid_file: &Path) {
    let pid = pid_in(pid_file);
    send(pid, Signal::SIGTERM);
    wait_for("the primary to stop", Duration::from_secs(30), || {
        reap(cluster, pid);
        !pid_alive(pid)
    });
    assert!(!pid_file.exists(), "removed at a clean exit");
}

fn pid_file() -> (TempFile, PathBuf) {
    let dir = TempFile::new("d", "");
    let path = dir.path().with_extension("pid");
    (dir, path)
}

fn five_upgrades_under(load_kind: &str) {
    subreaper();
    let (_dir, pid_file) = pid_file();
    let pid_arg = pid_file.to_string_lossy().into_owned();
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--pid-file",
        &pid_arg,
    ]);
    let addr = cluster.listen_addr();
    let watch = StatusWatch::start(cluster.status_addr());
    let load = match load_kind {
        "keep-alive" => Load::keep_alive(addr, 3),
        _ => Load::new_connections(addr, 3),
    };
    load.wait_for_ok(200, Duration::from_secs(10));
    let mut primaries = BTreeSet::from([cluster.pid()]);
    let mut took = Vec::new();
    for round in 0..5 {
        let before = load.ok();
        let (new, duration) = upgrade(&cluster, &pid_file);
        assert!(
            primaries.insert(new),
            "round {round}: a new primary each time"
        );
        took.push((duration, load.ok() - before));
        load.wait_for_ok(load.ok() + 50, Duration::from_secs(10));
    }
    let report = load.stop();
    let (status_ok, status_failed, errors) = watch.stop();
    eprintln!(
        "5 upgrades under {load_kind} load: {report}; /ready answered {status_ok} times, \
         failed {status_failed}; each upgrade (time, requests served meanwhile): {took:?}"
    );
    report.assert_all_succeeded();
    assert_eq!(
        status_failed, 0,
        "the status address answered throughout: {errors:?}"
    );
    let doc = cluster.status();
    assert_eq!(status::primary_pid(&doc), Some(pid_in(&pid_file)));
    for old in primaries.iter().filter(|&&p| p != pid_in(&pid_file)) {
        assert!(!pid_alive(*old), "old primary {old} exited");
    }
    stop(&cluster, &pid_file);
}

#[test]
fn five_upgrades_back_to_back_under_new_connection_load_lose_nothing() {
    five_upgrades_under("new-connection");
}

#[test]
fn five_upgrades_back_to_back_under_keep_alive_load_lose_nothing() {
    five_upgrades_under("keep-alive");
}

/// Waits for the log line of a failed upgrade; the old primary must still serve.
fn assert_upgrade_failed_and_old_serves(cluster: &Cluster, pid_file: &Path, load: Load) {
    let old = pid_in(pid_file);
    send(old, Signal::SIGUSR1);
    cluster.wait_for_log("upgrade failed", Duration::from_secs(30));
    load.wait_for_ok(load.ok() + 100, Duration::from_secs(10));
    let report = load.stop();
    eprintln!("a failed upgrade under load: {report}");
    report.assert_all_succeeded();
    assert_eq!(
        pid_in(pid_file),
        old,
        "the pid file still names the old primary"
    );
    let doc = cluster.status();
    assert_eq!(status::primary_pid(&doc), Some(old));
    assert!(status::all_ready(&doc));
    assert!(
        cluster.try_exit_status().is_none(),
        "the old primary keeps running"
    );
    // It still steers: every worker takes new connections.
    cluster.rolling_restart(Duration::from_secs(30));
}

#[test]
fn an_upgrade_whose_config_no_longer_parses_leaves_the_old_primary_serving() {
    subreaper();
    let (_dir, pid_file) = pid_file();
    let config = TempFile::new("toml", "workers = 2\nbalance = \"round-robin\"\n");
    let pid_arg = pid_file.to_string_lossy().into_owned();
    let cluster = Cluster::start(&["--config", config.as_arg(), "--pid-file", &pid_arg]);
    let load = Load::new_connections(cluster.listen_addr(), 2);
    load.wait_for_ok(100, Duration::from_secs(10));
    std::fs::write(config.path(), "workers = \"many\"\n").expect("break the config");
    assert_upgrade_failed_and_old_serves(&cluster, &pid_file, load);
    assert!(cluster.log().contains("workers"), "the reason is logged");
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn an_upgrade_to_an_executable_that_exits_1_leaves_the_old_primary_serving() {
    subreaper();
    let (_dir, pid_file) = pid_file();
    let pid_arg = pid_file.to_string_lossy().into_owned();
    let copy = TempFile::executable("bin", std::fs::read(steer_bin()).expect("read steer"));
    let (listen, status) = (
        steer_tests::free_local_addr().to_string(),
        steer_tests::free_local_addr().to_string(),
    );
    let cluster = Cluster::start_program(
        copy.path(),
        &[
            "run",
            "--listen",
            &listen,
            "--status",
            &status,
            "--workers",
            "2",
            "--balance",
            "round-robin",
            "--pid-file",
            &pid_arg,
        ],
    );
    let load = Load::new_connections(cluster.listen_addr(), 2);
    load.wait_for_ok(100, Duration::from_secs(10));
    // The binary on disk is replaced (a new inode at the same path, as installs do).
    let broken = copy.path().with_extension("new");
    std::fs::write(&broken, "#!/bin/sh\nexit 1\n").expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::fs::rename(&broken, copy.path()).expect("replace the binary");
    let old = pid_in(&pid_file);
    send(old, Signal::SIGUSR1);
    cluster.wait_for_log("upgrade failed", Duration::from_secs(30));
    assert!(cluster.log().contains("exit code 1"), "{}", cluster.log());
    load.wait_for_ok(load.ok() + 100, Duration::from_secs(10));
    let report = load.stop();
    report.assert_all_succeeded();
    assert_eq!(pid_in(&pid_file), old);
    assert!(status::all_ready(&cluster.status()));
    // The old binary is gone from disk: stop without rolling (a roll would run the script).
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn sighup_resizes_2_to_4_to_3_workers_under_load_losing_nothing() {
    let config = TempFile::new("toml", "workers = 2\nbalance = \"round-robin\"\n");
    let cluster = Cluster::start(&["--config", config.as_arg()]);
    let load = Load::new_connections(cluster.listen_addr(), 3);
    load.wait_for_ok(100, Duration::from_secs(10));
    std::fs::write(config.path(), "workers = 4\nbalance = \"round-robin\"\n").expect("write");
    cluster.signal(Signal::SIGHUP);
    cluster.wait_until(
        "4 workers ready, the roll done",
        Duration::from_secs(30),
        |s| {
            status::workers(s).len() == 4
                && status::all_ready(s)
                && s["primary"]["phase"] == "running"
        },
    );
    load.wait_for_ok(load.ok() + 100, Duration::from_secs(10));
    std::fs::write(config.path(), "workers = 3\nbalance = \"round-robin\"\n").expect("write");
    cluster.signal(Signal::SIGHUP);
    let doc = cluster.wait_until("3 workers", Duration::from_secs(30), |s| {
        status::workers(s).len() == 3 && status::all_ready(s) && s["primary"]["phase"] == "running"
    });
    assert_eq!(doc["totals"]["workers"], 3);
    load.wait_for_ok(load.ok() + 100, Duration::from_secs(10));
    let report = load.stop();
    eprintln!("SIGHUP 2 -> 4 -> 3 workers under load: {report}");
    report.assert_all_succeeded();
    // The removed slot gets nothing any more; the three others all serve.
    let mut seen = BTreeSet::new();
    for _ in 0..60 {
        seen.insert(
            http_get(cluster.listen_addr(), "/")
                .expect("get")
                .worker()
                .expect("header"),
        );
    }
    assert_eq!(seen, BTreeSet::from([0, 1, 2]));
    assert!(
        !cluster.log().contains("keeps its running value"),
        "a SIGHUP that applies `workers` warns that it did not: {}",
        cluster.log()
    );
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn sigttin_and_sigttou_add_and_remove_one_worker_without_touching_the_others() {
    let cluster = Cluster::start(&["--workers", "2", "--balance", "round-robin"]);
    let load = Load::new_connections(cluster.listen_addr(), 2);
    load.wait_for_ok(100, Duration::from_secs(10));
    let before = cluster.worker_pids();
    cluster.signal(Signal::SIGTTIN);
    let doc = cluster.wait_until("a third worker", Duration::from_secs(20), |s| {
        status::workers(s).len() == 3 && status::all_ready(s)
    });
    let after: Vec<(usize, u32)> = status::worker_pids(&doc);
    assert_eq!(&after[..2], &before[..], "slots 0 and 1 kept their pids");
    let third = after[2].1;
    cluster.signal(Signal::SIGTTOU);
    cluster.wait_until("back to two", Duration::from_secs(20), |s| {
        status::workers(s).len() == 2
    });
    wait_for(
        "the removed worker to exit",
        Duration::from_secs(20),
        || !pid_alive(third),
    );
    assert_eq!(
        cluster.worker_pids(),
        before,
        "slots 0 and 1 kept their pids"
    );
    let report = load.stop();
    eprintln!("SIGTTIN then SIGTTOU under load: {report}");
    report.assert_all_succeeded();
    assert!(
        !cluster.log().contains("rolling restart"),
        "no slot was rolled"
    );
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn sighup_from_round_robin_to_hash_under_load_then_one_client_sticks_to_one_slot() {
    let config = TempFile::new("toml", "workers = 4\nbalance = \"round-robin\"\n");
    let cluster = Cluster::start(&["--config", config.as_arg()]);
    let load = Load::new_connections(cluster.listen_addr(), 3);
    load.wait_for_ok(100, Duration::from_secs(10));
    std::fs::write(config.path(), "workers = 4\nbalance = \"hash\"\n").expect("write");
    cluster.signal(Signal::SIGHUP);
    cluster.wait_until("balance hash", Duration::from_secs(20), |s| {
        status::balance(s) == Some("hash") && status::all_ready(s)
    });
    load.wait_for_ok(load.ok() + 100, Duration::from_secs(10));
    let report = load.stop();
    eprintln!("round-robin -> hash under load: {report}");
    report.assert_all_succeeded();
    assert!(
        cluster.log().contains("without restarting a worker"),
        "{}",
        cluster.log()
    );
    assert!(
        !cluster.log().contains("keeps its running value"),
        "a SIGHUP that applies `balance` warns that it did not: {}",
        cluster.log()
    );
    for last in [5u8, 77, 200] {
        let client = Ipv4Addr::new(127, 0, 3, last);
        let slots: BTreeSet<usize> = (0..20)
            .map(|_| {
                http_get_from(client, cluster.listen_addr(), "/")
                    .expect("get")
                    .worker()
                    .expect("header")
            })
            .collect();
        assert_eq!(slots.len(), 1, "client {client} landed on {slots:?}");
    }
    assert_eq!(status::worker(&cluster.status(), 0).state, SlotState::Ready);
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn sighup_refuses_a_changed_listen_address_naming_it() {
    let (listen, status, other) = (
        steer_tests::free_local_addr(),
        steer_tests::free_local_addr(),
        steer_tests::free_local_addr(),
    );
    let text = |listen| {
        format!("workers = 1\nbalance = \"kernel\"\nlisten = \"{listen}\"\nstatus = \"{status}\"\n")
    };
    let config = TempFile::new("toml", text(listen));
    let cluster = Cluster::start_as_given(&["--config", config.as_arg()], listen, status);
    std::fs::write(config.path(), text(other)).expect("write");
    cluster.signal(Signal::SIGHUP);
    let log = cluster.wait_for_log("`listen` changed", Duration::from_secs(10));
    assert!(
        log.contains("SIGUSR1"),
        "the warning says how to apply it: {log}"
    );
    assert!(
        log.contains("added \"tcp-") && log.contains("removed \"tcp-"),
        "the warning names the listeners added and removed: {log}"
    );
    cluster.wait_until("the roll after the reload", Duration::from_secs(20), |s| {
        status::all_ready(s) && s["primary"]["phase"] == "running"
    });
    assert!(
        http_get(cluster.listen_addr(), "/").is_ok(),
        "still on the old address"
    );
    cluster.stop_cleanly(Duration::from_secs(15));
}

/// Issue 21, point 1: a second upgrade while the first old primary still drains. The
/// second successor is re-parented to the first old primary (the nearest subreaper) when
/// its own parent exits; that primary's exit must not take it, and its workers, along.
#[test]
fn a_chain_of_upgrades_while_the_first_old_primary_drains_loses_nothing() {
    subreaper();
    let (_dir, pid_file) = pid_file();
    let pid_arg = pid_file.to_string_lossy().into_owned();
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--shutdown-timeout",
        "20s",
        "--pid-file",
        &pid_arg,
    ]);
    let addr = cluster.listen_addr();
    let p0 = cluster.pid();
    // A 9 s request keeps the first primary draining through the second upgrade.
    let slow = std::thread::spawn(move || {
        steer_tests::http_get_timeout(addr, "/sleep?ms=9000", Duration::from_secs(30))
    });
    cluster.wait_until("the slow request in flight", Duration::from_secs(10), |s| {
        status::workers(s)
            .iter()
            .any(|w| w.raw["active"].as_u64() >= Some(1))
    });
    let load = Load::new_connections(addr, 3);
    load.wait_for_ok(200, Duration::from_secs(10));
    let (s1, _) = upgrade_without_waiting_for_the_old(&cluster, &pid_file);
    assert!(
        pid_alive(p0),
        "the first primary still drains its slow request"
    );
    let (s2, _) = upgrade_without_waiting_for_the_old(&cluster, &pid_file);
    assert_ne!(s1, s2);
    wait_for("every old primary to exit", Duration::from_secs(40), || {
        reap(&cluster, p0);
        reap(&cluster, s1);
        !pid_alive(p0) && !pid_alive(s1)
    });
    let slow = slow.join().expect("slow request thread");
    assert!(
        slow.as_ref().is_ok_and(|r| r.status == 200),
        "the drained request was answered: {slow:?}"
    );
    // The newest primary serves, after every old one has gone.
    load.wait_for_ok(load.ok() + 200, Duration::from_secs(10));
    let report = load.stop();
    eprintln!("a chain of two upgrades under load: {report}");
    report.assert_all_succeeded();
    assert!(pid_alive(s2), "the newest primary lives: {}", cluster.log());
    let doc = cluster.status();
    assert_eq!(status::primary_pid(&doc), Some(s2));
    assert!(status::all_ready(&doc), "{doc:#}");
    for _ in 0..20 {
        steer_tests::must_get(addr, "/");
    }
    stop(&cluster, &pid_file);
}

/// A successor chain refuses SIGUSR1 to a successor that has not taken over yet: it logs
/// why, and the upgrade under way completes.
#[test]
fn sigusr1_to_a_successor_that_has_not_taken_over_is_refused_with_a_reason() {
    subreaper();
    let (_dir, pid_file) = pid_file();
    let pid_arg = pid_file.to_string_lossy().into_owned();
    // Workers that take 1.5 s to say `ready` keep the successor from taking over for as
    // long: the window in which it is sent SIGUSR1.
    let app = format!("{}/fixtures/python_app.py", env!("CARGO_MANIFEST_DIR"));
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--pid-file",
        &pid_arg,
        "--",
        "python3",
        &app,
        "--start-delay-ms",
        "1500",
    ]);
    cluster.wait_until("both workers said ready", Duration::from_secs(20), |s| {
        status::workers(s)
            .iter()
            .all(|w| w.raw["health_ms"].is_u64())
            && status::all_ready(s)
    });
    let p0 = cluster.pid();
    send(p0, Signal::SIGUSR1);
    // The successor is the test's grandchild: find it as the primary's child that is not a
    // worker, as soon as it exists.
    let mut successor = None;
    wait_for("the successor process", Duration::from_secs(10), || {
        let workers: BTreeSet<u32> = cluster.worker_pid_list().into_iter().collect();
        successor = steer_tests::children_of(p0)
            .into_iter()
            .find(|pid| !workers.contains(pid));
        successor.is_some()
    });
    let s1 = successor.expect("found");
    send(s1, Signal::SIGUSR1);
    cluster.wait_for_log("still taking over", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(30);
    while pid_in(&pid_file) != s1 || !status::all_ready(&cluster.status()) {
        assert!(Instant::now() < deadline, "{}", cluster.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        cluster.log().matches("a new primary is starting").count(),
        1,
        "only one upgrade started: {}",
        cluster.log()
    );
    wait_for("the old primary to exit", Duration::from_secs(30), || {
        reap(&cluster, p0);
        !pid_alive(p0)
    });
    let doc = cluster.status();
    assert_eq!(status::primary_pid(&doc), Some(s1), "no second successor");
    stop(&cluster, &pid_file);
}

/// SIGUSR1 to the primary named in `pid_file`; waits until a successor answers `/status`
/// with every worker ready and holds the pid file, but not for the old primary to exit.
fn upgrade_without_waiting_for_the_old(cluster: &Cluster, pid_file: &Path) -> (u32, Duration) {
    let old = pid_in(pid_file);
    let started = Instant::now();
    send(old, Signal::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(doc) = cluster.try_status()
            && let Some(new) = status::primary_pid(&doc).filter(|&p| p != old)
            && status::all_ready(&doc)
            && pid_in(pid_file) == new
        {
            return (new, started.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "no successor took over: {}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An app file on disk that runs `real` (the python fixture, or a Node example), so that a
/// test can replace what is on disk under the same command line.
fn app_file(kind: &str) -> TempFile {
    let dir = env!("CARGO_MANIFEST_DIR");
    match kind {
        "fd3" => {
            let real = format!("{dir}/fixtures/fd3_worker.py");
            TempFile::new(
                "py",
                format!(
                    "import runpy, sys\nsys.argv[0] = {real:?}\nrunpy.run_path({real:?}, run_name='__main__')\n"
                ),
            )
        }
        "python" => {
            let real = format!("{dir}/fixtures/python_app.py");
            TempFile::new(
                "py",
                format!(
                    "import runpy, sys\nsys.argv[0] = {real:?}\nrunpy.run_path({real:?}, run_name='__main__')\n"
                ),
            )
        }
        _ => {
            let real = Path::new(dir).join("../examples/node/hello.mjs");
            let real = real.canonicalize().expect("examples/node/hello.mjs");
            TempFile::new("mjs", format!("import {:?};\n", real.display().to_string()))
        }
    }
}

/// Replaces `app` on disk by `text` (a new inode at the same path, as deploys do).
fn replace_app(app: &TempFile, text: &str) {
    let next = app.path().with_extension("next");
    std::fs::write(&next, text).expect("write the new release");
    std::fs::rename(&next, app.path()).expect("replace the app");
}

/// Issue 21, point 12: SIGUSR1 after the app on disk was replaced by one that exits 1 at
/// start. The successor waits for its workers' `ready` (the old ones said it), gives up
/// after three failed starts on a slot, and tells the old primary, which keeps serving.
fn an_upgrade_to_a_release_that_exits_at_start(kind: &str) {
    subreaper();
    let (_dir, pid_file) = pid_file();
    let pid_arg = pid_file.to_string_lossy().into_owned();
    let app = app_file(kind);
    let interpreter = if kind == "node" { "node" } else { "python3" };
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--start-timeout",
        "10s",
        "--pid-file",
        &pid_arg,
        "--",
        interpreter,
        app.as_arg(),
    ]);
    cluster.wait_until("both workers serving", Duration::from_secs(30), |s| {
        // A helper's workers say `ready` (and answer pings); a program that knows nothing
        // of Steer is ready when it runs.
        (kind == "fd3"
            || status::workers(s)
                .iter()
                .all(|w| w.raw["health_ms"].is_u64()))
            && status::all_ready(s)
    });
    let old = cluster.pid();
    let before = cluster.worker_pid_list();
    let load = Load::new_connections(cluster.listen_addr(), 2);
    load.wait_for_ok(100, Duration::from_secs(10));
    replace_app(
        &app,
        if kind == "node" {
            "process.exit(1);\n"
        } else {
            "import sys\nsys.exit(1)\n"
        },
    );
    let sent = Instant::now();
    send(old, Signal::SIGUSR1);
    let log = cluster.wait_for_log("upgrade failed", Duration::from_secs(30));
    let why = if kind == "fd3" {
        "failed to start 3 times in a row (last: exited right after it started: exit code 1)"
    } else {
        "failed to start 3 times in a row (last: exited before ready: exit code 1)"
    };
    assert!(log.contains(why), "the old primary says why: {log}");
    // Before the successor's deadline (start-timeout + 5 s = 15 s): it gave up by itself.
    eprintln!(
        "the upgrade was abandoned {:?} after SIGUSR1",
        sent.elapsed()
    );
    assert!(sent.elapsed() < Duration::from_secs(15), "{log}");
    assert!(
        !log.contains("did not have every worker ready within"),
        "{log}"
    );
    load.wait_for_ok(load.ok() + 200, Duration::from_secs(10));
    let report = load.stop();
    eprintln!("an upgrade to a {kind} release that exits at start: {report}");
    report.assert_all_succeeded();
    assert_eq!(pid_in(&pid_file), old, "the pid file names the old primary");
    let doc = cluster.status();
    assert_eq!(status::primary_pid(&doc), Some(old));
    assert!(status::all_ready(&doc), "{doc:#}");
    assert_eq!(cluster.worker_pid_list(), before, "the old workers serve");
    assert!(cluster.try_exit_status().is_none(), "the old primary runs");
    // Stop without rolling: the app on disk would not start.
    cluster.stop_cleanly(Duration::from_secs(15));
}

#[test]
fn an_upgrade_to_a_python_release_that_exits_at_start_leaves_the_old_primary_serving() {
    an_upgrade_to_a_release_that_exits_at_start("python");
}

#[test]
fn an_upgrade_to_a_node_release_that_exits_at_start_leaves_the_old_primary_serving() {
    an_upgrade_to_a_release_that_exits_at_start("node");
}

/// The same with a program that knows nothing of Steer (counted ready when it runs): it
/// must stay up a second before the new primary takes over, and one that exits at once
/// is a failed start.
#[test]
fn an_upgrade_to_a_plain_fd3_release_that_exits_at_start_leaves_the_old_primary_serving() {
    an_upgrade_to_a_release_that_exits_at_start("fd3");
}

/// Issue 21, point 8: an upgrade from `kernel` to an eBPF policy whose successor dies
/// after it attached its program. The old primary takes that program off the group (no
/// SYN is refused), and names itself in the pid file again.
#[test]
fn a_failed_upgrade_from_kernel_to_ebpf_leaves_no_program_on_the_group() {
    subreaper();
    let (_dir, pid_file) = pid_file();
    let pid_arg = pid_file.to_string_lossy().into_owned();
    let config = TempFile::new("toml", "workers = 2\nbalance = \"kernel\"\n");
    // Workers that take a second to say `ready`: the successor takes over that much later,
    // which leaves the time to stop the old primary before it hears of it.
    let fixture = format!("{}/fixtures/python_app.py", env!("CARGO_MANIFEST_DIR"));
    let cluster = Cluster::start(&[
        "--config",
        config.as_arg(),
        "--pid-file",
        &pid_arg,
        "--",
        "python3",
        &fixture,
        "--start-delay-ms",
        "1000",
    ]);
    cluster.wait_until("both workers said ready", Duration::from_secs(30), |s| {
        status::workers(s)
            .iter()
            .all(|w| w.raw["health_ms"].is_u64())
            && status::all_ready(s)
    });
    let old = cluster.pid();
    std::fs::write(config.path(), "workers = 2\nbalance = \"round-robin\"\n").expect("write");
    send(old, Signal::SIGUSR1);
    cluster.wait_for_log("a new primary is starting", Duration::from_secs(10));
    // The old primary does not hear the successor's `ready` until it is dead.
    send(old, Signal::SIGSTOP);
    let log = cluster.wait_for_log(
        "took over from the previous primary",
        Duration::from_secs(30),
    );
    let successor = pid_in(&pid_file);
    assert_ne!(successor, old, "the successor named itself: {log}");
    send(successor, Signal::SIGKILL);
    wait_for("the successor to die", Duration::from_secs(10), || {
        steer_tests::process_state(successor).is_none_or(|s| s == 'Z')
    });
    send(old, Signal::SIGCONT);
    cluster.wait_for_log("upgrade failed", Duration::from_secs(10));
    wait_for(
        "the old primary in the pid file",
        Duration::from_secs(10),
        || pid_in(&pid_file) == old,
    );
    let addr = cluster.listen_addr();
    let mut refused = 0;
    for _ in 0..50 {
        if steer_tests::http_get_timeout(addr, "/", Duration::from_secs(5)).is_err() {
            refused += 1;
        }
    }
    assert_eq!(refused, 0, "every connection is served: {}", cluster.log());
    let doc = cluster.status();
    assert_eq!(status::primary_pid(&doc), Some(old));
    assert_eq!(status::balance(&doc), Some("kernel"));
    cluster.stop_cleanly(Duration::from_secs(15));
}

/// One datagram from a new flow to `to`; the answering process's pid (the demo answers
/// `<slot> <pid> <generation> <payload>`), or `None` within `timeout`.
fn udp_answer_pid(to: std::net::SocketAddr, payload: &str, timeout: Duration) -> Option<u32> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("client socket");
    socket.set_read_timeout(Some(timeout)).expect("timeout");
    socket.send_to(payload.as_bytes(), to).expect("send");
    let mut buffer = [0u8; 512];
    let len = socket.recv(&mut buffer).ok()?;
    let text = std::str::from_utf8(&buffer[..len]).expect("ASCII answer");
    let fields: Vec<&str> = text.splitn(4, ' ').collect();
    assert_eq!(
        fields.get(3),
        Some(&payload),
        "the payload is echoed: {text:?}"
    );
    fields.get(1).and_then(|pid| pid.parse().ok())
}

/// Every one of `count` datagrams from new flows is answered by a worker the primary
/// shows in `/status`.
fn udp_all_answered(cluster: &Cluster, to: std::net::SocketAddr, count: usize, when: &str) {
    let workers = cluster.worker_pid_list();
    for i in 0..count {
        let payload = format!("{when} {i}");
        let pid = udp_answer_pid(to, &payload, Duration::from_secs(2))
            .unwrap_or_else(|| panic!("{when}: datagram {i} unanswered\n{}", cluster.log()));
        assert!(
            workers.contains(&pid),
            "{when}: answered by {pid}, not a worker of {workers:?}"
        );
    }
}

#[test]
fn an_upgrade_with_a_tcp_and_a_udp_listener_keeps_serving_both() {
    subreaper();
    let (_dir, pid_file) = pid_file();
    let pid_arg = pid_file.to_string_lossy().into_owned();
    let tcp = steer_tests::free_local_addr().to_string();
    let udp = steer_tests::free_local_addr();
    let udp_arg = format!("dns=udp://{udp}");
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--pid-file",
        &pid_arg,
        "--listen",
        &tcp,
        "--listen",
        &udp_arg,
    ]);
    udp_all_answered(&cluster, udp, 20, "before");
    let load = Load::new_connections(cluster.listen_addr(), 3);
    load.wait_for_ok(200, Duration::from_secs(10));
    let old = cluster.pid();
    let (new, took) = upgrade(&cluster, &pid_file);
    assert_ne!(new, old);
    load.wait_for_ok(load.ok() + 100, Duration::from_secs(10));
    udp_all_answered(&cluster, udp, 20, "after");
    let report = load.stop();
    eprintln!("an upgrade with TCP and UDP listeners, {took:?}: TCP {report}");
    report.assert_all_succeeded();
    let doc = cluster.status();
    let protocols: Vec<&str> = doc["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .filter_map(|l| l["protocol"].as_str())
        .collect();
    assert_eq!(
        protocols,
        ["tcp", "udp"],
        "the successor serves both: {doc}"
    );
    stop(&cluster, &pid_file);
}

/// `STEER_QUIC_RESET_KEY` of the worker `pid`, from the report
/// `tests/fixtures/listeners_worker.py` writes in `dir`.
fn quic_reset_key(dir: &Path, pid: u32) -> String {
    let report = dir.join(format!("{pid}.json"));
    wait_for("the worker's report", Duration::from_secs(10), || {
        report.exists()
    });
    let seen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
    seen["env"]["STEER_QUIC_RESET_KEY"]
        .as_str()
        .unwrap_or_else(|| panic!("no reset key: {seen}"))
        .to_owned()
}

#[test]
fn an_upgrade_hands_the_quic_reset_key_to_the_successors_workers() {
    subreaper();
    let (dir, pid_file) = pid_file();
    let reports = dir.path().with_extension("reports");
    std::fs::create_dir_all(&reports).expect("dir");
    let pid_arg = pid_file.to_string_lossy().into_owned();
    let script = format!(
        "{}/fixtures/listeners_worker.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let quic = format!("quic://{}", steer_tests::free_local_addr());
    let cluster = Cluster::start(&[
        "--workers",
        "1",
        "--pid-file",
        &pid_arg,
        "--listen",
        &steer_tests::free_local_addr().to_string(),
        "--listen",
        &quic,
        "--",
        "python3",
        &script,
        reports.to_str().expect("utf-8 path"),
    ]);
    let old_worker = cluster.worker_pid_list()[0];
    let before = quic_reset_key(&reports, old_worker);
    let (_new, _took) = upgrade(&cluster, &pid_file);
    let workers = cluster.worker_pid_list();
    assert!(
        !workers.contains(&old_worker),
        "the successor started its own workers"
    );
    let after: Vec<String> = workers
        .into_iter()
        .map(|pid| quic_reset_key(&reports, pid))
        .collect();
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|key| *key == before),
        "the successor's workers answer resets for the old ones' IDs: {before} vs {after:?}"
    );
    stop(&cluster, &pid_file);
    let _ = std::fs::remove_dir_all(&reports);
}
