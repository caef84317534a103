//! A socket another process holds, copied into this one for a moment.
//!
//! The primary closes its own copy of a worker's socket once the socket is in steering, so
//! that the socket leaves the `SO_REUSEPORT` group by itself when the worker dies. When it
//! needs the socket again (to attach its program once more after a takeover, to shut a
//! hung worker's listener down), it copies the worker's fd with `pidfd_getfd(2)` (Linux
//! 5.6) and checks, by inode, that the fd still holds the socket it registered: a worker
//! may have closed it and reused the number. Both need ptrace access to the worker: the
//! same user, or `CAP_SYS_PTRACE` for a worker that switched to another `--user`.
//!
//! Close a borrowed socket soon: while this process holds it, the socket outlives its
//! worker.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Why a socket could not be borrowed from the process holding it.
#[derive(Debug, thiserror::Error)]
pub enum BorrowError {
    /// `pidfd_getfd(2)` failed: the process is gone (`ESRCH`), holds nothing at that fd
    /// (`EBADF`), or this process may not ptrace it (`EPERM`).
    #[error(
        "pidfd_getfd of fd {fd}{}",
        ptrace_hint(source, " (the primary needs CAP_SYS_PTRACE over the worker)")
    )]
    Take {
        /// The fd number in the holding process.
        fd: RawFd,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The copy could not be looked at (`fstat(2)`).
    #[error("fstat of the copy of fd {fd}")]
    Inode {
        /// The fd number in the holding process.
        fd: RawFd,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The fd holds another file now: the process closed the socket and reused the
    /// number.
    #[error("fd {fd} of the worker is no longer its listening socket")]
    Replaced {
        /// The fd number in the holding process.
        fd: RawFd,
        /// The inode of the socket that was expected there.
        inode: u64,
    },
    /// `/proc/<pid>/fd` could not be listed or one of its links read: the process is gone
    /// (`ENOENT`), or this process may not inspect it (`EACCES`, `EPERM`).
    #[error(
        "cannot read /proc/{pid}/fd{}",
        ptrace_hint(source, "; the primary needs CAP_SYS_PTRACE")
    )]
    ListFds {
        /// The holding process.
        pid: i32,
        /// The error of `readdir` or `readlink`.
        #[source]
        source: io::Error,
    },
    /// No fd of the process holds the socket any longer.
    #[error("process {pid} no longer holds socket {inode}")]
    NotHeld {
        /// The process looked through.
        pid: i32,
        /// The socket's inode.
        inode: u64,
    },
}

impl BorrowError {
    /// Whether this process lacks the right to look into the holding process (ptrace
    /// access: the same user, or `CAP_SYS_PTRACE`).
    pub fn is_permission_denied(&self) -> bool {
        self.io_source()
            .is_some_and(|e| e.kind() == io::ErrorKind::PermissionDenied)
    }

    fn io_source(&self) -> Option<&io::Error> {
        match self {
            BorrowError::Take { source, .. }
            | BorrowError::Inode { source, .. }
            | BorrowError::ListFds { source, .. } => Some(source),
            BorrowError::Replaced { .. } | BorrowError::NotHeld { .. } => None,
        }
    }
}

/// `hint` when `err` says that access was denied.
fn ptrace_hint(err: &io::Error, hint: &'static str) -> &'static str {
    if err.kind() == io::ErrorKind::PermissionDenied {
        hint
    } else {
        ""
    }
}

/// A copy of the socket with `inode` that the process behind `pidfd` holds at fd `fd`:
/// `pidfd_getfd(2)`, then `fstat(2)` to check that the fd still holds that socket.
pub fn socket_at(pidfd: BorrowedFd<'_>, fd: RawFd, inode: u64) -> Result<OwnedFd, BorrowError> {
    let socket = pidfd_getfd(pidfd, fd).map_err(|source| BorrowError::Take { fd, source })?;
    let found =
        super::fd::inode(socket.as_fd()).map_err(|source| BorrowError::Inode { fd, source })?;
    if found != inode {
        return Err(BorrowError::Replaced { fd, inode });
    }
    Ok(socket)
}

/// The fd number under which process `pid` holds the socket with `inode`: the first
/// entry of `/proc/<pid>/fd` whose link reads `socket:[inode]`.
pub fn find_socket(pid: i32, inode: u64) -> Result<RawFd, BorrowError> {
    let wanted = format!("socket:[{inode}]");
    let unreadable = |source| BorrowError::ListFds { pid, source };
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        let link = match std::fs::read_link(entry.path()) {
            Ok(link) => link,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(unreadable(e)),
            // Closed since the directory was read.
            Err(_) => continue,
        };
        if link.as_os_str() == wanted.as_str()
            && let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok())
        {
            return Ok(fd);
        }
    }
    Err(BorrowError::NotHeld { pid, inode })
}

