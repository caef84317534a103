//! A worker's listening socket, reached through the worker process that holds it.
//!
//! The primary closes its copy of a worker's socket as soon as the socket is in steering,
//! so that the socket leaves the group by itself when the worker dies. When the primary
//! needs a socket of the group again (to attach its program once more after a takeover,
//! or to shut down a hung worker's listener), it borrows the worker's own fd for a moment
//! with `pidfd_getfd(2)` (Linux 5.6). That needs ptrace access to the worker: the same
//! user, or `CAP_SYS_PTRACE` for a worker that switched to another `--user`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The process holding a worker's listener, and which socket it is.
#[derive(Debug)]
pub struct ListenerHolder {
    pid: i32,
    pidfd: OwnedFd,
    inode: u64,
    /// The fd number it said it holds the socket at, if it said.
    fd: Option<RawFd>,
}

impl ListenerHolder {
    /// Remembers that process `pid` (behind `pidfd`, which is duplicated) holds `socket`,
    /// at fd `fd` if that is known.
    pub fn new(
        pid: i32,
        pidfd: BorrowedFd<'_>,
        socket: &OwnedFd,
        fd: Option<RawFd>,
    ) -> io::Result<ListenerHolder> {
        Ok(ListenerHolder {
            pid,
            pidfd: pidfd.try_clone_to_owned()?,
            inode: socket_inode(socket)?,
            fd,
        })
    }

    /// The socket's inode (`socket:[inode]` in `/proc/<pid>/fd`, `idiag_inode` in
    /// `sock_diag`).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// A copy of the listener, taken from the holding process: at the fd it said, else
    /// wherever `/proc/<pid>/fd` shows it.
    pub fn borrow(&self) -> io::Result<OwnedFd> {
        if let Some(fd) = self.fd
            && let Ok(socket) = pidfd_getfd(&self.pidfd, fd)
            && socket_inode(&socket)? == self.inode
        {
            return Ok(socket);
        }
        let target = find_socket_fd(self.pid, self.inode)?;
        pidfd_getfd(&self.pidfd, target)
    }
}

/// The inode of a socket (`fstat(2)`).
pub fn socket_inode(fd: &impl AsFd) -> io::Result<u64> {
    Ok(nix::sys::stat::fstat(fd.as_fd())?.st_ino)
}

/// The fd number under which `pid` holds the socket with `inode`.
pub fn find_socket_fd(pid: i32, inode: u64) -> io::Result<RawFd> {
    let wanted = format!("socket:[{inode}]");
    // A worker running as another user needs CAP_SYS_PTRACE to be inspected: say so
    // rather than "no longer holds".
    let hint = |e: io::Error| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            io::Error::new(
                e.kind(),
                format!("cannot read /proc/{pid}/fd ({e}); the primary needs CAP_SYS_PTRACE"),
            )
        } else {
            e
        }
    };
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(hint)? {
        let entry = entry?;
        let link = match std::fs::read_link(entry.path()) {
            Ok(link) => link,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(hint(e)),
            Err(_) => continue,
        };
        if link.as_os_str() == wanted.as_str()
            && let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok())
        {
            return Ok(fd);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("process {pid} no longer holds socket {inode}"),
    ))
}

/// Duplicates fd `target` of the process behind `pidfd` into this one (`pidfd_getfd(2)`;
/// needs ptrace access to the process).
pub fn pidfd_getfd(pidfd: impl AsFd, target: RawFd) -> io::Result<OwnedFd> {
    let pidfd = pidfd.as_fd().as_raw_fd();
    // SAFETY: plain syscall on integers; the kernel checks both fds.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just installed `fd` in this process for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
