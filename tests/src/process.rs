//! Linux process inspection through `kill(2)` and `/proc`: liveness, memory, parentage, and
//! the poll-with-deadline loop every wait in this crate is built on.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How often [`wait_for`] re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `condition` every [`POLL_INTERVAL`] until it returns `true`.
///
/// This is the replacement for sleeping: a test states what it waits for and how long that
/// may take at most, and proceeds the moment the condition holds.
///
/// # Panics
///
/// After `timeout`, with `timed out after .. waiting for <desc>`.
pub fn wait_for(desc: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {desc}"
        );
        thread::sleep(POLL_INTERVAL);
    }
}

/// Whether process `pid` exists and has not exited.
///
/// `kill(pid, 0)` alone is not enough: an exited child that its parent has not reaped yet is
/// a zombie that still answers `kill`. A zombie (state `Z` in `/proc/<pid>/stat`) counts as
/// dead. Pid 0 and pids above `i32::MAX` are never alive (they name no single process).
pub fn pid_alive(pid: u32) -> bool {
    let Some(target) = nix_pid(pid) else {
        return false;
    };
    match kill(target, None) {
        // EPERM: the process exists but belongs to another user.
        Ok(()) | Err(Errno::EPERM) => {}
        Err(_) => return false,
    }
    // No stat file means it vanished between the two checks.
    !matches!(process_state(pid), None | Some('Z'))
}

/// The one-letter state of `pid` from `/proc/<pid>/stat` (`R`, `S`, `D`, `Z`, `T`, ..), or
/// `None` if the process does not exist.
pub fn process_state(pid: u32) -> Option<char> {
    read_stat(pid).map(|stat| stat.state)
}

/// Whether `signal` is pending for process `pid`: sent, and not yet handled, ignored or
/// acted on (the `ShdPnd` and `SigPnd` masks of `/proc/<pid>/status`). `false` once the
/// process is gone. While it is pending, the kernel folds another one of the same signal
/// into it: a test that means to deliver a signal twice waits for this to turn false.
pub fn signal_pending(pid: u32, signal: Signal) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let bit = 1u64 << (signal as i32 - 1);
    status
        .lines()
        .filter_map(|line| {
            line.strip_prefix("ShdPnd:\t")
                .or_else(|| line.strip_prefix("SigPnd:\t"))
        })
        .filter_map(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .any(|mask| mask & bit != 0)
}

/// Resident memory of `pid` in bytes, from the `VmRSS` line of `/proc/<pid>/status`.
///
/// # Panics
///
/// If the process does not exist, or has no `VmRSS` (a zombie or a kernel thread).
pub fn rss_bytes(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .unwrap_or_else(|| panic!("{path} has no VmRSS line (zombie or kernel thread?)"));
    let kib: u64 = line
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: cannot parse VmRSS value {line:?}: {e}"));
    kib * 1024
}

/// Pids of the live processes whose parent is `pid`, ascending, found by scanning the ppid
/// field of every `/proc/<pid>/stat`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: Vec<u32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&candidate| read_stat(candidate).is_some_and(|stat| stat.ppid == pid))
        .collect();
    children.sort_unstable();
    children
}

/// Pids of every process below `pid` in the process tree (children, grandchildren, ..),
/// parents before their children.
pub fn descendants_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for child in children_of(parent) {
            // /proc is not read atomically, so a recycled pid could reappear: visit once.
            if !found.contains(&child) {
                found.push(child);
                frontier.push(child);
            }
        }
    }
    found
}

/// The start time of `pid` (clock ticks since boot, field 22 of `/proc/<pid>/stat`).
///
/// Together with the pid it names one process for good: a recycled pid has a later start
/// time, so the harness never kills a stranger that inherited a worker's pid.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    read_stat(pid).map(|stat| stat.start_time)
}

/// Sends SIGKILL to `pid` if it is still the process that started at `started`.
pub(crate) fn kill_if_same(pid: u32, started: u64) {
    if start_time(pid) == Some(started)
        && let Some(target) = nix_pid(pid)
    {
        // ESRCH: it exited in between, which is what we wanted anyway.
        let _ = kill(target, Signal::SIGKILL);
    }
}

/// `pid` as a nix [`Pid`], if it names a single process.
pub(crate) fn nix_pid(pid: u32) -> Option<Pid> {
    match i32::try_from(pid) {
        Ok(raw) if raw > 0 => Some(Pid::from_raw(raw)),
        _ => None,
    }
}

/// The fields of `/proc/<pid>/stat` the harness uses.
struct ProcStat {
    state: char,
    ppid: u32,
    start_time: u64,
}

fn read_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // Field 2 (comm) is in parentheses and may itself contain spaces and ')': the fixed
    // fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    // Fields 5..=21 lie between ppid (field 4) and starttime (field 22).
    let start_time = fields.nth(17)?.parse().ok()?;
    Some(ProcStat {
        state,
        ppid,
        start_time,
    })
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    fn spawn_sleep() -> std::process::Child {
        Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep")
    }

    #[test]
    fn parses_stat_with_awkward_comm() {
        let line = "4242 (a) b (c)) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 \
                    1000 200 18446744073709551615";
        let stat = parse_stat(line).expect("parses");
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.ppid, 17);
        assert_eq!(stat.start_time, 987_654);
    }

    #[test]
    fn this_process_is_alive_and_has_memory() {
        assert!(pid_alive(std::process::id()));
        assert!(rss_bytes(std::process::id()) > 1024 * 1024);
        assert!(start_time(std::process::id()).is_some());
    }

    #[test]
    fn pid_zero_and_huge_pids_are_not_alive() {
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
    }

    #[test]
    fn an_unreaped_zombie_is_not_alive_and_a_reaped_child_neither() {
        let mut child = Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        wait_for("`true` to become a zombie", Duration::from_secs(10), || {
            process_state(pid) == Some('Z')
        });
        assert!(!pid_alive(pid), "a zombie must count as dead");
        child.wait().expect("reap true");
        assert!(!pid_alive(pid));
    }

    #[test]
    fn children_and_descendants_include_a_spawned_child() {
        let mut child = spawn_sleep();
        let pid = child.id();
        assert!(children_of(std::process::id()).contains(&pid));
        assert!(descendants_of(std::process::id()).contains(&pid));
        assert!(children_of(pid).is_empty());
        child.kill().expect("kill sleep");
        child.wait().expect("reap sleep");
    }

    #[test]
    fn kill_if_same_spares_a_process_with_another_start_time() {
        let mut child = spawn_sleep();
        let pid = child.id();
        let started = start_time(pid).expect("child has a start time");
        kill_if_same(pid, started + 1);
        assert!(
            pid_alive(pid),
            "a different start time means a different process"
        );
        kill_if_same(pid, started);
        wait_for("sleep to die", Duration::from_secs(10), || !pid_alive(pid));
        child.wait().expect("reap sleep");
    }

    #[test]
    #[should_panic(expected = "timed out after 50ms waiting for the impossible")]
    fn wait_for_names_what_it_waited_for() {
        wait_for("the impossible", Duration::from_millis(50), || false);
    }
}
