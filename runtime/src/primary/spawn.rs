//! Starting a worker process: `fork`, then only async-signal-safe calls, then `execve`.
//!
//! `std::process::Command` cannot do two things a worker needs: set `LISTEN_PID` to the
//! child's own pid (its environment is fixed before `fork`), and place fds at exact numbers
//! without the risk of one `dup2` clobbering the source of the next. So the primary prepares
//! every byte the child needs (paths, argv, envp, a `LISTEN_PID` slot to fill in) before
//! `fork`, and the child only calls `prctl`, `setgroups`/`setgid`/`setuid`, `setrlimit`,
//! `dup2`, `sigprocmask` and `execve`.
//!
//! Every fd in the primary is created close-on-exec, so a child inherits exactly stdin
//! (`/dev/null`), stdout, stderr, and the fds placed here.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::core::ExitStatus;

/// Where an external worker finds its listening socket (systemd's `SD_LISTEN_FDS_START`).
pub(crate) const LISTEN_FD: RawFd = 3;

/// Fds below this may be a target in the child; sources are moved above it first.
const FIRST_SAFE_FD: RawFd = 10;

/// Width reserved for the decimal pid written into `LISTEN_PID=` in the child.
const PID_DIGITS: usize = 20;

/// What to start and what it inherits.
pub(crate) struct SpawnSpec {
    /// The executable, absolute or relative to the current directory.
    pub program: PathBuf,
    /// `argv`, including `argv[0]`.
    pub argv: Vec<OsString>,
    /// Variables set on top of the primary's own environment.
    pub env: Vec<(OsString, OsString)>,
    /// Variables removed from the primary's environment first.
    pub env_remove: &'static [&'static str],
    /// fds to place at exact numbers in the child: `(fd, number)`.
    pub fds: Vec<(OwnedFd, RawFd)>,
    /// Set `LISTEN_PID` to the child's pid (systemd socket activation).
    pub listen_pid: bool,
    /// Pin the child to this CPU (`--cpu-affinity`).
    pub cpu: Option<usize>,
    /// Credentials and limits applied before `execve` (see [`crate::privileges`]).
    pub limits: ChildLimits,
}

/// What a child gives up before `execve`. A worker always gets `PR_SET_NO_NEW_PRIVS`,
/// its parent-death signal and a process group of its own; a successor primary (an
/// upgrade) gets none of them: it outlives this primary and keeps its privileges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ChildLimits {
    /// A new primary taking over from this one, not a worker.
    pub successor: bool,
    /// Switch to `(uid, gid)` (supplementary groups: just `gid`).
    pub credentials: Option<(u32, u32)>,
    /// `RLIMIT_NOFILE` `(soft, hard)`.
    pub nofile: Option<(u64, u64)>,
    /// `RLIMIT_AS` in bytes, soft and hard.
    pub address_space: Option<u64>,
    /// Start with the primary's control signals ignored (see
    /// [`super::signals::CONTROL`]): only for this executable re-executed as a worker.
    pub ignore_control_signals: bool,
}

impl ChildLimits {
    /// The limits of a worker under `config`. An external program switches user before
    /// `execve` (its socket is already bound); a re-executed worker switches itself after
    /// registering (see [`crate::privileges`]). Without `worker-nofile` a worker gets the
    /// open-file limit the primary started with, not the one it raised for itself.
    ///
    /// A re-executed worker starts with the primary's control signals ignored, so that
    /// a signal sent to every process of the service (`systemctl kill` without
    /// `--kill-whom=main`) means only what it means to the primary. An external program
    /// starts from every default instead: an ignored signal survives `execve`, and a
    /// program may rely on its default (a shell cannot even trap a signal it found
    /// ignored). The Node and Python helpers ignore them themselves.
    pub(crate) fn for_worker(
        config: &crate::config::Config,
        external: bool,
        inherited_nofile: Option<(u64, u64)>,
    ) -> ChildLimits {
        ChildLimits {
            successor: false,
            credentials: config
                .credentials
                .as_ref()
                .filter(|_| external)
                .map(|c| (c.uid, c.gid)),
            nofile: config.worker_nofile.map(|n| (n, n)).or(inherited_nofile),
            address_space: config.worker_memory_limit,
            ignore_control_signals: !external,
        }
    }
}

