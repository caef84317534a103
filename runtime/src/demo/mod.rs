//! The built-in demo app: what a worker serves when steer is started without a COMMAND.
//!
//! It exists to show and test steer itself (which worker answered, what a rolling restart
//! or a drain does to open connections, how a hung, crashing or leaking worker is handled),
//! not to be a web server. Each worker answers plain-text HTTP/1.1 with keep-alive and
//! pipelining on its own `SO_REUSEPORT` listener, from one single-threaded `mio` loop:
//!
//! - `GET /` -> `hello from worker <slot> (pid <pid>)`
//! - `GET /sleep?ms=N` -> `slept N ms`, after N ms (at most 600 000), without holding up
//!   other connections;
//! - with `--demo-faults` only: `GET /block?ms=N` stalls the whole loop (a hung worker: pings
//!   go unanswered too), `GET /crash` exits with status 1 without answering, and
//!   `GET /alloc?mb=N` grows resident memory by N MiB for good.
//!
//! Every response carries `Content-Length`, `Content-Type: text/plain; charset=utf-8` and
//! `X-Steer-Worker: <slot>`. Unknown paths are 404, methods other than GET and HEAD 405, bad
//! query values 400; malformed requests (400), oversized heads (431) or bodies (413) and
//! chunked bodies (501) are answered and the connection closed.
//!
//! The same loop answers the primary: `ping` with `pong` and the worker's counters, `drain`
//! by accepting what is queued, closing the listener and idle connections, finishing the
//! requests in progress with `Connection: close`, and returning once no connection is left.
//! If the primary goes away the worker exits at once.

mod admission;
mod connection;
mod faults;
pub(crate) mod http;
#[cfg(feature = "quic")]
pub(crate) mod quic;
mod responder;
mod routes;
mod server;
mod timeouts;

pub(crate) use server::SEND_BUFFER;
pub(crate) use timeouts::ENV as TIMEOUTS_ENV;
pub use timeouts::Timeouts;

use std::process::ExitCode;

use crate::ipc::Channel;

/// Identity and options of the demo worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoOptions {
    /// The worker's slot, reported in `X-Steer-Worker` and the `/` body.
    pub slot: usize,
    /// The slot's generation (how many times it was (re)started), for the logs.
    pub generation: u64,
    /// Serve the fault routes (`/block`, `/crash`, `/alloc`): `--demo-faults`.
    pub faults: bool,
    /// How long a client may keep the worker waiting (`--demo-header-timeout` and the like).
    pub timeouts: Timeouts,
}

/// The environment variable and value that hand `config`'s demo timeouts to a worker.
pub(crate) fn timeouts_env(config: &crate::config::Config) -> (&'static str, String) {
    (timeouts::ENV, Timeouts::from_config(config).to_env())
}

