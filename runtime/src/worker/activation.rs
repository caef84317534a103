//! The sockets an external Rust program is started with, by name: systemd's socket
//! activation (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`, fds 3, 4, ...), which
//! `steer run -- ./prog` follows with one socket per `--listen`.
//!
//! ```no_run
//! let mut sockets = steer::InheritedSockets::from_env()?;
//! let web = sockets.take_tcp("web")?;         // --listen web=127.0.0.1:8000
//! let dns = sockets.take_udp("dns")?;         // --listen dns=udp://127.0.0.1:5353
//! # Ok::<(), steer::ActivationError>(())
//! ```

use std::collections::VecDeque;
use std::io;
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use socket2::{Domain, SockRef, Type};

use super::ListenerSocket;

/// The first inherited fd (systemd's `SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// Most sockets taken from `LISTEN_FDS`: a value past it is a broken environment, not a
/// service with that many listeners.
const MOST_FDS: usize = 1024;

/// Set once this process has taken its inherited fds: a second owner would close them
/// under the first.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Why the inherited sockets cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_PID` or `LISTEN_FDS` is not set, or `LISTEN_PID` names another process (the
    /// variables were inherited from a parent that was activated): this process was given
    /// no socket. Run without Steer, a program binds its own here.
    #[error("this process was not given sockets (LISTEN_PID and LISTEN_FDS)")]
    NotActivated,
    /// [`InheritedSockets::from_env`] was already called in this process: the fds have
    /// an owner.
    #[error("the inherited sockets were already taken in this process")]
    AlreadyTaken,
    /// A variable holds something other than what systemd's convention allows.
    #[error("{variable}={value:?} is not valid")]
    Invalid {
        /// The variable.
        variable: &'static str,
        /// What it holds.
        value: String,
    },
    /// `LISTEN_FDNAMES` names more or fewer sockets than `LISTEN_FDS` counts.
    #[error("LISTEN_FDNAMES names {names} sockets, LISTEN_FDS counts {fds}")]
    NameCount {
        /// How many names.
        names: usize,
        /// How many fds.
        fds: usize,
    },
    /// An fd `LISTEN_FDS` counts is not open (`fcntl(F_GETFD)`), or its flags cannot be
    /// set.
    #[error("inherited fd {fd}")]
    Fd {
        /// The fd.
        fd: RawFd,
        /// What `fcntl(2)` said.
        #[source]
        source: io::Error,
    },
    /// An inherited fd is neither a listening TCP socket nor a UDP socket (IPv4 or IPv6).
    #[error("inherited fd {fd} ({name}) is not a listening TCP socket or a UDP socket")]
    NotAListener {
        /// The fd.
        fd: RawFd,
        /// Its name in `LISTEN_FDNAMES`.
        name: String,
    },
    /// No socket of that name is left: none was given, or it was taken already.
    #[error("no inherited socket is named {name:?}")]
    Missing {
        /// The name asked for.
        name: String,
    },
    /// The socket of that name is of the other kind.
    #[error("the inherited socket {name:?} is not {expected}")]
    WrongKind {
        /// The name asked for.
        name: String,
        /// `"a TCP listener"` or `"a UDP socket"`.
        expected: &'static str,
    },
}

/// The sockets this process was started with, each under its name, owned here.
///
/// Made by [`InheritedSockets::from_env`]. Take each with [`InheritedSockets::take_tcp`]
/// or [`InheritedSockets::take_udp`]; the ones not taken are closed with this value.
#[derive(Debug)]
pub struct InheritedSockets {
    sockets: VecDeque<(String, ListenerSocket)>,
}

impl InheritedSockets {
    /// Takes the sockets the service manager (`steer run`, systemd) passed to this
    /// process: `LISTEN_PID` must be this process's pid (`getpid(2)`), `LISTEN_FDS` counts
    /// the fds from 3 on, and `LISTEN_FDNAMES` names them, joined by `:` (unset: each is
    /// `unknown`, as systemd has it). Each fd must be a listening TCP socket or a UDP
    /// socket, IPv4 or IPv6; it is marked close-on-exec (`fcntl(F_SETFD)`), so that
    /// programs this one starts do not hold it open. Checks every fd before taking any.
    ///
    /// The variables are left as they are: a child sees a `LISTEN_PID` that is not its
    /// own, and takes nothing.
    ///
    /// # Errors
    /// [`ActivationError::NotActivated`] when this process was given no sockets;
    /// [`ActivationError::AlreadyTaken`] on a second call; the other variants when the
    /// variables or the fds are not what the convention says.
    pub fn from_env() -> Result<InheritedSockets, ActivationError> {
        let names = names_from(|name| std::env::var(name).ok(), std::process::id())?;
        if TAKEN.swap(true, Ordering::SeqCst) {
            return Err(ActivationError::AlreadyTaken);
        }
        // SAFETY: the service manager placed these fds for this process (LISTEN_PID is
        // ours), and the flag above makes this call their only taker.
        unsafe { adopt(FIRST_FD, names) }
    }