/// Which step of the child's preparation failed, reported with its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum ChildStep {
    Exec = 0,
    PlaceFd = 1,
    SetGroups = 2,
    SetGid = 3,
    SetUid = 4,
    LimitFiles = 5,
    LimitMemory = 6,
    NoNewPrivs = 7,
    CloseFds = 8,
}

impl ChildStep {
    fn describe(code: u32) -> &'static str {
        match code {
            1 => "placing an inherited fd (dup2)",
            2 => "setgroups for --group",
            3 => "setgid for --group",
            4 => "setuid for --user",
            5 => "setrlimit(RLIMIT_NOFILE) for --worker-nofile",
            6 => "setrlimit(RLIMIT_AS) for --worker-memory-limit",
            7 => "prctl(PR_SET_NO_NEW_PRIVS)",
            8 => "closing the primary's other fds (close_range)",
            _ => "execve",
        }
    }
}

/// A started child. It may still be on its way to `execve`: a failure there is reported on
/// `exec_report` (read it with [`describe_exec_report`] once the child has exited), so the
/// primary never waits for the exec.
#[derive(Debug)]
pub(crate) struct Child {
    /// Its pid (and its process group id).
    pub pid: i32,
    /// `pidfd_open(pid)`: readable when it exits; signals through it cannot hit a reused pid.
    pub pidfd: OwnedFd,
    /// Non-blocking read end of the pipe a failed `execve` writes its step and errno to;
    /// end-of-file once the exec succeeded.
    pub exec_report: std::fs::File,
    /// The program, for the message about a failed exec.
    pub program: PathBuf,
}

/// Finds `name` on `PATH` the way `execvp` would, or returns it as given if it has a `/`.
pub(crate) fn resolve_program(name: &OsStr) -> io::Result<PathBuf> {
    crate::config::program::resolve(name)
}

/// Starts the child and returns at once, without waiting for its `execve`.
pub(crate) fn spawn(spec: SpawnSpec) -> io::Result<Child> {
    let program = cstring(spec.program.as_os_str())?;
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstring(a))
        .collect::<io::Result<_>>()?;
    let mut envp: Vec<Vec<u8>> = std::env::vars_os()
        .filter(|(k, _)| !spec.env_remove.iter().any(|r| OsStr::new(r) == k))
        .filter(|(k, _)| !spec.env.iter().any(|(set, _)| set == k))
        .chain(spec.env.iter().cloned())
        .map(|(k, v)| env_entry(&k, &v))
        .collect::<io::Result<_>>()?;
    let listen_pid_at = spec.listen_pid.then(|| {
        let mut entry = b"LISTEN_PID=".to_vec();
        entry.resize(entry.len() + PID_DIGITS + 1, 0);
        envp.push(entry);
        envp.len() - 1
    });

    // Move every source fd out of the range of targets, so no dup2 clobbers a later source.
    let mut fds = Vec::with_capacity(spec.fds.len());
    for (fd, target) in spec.fds {
        fds.push((dup_above(&fd, FIRST_SAFE_FD)?, target));
    }
    let dev_null = OwnedFd::from(std::fs::File::open("/dev/null")?);
    let (exec_err_read, exec_err_low) = pipe_cloexec()?;
    let exec_err_write = dup_above(&exec_err_low, FIRST_SAFE_FD)?;
    // Only one write end may stay open here, or the read end never sees end-of-file.
    drop(exec_err_low);
    crate::sys::fd::set_nonblocking(exec_err_read.as_fd(), true)?;

    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*mut libc::c_char> =
        envp.iter_mut().map(|e| e.as_mut_ptr().cast()).collect();
    envp_ptrs.push(std::ptr::null_mut());
    let listen_pid_buf: *mut u8 = match listen_pid_at {
        // SAFETY: the entry is `LISTEN_PID=` followed by PID_DIGITS + 1 reserved bytes.
        Some(i) => unsafe { envp[i].as_mut_ptr().add(b"LISTEN_PID=".len()) },
        None => std::ptr::null_mut(),
    };
    let child = ChildPlan {
        program: program.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: envp_ptrs.as_ptr(),
        fds: fds
            .iter()
            .map(|(fd, target)| (fd.as_raw_fd(), *target))
            .collect(),
        dev_null: dev_null.as_raw_fd(),
        exec_err: exec_err_write.as_raw_fd(),
        listen_pid_buf,
        parent: std::process::id() as libc::pid_t,
        cpu_set: spec.cpu.map(cpu_set_of),
        limits: spec.limits,
    };

    // Every signal stays blocked across fork, so none of the primary's handlers can run in
    // the child before it has reset them to their defaults.
    let blocked = SignalsBlocked::all()?;
    // SAFETY: fork has no preconditions; the child branch runs only `ChildPlan::exec`,
    // which makes async-signal-safe calls and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked child; every pointer in `child` stays valid
        // because the child's memory is a copy of the parent's at the time of fork.
        unsafe { child.exec() }
    }
    drop(blocked);
    drop(exec_err_write);
    drop(fds);
    // An unreaped child's pid cannot be reused, so killing by pid here is safe.
    let pidfd = pidfd_open(pid).inspect_err(|_| kill_and_reap(pid))?;
    Ok(Child {
        pid,
        pidfd,
        exec_report: std::fs::File::from(exec_err_read),
        program: spec.program,
    })
}