/// The environment variables that hand `--tls-cert` and `--tls-key` to a demo worker.
pub(crate) fn tls_env(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> [(std::ffi::OsString, std::ffi::OsString); 2] {
    [
        (ENV_TLS_CERT.into(), cert.as_os_str().to_owned()),
        (ENV_TLS_KEY.into(), key.as_os_str().to_owned()),
    ]
}

/// `--tls-cert`'s path, for a demo worker.
pub(crate) const ENV_TLS_CERT: &str = "STEER_DEMO_TLS_CERT";
/// `--tls-key`'s path, for a demo worker.
pub(crate) const ENV_TLS_KEY: &str = "STEER_DEMO_TLS_KEY";

/// Serves HTTP on `listener` until drained or orphaned. The worker has already registered
/// the listener with the primary; `channel` is the IPC channel (blocking or not, set it as you need).
/// Without a listener (the `userspace` baseline) it serves the connections the primary
/// sends over `channel`.
///
/// Sends `ready` once the event loop is set up, and returns `Ok(())` after a `drain` once
/// every connection is closed, or when the primary closes the channel (nobody is left to
/// drain or supervise it). Errors are those of setting up or polling the event loop
/// (`epoll_create1`, `epoll_ctl`, `epoll_wait`, `fcntl`), and a channel that failed
/// otherwise. It never exits the process: a test may run it on a thread.
///
/// With `load` (under `least-loaded`), the worker publishes its accepted and open
/// connection counts there on every accept and close.
pub fn serve(
    sockets: Vec<crate::worker::ListenerSocket>,
    channel: Channel,
    options: DemoOptions,
    load: Option<crate::steering::LoadReporter>,
) -> std::io::Result<()> {
    server::Server::new(sockets, channel, options, load)?.run()
}

/// Runs the demo app if this process was started as a demo worker. Called first thing in
/// `steer`'s `main` (the command line picks the demo; the worker side knows nothing of it).
pub(crate) fn run_worker_if_requested() -> Option<ExitCode> {
    use crate::worker::env::{DEMO_FAULTS, ROLE, ROLE_DEMO};
    if std::env::var(ROLE).ok()? != ROLE_DEMO {
        return None;
    }
    crate::logging::init_from_env();
    let (env, sockets, channel, load) = match crate::worker::bootstrap() {
        Ok(parts) => parts,
        Err(message) => {
            tracing::error!("worker bootstrap failed: {message}");
            return Some(ExitCode::FAILURE);
        }
    };
    let options = DemoOptions {
        slot: env.slot,
        generation: env.generation,
        faults: std::env::var(DEMO_FAULTS).as_deref() == Ok("1"),
        timeouts: Timeouts::from_process_env(),
    };
    let (quic, sockets) = split_quic(&env.listeners, sockets);
    let served = if quic.is_empty() {
        serve(sockets, channel, options, load)
    } else {
        serve_with_quic(sockets, quic, channel, options, load)
    };
    Some(match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(slot = env.slot, "demo worker failed: {err}");
            ExitCode::FAILURE
        }
    })
}

/// The QUIC listeners' sockets, apart from the rest (in order).
fn split_quic(
    listeners: &[crate::config::Listener],
    sockets: Vec<crate::worker::ListenerSocket>,
) -> (Vec<std::net::UdpSocket>, Vec<crate::worker::ListenerSocket>) {
    use crate::config::Protocol;
    use crate::worker::ListenerSocket;
    let mut quic = Vec::new();
    let mut rest = Vec::new();
    for (listener, socket) in listeners.iter().zip(sockets) {
        match socket {
            ListenerSocket::Udp(udp) if listener.protocol == Protocol::Quic => quic.push(udp),
            other => rest.push(other),
        }
    }
    (quic, rest)
}

/// [`serve`], with HTTP/3 on the QUIC listeners' sockets.
#[cfg(feature = "quic")]
fn serve_with_quic(
    sockets: Vec<crate::worker::ListenerSocket>,
    quic: Vec<std::net::UdpSocket>,
    channel: Channel,
    options: DemoOptions,
    load: Option<crate::steering::LoadReporter>,
) -> std::io::Result<()> {
    let setup = quic::QuicSetup::from_env(options.slot, options.timeouts.shutdown)
        .map_err(std::io::Error::other)?;
    server::Server::new(sockets, channel, options, load)?
        .with_quic(quic, setup)?
        .run()
}

