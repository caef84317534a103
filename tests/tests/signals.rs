//! Signals as an operator sends them: to every process of the service at once (what
//! `systemctl kill` does without `--kill-whom=main`), and several of the same in a row.
//!
//! - A control signal sent to every process reaches only the primary's meaning: no
//!   worker dies, stops or restarts from it, for demo workers and for workers on the Node
//!   and Python helpers.
//! - The primary counts repeated signals: three SIGTTINs add three workers, and a second
//!   SIGTERM kills at once, even when they come faster than its loop turns.

use std::time::{Duration, Instant};

use steer_tests::{
    Cluster, Signal, descendants_of, http_get, http_get_timeout, pid_alive, process_state,
    signal_pending, status,
};

/// How long a roll or a resize of a small cluster may take on a loaded test machine.
const SETTLE: Duration = Duration::from_secs(30);

fn fixture(name: &str) -> String {
    format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn contrib_example(name: &str) -> String {
    format!("{}/../examples/node/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Sends `signal` to `pids` (ignoring those that are gone), then waits until none of
/// them still has it pending: each has handled, ignored or died of it.
fn send_and_wait_delivered(pids: &[u32], signal: Signal) {
    for &pid in pids {
        let target = nix::unistd::Pid::from_raw(pid as i32);
        // ESRCH: it exited since it was listed, which the caller's checks see.
        let _ = nix::sys::signal::kill(target, signal);
    }
    // Looked at without sleeping: a signal is handled within microseconds, and the
    // SIGTTIN and SIGTERM tests mean to send the next one right then.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&pid| signal_pending(pid, signal)) {
        assert!(
            Instant::now() < deadline,
            "{signal} still pending in one of {pids:?} after 10 s"
        );
        std::thread::yield_now();
    }
}

/// The generation of every slot, in slot order.
fn generations(doc: &steer_tests::Value) -> Vec<u64> {
    status::workers(doc).iter().map(|w| w.generation).collect()
}

/// Waits until every slot of `cluster` answers a request (an external worker is
/// `ready` when it runs, before its helper has set up).
fn every_slot_answers(cluster: &Cluster, workers: usize) {
    let deadline = Instant::now() + SETTLE;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < workers {
        assert!(
            Instant::now() < deadline,
            "only slots {seen:?} answered within {SETTLE:?}"
        );
        if let Ok(response) = http_get(cluster.listen_addr(), "/") {
            seen.extend(response.worker());
        }
    }
}

/// SIGHUP, SIGUSR2, SIGWINCH and SIGTTIN, each to the primary and every process below
/// it. SIGHUP and SIGUSR2 roll the workers (new pids, which is not a restart), SIGWINCH
/// does nothing, SIGTTIN adds exactly one worker; no worker exits from a signal.
fn signals_to_every_process_reach_only_the_primary(cluster: &Cluster, workers: usize) {
    let primary = cluster.pid();
    for signal in [
        Signal::SIGHUP,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
        Signal::SIGTTIN,
    ] {
        let before = cluster.wait_ready(SETTLE);
        let mut unit = vec![primary];
        unit.extend(descendants_of(primary));
        assert!(
            unit.len() > workers,
            "the primary and its {workers} workers: {unit:?}"
        );
        send_and_wait_delivered(&unit, signal);
        let after = match signal {
            Signal::SIGHUP | Signal::SIGUSR2 => {
                let old = generations(&before);
                cluster.wait_until(&format!("the roll of {signal}"), SETTLE, |s| {
                    status::all_ready(s)
                        && generations(s).iter().zip(&old).all(|(new, old)| new > old)
                })
            }
            Signal::SIGTTIN => cluster.wait_until("one worker more", SETTLE, |s| {
                status::all_ready(s) && status::workers(s).len() == workers + 1
            }),
            _ => cluster.status(),
        };
        for &pid in &unit[1..] {
            assert!(
                !matches!(process_state(pid), Some('T' | 't')),
                "process {pid} was stopped by {signal}\n{}",
                cluster.log()
            );
        }
        if matches!(signal, Signal::SIGWINCH | Signal::SIGTTIN) {
            for (slot, pid) in status::worker_pids(&before) {
                assert!(
                    pid_alive(pid) && status::worker(&after, slot).pid == Some(pid),
                    "slot {slot} (pid {pid}) did not survive {signal}\n{after:#}\n{}",
                    cluster.log()
                );
            }
        }
        assert_eq!(
            status::total(&after, "restarts"),
            0,
            "after {signal}: {after:#}\n{}",
            cluster.log()
        );
    }
    // Nothing more than the one SIGTTIN asked for, and nothing died of a signal (an old
    // worker killed while it drained would not count as a restart).
    let end = cluster.wait_ready(SETTLE);
    assert_eq!(status::workers(&end).len(), workers + 1, "{end:#}");
    let log = cluster.log();
    for name in ["SIGHUP", "SIGUSR2", "SIGWINCH", "SIGTTIN"] {
        assert!(
            !log.contains(&format!("({name})")),
            "a process exited from {name}:\n{log}"
        );
    }
    cluster.stop_cleanly(SETTLE);
}

#[test]
fn control_signals_to_every_process_of_demo_workers_reach_only_the_primary() {
    let cluster = Cluster::start(&["--workers", "2", "--balance", "round-robin"]);
    signals_to_every_process_reach_only_the_primary(&cluster, 2);
}

#[test]
fn control_signals_to_every_process_of_node_workers_reach_only_the_primary() {
    let script = contrib_example("hello.mjs");
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--",
        "node",
        &script,
    ]);
    every_slot_answers(&cluster, 2);
    signals_to_every_process_reach_only_the_primary(&cluster, 2);
}