/// The message for a child's failure report: which step failed, and its errno.
pub(crate) fn describe_exec_report(report: [u8; 8]) -> String {
    let [s0, s1, s2, s3, e0, e1, e2, e3] = report;
    let step = u32::from_ne_bytes([s0, s1, s2, s3]);
    let err = io::Error::from_raw_os_error(i32::from_ne_bytes([e0, e1, e2, e3]));
    format!("{} failed in the worker: {err}", ChildStep::describe(step))
}

/// Blocks every signal until dropped (`pthread_sigmask`), restoring the previous mask.
struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    fn all() -> io::Result<SignalsBlocked> {
        // SAFETY: sigset_t is plain data, filled by sigfillset before use.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: both sets are valid for writing.
        let rc = unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old)
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(SignalsBlocked(old))
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores a mask read from the kernel.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// Everything the child needs, as raw pointers and numbers prepared before `fork`.
struct ChildPlan {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *mut libc::c_char,
    fds: Vec<(RawFd, RawFd)>,
    dev_null: RawFd,
    exec_err: RawFd,
    listen_pid_buf: *mut u8,
    parent: libc::pid_t,
    cpu_set: Option<libc::cpu_set_t>,
    limits: ChildLimits,
}

/// The affinity mask holding only `cpu`.
fn cpu_set_of(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET checks nothing but writes inside `set` for cpu < CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set) };
    set
}