    /// The names of the sockets not taken yet, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sockets.iter().map(|(name, _)| name.as_str())
    }

    /// Takes the socket named `name`, whatever its kind.
    ///
    /// # Errors
    /// [`ActivationError::Missing`] when there is none (left).
    pub fn take(&mut self, name: &str) -> Result<ListenerSocket, ActivationError> {
        let place = self.place_of(name)?;
        let (_, socket) = self.sockets.remove(place).expect("a place just found");
        Ok(socket)
    }

    /// Takes the listening TCP socket named `name` (blocking, as inherited: set it
    /// non-blocking for an async runtime).
    ///
    /// # Errors
    /// [`ActivationError::Missing`], or [`ActivationError::WrongKind`] for a UDP socket
    /// (which stays here).
    pub fn take_tcp(&mut self, name: &str) -> Result<TcpListener, ActivationError> {
        self.take_kind(name, "a TCP listener", |socket| match socket {
            ListenerSocket::Tcp(listener) => Ok(listener),
            other => Err(other),
        })
    }

    /// Takes the UDP socket named `name`, bound and in its `SO_REUSEPORT` group.
    ///
    /// # Errors
    /// [`ActivationError::Missing`], or [`ActivationError::WrongKind`] for a TCP listener
    /// (which stays here).
    pub fn take_udp(&mut self, name: &str) -> Result<UdpSocket, ActivationError> {
        self.take_kind(name, "a UDP socket", |socket| match socket {
            ListenerSocket::Udp(udp) => Ok(udp),
            other => Err(other),
        })
    }

    fn take_kind<T>(
        &mut self,
        name: &str,
        expected: &'static str,
        pick: impl FnOnce(ListenerSocket) -> Result<T, ListenerSocket>,
    ) -> Result<T, ActivationError> {
        let place = self.place_of(name)?;
        let (name, socket) = self.sockets.remove(place).expect("a place just found");
        pick(socket).map_err(|socket| {
            let error = ActivationError::WrongKind {
                name: name.clone(),
                expected,
            };
            self.sockets.insert(place, (name, socket));
            error
        })
    }

    fn place_of(&self, name: &str) -> Result<usize, ActivationError> {
        self.sockets
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| ActivationError::Missing { name: name.into() })
    }
}

impl IntoIterator for InheritedSockets {
    type Item = (String, ListenerSocket);
    type IntoIter = std::collections::vec_deque::IntoIter<(String, ListenerSocket)>;

    /// Every socket not taken yet, with its name, in order.
    fn into_iter(self) -> Self::IntoIter {
        self.sockets.into_iter()
    }
}

/// The names of the inherited fds, one per fd from 3 on, if the variables (read through
/// `get`) give this process (`pid`) any.
fn names_from(
    get: impl Fn(&str) -> Option<String>,
    pid: u32,
) -> Result<Vec<String>, ActivationError> {
    let (Some(listen_pid), Some(listen_fds)) = (get("LISTEN_PID"), get("LISTEN_FDS")) else {
        return Err(ActivationError::NotActivated);
    };
    let owner: u32 = listen_pid.parse().map_err(|_| ActivationError::Invalid {
        variable: "LISTEN_PID",
        value: listen_pid.clone(),
    })?;
    if owner != pid {
        return Err(ActivationError::NotActivated);
    }
    let count: usize = listen_fds
        .parse()
        .ok()
        .filter(|&count| count <= MOST_FDS)
        .ok_or_else(|| ActivationError::Invalid {
            variable: "LISTEN_FDS",
            value: listen_fds.clone(),
        })?;
    let names: Vec<String> = match get("LISTEN_FDNAMES") {
        None => vec!["unknown".to_owned(); count],
        Some(text) if count == 0 && text.is_empty() => Vec::new(),
        Some(text) => text.split(':').map(str::to_owned).collect(),
    };
    if names.len() != count {
        return Err(ActivationError::NameCount {
            names: names.len(),
            fds: count,
        });
    }
    Ok(names)
}

