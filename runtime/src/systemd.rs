//! The systemd notification protocol (`sd_notify(3)`), written out: one datagram of
//! `KEY=VALUE` lines to the Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for
//! an abstract socket). Without the variable nothing is sent.
//!
//! The primary reports, as `Type=notify` services do:
//!
//! | when | message |
//! |---|---|
//! | every slot is ready for the first time | `READY=1` |
//! | a rolling restart (SIGUSR2, SIGHUP) begins | `RELOADING=1`, `MONOTONIC_USEC=<now>` |
//! | it has ended | `READY=1` |
//! | stopping (SIGTERM, SIGINT) | `STOPPING=1` |
//! | the number of ready slots changes | `STATUS=<ready> of <n> workers ready` |
//! | a rolling restart gave up on a slot | `READY=1`, `STATUS=... rolling restart abandoned: slot <i>'s new worker could not start ...` |
//!
//! [`Notifier`] is fed the cluster's state on every turn of the primary's loop and sends
//! only on a change, so the supervisor needs no call at each place a state changes. The
//! socket is non-blocking: a service manager that does not read never stalls the
//! primary. What it could not take is not lost: the notifier compares with what was last
//! *delivered*, so the next turn sends the change again, folded into the latest state
//! (a `READY=1` is never dropped; a `RELOADING=1` that the end of the reload overtook is
//! simply not sent).

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable naming the service manager's socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// What the service manager is told about, as seen by the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterState {
    /// Slots in state `ready`.
    pub ready: usize,
    /// All slots.
    pub slots: usize,
    /// Where the cluster is.
    pub phase: Phase,
    /// The last rolling restart gave up on this slot: its new worker could not start.
    pub roll_abandoned: Option<usize>,
}

/// The cluster phases the protocol distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving (or starting).
    Running,
    /// A rolling restart is replacing the workers.
    Reloading,
    /// Draining for exit.
    Stopping,
}

/// Sends state changes to systemd.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// The state systemd has been told.
    last: Option<ClusterState>,
    /// `READY=1` has been delivered once (start-up is over).
    started: bool,
    /// Datagrams the socket refused (full); each was folded into a later one.
    deferred: u64,
    /// Says nothing about the cluster's state: another primary is the service's main
    /// process (a successor before its predecessor has gone, or a predecessor after it
    /// handed over).
    quiet: bool,
    /// `MAINPID=` still to be delivered (a primary handing over to its successor).
    main_pid: Option<u32>,
}

