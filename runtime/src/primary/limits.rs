//! The primary's open-file budget: the soft `RLIMIT_NOFILE` is raised to the hard limit at
//! start, and a cluster the limit cannot hold is refused before anything starts, instead
//! of failing later as fds run out mid-registration.

use std::io;

/// File descriptors the primary holds per worker process besides its sockets: its pidfd,
/// its IPC socket, its `/proc/<pid>/statm`, its exec-report pipe, and the read ends of its
/// stdout and stderr (`worker-output`; kept until every process of its tree has closed
/// them); 7 in all with one listener.
pub(crate) const FDS_PER_WORKER: u64 = 6;

/// Per listener and worker: its socket, held until it is in steering.
pub(crate) const FDS_PER_SOCKET: u64 = 1;

/// File descriptors per worker process with `listeners` listeners.
pub(crate) fn per_worker(listeners: usize) -> u64 {
    FDS_PER_WORKER + FDS_PER_SOCKET * listeners.max(1) as u64
}

/// File descriptors the primary needs besides its workers': the event loop, signals, the
/// eBPF program and maps, the status listener and its clients, logging, and headroom.
pub(crate) const FDS_BASE: u64 = 256;

/// What the primary needs for `workers` slots: during a rolling restart a slot has a
/// replacement besides its worker, so twice the per-worker count.
pub(crate) fn needed(workers: usize, listeners: usize) -> u64 {
    FDS_BASE + 2 * per_worker(listeners) * workers as u64
}

/// Raises the soft open-file limit to the hard one. Returns the limits this process
/// started with (what workers get unless `worker-nofile` says otherwise), or a message
/// naming the limit and the fix when even the hard limit cannot hold `workers` slots.
pub(crate) fn raise_for(workers: usize, listeners: usize) -> Result<(u64, u64), String> {
    let (soft, hard) = get().map_err(|e| format!("cannot read RLIMIT_NOFILE: {e}"))?;
    if soft < hard
        && let Err(err) = set(hard, hard)
    {
        tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {err}");
    }
    let (now, _) = get().unwrap_or((soft, hard));
    let need = needed(workers, listeners);
    let each = per_worker(listeners);
    if now < need {
        return Err(format!(
            "the open-file limit (RLIMIT_NOFILE) is {now} (hard limit {hard}), but {workers} \
             workers need about {need} file descriptors in the primary ({each} per \
             worker with {listeners} listener(s), twice that during a rolling restart, plus {FDS_BASE}): raise the hard \
             limit (`ulimit -n`, or LimitNOFILE= in the systemd unit) or run fewer workers"
        ));
    }
    Ok((soft, hard))
}

fn get() -> io::Result<(u64, u64)> {
    // SAFETY: rlimit is plain data written by the kernel.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes into `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur as u64, limit.rlim_max as u64))
}

fn set(soft: u64, hard: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit reads `limit`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes sure fds 0, 1 and 2 are open (on `/dev/null` if they were closed), so nothing
/// the primary opens later lands on them: a socket on fd 2 would receive the log, and a
/// worker would inherit a closed stdin. Call before anything else opens a file.
pub(crate) fn ensure_standard_fds() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD on any number only reads.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        // SAFETY: open returns the lowest free fd, which is `fd` (those below are open).
        let opened = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        if opened >= 0 && opened != fd {
            // SAFETY: moving our own fd to the free number and closing the original.
            unsafe {
                libc::dup2(opened, fd);
                libc::close(opened);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_grows_with_workers_and_a_roll() {
        assert_eq!(needed(0, 1), FDS_BASE);
        assert_eq!(
            needed(16, 1) - needed(15, 1),
            2 * 7,
            "7 per worker with one listener"
        );
        assert_eq!(
            needed(1, 3) - needed(1, 1),
            2 * 2,
            "one more per extra listener"
        );
    }
}