/// Takes the fds `first`, `first + 1`, ... one per name: checks that each is open and a
/// listening TCP or a UDP socket, marks them close-on-exec, then owns them. Nothing is
/// taken (or closed) if one fails a check.
///
/// # Safety
/// Nothing else in this process may own these fds, now or later: they are closed when
/// what this returns is dropped.
unsafe fn adopt(first: RawFd, names: Vec<String>) -> Result<InheritedSockets, ActivationError> {
    let mut kinds = Vec::with_capacity(names.len());
    for (fd, name) in (first..).zip(&names) {
        let flags = fcntl_checked(fd, FcntlArg::F_GETFD)?;
        // SAFETY: `fd` is open (F_GETFD succeeded) and stays open while borrowed here: this
        // function is its only user until it owns it below.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let kind = listener_kind(borrowed).ok_or_else(|| ActivationError::NotAListener {
            fd,
            name: name.clone(),
        })?;
        kinds.push((fd, FdFlag::from_bits_truncate(flags), kind));
    }
    let mut sockets = VecDeque::with_capacity(names.len());
    for ((fd, flags, kind), name) in kinds.into_iter().zip(names) {
        fcntl_checked(fd, FcntlArg::F_SETFD(flags | FdFlag::FD_CLOEXEC))?;
        // SAFETY: it is open (checked above), and the caller guarantees it has no other
        // owner in this process.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let socket = match kind {
            Kind::Tcp => ListenerSocket::Tcp(TcpListener::from(owned)),
            Kind::Udp => ListenerSocket::Udp(UdpSocket::from(owned)),
        };
        sockets.push_back((name, socket));
    }
    Ok(InheritedSockets { sockets })
}

/// `fcntl(2)` on a raw fd that may not be open: `EBADF` is an error, not a panic.
fn fcntl_checked(fd: RawFd, arg: FcntlArg<'_>) -> Result<i32, ActivationError> {
    // SAFETY: fcntl takes any integer; on one that is not open it fails with EBADF, which
    // is returned, and the borrow ends with this call.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, arg).map_err(|errno| ActivationError::Fd {
        fd,
        source: io::Error::from(errno),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Udp,
}