/// Without the `quic` feature, a QUIC listener cannot be served (`steer check` says so
/// before any worker starts).
#[cfg(not(feature = "quic"))]
fn serve_with_quic(
    _sockets: Vec<crate::worker::ListenerSocket>,
    _quic: Vec<std::net::UdpSocket>,
    _channel: Channel,
    _options: DemoOptions,
    _load: Option<crate::steering::LoadReporter>,
) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "this steer was built without the quic feature: the demo cannot serve quic:// listeners",
    ))
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::thread::{self, JoinHandle};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::ipc::Message;

    const PATIENCE: Duration = Duration::from_secs(5);

    /// A worker under test: `serve` on a thread, and the primary's end of its channel (when
    /// it closes, the worker's loop ends, as it does when its primary is gone).
    struct Worker {
        addr: SocketAddr,
        primary: Channel,
        thread: JoinHandle<std::io::Result<()>>,
    }

    impl Worker {
        fn start(slot: usize, faults: bool) -> Worker {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let (primary, worker_end) = Channel::pair().expect("socketpair");
            primary.set_nonblocking(true).expect("nonblocking");
            let options = DemoOptions {
                slot,
                generation: 1,
                faults,
                timeouts: Timeouts::default(),
            };
            let thread = thread::spawn(move || {
                serve(
                    vec![crate::worker::ListenerSocket::Tcp(listener)],
                    worker_end,
                    options,
                    None,
                )
            });
            let worker = Worker {
                addr,
                primary,
                thread,
            };
            assert_eq!(
                worker.next_message(),
                Message::Ready { heartbeats: true },
                "the worker announces itself first, declaring its heartbeats"
            );
            worker
        }

        fn next_message(&self) -> Message {
            let deadline = Instant::now() + PATIENCE;
            loop {
                if let Some(received) = self.primary.recv().expect("recv from worker") {
                    return received.message;
                }
                assert!(Instant::now() < deadline, "no IPC message from the worker");
                thread::sleep(Duration::from_millis(2));
            }
        }

        fn ping(&self, seq: u64) -> crate::ipc::Counters {
            self.primary
                .send(&Message::Ping { seq })
                .expect("send ping");
            match self.next_message() {
                Message::Pong { seq: got, counters } if got == seq => counters,
                other => panic!("expected pong {seq}, got {other:?}"),
            }
        }

        fn connect(&self) -> Client {
            Client::connect(self.addr)
        }

        fn drain_and_join(self, before_close: impl FnOnce(&Worker)) {
            self.primary.send(&Message::Drain).expect("send drain");
            before_close(&self);
            let deadline = Instant::now() + PATIENCE;
            while !self.thread.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "serve did not return after the drain"
                );
                thread::sleep(Duration::from_millis(5));
            }
            self.thread
                .join()
                .expect("serve panicked")
                .expect("serve failed");
            let refused = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
            assert!(refused.is_err(), "the listener is closed after a drain");
        }
    }

    /// A blocking HTTP client that keeps what it read past the current response.
    struct Client {
        stream: TcpStream,
        pending: Vec<u8>,
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }
    }

    impl Client {
        fn connect(addr: SocketAddr) -> Client {
            let stream = TcpStream::connect(addr).expect("connect");
            stream
                .set_read_timeout(Some(PATIENCE))
                .expect("read timeout");
            Client {
                stream,
                pending: Vec::new(),
            }
        }

        fn send(&mut self, request: &str) {
            self.stream
                .write_all(request.as_bytes())
                .expect("send request");
        }

        fn get(&mut self, target: &str) -> Reply {
            self.send(&format!("GET {target} HTTP/1.1\r\nHost: test\r\n\r\n"));
            self.reply()
        }

        fn reply(&mut self) -> Reply {
            loop {
                if let Some(reply) = self.parse_reply() {
                    return reply;
                }
                let mut chunk = [0u8; 4096];
                let len = self.stream.read(&mut chunk).expect("read response");
                assert!(
                    len > 0,
                    "connection closed before a full response: {:?}",
                    self.pending
                );
                self.pending.extend_from_slice(&chunk[..len]);
            }
        }

        fn parse_reply(&mut self) -> Option<Reply> {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut response = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(head_len) =
                response.parse(&self.pending).expect("valid response")
            else {
                return None;
            };
            let headers: Vec<(String, String)> = response
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let status = response.code.expect("status code");
            let body_len: usize = headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                .expect("every response has Content-Length")
                .1
                .parse()
                .expect("numeric Content-Length");
            if self.pending.len() < head_len + body_len {
                return None;
            }
            let body =
                String::from_utf8_lossy(&self.pending[head_len..head_len + body_len]).into_owned();
            self.pending.drain(..head_len + body_len);
            Some(Reply {
                status,
                headers,
                body,
            })
        }

        /// The server closed the connection (EOF or reset) with nothing more to read.
        fn closed_by_server(&mut self) -> bool {
            let mut chunk = [0u8; 64];
            self.pending.is_empty()
                && match self.stream.read(&mut chunk) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(error) => error.kind() == ErrorKind::ConnectionReset,
                }
        }
    }

    #[test]
    fn accepted_connections_inherit_tcp_nodelay_and_the_send_buffer_from_the_listener() {
        // The worker sets TCP_NODELAY once on its listener, not on each connection: what
        // the listener accepts inherits it, so keep-alive responses never wait for Nagle.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let watch = listener.try_clone().expect("dup of the listener");
        let (_primary, worker_end) = Channel::pair().expect("socketpair");
        let options = DemoOptions {
            slot: 0,
            generation: 1,
            faults: false,
            timeouts: Timeouts::default(),
        };
        let server = server::Server::new(
            vec![crate::worker::ListenerSocket::Tcp(listener)],
            worker_end,
            options,
            None,
        )
        .expect("a server over the listener");
        assert!(
            socket2::SockRef::from(&watch)
                .tcp_nodelay()
                .expect("getsockopt"),
            "the listener has TCP_NODELAY"
        );
        let _client = TcpStream::connect(watch.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = watch.accept().expect("the handshake is done: accept");
        assert!(
            socket2::SockRef::from(&accepted)
                .tcp_nodelay()
                .expect("getsockopt"),
            "an accepted socket inherits it"
        );
        // And the fixed send buffer (the kernel reports twice what was set), which
        // autotuning would otherwise grow for a client that never reads.
        let sndbuf = |s: &TcpStream| {
            socket2::SockRef::from(s)
                .send_buffer_size()
                .expect("getsockopt")
        };
        let listener_sndbuf = socket2::SockRef::from(&watch)
            .send_buffer_size()
            .expect("getsockopt");
        assert_eq!(
            listener_sndbuf,
            2 * SEND_BUFFER,
            "the listener has the fixed send buffer"
        );
        assert_eq!(
            sndbuf(&accepted),
            listener_sndbuf,
            "an accepted socket inherits it"
        );
        drop(server);
    }

    #[test]
    fn serves_http_answers_pings_and_drains() {
        let worker = Worker::start(3, false);

        let mut alice = worker.connect();
        let hello = alice.get("/");
        assert_eq!(hello.status, 200);
        assert_eq!(hello.header("X-Steer-Worker"), Some("3"));
        assert_eq!(
            hello.header("Content-Type"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(
            hello.body,
            format!("hello from worker 3 (pid {})\n", std::process::id())
        );
        assert_eq!(alice.get("/").status, 200, "the connection is kept alive");

        let counters = worker.ping(7);
        assert!(counters.requests >= 2, "{counters:?}");
        assert!(
            counters.accepted >= 1 && counters.active >= 1,
            "{counters:?}"
        );

        let mut mallory = worker.connect();
        mallory.send("\x01\x02 nonsense\r\n\r\n");
        let rejected = mallory.reply();
        assert_eq!(rejected.status, 400);
        assert_eq!(rejected.header("Connection"), Some("close"));
        assert!(
            mallory.closed_by_server(),
            "a malformed request closes the connection"
        );

        assert_eq!(
            alice.get("/crash").status,
            404,
            "fault routes are off by default"
        );
        assert_eq!(alice.get("/sleep?ms=soon").status, 400);

        alice.send("GET /sleep?ms=30 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(
            alice.reply().body,
            "slept 30 ms\n",
            "pipelined requests are answered in order"
        );
        assert!(alice.reply().body.starts_with("hello"));

        let mut sleeper = worker.connect();
        let started = Instant::now();
        sleeper.send("GET /sleep?ms=200 HTTP/1.1\r\n\r\n");
        let mut bob = worker.connect();
        assert_eq!(bob.get("/").status, 200);
        assert!(
            started.elapsed() < Duration::from_millis(150),
            "a sleep must not hold up others"
        );
        assert_eq!(sleeper.reply().body, "slept 200 ms\n");
        assert!(started.elapsed() >= Duration::from_millis(200));

        // Drain with one request in progress and idle keep-alive connections.
        sleeper.send("GET /sleep?ms=300 HTTP/1.1\r\n\r\n");
        thread::sleep(Duration::from_millis(50));
        worker.drain_and_join(|worker| {
            // An idle keep-alive connection is not closed under a client that may be
            // sending on it: its next request is answered, with `Connection: close`.
            let next = alice.get("/");
            assert_eq!(next.status, 200);
            assert_eq!(next.header("Connection"), Some("close"));
            assert!(alice.closed_by_server());
            assert!(
                worker.ping(8).active >= 1,
                "pings are answered while draining"
            );
            let last = sleeper.reply();
            assert_eq!((last.status, last.body.as_str()), (200, "slept 300 ms\n"));
            assert_eq!(last.header("Connection"), Some("close"));
            assert!(sleeper.closed_by_server());
            // One that stays idle is closed once the grace is over.
            let idle_since = Instant::now();
            assert!(
                bob.closed_by_server(),
                "idle connections close after the grace"
            );
            assert!(idle_since.elapsed() >= server::IDLE_GRACE / 2);
        });
    }

    #[test]
    fn pipelined_flood_is_answered_in_order_under_backpressure() {
        const REQUESTS: usize = 60_000;
        let worker = Worker::start(2, false);
        let mut client = worker.connect();
        let mut writer = client.stream.try_clone().expect("clone stream");
        // Far more responses than the worker buffers before it stops reading: it must resume
        // once the client catches up, without losing or reordering anything.
        let flood = thread::spawn(move || {
            let mut batch = String::new();
            for n in 0..REQUESTS {
                let target = if n % 2 == 0 { "/" } else { "/missing" };
                batch.push_str(&format!("GET {target} HTTP/1.1\r\n\r\n"));
            }
            writer.write_all(batch.as_bytes()).expect("write flood");
        });
        // Let the worker fill its output buffer while nobody reads.
        thread::sleep(Duration::from_millis(200));
        for n in 0..REQUESTS {
            let expected = if n % 2 == 0 { 200 } else { 404 };
            assert_eq!(client.reply().status, expected, "response {n}");
        }
        flood.join().expect("flood writer");

        let mut old = worker.connect();
        old.send("GET / HTTP/1.0\r\n\r\n");
        assert_eq!(old.reply().header("Connection"), Some("close"));
        assert!(old.closed_by_server(), "HTTP/1.0 closes without keep-alive");

        let mut big = worker.connect();
        big.send(&format!(
            "GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(9000)
        ));
        assert_eq!(big.reply().status, 431);
        assert!(big.closed_by_server());

        worker.drain_and_join(|_| assert!(client.closed_by_server()));
    }

    #[test]
    fn fault_routes_hang_the_loop_and_grow_memory() {
        let worker = Worker::start(1, true);
        let mut client = worker.connect();
        client.send("GET /block?ms=300 HTTP/1.1\r\n\r\n");
        thread::sleep(Duration::from_millis(50));
        let asked = Instant::now();
        worker.ping(1);
        assert!(
            asked.elapsed() >= Duration::from_millis(150),
            "a blocked loop answers no ping"
        );
        assert_eq!(client.reply().body, "blocked 300 ms\n");

        assert_eq!(client.get("/alloc?mb=1").body, "allocated 1 MiB\n");
        assert_eq!(client.get("/alloc?mb=lots").status, 400);
        client.send("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(
            client.reply().status,
            405,
            "the body is read and the connection kept"
        );
        assert_eq!(client.get("/").status, 200);

        worker.drain_and_join(|_| assert!(client.closed_by_server()));
    }
}