impl ChildPlan {
    /// Runs in the forked child. Never returns.
    ///
    /// # Safety
    /// Must be called only in the child right after `fork`, with the plan's pointers valid.
    unsafe fn exec(&self) -> ! {
        // SAFETY: only async-signal-safe libc calls on memory prepared by the parent before
        // fork; no allocation, no locks.
        unsafe {
            // Credentials first: changing them clears the parent-death signal set below.
            if let Some((uid, gid)) = self.limits.credentials {
                if libc::setgroups(1, &gid) != 0 {
                    self.fail(ChildStep::SetGroups);
                }
                if libc::setgid(gid) != 0 {
                    self.fail(ChildStep::SetGid);
                }
                if libc::setuid(uid) != 0 {
                    self.fail(ChildStep::SetUid);
                }
            }
            if !self.limits.successor {
                // The worker dies with its primary (even on SIGKILL): no orphans.
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                // The primary may have died between fork and prctl: then nobody would
                // kill us.
                if libc::getppid() != self.parent {
                    libc::_exit(1);
                }
                // Own process group: a terminal's Ctrl-C reaches the primary only, which
                // then drains the workers instead of having them killed mid-request.
                libc::setpgid(0, 0);
            }
            // A worker starts from the default disposition of every signal: the primary's
            // handlers would run here until execve, and ignored signals (SIGPIPE, or what
            // the primary's own parent ignored) survive execve. Signals are still blocked
            // (see `SignalsBlocked`), so none arrives before its default is back.
            reset_signal_dispositions();
            if self.limits.ignore_control_signals {
                ignore_signals(&super::signals::CONTROL);
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            if self.limits.successor {
                // A new primary keeps the control signals blocked through execve, until
                // its handlers are in (`signals::open`): one sent to it meanwhile (the
                // operator, or `systemctl kill` to the whole unit) waits for its loop
                // instead of killing it with the default action.
                for signal in super::signals::HANDLED {
                    libc::sigaddset(&mut empty, signal);
                }
            }
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // The CPU is one the primary may use (`steering::allowed_cpus`); should the
            // set have changed since, the worker stays unpinned: there is no one to tell
            // from here, and an unpinned worker still serves.
            if let Some(set) = &self.cpu_set {
                libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), set);
            }

            libc::dup2(self.dev_null, 0);
            for &(source, target) in &self.fds {
                // dup2 clears FD_CLOEXEC on the target: these are the only fds that survive.
                if libc::dup2(source, target) < 0 {
                    self.fail(ChildStep::PlaceFd);
                }
            }
            // Whatever the primary itself inherited without FD_CLOEXEC (a jobserver pipe,
            // a shell's fd) must not reach the worker either.
            let first_unused = self
                .fds
                .iter()
                .map(|&(_, target)| target + 1)
                .max()
                .unwrap_or(3)
                .max(3);
            // The exec-error pipe stays (it is close-on-exec, so it goes at execve anyway).
            let keep = self.exec_err;
            if keep > first_unused {
                close_from(first_unused, keep - 1);
            }
            if !close_from(keep.max(first_unused - 1) + 1, RawFd::MAX) {
                self.fail(ChildStep::CloseFds);
            }
            if let Some((soft, hard)) = self.limits.nofile {
                let limit = libc::rlimit {
                    rlim_cur: soft as libc::rlim_t,
                    rlim_max: hard as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    self.fail(ChildStep::LimitFiles);
                }
            }
            if let Some(bytes) = self.limits.address_space {
                let limit = libc::rlimit {
                    rlim_cur: bytes as libc::rlim_t,
                    rlim_max: bytes as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                    self.fail(ChildStep::LimitMemory);
                }
            }
            // Nothing the worker executes can gain privileges (set-uid bits, file caps).
            if !self.limits.successor && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                self.fail(ChildStep::NoNewPrivs);
            }
            if !self.listen_pid_buf.is_null() {
                write_decimal(self.listen_pid_buf, libc::getpid() as u64);
            }
            libc::execve(self.program, self.argv, self.envp.cast());
            self.fail(ChildStep::Exec)
        }
    }

    /// Reports the failed step and errno to the parent and exits.
    unsafe fn fail(&self, step: ChildStep) -> ! {
        // SAFETY: async-signal-safe calls on a valid fd and a stack buffer.
        unsafe {
            let errno = *libc::__errno_location();
            let mut report = [0u8; 8];
            report[..4].copy_from_slice(&(step as u32).to_ne_bytes());
            report[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(self.exec_err, report.as_ptr().cast(), report.len());
            libc::_exit(127)
        }
    }
}

/// The kernel's `struct sigaction` (x86_64 and aarch64 layout), for `rt_sigaction(2)`
/// directly: glibc's `signal()` refuses the signals it reserves (32 and 33), which can
/// still arrive ignored from a careless parent.
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Every signal back to its default disposition (async-signal-safe: raw syscalls only).
///
/// # Safety
/// Only in the forked child, with every signal blocked.
unsafe fn reset_signal_dispositions() {
    for signal in 1..=64 {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: as this function's.
        unsafe { set_disposition(signal, libc::SIG_DFL) };
    }
}