#[test]
fn control_signals_to_every_process_of_python_workers_reach_only_the_primary() {
    let script = fixture("python_app.py");
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--",
        "python3",
        &script,
    ]);
    every_slot_answers(&cluster, 2);
    signals_to_every_process_reach_only_the_primary(&cluster, 2);
}

#[test]
fn three_sigttins_back_to_back_add_three_workers() {
    let cluster = Cluster::start(&["--workers", "2", "--balance", "round-robin"]);
    let primary = cluster.pid();
    // Back to back, within microseconds, and still three: the kernel folds a signal sent
    // while the same one is pending for the same target, so each goes to another thread
    // of the primary that takes it (each thread has its pending set). Once there are no
    // more such threads, the next waits until the one before has been handled.
    let mut threads = threads_taking(primary, Signal::SIGTTIN);
    // The loop's own thread last, so the others' handlers have run when it wakes.
    threads.sort_by_key(|&tid| tid == primary);
    let started = Instant::now();
    for i in 0..3 {
        match threads.get(i) {
            Some(&tid) => tgkill(primary, tid, Signal::SIGTTIN),
            None => send_and_wait_delivered(&[primary], Signal::SIGTTIN),
        }
    }
    let sent = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(10);
    while threads
        .iter()
        .any(|&tid| task_signal_pending(primary, tid, Signal::SIGTTIN))
    {
        assert!(
            Instant::now() < deadline,
            "SIGTTIN still pending after 10 s"
        );
        std::thread::yield_now();
    }
    eprintln!(
        "three SIGTTINs sent in {sent:?} ({} to threads of their own), handled in {:?}",
        threads.len().min(3),
        started.elapsed()
    );
    let doc = cluster.wait_until("five workers", SETTLE, |s| {
        status::all_ready(s) && status::workers(s).len() == 5
    });
    assert_eq!(status::total(&doc, "restarts"), 0, "{doc:#}");
    cluster.stop_cleanly(SETTLE);
}

/// The threads of process `pid` that do not block `signal` (`SigBlk` in
/// `/proc/<pid>/task/<tid>/status`).
fn threads_taking(pid: u32, signal: Signal) -> Vec<u32> {
    let bit = 1u64 << (signal as i32 - 1);
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/<pid>/task");
    let mut threads: Vec<u32> = tasks
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
                .ok()
                .and_then(|status| {
                    let mask = status.lines().find_map(|l| l.strip_prefix("SigBlk:\t"))?;
                    u64::from_str_radix(mask.trim(), 16).ok()
                })
                .is_some_and(|blocked| blocked & bit == 0)
        })
        .collect();
    threads.sort_unstable();
    threads
}

/// Whether `signal` is pending for thread `tid` of `pid`, in its own set or the process's.
fn task_signal_pending(pid: u32, tid: u32, signal: Signal) -> bool {
    let bit = 1u64 << (signal as i32 - 1);
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
        return false;
    };
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("SigPnd:\t")
                .or_else(|| l.strip_prefix("ShdPnd:\t"))
        })
        .filter_map(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .any(|mask| mask & bit != 0)
}

/// `tgkill(2)`: `signal` to thread `tid` of process `pid`.
fn tgkill(pid: u32, tid: u32, signal: Signal) {
    // SAFETY: a plain syscall on integers; a wrong id fails with ESRCH.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            pid as libc::pid_t,
            tid as libc::pid_t,
            signal as libc::c_int,
        )
    };
    assert_eq!(
        rc,
        0,
        "tgkill({pid}, {tid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn a_second_sigterm_back_to_back_kills_at_once() {
    let shutdown_timeout = Duration::from_secs(60);
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "round-robin",
        "--shutdown-timeout",
        "60s",
        "--health-interval",
        "200ms",
    ]);
    // A request in flight that a drain would wait for.
    let addr = cluster.listen_addr();
    let in_flight = std::thread::spawn(move || {
        http_get_timeout(addr, "/sleep?ms=50000", Duration::from_secs(90))
    });
    cluster.wait_until("the request in flight", SETTLE, |s| {
        status::workers(s)
            .iter()
            .any(|w| w.raw["active"].as_u64().is_some_and(|n| n > 0))
    });
    let primary = [cluster.pid()];
    let started = Instant::now();
    send_and_wait_delivered(&primary, Signal::SIGTERM);
    send_and_wait_delivered(&primary, Signal::SIGTERM);
    let exit = cluster.wait_exit(shutdown_timeout / 2);
    eprintln!(
        "exited {exit} {:?} after the first SIGTERM",
        started.elapsed()
    );
    let cut = in_flight.join().expect("the request thread");
    assert!(
        !cut.as_ref().is_ok_and(|r| r.status == 200),
        "the request in flight was cut, not answered: {cut:?}"
    );
    let log = cluster.log();
    assert!(
        log.contains("second stop signal: killing every worker now"),
        "{log}"
    );
}