impl Notifier {
    /// A notifier for `$NOTIFY_SOCKET`, or one that sends nothing if it is unset. A value
    /// that is not a usable address is logged and ignored: Steer runs without systemd too.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os(NOTIFY_SOCKET).and_then(|name| {
            match Notifier::open(&name.to_string_lossy()) {
                Ok(target) => Some(target),
                Err(err) => {
                    tracing::warn!("{NOTIFY_SOCKET}={name:?} cannot be used: {err}");
                    None
                }
            }
        });
        Notifier {
            target,
            last: None,
            started: false,
            deferred: 0,
            quiet: false,
            main_pid: None,
        }
    }

    /// A notifier that sends nothing.
    #[cfg(test)]
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            last: None,
            started: false,
            deferred: 0,
            quiet: false,
            main_pid: None,
        }
    }

    /// Stops or resumes reporting the cluster's state. A successor stays quiet until its
    /// predecessor has gone: with `NotifyAccess=main` only the main process is heard.
    pub fn set_quiet(&mut self, quiet: bool) {
        self.quiet = quiet;
    }

    /// Tells the service manager that `pid` is the service's main process from now on
    /// (`MAINPID=`), then says nothing more: the successor speaks for the service.
    /// Retried on every [`Notifier::observe`] until the socket takes it.
    pub fn hand_over(&mut self, pid: u32) {
        self.main_pid = Some(pid);
        self.quiet = true;
        self.deliver_main_pid();
    }

    /// Whether a `MAINPID=` is still waiting for room in the socket.
    pub fn handing_over(&self) -> bool {
        self.main_pid.is_some()
    }

    fn deliver_main_pid(&mut self) {
        if let Some(pid) = self.main_pid
            && self.send(&format!("MAINPID={pid}"))
        {
            self.main_pid = None;
        }
    }

    /// How many times the service manager's socket was full and a message waited for a
    /// later turn.
    #[cfg(test)]
    pub fn deferred(&self) -> u64 {
        self.deferred
    }

    fn open(name: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
        let addr = match name.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
            None if name.starts_with('/') => SocketAddr::from_pathname(name)?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "expected an absolute path or @abstract-name",
                ));
            }
        };
        // std creates the socket with SOCK_CLOEXEC, so workers do not inherit it.
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok((socket, addr))
    }

    /// Whether messages are sent at all.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Takes the current state; sends what changed since the last delivered one. Never
    /// blocks: if the socket is full, the change is sent again on a later call.
    pub fn observe(&mut self, state: ClusterState) {
        if self.target.is_none() {
            return;
        }
        self.deliver_main_pid();
        if self.quiet || self.last == Some(state) {
            return;
        }
        let (message, started) = self.message(state);
        if message.is_empty() || self.send(&message) {
            self.last = Some(state);
            self.started = started;
        }
    }

    /// The datagram for a change from what was delivered to `state` (empty if nothing is
    /// worth saying), and whether start-up is over once it is delivered.
    fn message(&self, state: ClusterState) -> (String, bool) {
        let before = self.last;
        let mut started = self.started;
        let mut lines = Vec::new();
        match state.phase {
            Phase::Stopping if before.is_none_or(|b| b.phase != Phase::Stopping) => {
                lines.push("STOPPING=1".to_owned());
            }
            Phase::Reloading if started && before.is_none_or(|b| b.phase != Phase::Reloading) => {
                lines.push("RELOADING=1".to_owned());
                lines.push(format!("MONOTONIC_USEC={}", monotonic_usec()));
            }
            Phase::Running if state.ready == state.slots && !started => {
                started = true;
                lines.push("READY=1".to_owned());
            }
            Phase::Running if started && before.is_some_and(|b| b.phase == Phase::Reloading) => {
                lines.push("READY=1".to_owned());
            }
            _ => {}
        }
        if before.is_none_or(|b| {
            b.ready != state.ready
                || b.slots != state.slots
                || b.roll_abandoned != state.roll_abandoned
        }) || !lines.is_empty()
        {
            let what = match state.phase {
                Phase::Running => "",
                Phase::Reloading => "rolling restart; ",
                Phase::Stopping => "stopping; ",
            };
            let problem = match state.roll_abandoned {
                Some(slot) => format!(
                    "; rolling restart abandoned: slot {slot}'s new worker could not start, \
                     the running generation serves"
                ),
                None => String::new(),
            };
            lines.push(format!(
                "STATUS={what}{} of {} workers ready{problem}",
                state.ready, state.slots
            ));
        }
        (lines.join("\n"), started)
    }

    /// Sends one datagram; false if it must be tried again (the socket is full). Other
    /// errors (no listener) are logged and count as delivered: retrying cannot help.
    fn send(&mut self, message: &str) -> bool {
        let Some((socket, addr)) = &self.target else {
            return true;
        };
        match socket.send_to_addr(message.as_bytes(), addr) {
            Ok(_) => true,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                self.deferred += 1;
                false
            }
            Err(err) => {
                tracing::debug!("cannot notify systemd ({message:?}): {err}");
                true
            }
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn state(ready: usize, phase: Phase) -> ClusterState {
        ClusterState {
            ready,
            slots: 2,
            phase,
            roll_abandoned: None,
        }
    }

    fn listening() -> (UnixDatagram, Notifier, String) {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("steer-notify-test-{}-{n}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let (sender, target) = Notifier::open(&format!("@{name}")).expect("open");
        let notifier = Notifier {
            target: Some((sender, target)),
            last: None,
            started: false,
            deferred: 0,
            quiet: false,
            main_pid: None,
        };
        (socket, notifier, name)
    }

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sequence_over_an_abstract_socket() {
        let (socket, mut notifier, _) = listening();
        notifier.observe(state(0, Phase::Running));
        assert_eq!(recv(&socket), "STATUS=0 of 2 workers ready");
        notifier.observe(state(0, Phase::Running));
        notifier.observe(state(2, Phase::Running));
        assert_eq!(recv(&socket), "READY=1\nSTATUS=2 of 2 workers ready");
        notifier.observe(state(2, Phase::Reloading));
        let reloading = recv(&socket);
        let lines: Vec<&str> = reloading.lines().collect();
        assert_eq!(lines[0], "RELOADING=1", "{reloading}");
        let usec: u64 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{reloading}"));
        assert!(usec > 0);
        notifier.observe(state(2, Phase::Running));
        assert_eq!(recv(&socket), "READY=1\nSTATUS=2 of 2 workers ready");
        notifier.observe(state(1, Phase::Running));
        assert_eq!(recv(&socket), "STATUS=1 of 2 workers ready");
        notifier.observe(state(0, Phase::Stopping));
        assert_eq!(
            recv(&socket),
            "STOPPING=1\nSTATUS=stopping; 0 of 2 workers ready"
        );
    }

    #[test]
    fn an_abandoned_roll_says_ready_and_names_the_slot() {
        let (socket, mut notifier, _) = listening();
        notifier.observe(state(2, Phase::Running));
        assert!(recv(&socket).starts_with("READY=1"));
        notifier.observe(state(2, Phase::Reloading));
        assert!(recv(&socket).starts_with("RELOADING=1"));
        notifier.observe(ClusterState {
            roll_abandoned: Some(1),
            ..state(2, Phase::Running)
        });
        let said = recv(&socket);
        assert!(said.starts_with("READY=1\n"), "{said}");
        assert!(
            said.contains("STATUS=2 of 2 workers ready; rolling restart abandoned: slot 1's"),
            "{said}"
        );
    }

    #[test]
    fn a_roll_before_start_up_ends_sends_no_reloading() {
        let (socket, mut notifier, _) = listening();
        notifier.observe(state(1, Phase::Reloading));
        assert_eq!(
            recv(&socket),
            "STATUS=rolling restart; 1 of 2 workers ready"
        );
        notifier.observe(state(2, Phase::Running));
        assert_eq!(recv(&socket), "READY=1\nSTATUS=2 of 2 workers ready");
    }

    #[test]
    fn a_full_socket_never_blocks_and_ready_is_delivered_once_there_is_room() {
        let (socket, mut notifier, _) = listening();
        // Fill the receiver's queue without reading it.
        let (filler, addr) = Notifier::open(&format!("@{}", abstract_name(&socket))).expect("open");
        while filler.send_to_addr(b"STATUS=filler", &addr).is_ok() {}
        let started = std::time::Instant::now();
        notifier.observe(state(2, Phase::Running));
        notifier.observe(state(2, Phase::Running));
        assert!(started.elapsed() < Duration::from_secs(1), "never blocks");
        assert!(notifier.deferred() >= 1);
        // The manager reads again: the next turn delivers READY=1.
        socket.set_nonblocking(true).expect("nonblocking");
        while socket.recv(&mut [0u8; 512]).is_ok() {}
        notifier.observe(state(2, Phase::Running));
        let mut seen = String::new();
        let mut buf = [0u8; 512];
        while let Ok(n) = socket.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('|');
        }
        assert!(seen.contains("READY=1"), "{seen}");
    }

    fn abstract_name(socket: &UnixDatagram) -> String {
        let addr = socket.local_addr().expect("addr");
        String::from_utf8_lossy(addr.as_abstract_name().expect("abstract")).into_owned()
    }

    #[test]
    fn a_hand_over_names_the_new_main_pid_and_then_says_nothing() {
        let (socket, mut notifier, _) = listening();
        notifier.observe(state(2, Phase::Running));
        assert_eq!(recv(&socket), "READY=1\nSTATUS=2 of 2 workers ready");
        notifier.hand_over(4242);
        assert_eq!(recv(&socket), "MAINPID=4242");
        assert!(!notifier.handing_over());
        notifier.observe(state(0, Phase::Stopping));
        socket.set_nonblocking(true).expect("nonblocking");
        assert!(
            socket.recv(&mut [0u8; 64]).is_err(),
            "no STOPPING=1 from the old primary"
        );
    }

    #[test]
    fn bad_socket_names_are_refused() {
        assert!(Notifier::open("relative/path").is_err());
        assert!(!Notifier::disabled().enabled());
    }
}