/// `signals` ignored (`SIG_IGN` survives `execve`). Async-signal-safe.
///
/// # Safety
/// Only in the forked child, with every signal blocked.
unsafe fn ignore_signals(signals: &[libc::c_int]) {
    for &signal in signals {
        // SAFETY: as this function's.
        unsafe { set_disposition(signal, libc::SIG_IGN) };
    }
}

/// One `rt_sigaction(2)`, without glibc.
///
/// # Safety
/// Only in the forked child, with every signal blocked.
unsafe fn set_disposition(signal: libc::c_int, handler: libc::sighandler_t) {
    let action = KernelSigaction {
        handler,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: installs SIG_DFL or SIG_IGN for one signal; the struct matches the kernel's
    // and the size argument is that of its 64-bit mask.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            signal,
            &action as *const KernelSigaction,
            std::ptr::null_mut::<KernelSigaction>(),
            8usize,
        )
    };
}

/// Closes fds `first..=last` in the child: `close_range(2)`, or one `close` at a time up
/// to the open-file limit where the kernel has no `close_range`. Async-signal-safe.
/// Returns false if neither worked.
///
/// # Safety
/// Only in the forked child, where no other thread can be using these fds.
unsafe fn close_from(first: RawFd, last: RawFd) -> bool {
    if first > last || first < 0 {
        return true;
    }
    // SAFETY: closing fds the child will not use; the kernel checks the range.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            0,
        )
    };
    if rc == 0 {
        return true;
    }
    // SAFETY: rlimit is plain data written by the kernel.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes into `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return false;
    }
    let end = (limit.rlim_cur.min(1 << 20) as RawFd).min(last.saturating_add(1));
    for fd in first..end {
        // SAFETY: as above; EBADF for fds that are not open is harmless.
        unsafe { libc::close(fd) };
    }
    true
}

/// Writes `value` in decimal followed by NUL at `buf` (which has PID_DIGITS + 1 bytes).
///
/// # Safety
/// `buf` must be valid for PID_DIGITS + 1 bytes.
unsafe fn write_decimal(buf: *mut u8, mut value: u64) {
    let mut digits = [0u8; PID_DIGITS];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (value % 10) as u8;
        n += 1;
        value /= 10;
        if value == 0 || n == PID_DIGITS {
            break;
        }
    }
    for i in 0..n {
        // SAFETY: i < n <= PID_DIGITS, inside the buffer the caller vouches for.
        unsafe { *buf.add(i) = digits[n - 1 - i] };
    }
    // SAFETY: n <= PID_DIGITS, so the terminator is still inside the buffer.
    unsafe { *buf.add(n) = 0 };
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in argument"))
}

fn env_entry(key: &OsStr, value: &OsStr) -> io::Result<Vec<u8>> {
    let mut entry = Vec::with_capacity(key.len() + value.len() + 2);
    entry.extend_from_slice(key.as_bytes());
    entry.push(b'=');
    entry.extend_from_slice(value.as_bytes());
    if entry.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NUL byte in environment",
        ));
    }
    entry.push(0);
    Ok(entry)
}

