//! `steer-bench profile`: where one new connection's microseconds go, by `perf`.
//!
//! It starts Steer under one policy, runs the new-connection load against it while
//! `perf record -a -g -e cpu-clock` samples the whole machine (the software clock: a VM
//! often has no hardware counters), and sorts every sample of the server's processes and
//! of the load generator by where it was: the steering program, the user code of each
//! side, the softirq that delivers loopback packets, or the system call it ran in. The
//! program's own cost is also read exactly from the kernel (`kernel.bpf_stats_enabled`,
//! then `run_time_ns` and `run_cnt` in the program fd's `fdinfo` in the primary).
//!
//! On loopback the sender's system call runs the receiver's side of TCP in softirq: the
//! client's `connect` carries the server's SYN handling, the reuseport selection and the
//! program, and the server's `write` and `shutdown` carry the client's receipt of the
//! response and the FIN. The report keeps each sample with the process it was charged to,
//! as `/proc` does.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::load::{self, LoadSpec, Mode, Stop};
use crate::suite::footprint;
use crate::suite::subject::{Programs, Server, Subject};

/// Sampling frequency per CPU: a sample every 200 us.
const FREQUENCY: &str = "4999";
/// The JITed program's symbol ends with its name.
const PROGRAM_SYMBOL: &str = "_steer_select";
/// Categories under this share of a side's samples are summed into one "other" line.
const SHOWN_SHARE: f64 = 0.005;

/// What to profile.
#[derive(Debug, Clone)]
pub struct ProfileConfig {
    /// Where the programs are.
    pub programs: Programs,
    /// The `--balance` policy.
    pub policy: String,
    /// Workers.
    pub workers: usize,
    /// Length of the profiled load run.
    pub length: Duration,
    /// Where `perf.data` and `perf.md` go.
    pub out_dir: PathBuf,
}

/// Who a sample was charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    /// The primary or a worker.
    Server,
    /// The load generator.
    Client,
}

/// Nanoseconds of samples per category, per side.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Breakdown {
    /// (side, category) -> sampled nanoseconds.
    pub ns: BTreeMap<(Side, String), u64>,
    /// Sampled nanoseconds with the reuseport selection on the stack (the kernel's
    /// `reuseport_select_sock`, the program inside it).
    pub selection_ns: u64,
    /// Sampled nanoseconds with the program on the stack.
    pub program_ns: u64,
}

impl Breakdown {
    /// All sampled nanoseconds of `side`.
    pub fn total(&self, side: Side) -> u64 {
        self.ns
            .iter()
            .filter(|((s, _), _)| *s == side)
            .map(|(_, ns)| ns)
            .sum()
    }
}

/// The program's statistics from its `fdinfo`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ProgramStats {
    run_time_ns: u64,
    run_cnt: u64,
}