/// `pidfd_getfd(pidfd, target, 0)`: duplicates fd `target` of the process behind `pidfd`
/// into this one, close-on-exec. Needs ptrace access to the process.
fn pidfd_getfd(pidfd: BorrowedFd<'_>, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall on integers; the kernel checks both fds.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just installed `fd` in this process for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;
    use crate::primary::spawn::pidfd_open;
    use crate::sys::fd::inode;

    fn own_pidfd() -> OwnedFd {
        pidfd_open(std::process::id() as i32).expect("pidfd_open")
    }

    #[test]
    fn a_borrowed_listener_is_the_same_socket_and_shutting_it_down_stops_listening() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let expected = inode(listener.as_fd()).expect("inode");
        let pidfd = own_pidfd();
        let socket = socket_at(pidfd.as_fd(), listener.as_raw_fd(), expected).expect("borrow");
        assert_eq!(inode(socket.as_fd()).expect("inode"), expected);
        socket2::SockRef::from(&socket)
            .shutdown(std::net::Shutdown::Read)
            .expect("shutdown");
        assert!(
            TcpStream::connect(addr).is_err(),
            "a shut-down listener must refuse"
        );
        let err = listener
            .accept()
            .expect_err("accept on a shut-down listener");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }

    #[test]
    fn an_fd_that_holds_another_socket_is_not_borrowed() {
        let registered = TcpListener::bind("127.0.0.1:0").expect("bind");
        let other = TcpListener::bind("127.0.0.1:0").expect("bind");
        let expected = inode(registered.as_fd()).expect("inode");
        let err = socket_at(own_pidfd().as_fd(), other.as_raw_fd(), expected)
            .expect_err("another socket");
        assert!(matches!(err, BorrowError::Replaced { .. }), "{err:?}");
    }

    #[test]
    fn a_closed_fd_keeps_its_errno() {
        let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
        let (fd, expected) = (closed.as_raw_fd(), inode(closed.as_fd()).expect("inode"));
        let pidfd = own_pidfd();
        drop(closed);
        // The number may have been reused by another thread meanwhile: then it holds
        // another file, which is refused too.
        match socket_at(pidfd.as_fd(), fd, expected) {
            Err(err @ BorrowError::Take { .. }) => {
                let errno = err.io_source().and_then(io::Error::raw_os_error);
                assert_eq!(errno, Some(libc::EBADF), "{err:?}");
                let chain = crate::errors::error_chain(&err);
                assert!(
                    chain.contains(&format!("pidfd_getfd of fd {fd}: ")),
                    "{chain}"
                );
            }
            Err(BorrowError::Replaced { .. }) => {}
            other => panic!("a closed fd was borrowed: {other:?}"),
        }
    }

    #[test]
    fn a_socket_is_found_at_its_fd_and_a_gone_one_is_not_held() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let expected = inode(listener.as_fd()).expect("inode");
        let pid = std::process::id() as i32;
        assert_eq!(
            find_socket(pid, expected).expect("found"),
            listener.as_raw_fd()
        );
        drop(listener);
        let err = find_socket(pid, expected).expect_err("closed");
        assert!(matches!(err, BorrowError::NotHeld { .. }), "{err:?}");
    }

    #[test]
    fn denied_access_names_the_capability() {
        let err = BorrowError::Take {
            fd: 3,
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert!(err.is_permission_denied());
        assert!(err.to_string().contains("CAP_SYS_PTRACE"), "{err}");
        let listing = BorrowError::ListFds {
            pid: 1,
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert!(!listing.is_permission_denied());
        assert!(!listing.to_string().contains("CAP_SYS_PTRACE"), "{listing}");
    }
}