/// `fcntl(F_DUPFD_CLOEXEC, min)`.
fn dup_above(fd: &OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd we own, or -1.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// `pipe2(O_CLOEXEC)`.
fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `pidfd_open(pid, 0)`; the fd is close-on-exec.
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: the syscall takes two integers and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal`: signals exactly the process the pidfd names, never a reused pid.
pub(crate) fn pidfd_signal(pidfd: &OwnedFd, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: valid pidfd, a signal number, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// SIGKILL and a blocking `waitpid` for a child of ours that cannot be supervised.
pub(crate) fn kill_and_reap(pid: i32) {
    // SAFETY: kill on our own unreaped child (its pid cannot have been reused).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    reap(pid);
}

/// Blocking `waitpid` for a child of ours that cannot be supervised.
fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

/// Whether the child behind `pidfd` has exited, without reaping it (`WNOWAIT`).
pub(crate) fn has_exited(pidfd: &OwnedFd) -> bool {
    // SAFETY: siginfo_t is plain data; all-zero is a valid value to be overwritten.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our pidfd writes into `info`.
    let rc = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: filled by the kernel, or left zero.
    rc < 0 || unsafe { info.si_pid() } != 0
}

/// Reaps the child behind `pidfd` if it has exited: `waitid(P_PIDFD, WEXITED | WNOHANG)`.
/// `ECHILD` (reaped by someone else, or SIGCHLD was ignored when it exited) is an exit
/// of unknown status, never "still running".
pub(crate) fn try_reap(pidfd: &OwnedFd) -> Option<ExitStatus> {
    // SAFETY: siginfo_t is plain data; all-zero is a valid value to be overwritten.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our pidfd writes into `info`.
    let rc = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if rc < 0 {
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => None,
            _ => Some(ExitStatus::Unknown),
        };
    }
    // SAFETY: the kernel filled `info` for a child that changed state, or left si_pid 0.
    let (pid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
    if pid == 0 {
        return None;
    }
    Some(match code {
        libc::CLD_EXITED => ExitStatus::Code(status),
        libc::CLD_KILLED | libc::CLD_DUMPED => ExitStatus::Signal(status),
        _ => ExitStatus::Unknown,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::{Duration, Instant};

    use super::*;

    fn wait(child: &Child) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = try_reap(&child.pidfd) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "child {} did not exit",
                child.pid
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn child_gets_exactly_stdio_and_the_placed_fds() {
        let (read, write) = pipe_cloexec().expect("pipe");
        let (marker, _keep) = pipe_cloexec().expect("pipe");
        // An fd this process holds without FD_CLOEXEC, like an inherited jobserver pipe.
        let (inheritable, _keep2) = pipe_cloexec().expect("pipe");
        // SAFETY: clearing FD_CLOEXEC on an fd we own.
        unsafe { libc::fcntl(inheritable.as_raw_fd(), libc::F_SETFD, 0) };
        let script = "import os; os.write(3, ' '.join(os.listdir('/proc/self/fd')).encode() + b' ' + os.environ['FOO'].encode())";
        let spawned = spawn(SpawnSpec {
            program: resolve_program(OsStr::new("python3")).expect("python3 on PATH"),
            argv: vec!["python3".into(), "-S".into(), "-c".into(), script.into()],
            env: vec![("FOO".into(), "bar".into())],
            env_remove: &[],
            fds: vec![(write, 3), (marker, 4)],
            listen_pid: true,
            cpu: None,
            limits: ChildLimits::default(),
        })
        .expect("spawn");
        assert_eq!(wait(&spawned), ExitStatus::Code(0));
        let mut out = String::new();
        std::fs::File::from(read)
            .read_to_string(&mut out)
            .expect("read");
        let mut words: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(words.pop(), Some("bar"), "env reaches the child: {out:?}");
        let mut fds: Vec<i32> = words
            .iter()
            .map(|w| w.parse().expect("fd number"))
            .collect();
        fds.sort_unstable();
        // listdir itself holds one fd open on the directory while it reads it.
        assert_eq!(fds[..5], [0, 1, 2, 3, 4], "{fds:?}");
        assert!(
            fds.len() == 6,
            "no other fd may leak into the child: {fds:?}"
        );
        drop(inheritable);
    }

    #[test]
    fn listen_pid_is_the_childs_pid() {
        let (read, write) = pipe_cloexec().expect("pipe");
        let spawned = spawn(SpawnSpec {
            program: "/bin/sh".into(),
            argv: vec!["sh".into(), "-c".into(), "echo $LISTEN_PID $$ >&3".into()],
            env: vec![],
            env_remove: &[],
            fds: vec![(write, 3)],
            listen_pid: true,
            cpu: None,
            limits: ChildLimits::default(),
        })
        .expect("spawn");
        wait(&spawned);
        let mut out = String::new();
        std::fs::File::from(read)
            .read_to_string(&mut out)
            .expect("read");
        let words: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(words.len(), 2, "{out:?}");
        assert_eq!(words[0], words[1]);
        assert_eq!(words[0], spawned.pid.to_string());
    }

    #[test]
    fn exec_failure_is_reported_without_waiting_for_it() {
        let mut child = spawn(SpawnSpec {
            program: "/nonexistent/steer-test".into(),
            argv: vec!["x".into()],
            env: vec![],
            env_remove: &[],
            fds: vec![],
            listen_pid: false,
            cpu: None,
            limits: ChildLimits::default(),
        })
        .expect("fork succeeds; the exec fails later");
        assert_eq!(wait(&child), ExitStatus::Code(127));
        let mut report = [0u8; 8];
        child.exec_report.read_exact(&mut report).expect("a report");
        let text = describe_exec_report(report);
        assert!(
            text.contains("execve") && text.contains("No such file"),
            "{text}"
        );
    }

    #[test]
    fn a_successful_exec_closes_the_report_pipe_and_resets_every_signal() {
        // What a careless parent passes on through exec: an ignored signal.
        // SAFETY: setting and restoring a disposition; no handler is installed.
        let before = unsafe { libc::signal(libc::SIGWINCH, libc::SIG_IGN) };
        let (read, write) = pipe_cloexec().expect("pipe");
        let mut child = spawn(SpawnSpec {
            program: "/bin/sh".into(),
            argv: vec![
                "sh".into(),
                "-c".into(),
                "grep -E '^Sig(Ign|Blk)' /proc/self/status >&3".into(),
            ],
            env: vec![],
            env_remove: &[],
            fds: vec![(write, 3)],
            listen_pid: false,
            cpu: None,
            limits: ChildLimits::default(),
        })
        .expect("spawn");
        // SAFETY: restores what was there.
        unsafe { libc::signal(libc::SIGWINCH, before) };
        assert_eq!(wait(&child), ExitStatus::Code(0));
        let mut report = Vec::new();
        child
            .exec_report
            .read_to_end(&mut report)
            .expect("end of file");
        assert!(report.is_empty(), "a successful exec reports nothing");
        let mut out = String::new();
        std::fs::File::from(read)
            .read_to_string(&mut out)
            .expect("read");
        assert!(out.contains("SigIgn:\t0000000000000000"), "{out}");
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
    }

    #[test]
    fn a_worker_of_this_executable_starts_with_the_control_signals_ignored() {
        let (read, write) = pipe_cloexec().expect("pipe");
        let child = spawn(SpawnSpec {
            program: "/bin/sh".into(),
            argv: vec![
                "sh".into(),
                "-c".into(),
                "grep -E '^SigIgn' /proc/self/status >&3".into(),
            ],
            env: vec![],
            env_remove: &[],
            fds: vec![(write, 3)],
            listen_pid: false,
            cpu: None,
            limits: ChildLimits {
                ignore_control_signals: true,
                ..ChildLimits::default()
            },
        })
        .expect("spawn");
        assert_eq!(wait(&child), ExitStatus::Code(0));
        let mut out = String::new();
        std::fs::File::from(read)
            .read_to_string(&mut out)
            .expect("read");
        let mask = super::super::signals::CONTROL
            .iter()
            .fold(0u64, |mask, &signal| mask | 1 << (signal - 1));
        assert_eq!(out.trim(), format!("SigIgn:\t{mask:016x}"), "{out}");
    }

    #[test]
    fn path_lookup_and_exit_status() {
        let sh = resolve_program(OsStr::new("sh")).expect("sh on PATH");
        let spawned = spawn(SpawnSpec {
            program: sh,
            argv: vec!["sh".into(), "-c".into(), "kill -9 $$".into()],
            env: vec![],
            env_remove: &[],
            fds: vec![],
            listen_pid: false,
            cpu: None,
            limits: ChildLimits::default(),
        })
        .expect("spawn");
        assert_eq!(wait(&spawned), ExitStatus::Signal(libc::SIGKILL));
        assert_eq!(ExitStatus::Signal(9).to_string(), "signal 9 (SIGKILL)");
    }
}
