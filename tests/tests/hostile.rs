//! Hostile clients on loopback, one test per defence (issue 12): what an attacker who can
//! reach the ports does, bounded in connections and seconds, and what Steer must still do.
//!
//! Every attack runs in threads this test owns, stops when its guard is dropped (also when
//! an assertion fails), and has a hard limit on its duration and on how many connections it
//! opens. The clusters are killed with their workers when the test ends, pass or fail. The
//! tests that measure time or CPU take [`QUIET`] so they do not attack each other's
//! measurements.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use steer_bench::suite::footprint;
use steer_tests::{Cluster, http_get_timeout, status, steer_bin, wait_for};

/// Serializes the tests whose figures (latency, CPU time) another attack would distort.
static QUIET: Mutex<()> = Mutex::new(());

fn quiet() -> MutexGuard<'static, ()> {
    QUIET.lock().unwrap_or_else(PoisonError::into_inner)
}

/// No attack in this file runs longer than this, whatever the test does.
const ATTACK_LIMIT: Duration = Duration::from_secs(60);

/// Raises this process's soft `RLIMIT_NOFILE` to `want` (at most the hard limit): some
/// attacks hold thousands of sockets. Returns the new soft limit.
fn raise_nofile(want: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let soft = soft.max(want.min(hard));
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("setrlimit");
    soft
}

/// Sets another process's soft `RLIMIT_NOFILE` with `prlimit(2)`, keeping its hard limit
/// (raising a hard limit takes `CAP_SYS_RESOURCE`); returns the soft limit it had.
fn set_process_nofile(pid: u32, soft: u64) -> u64 {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a null new limit only reads the current one into `old`.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit: {}", io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: a valid rlimit for the call; the old value is not asked for.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", io::Error::last_os_error());
    old.rlim_cur
}

/// Open file descriptors of `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// The lowest descriptor number `pid` does not use: with `RLIMIT_NOFILE` set to it, the
/// process can open nothing more (the limit bounds descriptor numbers, not their count).
/// Read once its descriptors hold still (the same three readings 100 ms apart, within 5 s):
/// a socket closing a moment later (a status client on its way out) would free a number
/// below the limit, and the process could accept again.
fn lowest_free_fd(pid: u32) -> u64 {
    let used = || -> std::collections::BTreeSet<u64> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("the process's fd directory")
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut readings = vec![used()];
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        readings.push(used());
        if let [.., a, b, c] = &readings[..]
            && a == b
            && b == c
        {
            break;
        }
    }
    let used = readings.pop().expect("one reading at least");
    (0..).find(|n| !used.contains(n)).unwrap_or(0)
}

/// `127.0.x.y` for client number `n`, starting at `127.0.2.1`: each a distinct address.
fn client_ip(n: usize) -> IpAddr {
    let n = u32::try_from(n).expect("few clients") + 2 * 256 + 1;
    IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | n))
}

/// A non-blocking connection from `from` (or any address), `SO_RCVBUF` set first if given.
fn connect_from(
    from: Option<IpAddr>,
    to: SocketAddr,
    rcvbuf: Option<usize>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size)?;
    }
    if let Some(ip) = from {
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    socket.connect_timeout(&SockAddr::from(to), timeout)?;
    socket.set_nonblocking(true)?;
    Ok(TcpStream::from(socket))
}

