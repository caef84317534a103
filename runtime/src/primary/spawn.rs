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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

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

/// What a child gives up before `execve`. `PR_SET_NO_NEW_PRIVS` is always set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ChildLimits {
    /// Switch to `(uid, gid)` (supplementary groups: just `gid`).
    pub credentials: Option<(u32, u32)>,
    /// `RLIMIT_NOFILE`, soft and hard.
    pub nofile: Option<u64>,
    /// `RLIMIT_AS` in bytes, soft and hard.
    pub address_space: Option<u64>,
}

impl ChildLimits {
    /// The limits of a worker under `config`. An external program switches user before
    /// `execve` (its socket is already bound); a re-executed worker switches itself after
    /// registering (see [`crate::privileges`]).
    pub(crate) fn for_worker(config: &crate::config::Config, external: bool) -> ChildLimits {
        ChildLimits {
            credentials: config
                .credentials
                .as_ref()
                .filter(|_| external)
                .map(|c| (c.uid, c.gid)),
            nofile: config.worker_nofile,
            address_space: config.worker_memory_limit,
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
            _ => "execve",
        }
    }
}

/// A started child.
#[derive(Debug)]
pub(crate) struct Spawned {
    /// Its pid.
    pub pid: i32,
    /// `pidfd_open(pid)`: readable when it exits; signals through it cannot hit a reused pid.
    pub pidfd: OwnedFd,
}

/// Finds `name` on `PATH` the way `execvp` would, or returns it as given if it has a `/`.
pub(crate) fn resolve_program(name: &OsStr) -> io::Result<PathBuf> {
    if name.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} not found on PATH", name.to_string_lossy()),
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Starts the child. Returns once `execve` has succeeded (or with its errno).
pub(crate) fn spawn(spec: SpawnSpec) -> io::Result<Spawned> {
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
    // Only one write end may stay open here, or the read below never sees end-of-file.
    drop(exec_err_low);

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
    drop(exec_err_write);
    drop(fds);

    // Our copy of the write end is closed; the child's closes on exec (empty read) or
    // after it writes the errno of a failed exec.
    let mut report = [0u8; 8];
    let mut pipe = std::fs::File::from(exec_err_read);
    let read = read_full(&mut pipe, &mut report).inspect_err(|_| kill_and_reap(pid))?;
    if read == report.len() {
        reap(pid);
        let [s0, s1, s2, s3, e0, e1, e2, e3] = report;
        let step = u32::from_ne_bytes([s0, s1, s2, s3]);
        let err = io::Error::from_raw_os_error(i32::from_ne_bytes([e0, e1, e2, e3]));
        if step == ChildStep::Exec as u32 {
            let who = match spec.limits.credentials {
                Some((uid, gid)) => format!(" as uid {uid} gid {gid}"),
                None => String::new(),
            };
            return Err(io::Error::new(
                err.kind(),
                format!("execve {}{who}: {err}", spec.program.display()),
            ));
        }
        return Err(io::Error::new(
            err.kind(),
            format!("{} failed in the worker: {err}", ChildStep::describe(step)),
        ));
    }
    // An unreaped child's pid cannot be reused, so killing by pid here is safe.
    let pidfd = pidfd_open(pid).inspect_err(|_| kill_and_reap(pid))?;
    Ok(Spawned { pid, pidfd })
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
            // The worker dies with its primary (even on SIGKILL), so there are no orphans.
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            // The primary may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != self.parent {
                libc::_exit(1);
            }
            // Own process group: a terminal's Ctrl-C reaches the primary only, which then
            // drains the workers instead of having them killed mid-request.
            libc::setpgid(0, 0);
            // The primary blocks its signals for signalfd and ignores SIGPIPE; a worker
            // starts from the defaults (ignored dispositions survive execve).
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            // A CPU this process may not use (a cpuset) leaves the worker unpinned: there
            // is no one to tell from here, and an unpinned worker still serves.
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
                libc::syscall(
                    libc::SYS_close_range,
                    first_unused as libc::c_uint,
                    (keep - 1) as libc::c_uint,
                    0,
                );
            }
            libc::syscall(
                libc::SYS_close_range,
                (keep.max(first_unused - 1) + 1) as libc::c_uint,
                libc::c_uint::MAX,
                0,
            );
            if let Some(n) = self.limits.nofile {
                let limit = libc::rlimit {
                    rlim_cur: n as libc::rlim_t,
                    rlim_max: n as libc::rlim_t,
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
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
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

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitStatus {
    /// `exit(code)`.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// `exit 0`.
    pub(crate) fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal(sig) => {
                let name =
                    nix::sys::signal::Signal::try_from(*sig).map_or("unknown", |s| s.as_str());
                write!(f, "signal {sig} ({name})")
            }
        }
    }
}

/// `waitpid(pid, WNOHANG)`: the status if the child has exited (and reaps it).
pub(crate) fn try_reap(pid: i32) -> Option<ExitStatus> {
    let mut status = 0;
    // SAFETY: waitpid on our own child writes the status integer.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if rc != pid {
        return None;
    }
    if libc::WIFEXITED(status) {
        Some(ExitStatus::Code(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(ExitStatus::Signal(libc::WTERMSIG(status)))
    } else {
        None
    }
}

/// SIGKILL and a blocking `waitpid` for a child of ours that cannot be supervised.
pub(crate) fn kill_and_reap(pid: i32) {
    // SAFETY: kill on our own unreaped child (its pid cannot have been reused).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    reap(pid);
}

/// Blocking `waitpid` for a child that failed to exec.
fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::{Duration, Instant};

    use super::*;

    fn wait(pid: i32) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = try_reap(pid) {
                return status;
            }
            assert!(Instant::now() < deadline, "child {pid} did not exit");
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
        assert_eq!(wait(spawned.pid), ExitStatus::Code(0));
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
        wait(spawned.pid);
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
    fn exec_failure_is_reported_with_errno() {
        let err = spawn(SpawnSpec {
            program: "/nonexistent/steer-test".into(),
            argv: vec!["x".into()],
            env: vec![],
            env_remove: &[],
            fds: vec![],
            listen_pid: false,
            cpu: None,
            limits: ChildLimits::default(),
        })
        .expect_err("cannot exec");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
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
        assert_eq!(wait(spawned.pid), ExitStatus::Signal(libc::SIGKILL));
        assert_eq!(ExitStatus::Signal(9).to_string(), "signal 9 (SIGKILL)");
    }
}