/// Runs the profile and writes `perf.md`; returns its path.
pub fn run(config: &ProfileConfig) -> Result<PathBuf, String> {
    std::fs::create_dir_all(&config.out_dir)
        .map_err(|e| format!("creating {}: {e}", config.out_dir.display()))?;
    std::fs::create_dir_all(&config.programs.scratch)
        .map_err(|e| format!("creating {}: {e}", config.programs.scratch.display()))?;
    let subject = Subject::Steer {
        policy: config.policy.clone(),
        client_limit: false,
    };
    let server = Server::start(&subject, config.workers, &config.programs)?;
    let spec = |length: Duration| {
        let mut spec = LoadSpec::new(server.addr, Mode::Connect, 32, Stop::After(length));
        spec.threads = 2;
        spec.sources = 64;
        spec
    };
    load::run(&spec(Duration::from_millis(500))).map_err(|e| format!("warm-up: {e}"))?;

    let _stats = BpfStats::enable();
    let primary = server.primary_pid();
    let program_before = program_stats(primary);
    let cpu_before = footprint::sample(primary).ok_or("the server is gone")?;
    let data = config.out_dir.join("perf.data");
    let record_for = config.length + Duration::from_secs(1);
    let mut perf = Command::new("perf")
        .args([
            "record",
            "-a",
            "-g",
            "-e",
            "cpu-clock",
            "-F",
            FREQUENCY,
            "-o",
        ])
        .arg(&data)
        .args(["--", "sleep", &format!("{:.1}", record_for.as_secs_f64())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting perf (apt-get install linux-perf): {e}"))?;
    // perf needs a moment to open its events on every CPU.
    std::thread::sleep(Duration::from_millis(500));
    let report = load::run(&spec(config.length)).map_err(|e| format!("load: {e}"))?;
    let cpu_after = footprint::sample(primary).ok_or("the server is gone")?;
    let program_after = program_stats(primary);
    let status = perf.wait().map_err(|e| format!("waiting for perf: {e}"))?;
    server.stop();
    if !status.success() {
        return Err(format!("perf record failed ({status})"));
    }
    let server_pids: Vec<u32> = cpu_after.processes.iter().map(|p| p.pid).collect();
    let breakdown = read_samples(&data, &server_pids, std::process::id())?;
    let connections = report.ok.max(1);
    let proc_us = 1e6
        * cpu_after
            .cpu()
            .saturating_sub(cpu_before.cpu())
            .as_secs_f64()
        / connections as f64;
    let program = match (program_before, program_after) {
        (Some(before), Some(after)) if after.run_cnt > before.run_cnt => Some(ProgramStats {
            run_time_ns: after.run_time_ns - before.run_time_ns,
            run_cnt: after.run_cnt - before.run_cnt,
        }),
        _ => None,
    };
    let text = markdown(config, &report, proc_us, program, &breakdown);
    let path = config.out_dir.join("perf.md");
    std::fs::write(&path, &text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

/// Turns `kernel.bpf_stats_enabled` on while it lives, and back to what it was.
pub(crate) struct BpfStats {
    before: Option<String>,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    /// Turns the statistics on (says so on stderr if it cannot).
    pub(crate) fn enable() -> BpfStats {
        let before = std::fs::read_to_string(BPF_STATS).ok();
        if std::fs::write(BPF_STATS, "1").is_err() {
            eprintln!("profile: cannot enable {BPF_STATS}; the program's own timing is left out");
        }
        BpfStats { before }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(before) = &self.before {
            let _ = std::fs::write(BPF_STATS, before.trim());
        }
    }
}

/// The statistics of the (one) BPF program `pid` holds open, from its fd's `fdinfo`.
fn program_stats(pid: u32) -> Option<ProgramStats> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    for fd in fds.flatten() {
        let is_program = std::fs::read_link(fd.path())
            .is_ok_and(|target| target.to_string_lossy() == "anon_inode:bpf-prog");
        if !is_program {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .ok()?;
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name))?
                .trim()
                .parse()
                .ok()
        };
        return Some(ProgramStats {
            run_time_ns: field("run_time_ns:")?,
            run_cnt: field("run_cnt:")?,
        });
    }
    None
}

/// Runs `perf script` over `data` and sorts the samples of `server` pids and of `client`.
fn read_samples(data: &Path, server: &[u32], client: u32) -> Result<Breakdown, String> {
    let mut script = Command::new("perf")
        .args(["script", "-F", "comm,pid,tid,period,ip,sym,dso", "-i"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting perf script: {e}"))?;
    let stdout = script.stdout.take().ok_or("perf script has no stdout")?;
    let started = Instant::now();
    let breakdown = parse_script(BufReader::new(stdout), |pid| {
        if pid == client {
            Some(Side::Client)
        } else if server.contains(&pid) {
            Some(Side::Server)
        } else {
            None
        }
    });
    let status = script
        .wait()
        .map_err(|e| format!("waiting for perf script: {e}"))?;
    if !status.success() {
        return Err(format!("perf script failed ({status})"));
    }
    eprintln!(
        "profile: read the samples in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(breakdown)
}

/// One sample: who, how long it stands for, its stack (leaf first) as (symbol, dso).
#[derive(Debug, Default)]
struct Sample {
    pid: u32,
    period_ns: u64,
    frames: Vec<(String, String)>,
}

/// Parses `perf script -F comm,pid,tid,period,ip,sym,dso` output: a header line per
/// sample (`comm pid/tid period`), then one line per frame (`ip symbol+off (dso)`), then a
/// blank line. `side` says whose a pid is (`None`: not ours).
fn parse_script(input: impl BufRead, side: impl Fn(u32) -> Option<Side>) -> Breakdown {
    let mut breakdown = Breakdown::default();
    let mut current: Option<(Side, Sample)> = None;
    let mut finish = |current: &mut Option<(Side, Sample)>| {
        if let Some((side, sample)) = current.take() {
            classify(&mut breakdown, side, &sample);
        }
    };
    for line in input.lines().map_while(Result::ok) {
        if line.trim().is_empty() {
            finish(&mut current);
        } else if line.starts_with(char::is_whitespace) {
            if let Some((_, sample)) = current.as_mut() {
                sample.frames.push(parse_frame(&line));
            }
        } else {
            finish(&mut current);
            current = parse_header(&line).and_then(|sample| Some((side(sample.pid)?, sample)));
        }
    }
    finish(&mut current);
    breakdown
}

/// `comm pid/tid period`; the command may hold spaces, so fields are taken from the right.
fn parse_header(line: &str) -> Option<Sample> {
    let mut fields = line.split_whitespace().rev();
    let period_ns = fields.next()?.parse().ok()?;
    let pid = fields.next()?.split('/').next()?.parse().ok()?;
    Some(Sample {
        pid,
        period_ns,
        frames: Vec::new(),
    })
}

/// `ffffffff81e7e9ef __sys_connect+0x8f ([kernel.kallsyms])` -> (`__sys_connect`, dso).
fn parse_frame(line: &str) -> (String, String) {
    let line = line.trim();
    let rest = line.split_once(' ').map_or("", |(_, rest)| rest);
    let (symbol, dso) = match rest.rfind(" (") {
        Some(i) => (&rest[..i], rest[i + 2..].trim_end_matches(')')),
        None => (rest, ""),
    };
    let symbol = match symbol.rfind("+0x") {
        Some(i) => &symbol[..i],
        None => symbol,
    };
    (symbol.to_owned(), dso.to_owned())
}

fn is_kernel(dso: &str) -> bool {
    dso.starts_with("[kernel") || dso.starts_with("[bpf_prog") || dso.is_empty()
}

/// Where a sample was, from its stack.
fn category(frames: &[(String, String)]) -> String {
    let Some((leaf, leaf_dso)) = frames.first() else {
        return "kernel: unknown".into();
    };
    if leaf.ends_with(PROGRAM_SYMBOL) {
        return "the steering program (eBPF)".into();
    }
    if !is_kernel(leaf_dso) {
        let file = leaf_dso.rsplit('/').next().unwrap_or(leaf_dso);
        let file = if file.starts_with("libc.so") {
            "libc"
        } else {
            file
        };
        return format!("user code: {file}");
    }
    let has = |names: &[&str]| frames.iter().any(|(s, _)| names.contains(&s.as_str()));
    let syscall = frames.iter().find_map(|(s, _)| {
        s.strip_prefix("__x64_sys_")
            .or_else(|| s.strip_prefix("__do_sys_"))
            .or_else(|| s.strip_prefix("__se_sys_"))
    });
    if frames.iter().any(|(s, _)| s.contains("page_fault")) {
        return "kernel: page faults".into();
    }
    if has(&[
        "handle_softirqs",
        "__do_softirq",
        "net_rx_action",
        "do_softirq",
    ]) {
        return match syscall {
            Some(call) => format!("kernel: loopback delivery to the peer (softirq) in {call}"),
            None => "kernel: softirq on interrupt".into(),
        };
    }
    match syscall {
        Some(call) => format!("kernel: {call}"),
        // The last close of a file releases it on the way back to user space.
        None if has(&["__fput"]) => "kernel: close".into(),
        None if has(&["schedule", "__schedule"]) => "kernel: scheduling".into(),
        None if has(&["do_syscall_64", "entry_SYSCALL_64_after_hwframe"]) => {
            "kernel: system call entry and exit".into()
        }
        None => "kernel: other".into(),
    }
}

fn classify(breakdown: &mut Breakdown, side: Side, sample: &Sample) {
    *breakdown
        .ns
        .entry((side, category(&sample.frames)))
        .or_insert(0) += sample.period_ns;
    let on_stack = |name: &dyn Fn(&str) -> bool| sample.frames.iter().any(|(s, _)| name(s));
    if on_stack(&|s| s.ends_with(PROGRAM_SYMBOL)) {
        breakdown.program_ns += sample.period_ns;
    }
    if on_stack(&|s| s == "reuseport_select_sock") {
        breakdown.selection_ns += sample.period_ns;
    }
}

/// The report: both sides' breakdowns per connection, and the program's own figures.
fn markdown(
    config: &ProfileConfig,
    report: &load::LoadReport,
    proc_us: f64,
    program: Option<ProgramStats>,
    breakdown: &Breakdown,
) -> String {
    let connections = report.ok.max(1) as f64;
    let us = |ns: u64| ns as f64 / 1000.0 / connections;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Where a new connection's CPU goes ({}, {} workers)\n\n\
         `perf record -a -g -e cpu-clock -F {FREQUENCY}` over {:.1} s of new-connection load \
         (32 lanes, 2 client threads, 64 source addresses): {} connections, {:.0}/s. \
         Server CPU from `/proc` over the same run: {proc_us:.1} us per connection.\n",
        config.policy,
        config.workers,
        config.length.as_secs_f64(),
        report.ok,
        report.rate
    );
    for (side, title) in [
        (Side::Server, "Server (primary and workers)"),
        (Side::Client, "Client (steer-bench)"),
    ] {
        let total = breakdown.total(side);
        let _ = writeln!(
            out,
            "## {title}: {:.1} us per connection sampled\n\n| where | share | us per connection |\n|---|---|---|",
            us(total)
        );
        let mut rows: Vec<(&String, u64)> = breakdown
            .ns
            .iter()
            .filter(|((s, _), _)| *s == side)
            .map(|((_, category), ns)| (category, *ns))
            .collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let mut rest = (0usize, 0u64);
        for (category, ns) in rows {
            let share = ns as f64 / total.max(1) as f64;
            if share < SHOWN_SHARE {
                rest = (rest.0 + 1, rest.1 + ns);
                continue;
            }
            let _ = writeln!(
                out,
                "| {category} | {:.1}% | {:.2} |",
                100.0 * share,
                us(ns)
            );
        }
        if rest.0 > 0 {
            let _ = writeln!(
                out,
                "| {} smaller categories | {:.1}% | {:.2} |",
                rest.0,
                100.0 * rest.1 as f64 / total.max(1) as f64,
                us(rest.1)
            );
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "## The steering program\n\nSampled with the program on the stack: {:.2} us per \
         connection; with the kernel's reuseport selection (`reuseport_select_sock`, the \
         program inside it) on the stack: {:.2} us.",
        us(breakdown.program_ns),
        us(breakdown.selection_ns)
    );
    match program {
        Some(p) => {
            let _ = writeln!(
                out,
                "From the kernel (`kernel.bpf_stats_enabled`): {} runs ({:.2} per connection), \
                 {:.0} ns per run, {:.2} us per connection.",
                p.run_cnt,
                p.run_cnt as f64 / connections,
                p.run_time_ns as f64 / p.run_cnt.max(1) as f64,
                p.run_time_ns as f64 / 1000.0 / connections
            );
        }
        None => {
            let _ = writeln!(out, "No program statistics (not an eBPF policy?).");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "\
load-0  900/901      200000 
\tffffffff820b4f10 bpf_prog_31f72ff836716348_steer_select+0x40 ([kernel.kallsyms])
\tffffffff81e8f7a1 bpf_run_sk_reuseport+0x51 ([kernel.kallsyms])
\tffffffff81e8f7a1 reuseport_select_sock+0x51 ([kernel.kallsyms])
\tffffffff81e858e1 __do_softirq+0xf1 ([kernel.kallsyms])
\tffffffff81e7ea64 __x64_sys_connect+0x14 ([kernel.kallsyms])
\t          10a7fb __libc_connect+0x4b (/usr/lib/x86_64-linux-gnu/libc.so.6)

steer  42/42      200000 
\tffffffff820853f4 inet_csk_accept+0xac4 ([kernel.kallsyms])
\tffffffff81e7ea64 __x64_sys_accept4+0x14 ([kernel.kallsyms])

steer  43/43      100000 
\t          1234 steer::demo::http::parse_head+0x10 (/work/target/release/steer)

kworker/u8:0-kv  7/7      200000 
\tffffffff820853f4 worker_thread+0x1 ([kernel.kallsyms])

steer  42/42      100000 
\tffffffff820853f4 __dentry_kill+0x1 ([kernel.kallsyms])
\tffffffff820853f4 __fput+0x1 ([kernel.kallsyms])
\tffffffff820853f4 task_work_run+0x1 ([kernel.kallsyms])
\tffffffff820853f4 do_syscall_64+0x1 ([kernel.kallsyms])

steer  42/42      200000 
\tffffffff820853f4 tcp_v4_rcv+0x1 ([kernel.kallsyms])
\tffffffff81e858e1 handle_softirqs+0xf1 ([kernel.kallsyms])
\tffffffff81e7ea64 __x64_sys_sendto+0x14 ([kernel.kallsyms])
";

    #[test]
    fn samples_are_sorted_by_side_and_by_where_they_ran() {
        let breakdown = parse_script(SCRIPT.as_bytes(), |pid| match pid {
            900 => Some(Side::Client),
            42 | 43 => Some(Side::Server),
            _ => None,
        });
        let ns = |side: Side, category: &str| {
            breakdown
                .ns
                .get(&(side, category.to_owned()))
                .copied()
                .unwrap_or(0)
        };
        assert_eq!(ns(Side::Client, "the steering program (eBPF)"), 200_000);
        assert_eq!(ns(Side::Server, "kernel: accept4"), 200_000);
        assert_eq!(ns(Side::Server, "user code: steer"), 100_000);
        assert_eq!(
            ns(
                Side::Server,
                "kernel: loopback delivery to the peer (softirq) in sendto"
            ),
            200_000
        );
        assert_eq!(
            ns(Side::Server, "kernel: close"),
            100_000,
            "a deferred fput"
        );
        assert_eq!(breakdown.total(Side::Server), 600_000);
        assert_eq!(
            breakdown.total(Side::Client),
            200_000,
            "the kworker is not ours"
        );
        assert_eq!(
            (breakdown.program_ns, breakdown.selection_ns),
            (200_000, 200_000)
        );
    }

    #[test]
    fn frames_lose_their_offsets_and_keep_their_dso() {
        assert_eq!(
            parse_frame("\t          10a7fb __libc_connect+0x4b (/usr/lib/libc.so.6)"),
            ("__libc_connect".into(), "/usr/lib/libc.so.6".into())
        );
        assert_eq!(
            parse_frame("\t 0 [unknown] ([unknown])"),
            ("[unknown]".into(), "[unknown]".into())
        );
        let header = parse_header("memfd:sealed (x)  12/13      200040 ").expect("a header");
        assert_eq!((header.pid, header.period_ns), (12, 200_040));
    }
}