/// Connections held open by a background thread, each reopened when the server closes it:
/// the attacker of the idle-connection tests. It sends `greeting` (maybe nothing) on each
/// new connection, then never anything else. Stops when dropped, after [`ATTACK_LIMIT`], or
/// after `max_connects` connections.
struct Horde {
    stop: Arc<AtomicBool>,
    open: Arc<AtomicUsize>,
    connects: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Horde {
    fn hold(to: SocketAddr, sources: Vec<Option<IpAddr>>, greeting: &'static [u8]) -> Horde {
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let connects = Arc::new(AtomicU64::new(0));
        let max_connects = 100 * sources.len() as u64 + 10_000;
        let thread = thread::spawn({
            let (stop, open, connects) = (stop.clone(), open.clone(), connects.clone());
            move || {
                let started = Instant::now();
                let mut held: Vec<Option<TcpStream>> = sources.iter().map(|_| None).collect();
                let mut sink = [0u8; 4096];
                while !stop.load(Ordering::Relaxed)
                    && started.elapsed() < ATTACK_LIMIT
                    && connects.load(Ordering::Relaxed) < max_connects
                {
                    for (slot, from) in held.iter_mut().zip(&sources) {
                        if slot.is_none()
                            && let Ok(mut stream) =
                                connect_from(*from, to, None, Duration::from_millis(200))
                        {
                            connects.fetch_add(1, Ordering::Relaxed);
                            let _ = stream.write(greeting);
                            *slot = Some(stream);
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                    open.store(held.iter().flatten().count(), Ordering::Relaxed);
                    // Which did the server close? Read what it sent; end-of-file or an
                    // error means closed, and the slot connects again next round.
                    let mut fds: Vec<libc::pollfd> = held
                        .iter()
                        .flatten()
                        .map(|s| libc::pollfd {
                            fd: s.as_raw_fd(),
                            events: libc::POLLIN | libc::POLLRDHUP,
                            revents: 0,
                        })
                        .collect();
                    // SAFETY: `fds` is a valid array of pollfd for the call.
                    let _ = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
                    let mut ready = fds.iter().map(|fd| fd.revents != 0);
                    for slot in held.iter_mut() {
                        if slot.is_some() && ready.next() == Some(true) {
                            let closed = match slot.as_mut().map(|s| s.read(&mut sink)) {
                                Some(Ok(0)) => true,
                                Some(Ok(_)) => false,
                                Some(Err(e)) => e.kind() != ErrorKind::WouldBlock,
                                None => false,
                            };
                            if closed {
                                *slot = None;
                            }
                        }
                    }
                }
                open.store(0, Ordering::Relaxed);
            }
        });
        Horde {
            stop,
            open,
            connects,
            thread: Some(thread),
        }
    }

    /// Waits until at least `n` connections are open at once.
    fn wait_open(&self, n: usize, timeout: Duration) {
        wait_for(&format!("{n} attacking connections"), timeout, || {
            self.open.load(Ordering::Relaxed) >= n
        });
    }

    fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }
}

impl Drop for Horde {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends `request` on a new connection and reads until the server closes, within `limit`
/// in all; the raw bytes.
fn exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + limit;
    let mut stream = TcpStream::connect_timeout(&addr, limit)?;
    stream.set_write_timeout(Some(limit))?;
    stream.write_all(request)?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or_else(|| io::Error::new(ErrorKind::TimedOut, "no close within the limit"))?;
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(reply),
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset && !reply.is_empty() => {
                return Ok(reply);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Splits a raw response into its head (as text) and body.
fn split(reply: &[u8]) -> (String, &[u8]) {
    let end = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(reply.len(), |at| at + 4);
    (
        String::from_utf8_lossy(&reply[..end]).into_owned(),
        &reply[end..],
    )
}

/// The `Content-Length` of a response head.
fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

/// The p-th percentile (0..=100) of `samples`.
fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort();
    let rank = (samples.len() * p).div_ceil(100).max(1) - 1;
    samples[rank.min(samples.len() - 1)]
}

/// Waits until `stream`'s peer has closed it (end-of-file or reset); the time it took.
fn time_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    stream.set_nonblocking(false).ok()?;
    let mut sink = [0u8; 4096];
    while started.elapsed() < limit {
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .ok()?;
        match stream.read(&mut sink) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

// ---- the status listener ----

/// 200 idle connections from the prober's own address and 300 from 300 others hold the
/// status port, each reopened as soon as it is closed; `/ready` still answers 10 of 10
/// probes within 1 s each, and `/status` and `steer status` still work.
#[test]
fn one_address_holds_at_most_16_status_connections_and_others_keep_theirs() {
    // Past its cap of 16, an address's oldest idle connections (those past their grace)
    // give way to its new ones; another address's connections are not touched.
    let _quiet = quiet();
    let cluster = Cluster::start(&["--workers", "1", "--balance", "kernel"]);
    let status = cluster.status_addr();
    let (greedy, bystander) = (client_ip(700), client_ip(701));
    let open = |ip: IpAddr, n: usize| -> Vec<TcpStream> {
        (0..n)
            .map(|_| connect_from(Some(ip), status, None, Duration::from_secs(1)).expect("connect"))
            .collect()
    };
    let closed = |streams: &mut [TcpStream]| -> usize {
        let mut byte = [0u8; 1];
        streams
            .iter_mut()
            .filter(|s| match (&**s).read(&mut byte) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != ErrorKind::WouldBlock,
            })
            .count()
    };
    let mut others = open(bystander, 10);
    let mut first = open(greedy, 16);
    // Past the grace (250 ms), well within the header timeout (2 s).
    thread::sleep(Duration::from_millis(500));
    assert_eq!(closed(&mut first), 0, "16 from one address are allowed");
    let mut more = open(greedy, 4);
    thread::sleep(Duration::from_millis(300));
    let (pushed_out, fresh, untouched) =
        (closed(&mut first), closed(&mut more), closed(&mut others));
    println!(
        "status port, one address opening 20: {pushed_out} of its first 16 closed, {fresh} \
         of its 4 new; {untouched} of another address's 10"
    );
    assert_eq!(pushed_out, 4, "the 4 oldest of the address give way");
    assert_eq!(fresh, 0, "the new ones are in");
    assert_eq!(untouched, 0, "another address keeps its connections");
    let answer = exchange(
        status,
        b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(1),
    )
    .expect("/ready");
    assert!(split(&answer).0.starts_with("HTTP/1.1 200"), "{answer:?}");
}

#[test]
fn ready_answers_every_probe_while_idle_clients_hold_the_status_port() {
    let _quiet = quiet();
    raise_nofile(4096);
    let cluster = Cluster::start(&["--workers", "1", "--balance", "kernel"]);
    let addr = cluster.status_addr();
    let mut sources: Vec<Option<IpAddr>> = vec![None; 200];
    sources.extend((0..300).map(|n| Some(client_ip(n))));
    let horde = Horde::hold(addr, sources, b"");
    horde.wait_open(400, Duration::from_secs(20));

    let mut latencies = Vec::new();
    for probe in 0..10 {
        let started = Instant::now();
        let answer = exchange(
            addr,
            b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n",
            Duration::from_secs(1),
        );
        let took = started.elapsed();
        let reply = answer.unwrap_or_else(|e| {
            panic!(
                "probe {probe}: {e} after {took:?}; {} attacking connections opened\n{}",
                horde.connects(),
                cluster.log()
            )
        });
        let (head, body) = split(&reply);
        assert!(head.starts_with("HTTP/1.1 200 OK"), "probe {probe}: {head}");
        assert!(
            body.starts_with(b"ready (1 of 1 workers ready"),
            "probe {probe}"
        );
        assert!(took < Duration::from_secs(1), "probe {probe} took {took:?}");
        latencies.push(took);
        thread::sleep(Duration::from_millis(100));
    }
    let status = exchange(
        addr,
        b"GET /status HTTP/1.1\r\n\r\n",
        Duration::from_secs(3),
    )
    .expect("/status during the attack");
    assert!(split(&status).0.starts_with("HTTP/1.1 200 OK"));
    let table = Command::new(steer_bin())
        .args(["status", "--status", &addr.to_string()])
        .output()
        .expect("steer status runs");
    assert!(table.status.success(), "{table:?}");
    println!(
        "/ready under {} attacking connections ({} opened so far): 10/10, slowest {:?}",
        horde.open.load(Ordering::Relaxed),
        horde.connects(),
        percentile(&mut latencies, 100)
    );
    drop(horde);
    // The primary kept supervising meanwhile: nothing was declared hung or restarted.
    let doc = cluster.status();
    assert_eq!(status::worker(&doc, 0).generation, 1, "{doc:#}");
    assert!(!cluster.log().contains("hung"), "{}", cluster.log());
}

// ---- timeouts ----

/// A client that sends nothing, half a head, stops a body, idles after a response or never
/// reads its responses is closed once its timeout has passed, not before; the status port
/// closes a silent client after its 2 s head timeout. The defaults are at most 60 s.
#[test]
fn silent_and_slow_clients_are_closed_within_the_timeouts() {
    let _quiet = quiet();
    let check = Command::new(steer_bin())
        .args(["check"])
        .output()
        .expect("steer check runs");
    let summary = String::from_utf8_lossy(&check.stdout);
    for key in [
        "demo-header-timeout = \"10s\"",
        "demo-idle-timeout = \"30s\"",
        "demo-body-timeout = \"30s\"",
        "demo-send-timeout = \"30s\"",
    ] {
        assert!(summary.contains(key), "{key} missing from:\n{summary}");
    }

    let cluster = Cluster::start(&[
        "--workers",
        "1",
        "--balance",
        "kernel",
        "--demo-header-timeout",
        "1s",
        "--demo-idle-timeout",
        "2s",
        "--demo-body-timeout",
        "1s",
        "--demo-send-timeout",
        "1s",
    ]);
    let listen = cluster.listen_addr();
    let status = cluster.status_addr();
    let open = |to: SocketAddr| {
        let stream = TcpStream::connect(to).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
    };
    let within = |what: &str, took: Option<Duration>, low: f64, high: f64| {
        let took = took.unwrap_or_else(|| panic!("{what}: still open"));
        assert!(
            took >= Duration::from_secs_f64(low) && took <= Duration::from_secs_f64(high),
            "{what}: closed after {took:?}, expected {low}..{high} s"
        );
        println!("{what}: closed after {took:?}");
    };
    thread::scope(|scope| {
        scope.spawn(|| {
            let mut silent = open(listen);
            within(
                "silent",
                time_until_closed(&mut silent, Duration::from_secs(5)),
                0.9,
                1.6,
            );
        });
        scope.spawn(|| {
            let mut slow = open(listen);
            let started = Instant::now();
            for byte in b"GET / HTTP/1.1\r\nHost: dribble" {
                if slow.write_all(&[*byte]).is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
                if started.elapsed() > Duration::from_millis(700) {
                    break;
                }
            }
            let rest = time_until_closed(&mut slow, Duration::from_secs(5));
            within(
                "half a head",
                rest.map(|r| r + Duration::from_millis(700)),
                0.9,
                1.7,
            );
        });
        scope.spawn(|| {
            let mut body = open(listen);
            body.write_all(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nab")
                .expect("write");
            within(
                "stopped body",
                time_until_closed(&mut body, Duration::from_secs(5)),
                0.9,
                1.6,
            );
        });
        scope.spawn(|| {
            let mut idle = open(listen);
            idle.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
            let mut reply = [0u8; 512];
            let n = idle.read(&mut reply).expect("a response");
            assert!(reply[..n].starts_with(b"HTTP/1.1 200 OK"));
            within(
                "idle keep-alive",
                time_until_closed(&mut idle, Duration::from_secs(5)),
                1.9,
                2.7,
            );
        });
        scope.spawn(|| {
            // Pipelines far more than its tiny receive buffer holds and never reads: the
            // worker's output stalls, and the send timeout drops the connection.
            let mut deaf =
                connect_from(None, listen, Some(4096), Duration::from_secs(1)).expect("connect");
            let started = Instant::now();
            let request = b"GET / HTTP/1.1\r\n\r\n".repeat(64);
            let closed = loop {
                match deaf.write(&request) {
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => break Some(started.elapsed()),
                }
                if started.elapsed() > Duration::from_secs(5) {
                    break None;
                }
                thread::sleep(Duration::from_millis(5));
            };
            within("never reads", closed, 0.9, 2.5);
        });
        scope.spawn(|| {
            let mut silent = open(status);
            within(
                "silent on the status port",
                time_until_closed(&mut silent, Duration::from_secs(5)),
                1.9,
                2.7,
            );
        });
    });
}

// ---- descriptors ----

/// Two workers of 1,024 descriptors each and 2,500 idle connections held (reopened when
/// closed): at least 19 of 20 new clients are served within 2 s, and no worker logs a flood
/// of accept failures.
#[test]
fn idle_clients_cannot_take_every_descriptor() {
    let _quiet = quiet();
    raise_nofile(8192);
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "kernel",
        "--worker-nofile",
        "1024",
    ]);
    let listen = cluster.listen_addr();
    let workers = cluster.worker_pid_list();
    let sources = (0..2500).map(|n| Some(client_ip(n % 50))).collect();
    let horde = Horde::hold(listen, sources, b"");
    // Both workers at their cap, the rest of the horde queued or reconnecting.
    wait_for("both workers full", Duration::from_secs(30), || {
        workers.iter().all(|&pid| fd_count(pid) > 900)
    });
    // Past its cap a worker lets its longest-idle connections go, and the horde opens new
    // ones: wait until that churn is well under way.
    wait_for(
        "workers shedding and the horde reconnecting",
        Duration::from_secs(30),
        || horde.connects() >= 4000,
    );
    horde.wait_open(2500, Duration::from_secs(30));
    let mut served = 0;
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let answer = http_get_timeout(listen, "/", Duration::from_secs(2));
        let took = started.elapsed();
        if answer.is_ok_and(|r| r.status == 200) && took <= Duration::from_secs(2) {
            served += 1;
        }
        latencies.push(took);
        thread::sleep(Duration::from_millis(50));
    }
    let fds: Vec<usize> = workers.iter().map(|&pid| fd_count(pid)).collect();
    println!(
        "{served}/20 new clients served; slowest {:?}; worker fds {fds:?}; {} attacking \
         connections opened",
        percentile(&mut latencies, 100),
        horde.connects()
    );
    drop(horde);
    assert!(
        served >= 19,
        "only {served} of 20 new clients served within 2 s"
    );
    let log = cluster.log();
    let failures = log.matches("accept failed").count();
    assert!(failures <= 2, "{failures} accept failures logged:\n{log}");
}

// ---- pipelining ----

/// 400 connections with a 4 KiB receive buffer pipeline GETs and never read. A normal
/// client's p99 stays at or under 100 ms and no worker is declared hung.
#[test]
fn non_reading_pipeliners_do_not_stall_the_workers() {
    let _quiet = quiet();
    raise_nofile(4096);
    let cluster = Cluster::start(&[
        "--workers",
        "2",
        "--balance",
        "kernel",
        "--health-interval",
        "250ms",
        "--health-timeout",
        "1s",
    ]);
    let listen = cluster.listen_addr();
    let before = cluster.worker_pids();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flood = thread::spawn({
        let (stop, sent) = (stop.clone(), sent.clone());
        move || {
            let started = Instant::now();
            let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(256);
            let mut deaf: Vec<TcpStream> = (0..400)
                .filter_map(|n| {
                    connect_from(
                        Some(client_ip(n)),
                        listen,
                        Some(4096),
                        Duration::from_secs(1),
                    )
                    .ok()
                })
                .collect();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < ATTACK_LIMIT {
                for stream in &mut deaf {
                    while let Ok(n) = stream.write(&request) {
                        sent.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
            deaf.len()
        }
    });
    wait_for("the flood under way", Duration::from_secs(20), || {
        sent.load(Ordering::Relaxed) > 400 * 16 * 1024
    });
    let mut latencies = Vec::new();
    let started = Instant::now();
    while latencies.len() < 300 && started.elapsed() < Duration::from_secs(20) {
        let asked = Instant::now();
        let answer = http_get_timeout(listen, "/", Duration::from_secs(5));
        assert!(
            answer.as_ref().is_ok_and(|r| r.status == 200),
            "a normal client failed: {answer:?}"
        );
        latencies.push(asked.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let pipeliners = flood.join().expect("flood thread");
    let p50 = percentile(&mut latencies, 50);
    let p99 = percentile(&mut latencies, 99);
    println!(
        "{} requests beside {pipeliners} pipeliners ({} MiB sent): p50 {p50:?}, p99 {p99:?}",
        latencies.len(),
        sent.load(Ordering::Relaxed) >> 20
    );
    assert_eq!(pipeliners, 400);
    assert!(p99 <= Duration::from_millis(100), "p99 {p99:?}");
    let doc = cluster.status();
    assert_eq!(
        status::worker_pids(&doc),
        before,
        "a worker was replaced: {doc:#}"
    );
    assert!(!cluster.log().contains("hung"), "{}", cluster.log());
}

// ---- /sleep ----

/// 1,000 clients ask for a 60 s `/sleep` and hang up; within 1 s the worker holds their
/// descriptors no more.
#[test]
fn closed_sleepers_are_freed_at_once() {
    let _quiet = quiet();
    raise_nofile(4096);
    let cluster = Cluster::start(&[
        "--workers",
        "1",
        "--balance",
        "kernel",
        "--worker-nofile",
        "4096",
    ]);
    let listen = cluster.listen_addr();
    let worker = cluster.worker_pid_list()[0];
    let baseline = fd_count(worker);
    let sleepers: Vec<TcpStream> = (0..1000)
        .map(|n| {
            let mut stream = connect_from(
                Some(client_ip(n % 100)),
                listen,
                None,
                Duration::from_secs(2),
            )
            .expect("connect");
            stream
                .write_all(b"GET /sleep?ms=60000 HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("send");
            stream
        })
        .collect();
    wait_for("every sleeper accepted", Duration::from_secs(20), || {
        fd_count(worker) >= baseline + 1000
    });
    let hung_up = Instant::now();
    drop(sleepers);
    wait_for(
        "the sleepers' descriptors freed",
        Duration::from_secs(1),
        || fd_count(worker) <= baseline + 10,
    );
    println!("1000 closed sleepers freed in {:?}", hung_up.elapsed());
    // The worker still serves.
    let hello = http_get_timeout(listen, "/", Duration::from_secs(2)).expect("served");
    assert_eq!(hello.status, 200);
}

// ---- steer status and steer top ----

/// What a server that is not a status listener may send.
#[derive(Clone, Copy, Debug)]
enum Endless {
    /// Header bytes, never a blank line.
    Head,
    /// A head without a length, then body bytes forever.
    Body,
    /// One byte every 100 ms.
    Trickle,
}

/// Serves `kind` to every connection until the client goes away or [`ATTACK_LIMIT`].
fn endless_server(kind: Endless) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let thread = thread::spawn(move || {
        listener.set_nonblocking(true).expect("nonblocking");
        let started = Instant::now();
        let mut conns = Vec::new();
        while started.elapsed() < ATTACK_LIMIT {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).expect("blocking");
                    stream
                        .set_write_timeout(Some(Duration::from_secs(1)))
                        .expect("timeout");
                    conns.push(thread::spawn(move || feed(stream, kind, started)));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if conns.iter().any(JoinHandle::is_finished) {
                        return;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
    });
    (addr, thread)
}

fn feed(mut stream: TcpStream, kind: Endless, started: Instant) {
    let head: &[u8] = match kind {
        Endless::Head => b"HTTP/1.1 200 OK\r\nX-Endless: ",
        Endless::Body | Endless::Trickle => b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n",
    };
    if stream.write_all(head).is_err() {
        return;
    }
    let chunk = [b'a'; 64 * 1024];
    while started.elapsed() < ATTACK_LIMIT {
        let sent = match kind {
            Endless::Trickle => {
                thread::sleep(Duration::from_millis(100));
                stream.write_all(b"a")
            }
            Endless::Head | Endless::Body => stream.write_all(&chunk),
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Runs `steer ARGS` to its exit and returns (exit code, stderr, wall time, peak RSS).
/// Killed after 20 s.
///
/// The peak is `VmHWM` read at the process's exit stop (`ptrace` with
/// `PTRACE_O_TRACEEXIT`), when its memory is still there: `wait4`'s `ru_maxrss` would
/// count the test process too, whose memory the child shares until it calls `execve`.
fn run_measured(args: &[&str]) -> (Option<i32>, String, Duration, u64) {
    let started = Instant::now();
    #[expect(
        clippy::zombie_processes,
        reason = "reaped by waitpid below, which traces it to its exit"
    )]
    let mut child = Command::new(steer_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn steer");
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: PTRACE_SEIZE of our own child takes no pointers; the options are a flag word.
    let seized = unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            libc::PTRACE_O_TRACEEXIT as usize as *mut libc::c_void,
        )
    };
    assert_eq!(seized, 0, "PTRACE_SEIZE: {}", io::Error::last_os_error());
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let done = Arc::new(AtomicBool::new(false));
    let killer = thread::spawn({
        let done = done.clone();
        move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
                if done.load(Ordering::Relaxed) {
                    return;
                }
            }
            // SAFETY: our child, not reaped until the main thread sees it exit.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut peak = 0;
    let code = loop {
        let mut wstatus = 0;
        // SAFETY: a valid out-pointer; `pid` is our traced child.
        let waited = unsafe { libc::waitpid(pid, &mut wstatus, libc::__WALL) };
        assert_eq!(waited, pid, "waitpid: {}", io::Error::last_os_error());
        if libc::WIFEXITED(wstatus) {
            break Some(libc::WEXITSTATUS(wstatus));
        }
        if libc::WIFSIGNALED(wstatus) {
            break None;
        }
        let event = (wstatus >> 16) & 0xff;
        if event == libc::PTRACE_EVENT_EXIT {
            peak = vm_hwm(child.id());
        }
        // A signal stop passes the signal on; event stops resume with none.
        let signal = if event == 0 {
            libc::WSTOPSIG(wstatus)
        } else {
            0
        };
        // SAFETY: resumes our stopped tracee; the signal travels in the data argument.
        unsafe {
            libc::ptrace(
                libc::PTRACE_CONT,
                pid,
                std::ptr::null_mut::<libc::c_void>(),
                signal as usize as *mut libc::c_void,
            )
        };
    };
    let took = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let _ = killer.join();
    (code, reader.join().unwrap_or_default(), took, peak)
}

/// `VmHWM` (peak resident memory) of `pid`, in bytes.
fn vm_hwm(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Pointed at servers that stream bytes forever, `steer status` and `steer top` exit 1
/// within 10 s with a message saying which limit was hit, and stay under 20 MiB.
#[test]
fn steer_status_and_top_give_up_on_an_endless_reply() {
    let _quiet = quiet();
    let cases = [
        (
            Endless::Head,
            "status",
            "no end of the head in its first 64 KiB",
        ),
        (Endless::Body, "status", "larger than 4 MiB"),
        (Endless::Trickle, "status", "no complete answer within 5 s"),
        (Endless::Body, "top", "larger than 4 MiB"),
    ];
    let results: Vec<_> = thread::scope(|scope| {
        let runs: Vec<_> = cases
            .iter()
            .map(|&(kind, command, _)| {
                scope.spawn(move || {
                    let (addr, server) = endless_server(kind);
                    let addr = addr.to_string();
                    let run = run_measured(&[command, "--status", &addr]);
                    let _ = server.join();
                    run
                })
            })
            .collect();
        runs.into_iter()
            .map(|run| run.join().expect("run"))
            .collect()
    });
    for ((kind, command, message), (code, stderr, took, rss)) in cases.iter().zip(results) {
        println!(
            "steer {command} against {kind:?}: exit {code:?} after {took:?}, peak RSS {} KiB",
            rss >> 10
        );
        assert_eq!(code, Some(1), "{command} {kind:?}: {stderr}");
        assert!(
            took < Duration::from_secs(10),
            "{command} {kind:?}: {took:?}"
        );
        assert!(
            rss > 0,
            "{command} {kind:?}: no VmHWM was read at its exit (the peak is unmeasured)"
        );
        assert!(
            rss < 20 << 20,
            "{command} {kind:?}: peak RSS {} KiB",
            rss >> 10
        );
        assert!(stderr.contains(message), "{command} {kind:?}: {stderr}");
        assert!(
            stderr.contains("is --status the address of a steer status listener"),
            "{stderr}"
        );
    }
}

// ---- protocol ----

/// HEAD gets the head of the GET answer and no body; any method but GET and HEAD gets 405
/// with `Allow`, whatever its body, on the status port and on the demo.
#[test]
fn head_has_no_body_and_other_methods_are_405() {
    let cluster = Cluster::start(&["--workers", "1", "--balance", "kernel"]);
    let status_addr = cluster.status_addr();
    let limit = Duration::from_secs(3);
    for path in ["/status", "/metrics", "/ready", "/nope"] {
        let get = exchange(
            status_addr,
            format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes(),
            limit,
        )
        .expect("GET");
        let head = exchange(
            status_addr,
            format!("HEAD {path} HTTP/1.1\r\n\r\n").as_bytes(),
            limit,
        )
        .expect("HEAD");
        let (get_head, get_body) = split(&get);
        let (head_head, head_body) = split(&head);
        assert!(head_body.is_empty(), "HEAD {path} sent a body: {head_head}");
        assert_eq!(
            get_head.lines().next(),
            head_head.lines().next(),
            "HEAD {path} answers as GET does"
        );
        let announced = content_length(&head_head).expect("HEAD announces the length");
        assert!(announced > 0, "HEAD {path}: {head_head}");
        if path != "/status" && path != "/metrics" {
            assert_eq!(announced, get_body.len(), "{path}");
        }
    }
    let mut big = b"POST /status HTTP/1.1\r\nContent-Length: 100000\r\n\r\n".to_vec();
    big.resize(big.len() + 100_000, b'x');
    for request in [
        big,
        b"PUT /ready HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
        b"DELETE /status HTTP/1.1\r\n\r\n".to_vec(),
        b"OPTIONS * HTTP/1.1\r\n\r\n".to_vec(),
    ] {
        let reply = exchange(status_addr, &request, limit).expect("an answer");
        let (head, _) = split(&reply);
        assert!(
            head.starts_with("HTTP/1.1 405 Method Not Allowed"),
            "{head}"
        );
        assert!(head.contains("Allow: GET, HEAD"), "{head}");
    }

    let listen = cluster.listen_addr();
    let head = exchange(
        listen,
        b"HEAD / HTTP/1.1\r\nConnection: close\r\n\r\n",
        limit,
    )
    .expect("HEAD /");
    let (head_head, head_body) = split(&head);
    assert!(head_head.starts_with("HTTP/1.1 200 OK"), "{head_head}");
    assert!(head_body.is_empty() && content_length(&head_head).is_some_and(|n| n > 0));
    let mut post = TcpStream::connect(listen).expect("connect");
    post.set_read_timeout(Some(limit)).expect("timeout");
    post.write_all(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut replies = Vec::new();
    let _ = post.read_to_end(&mut replies);
    let text = String::from_utf8_lossy(&replies);
    assert!(
        text.starts_with("HTTP/1.1 405 Method Not Allowed"),
        "{text}"
    );
    assert!(text.contains("Allow: GET, HEAD"), "{text}");
    assert!(
        text.contains("HTTP/1.1 200 OK"),
        "the connection stays usable: {text}"
    );
    let _ = post.shutdown(Shutdown::Both);
}

// ---- EMFILE ----

/// Counts `accept failed` lines logged since `from` bytes of the log.
fn accept_failures(cluster: &Cluster, from: usize) -> usize {
    cluster.log()[from..].matches("accept failed").count()
}

/// Out of descriptors, a demo worker and the `userspace` baseline's primary pause accepting
/// and warn once, instead of retrying at once: little CPU, at most one warning in 2 s, and
/// the queued clients are served once descriptors are free again.
#[test]
fn out_of_descriptors_accepting_pauses_instead_of_spinning() {
    let _quiet = quiet();
    for (balance, who) in [("kernel", "worker"), ("userspace", "primary")] {
        let cluster = Cluster::start(&["--workers", "1", "--balance", balance]);
        let listen = cluster.listen_addr();
        let pid = match who {
            "worker" => cluster.worker_pid_list()[0],
            _ => cluster.pid(),
        };
        let nofile = set_process_nofile(pid, lowest_free_fd(pid));
        let log_from = cluster.log().len();
        let cpu_time = |pid| footprint::sample(pid).map(|tree| tree.root_cpu());
        let cpu_before = cpu_time(pid).expect("cpu time");
        let started = Instant::now();
        let clients: Vec<_> = (0..4)
            .map(|_| thread::spawn(move || http_get_timeout(listen, "/", Duration::from_secs(10))))
            .collect();
        thread::sleep(Duration::from_secs(2));
        let cpu = cpu_time(pid).expect("cpu time") - cpu_before;
        let warnings = accept_failures(&cluster, log_from);
        let elapsed = started.elapsed();
        let served_early = clients.iter().filter(|c| c.is_finished()).count();
        set_process_nofile(pid, nofile);
        assert_eq!(
            served_early, 0,
            "{balance}: the {who} had no descriptor left, yet {served_early} client(s) were done"
        );
        for client in clients {
            let answer = client.join().expect("client thread");
            assert!(
                answer.as_ref().is_ok_and(|r| r.status == 200),
                "{balance}: {answer:?}"
            );
        }
        println!(
            "{balance}: the {who} used {cpu:?} of CPU in {elapsed:?} out of descriptors, {warnings} warning(s)"
        );
        assert!(
            cpu < Duration::from_millis(200),
            "{balance}: the {who} spun: {cpu:?}"
        );
        assert_eq!(
            warnings,
            1,
            "{balance}: accept ran out of descriptors: one warning per interval, not one per \
             failure:\n{}",
            cluster.log()
        );
    }
}
