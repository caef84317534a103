//! A worker's listening socket, reached through the worker process that holds it.
//!
//! The primary closes its copy of a worker's socket as soon as the socket is in steering,
//! so that the socket leaves the group by itself when the worker dies. When steering
//! needs a socket of the group again (to attach its program once more after a takeover),
//! it borrows the worker's own fd for a moment (`pidfd_getfd(2)`, checked by inode).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};

use crate::sys::borrow::{self, BorrowError};

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
    /// at fd `fd` if that is known. Fails if `pidfd` cannot be duplicated (`EMFILE`).
    pub fn new(
        pid: i32,
        pidfd: BorrowedFd<'_>,
        socket: &OwnedFd,
        fd: Option<RawFd>,
    ) -> io::Result<ListenerHolder> {
        Ok(ListenerHolder {
            pid,
            pidfd: pidfd.try_clone_to_owned()?,
            inode: crate::sys::fd::inode(socket.as_fd())?,
            fd,
        })
    }

    /// The socket's inode (`socket:[inode]` in `/proc/<pid>/fd`, `idiag_inode` in
    /// `sock_diag`).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// A copy of the listener, taken from the holding process: at the fd it said, else
    /// wherever `/proc/<pid>/fd` shows it. The error is that of the search, when the fd
    /// it said no longer holds it.
    pub fn borrow(&self) -> Result<OwnedFd, BorrowError> {
        let borrowed = match self.fd {
            Some(fd) => borrow::socket_at(self.pidfd.as_fd(), fd, self.inode),
            None => Err(BorrowError::NotHeld {
                pid: self.pid,
                inode: self.inode,
            }),
        };
        borrowed.or_else(|_| {
            let fd = borrow::find_socket(self.pid, self.inode)?;
            borrow::socket_at(self.pidfd.as_fd(), fd, self.inode)
        })
    }
}
