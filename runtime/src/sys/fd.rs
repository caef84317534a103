//! The flags and identity of one of this process's file descriptors.

use std::io;
use std::os::fd::BorrowedFd;

use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// Sets or clears `O_NONBLOCK` on `fd`: `fcntl(F_GETFL)`, then `fcntl(F_SETFL)`.
///
/// Fails only if `fd` is not open (`EBADF`); the flag is shared by every copy of the
/// file description (a `dup`, a copy taken with `pidfd_getfd`, the other end of a fork).
pub fn set_nonblocking(fd: BorrowedFd<'_>, nonblocking: bool) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    let flags = if nonblocking {
        flags | OFlag::O_NONBLOCK
    } else {
        flags - OFlag::O_NONBLOCK
    };
    fcntl(fd, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// The inode of the file behind `fd` (`fstat(2)`, `st_ino`). For a socket this is its
/// name wherever it is seen: `socket:[inode]` in `/proc/<pid>/fd`, `idiag_inode` in
/// `sock_diag`, and the same in every process that holds a copy.
///
/// Fails only if `fd` is not open (`EBADF`).
pub fn inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(nix::sys::stat::fstat(fd)?.st_ino)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn nonblocking_is_set_and_cleared() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        set_nonblocking(listener.as_fd(), true).expect("set");
        let err = listener.accept().expect_err("nothing to accept");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        set_nonblocking(listener.as_fd(), false).expect("clear");
        let flags = fcntl(listener.as_fd(), FcntlArg::F_GETFL).expect("F_GETFL");
        assert!(!OFlag::from_bits_truncate(flags).contains(OFlag::O_NONBLOCK));
    }

    #[test]
    fn a_copy_of_a_socket_has_its_inode_and_another_socket_does_not() {
        let one = TcpListener::bind("127.0.0.1:0").expect("bind");
        let copy = one.try_clone().expect("dup");
        let other = TcpListener::bind("127.0.0.1:0").expect("bind");
        let inode_of = |l: &TcpListener| inode(l.as_fd()).expect("fstat");
        assert_eq!(inode_of(&one), inode_of(&copy));
        assert_ne!(inode_of(&one), inode_of(&other));
    }
}
