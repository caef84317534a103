//! The status listener inside the primary's event loop: small, non-blocking, read-only.
//!
//! It answers `GET /status`, `GET /metrics` and `GET /ready` (200 while at least one
//! worker serves and the cluster is not stopping, else 503: for load balancers and
//! Kubernetes probes) and closes the connection. It exposes no action: any other method is
//! `405`, so nothing reachable on this port can stop, restart or reconfigure the cluster.
//! A bare `--status PORT` binds 127.0.0.1; another address is logged as reachable from
//! elsewhere. A slow or silent client only holds its own few-KiB buffer and is dropped after
//! [`CLIENT_TIMEOUT`].

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

/// Request heads larger than this are refused.
const MAX_REQUEST: usize = 8 * 1024;
/// At most this many status clients at once; more are closed at accept.
const MAX_CLIENTS: usize = 64;
/// A status client that has not sent a full request by then is dropped.
pub(crate) const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// First token used for status clients; the supervisor's own tokens are below it.
pub(crate) const CLIENT_TOKEN_BASE: usize = 1 << 40;

/// A response the supervisor builds for a request path.
pub(crate) struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

struct Client {
    stream: TcpStream,
    request: Vec<u8>,
    response: Vec<u8>,
    written: usize,
    since: Instant,
}

/// The status listener and its clients.
pub(crate) struct StatusServer {
    listener: TcpListener,
    clients: HashMap<Token, Client>,
    next_token: usize,
    /// No longer accepting ([`StatusServer::close`]).
    closed: bool,
}

impl StatusServer {
    /// Binds the listener (`SO_REUSEADDR`, no `SO_REUSEPORT`: one primary owns it).
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<StatusServer> {
        if !addr.ip().is_loopback() {
            tracing::warn!(
                "the status listener on {addr} is reachable from other hosts; it is read-only, \
                 but it shows pids and counters (use a loopback address to keep it local)"
            );
        }
        Ok(StatusServer {
            listener: TcpListener::bind(addr)?,
            clients: HashMap::new(),
            next_token: CLIENT_TOKEN_BASE,
            closed: false,
        })
    }

    /// Serves on a listener that is already bound and listening (handed down by the
    /// primary this one replaces, so the status address never refuses a connection).
    pub(crate) fn from_listener(listener: std::net::TcpListener) -> io::Result<StatusServer> {
        listener.set_nonblocking(true)?;
        Ok(StatusServer {
            listener: TcpListener::from_std(listener),
            clients: HashMap::new(),
            next_token: CLIENT_TOKEN_BASE,
            closed: false,
        })
    }

    /// The listening socket, to hand down to a successor.
    pub(crate) fn listener_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.listener.as_fd()
    }

    /// The bound address.
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Registers the listener under `token`.
    pub(crate) fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut self.listener, token, Interest::READABLE)
    }

    /// Stops accepting (a primary that handed over to its successor, which serves the same
    /// listening socket): clients already connected are still answered, and the socket
    /// itself stays open in the successor, so nobody is refused.
    pub(crate) fn close(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.listener);
        self.closed = true;
    }

    /// Accepts every pending client.
    pub(crate) fn accept(&mut self, registry: &Registry) {
        if self.closed {
            return;
        }
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.clients.len() >= MAX_CLIENTS {
                        continue;
                    }
                    let token = Token(self.next_token);
                    self.next_token += 1;
                    if registry
                        .register(&mut stream, token, Interest::READABLE)
                        .is_ok()
                    {
                        let client = Client {
                            stream,
                            request: Vec::new(),
                            response: Vec::new(),
                            written: 0,
                            since: Instant::now(),
                        };
                        self.clients.insert(token, client);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("status accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Progresses one client: reads its request, builds the reply with `respond`, writes.
    pub(crate) fn on_client_event(
        &mut self,
        registry: &Registry,
        token: Token,
        respond: impl FnOnce(&str) -> Reply,
    ) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        let done = match client.progress(registry, token, respond) {
            Ok(done) => done,
            Err(e) => {
                tracing::debug!("status client dropped: {e}");
                true
            }
        };
        if done && let Some(mut client) = self.clients.remove(&token) {
            let _ = registry.deregister(&mut client.stream);
        }
    }

    /// Drops clients that have been around too long.
    pub(crate) fn expire(&mut self, registry: &Registry, now: Instant) {
        self.clients.retain(|_, client| {
            let keep = now.saturating_duration_since(client.since) < CLIENT_TIMEOUT;
            if !keep {
                let _ = registry.deregister(&mut client.stream);
            }
            keep
        });
    }

    /// Whether any client is connected (the loop then wakes to expire them).
    pub(crate) fn has_clients(&self) -> bool {
        !self.clients.is_empty()
    }
}

impl Client {
    /// Returns true when the client is finished with (answered or gone).
    fn progress(
        &mut self,
        registry: &Registry,
        token: Token,
        respond: impl FnOnce(&str) -> Reply,
    ) -> io::Result<bool> {
        if self.response.is_empty() {
            let mut buf = [0u8; 2048];
            loop {
                match self.stream.read(&mut buf) {
                    Ok(0) => return Ok(true),
                    Ok(n) => {
                        self.request.extend_from_slice(&buf[..n]);
                        if self.request.len() > MAX_REQUEST {
                            self.response = encode(&Reply {
                                status: 431,
                                content_type: "text/plain",
                                body: "request too large\n".into(),
                            });
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            if self.response.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut request = httparse::Request::new(&mut headers);
                match request.parse(&self.request) {
                    Ok(httparse::Status::Partial) => return Ok(false),
                    Ok(httparse::Status::Complete(_)) => {
                        let reply = match (request.method, request.path) {
                            (Some("GET" | "HEAD"), Some(path)) => {
                                respond(path.split('?').next().unwrap_or(path))
                            }
                            _ => Reply {
                                status: 405,
                                content_type: "text/plain",
                                body: "read-only: only GET\n".into(),
                            },
                        };
                        self.response = encode(&reply);
                    }
                    Err(_) => {
                        self.response = encode(&Reply {
                            status: 400,
                            content_type: "text/plain",
                            body: "bad request\n".into(),
                        })
                    }
                }
            }
        }
        while self.written < self.response.len() {
            match self.stream.write(&self.response[self.written..]) {
                Ok(0) => return Ok(true),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    registry.reregister(&mut self.stream, token, Interest::WRITABLE)?;
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

fn encode(reply: &Reply) -> Vec<u8> {
    let reason = match reply.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reply.status,
        reply.content_type,
        reply.body.len()
    )
    .into_bytes();
    out.extend_from_slice(reply.body.as_bytes());
    out
}