/// What the socket at `fd` is (`getsockopt` `SO_DOMAIN`, `SO_TYPE`, `SO_ACCEPTCONN`):
/// an IPv4 or IPv6 listening TCP socket, a UDP socket, or neither.
fn listener_kind(fd: BorrowedFd<'_>) -> Option<Kind> {
    let socket = SockRef::from(&fd);
    let domain = socket.domain().ok()?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return None;
    }
    match socket.r#type().ok()? {
        Type::STREAM if socket.is_listener().ok()? => Some(Kind::Tcp),
        Type::DGRAM => Some(Kind::Udp),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::fd::AsRawFd;

    use super::*;

    fn names(vars: &[(&str, &str)], pid: u32) -> Result<Vec<String>, ActivationError> {
        let vars: HashMap<&str, &str> = vars.iter().copied().collect();
        names_from(|name| vars.get(name).map(|v| v.to_string()), pid)
    }

    #[test]
    fn names_come_from_listen_fdnames_for_this_pid_only() {
        let vars = [
            ("LISTEN_PID", "42"),
            ("LISTEN_FDS", "2"),
            ("LISTEN_FDNAMES", "web:dns"),
        ];
        assert_eq!(names(&vars, 42).expect("ours"), ["web", "dns"]);
        assert!(matches!(
            names(&vars, 43),
            Err(ActivationError::NotActivated)
        ));
        assert!(matches!(
            names(&vars[1..], 42),
            Err(ActivationError::NotActivated)
        ));
        let unnamed = names(&vars[..2], 42).expect("no names");
        assert_eq!(unnamed, ["unknown", "unknown"]);
    }

    #[test]
    fn a_broken_environment_is_refused_by_name() {
        let miscounted = names(
            &[
                ("LISTEN_PID", "7"),
                ("LISTEN_FDS", "3"),
                ("LISTEN_FDNAMES", "a:b"),
            ],
            7,
        );
        assert!(
            matches!(
                miscounted,
                Err(ActivationError::NameCount { names: 2, fds: 3 })
            ),
            "{miscounted:?}"
        );
        for (pid, fds) in [("x", "1"), ("7", "-1"), ("7", "99999")] {
            let err = names(&[("LISTEN_PID", pid), ("LISTEN_FDS", fds)], 7).expect_err(fds);
            assert!(matches!(err, ActivationError::Invalid { .. }), "{err}");
        }
        assert!(
            names(
                &[
                    ("LISTEN_PID", "7"),
                    ("LISTEN_FDS", "0"),
                    ("LISTEN_FDNAMES", "")
                ],
                7
            )
            .expect("none")
            .is_empty()
        );
    }

    /// Places `sockets` at consecutive fds from a high number no other test uses, as a
    /// service manager places them from 3, and returns the first.
    fn place(first: RawFd, sockets: Vec<OwnedFd>) -> RawFd {
        for (fd, socket) in (first..).zip(sockets) {
            // SAFETY: dup2 onto a number this test alone uses; the copy is owned by the
            // code under test from here.
            let rc = unsafe { libc::dup2(socket.as_raw_fd(), fd) };
            assert_eq!(rc, fd, "dup2: {}", io::Error::last_os_error());
        }
        first
    }

    fn cloexec(fd: RawFd) -> bool {
        let flags = fcntl_checked(fd, FcntlArg::F_GETFD).expect("open");
        FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC)
    }

    #[test]
    fn a_tcp_listener_and_a_udp_socket_are_taken_by_name_and_kind() {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind");
        let udp = UdpSocket::bind("[::1]:0")
            .or_else(|_| UdpSocket::bind("127.0.0.1:0"))
            .expect("bind udp");
        let (tcp_addr, udp_addr) = (tcp.local_addr().expect("a"), udp.local_addr().expect("a"));
        let first = place(900, vec![tcp.into(), udp.into()]);
        // The fds inherited from a service manager are not close-on-exec.
        for fd in [first, first + 1] {
            fcntl_checked(fd, FcntlArg::F_SETFD(FdFlag::empty())).expect("clear");
        }
        // SAFETY: the copies `place` made are this test's alone.
        let mut sockets =
            unsafe { adopt(first, vec!["web".into(), "dns".into()]) }.expect("adopted");
        assert!(cloexec(first) && cloexec(first + 1));
        assert_eq!(sockets.names().collect::<Vec<_>>(), ["web", "dns"]);
        let err = sockets.take_udp("web").expect_err("TCP");
        assert!(matches!(err, ActivationError::WrongKind { .. }), "{err}");
        let web = sockets.take_tcp("web").expect("still there");
        assert_eq!(web.local_addr().expect("addr"), tcp_addr);
        assert!(matches!(
            sockets.take_tcp("web"),
            Err(ActivationError::Missing { .. })
        ));
        let dns = sockets.take_udp("dns").expect("udp");
        assert_eq!(dns.local_addr().expect("addr"), udp_addr);
        assert_eq!(sockets.names().count(), 0);
    }

    #[test]
    fn nothing_is_taken_when_one_fd_is_not_a_listener() {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind");
        // Connected, not listening.
        let stream = std::net::TcpStream::connect(tcp.local_addr().expect("a")).expect("c");
        let first = place(910, vec![tcp.into(), stream.into()]);
        // SAFETY: the copies `place` made are this test's alone.
        let err = unsafe { adopt(first, vec!["a".into(), "b".into()]) }.expect_err("a stream");
        assert!(
            matches!(&err, ActivationError::NotAListener { fd, name } if *fd == first + 1 && name == "b"),
            "{err}"
        );
        assert!(
            fcntl_checked(first, FcntlArg::F_GETFD).is_ok(),
            "the good fd is left open, not closed by a half-done take"
        );
        // SAFETY: fd 930 is open nowhere in this test process.
        let missing = unsafe { adopt(930, vec!["nothing at 930".into()]) }.expect_err("closed");
        assert!(
            matches!(missing, ActivationError::Fd { fd: 930, .. }),
            "{missing}"
        );
        // SAFETY: the test's own copies, owned by nothing else.
        drop(unsafe { OwnedFd::from_raw_fd(first) });
        // SAFETY: as above.
        drop(unsafe { OwnedFd::from_raw_fd(first + 1) });
    }
}
