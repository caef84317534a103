//! What a server's processes cost, read from `/proc`: CPU time and resident memory.
//!
//! A server is its primary and every process below it. Its CPU time is, over each live
//! process of that tree, utime+stime (all its threads, exited ones included) plus
//! cutime+cstime (what its exited and reaped children used, their own reaped children
//! included). A worker that exits during a run, such as one replaced by a rolling restart,
//! is reaped by its parent: its time moves from the live sum into the parent's cutime and
//! is counted once, whether or not it was alive when the run began. An exited worker not
//! yet reaped is a zombie whose `/proc/<pid>/stat` still holds its times.
//!
//! Times in `/proc/<pid>/stat` are clock ticks (10 ms at the usual `USER_HZ` of 100), so a
//! sample is exact to a tick per process: runs long enough to use a second or more of CPU
//! make that a percent or less.

use std::collections::BTreeMap;
use std::time::Duration;

/// How many times [`sample`] reads the tree again when a process vanished while it read.
const ATTEMPTS: usize = 5;

/// One process of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessCost {
    /// Its pid.
    pub pid: u32,
    /// Its parent's pid.
    pub ppid: u32,
    /// utime+stime of its threads, clock ticks.
    pub own_ticks: u64,
    /// cutime+cstime: its exited and reaped children, clock ticks.
    pub reaped_ticks: u64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
}

/// The server's processes at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeSample {
    /// The root (the server's primary) first, then its descendants by pid.
    pub processes: Vec<ProcessCost>,
    /// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
    pub ticks_per_second: u64,
}

impl TreeSample {
    /// CPU time of the whole tree so far, exited processes included.
    pub fn cpu(&self) -> Duration {
        let ticks: u64 = self
            .processes
            .iter()
            .map(|p| p.own_ticks + p.reaped_ticks)
            .sum();
        self.ticks(ticks)
    }

    /// CPU time of the root alone (its own threads, not its children).
    pub fn root_cpu(&self) -> Duration {
        self.ticks(self.processes.first().map_or(0, |p| p.own_ticks))
    }

    /// The root's RSS, bytes.
    pub fn root_rss(&self) -> u64 {
        self.processes.first().map_or(0, |p| p.rss_bytes)
    }

    /// RSS of every process below the root, bytes.
    pub fn descendant_rss(&self) -> Vec<u64> {
        self.processes.iter().skip(1).map(|p| p.rss_bytes).collect()
    }

    fn ticks(&self, ticks: u64) -> Duration {
        Duration::from_secs_f64(ticks as f64 / self.ticks_per_second.max(1) as f64)
    }
}

/// Reads `root` and every process below it. `None` if `root` is gone.
///
/// A process that exits between the listing and the read of its `stat` would be missed,
/// and one reaped between the read of its own `stat` and its parent's would be counted
/// twice; either way some process of the sample is gone afterwards, and the tree is read
/// again (up to [`ATTEMPTS`] times).
pub fn sample(root: u32) -> Option<TreeSample> {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks_per_second = u64::try_from(per_second).ok().filter(|&n| n > 0)?;
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let tree = read_tree(root)?;
        let stable = tree
            .iter()
            .all(|p| read_stat(p.pid).is_some_and(|again| again.ppid == p.ppid));
        last = Some(tree);
        if stable {
            break;
        }
    }
    Some(TreeSample {
        processes: last?,
        ticks_per_second,
    })
}

/// Every process, then the ones below `root`; `root` first.
fn read_tree(root: u32) -> Option<Vec<ProcessCost>> {
    let all: Vec<ProcessCost> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(read_stat)
        .collect();
    let mut children: BTreeMap<u32, Vec<ProcessCost>> = BTreeMap::new();
    let mut root_cost = None;
    for process in all {
        if process.pid == root {
            root_cost = Some(process);
        } else {
            children.entry(process.ppid).or_default().push(process);
        }
    }
    let mut tree = vec![root_cost?];
    let mut next = 0;
    while next < tree.len() {
        if let Some(below) = children.remove(&tree[next].pid) {
            tree.extend(below);
        }
        next += 1;
    }
    tree[1..].sort_by_key(|p| p.pid);
    Some(tree)
}

/// One process's line of `/proc/<pid>/stat`.
fn read_stat(pid: u32) -> Option<ProcessCost> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &stat)
}

/// Parses `/proc/<pid>/stat` (proc(5)): ppid is field 4, utime..cstime 14-17, rss 24 (pages).
fn parse_stat(pid: u32, stat: &str) -> Option<ProcessCost> {
    // The command name may hold spaces and parentheses; the fields after its last closing
    // parenthesis are fixed, starting with field 3 (the state).
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    Some(ProcessCost {
        pid,
        ppid: u32::try_from(field(4)?).ok()?,
        own_ticks: field(14)? + field(15)?,
        reaped_ticks: field(16)? + field(17)?,
        rss_bytes: field(24)? * page,
    })
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};
    use std::time::Instant;

    use super::*;

    #[test]
    fn parses_a_stat_line_whose_name_holds_spaces_and_parentheses() {
        let line = "4242 (a (b) c) S 17 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 7 3 20 0 1 0 12345 1000000 300 18446744073709551615";
        let cost = parse_stat(4242, line).expect("parses");
        assert_eq!(
            (cost.ppid, cost.own_ticks, cost.reaped_ticks),
            (17, 300, 10)
        );
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        assert_eq!(cost.rss_bytes, 300 * page);
    }

    #[test]
    fn a_child_that_burned_cpu_and_exited_is_still_counted() {
        // The shell starts a child that counts to 100,000 (a fixed amount of work, about
        // 0.2 s of CPU however loaded the machine is), reaps it, then waits on its stdin
        // without a child: the only trace of the child's CPU is the shell's cutime.
        let mut shell = Command::new("sh")
            .args([
                "-c",
                "(i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done) & wait $!; \
                 echo reaped; read line",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sh runs");
        let pid = shell.id();
        let before = sample(pid).expect("the shell runs");
        let started = Instant::now();
        let mut line = String::new();
        let mut out = std::io::BufReader::new(shell.stdout.take().expect("piped"));
        std::io::BufRead::read_line(&mut out, &mut line).expect("reads");
        assert_eq!(line.trim(), "reaped");
        let after = sample(pid).expect("the shell still runs");
        let _ = shell.kill();
        let _ = shell.wait();
        assert!(started.elapsed() < Duration::from_secs(60), "bounded");
        assert_eq!(
            after.processes.len(),
            1,
            "only the shell is left: {after:?}"
        );
        let burned = after.cpu().saturating_sub(before.cpu());
        assert!(
            burned >= Duration::from_millis(50),
            "the exited child's CPU counts: {burned:?} ({before:?} -> {after:?})"
        );
        assert!(
            after.root_cpu() < burned,
            "and it is not the shell's own: {after:?}"
        );
    }

    #[test]
    fn the_tree_holds_the_root_and_its_live_descendants() {
        let mut shell = Command::new("sh")
            .args(["-c", "sleep 10 & sleep 10 & echo started; wait"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("sh runs");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(shell.stdout.take().expect("piped"));
        std::io::BufRead::read_line(&mut out, &mut line).expect("reads");
        let tree = sample(shell.id()).expect("the shell runs");
        for sleeper in &tree.processes[1..] {
            if let Ok(pid) = libc::pid_t::try_from(sleeper.pid) {
                // SAFETY: kill on a child of our own child, read from its ppid just now.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = shell.kill();
        let _ = shell.wait();
        assert_eq!(tree.processes[0].pid, shell.id());
        assert_eq!(tree.processes.len(), 3, "{tree:?}");
        assert!(tree.processes[1..].iter().all(|p| p.ppid == shell.id()));
        // A child caught inside execve may have no pages mapped yet: only the count holds.
        assert!(tree.root_rss() > 0 && tree.descendant_rss().len() == 2);
        assert!(sample(u32::MAX - 1).is_none(), "no such process");
    }
}
