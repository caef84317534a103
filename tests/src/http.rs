//! A minimal blocking HTTP/1.1 client over `std::net::TcpStream`, enough to talk to the demo
//! app and the status endpoint: `GET` only, `Content-Length`, chunked and read-to-EOF bodies.
//!
//! The raw functions return `io::Result` so load loops can count failures; each error says
//! which step failed against which address. [`must_get`] is the panicking convenience.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Connect, read and write timeout of every request unless a function says otherwise.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a `Connection: close` request waits for the server to close after its response.
const FIN_WAIT: Duration = Duration::from_millis(250);
/// Longest status line or header line accepted.
const MAX_LINE: usize = 16 * 1024;
/// Most header lines accepted in one response.
const MAX_HEADERS: usize = 100;
/// Largest body accepted.
const MAX_BODY: u64 = 64 * 1024 * 1024;

/// The demo app's header naming the slot that served a request.
pub const WORKER_HEADER: &str = "X-Steer-Worker";

/// One HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Header fields in the order received, names as sent, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The body, decoded from chunked if need be (lossy UTF-8).
    pub body: String,
}

impl Response {
    /// The value of the first header called `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The slot from the demo app's `X-Steer-Worker` header, if present and numeric.
    pub fn worker(&self) -> Option<usize> {
        self.header(WORKER_HEADER)?.parse().ok()
    }

    /// Whether the server announced it closes the connection after this response
    /// (`Connection: close`).
    pub fn closes_connection(&self) -> bool {
        self.header_has_token("connection", "close")
    }

    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case(name))
            .flat_map(|(_, value)| value.split(','))
            .any(|item| item.trim().eq_ignore_ascii_case(token))
    }
}

/// Shows the status line, headers and body, for assertion messages.
impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "HTTP {}", self.status)?;
        for (name, value) in &self.headers {
            writeln!(f, "{name}: {value}")?;
        }
        write!(f, "\n{}", self.body)
    }
}

/// `GET path` on a new connection to `addr` with `Connection: close`, [`HTTP_TIMEOUT`] for
/// connect and each read and write.
///
/// # Errors
///
/// Connect failure (refused, timed out), a reset or EOF before the response is complete, a
/// read timeout, or a malformed response. The message names the step and the address.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    http_get_timeout(addr, path, HTTP_TIMEOUT)
}

/// [`http_get`] with another timeout, e.g. for a slow `/sleep?ms=N` request.
///
/// # Errors
///
/// As [`http_get`].
pub fn http_get_timeout(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Response> {
    one_shot(connect(None, addr, timeout)?, addr, path)
}

/// [`http_get`] from a chosen source address: the client socket is bound to
/// `local_ip:0` before `connect(2)`, e.g. `127.0.0.2` to look like another client to the
/// `hash` policy (all of 127.0.0.0/8 is loopback on Linux).
///
/// # Errors
///
/// As [`http_get`], plus a failed `bind(2)` (an address not on this host).
pub fn http_get_from(
    local_ip: impl Into<IpAddr>,
    addr: SocketAddr,
    path: &str,
) -> io::Result<Response> {
    one_shot(
        connect(Some(local_ip.into()), addr, HTTP_TIMEOUT)?,
        addr,
        path,
    )
}

/// [`http_get`] that panics on error, naming the address, path and error.
///
/// # Panics
///
/// On any error [`http_get`] returns. A non-200 status is not an error.
pub fn must_get(addr: SocketAddr, path: &str) -> Response {
    http_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path} failed: {e}"))
}

/// Sends one request with `Connection: close` and reads its response.
fn one_shot(stream: TcpStream, addr: SocketAddr, path: &str) -> io::Result<Response> {
    let mut reader = BufReader::new(stream);
    send_get(reader.get_mut(), addr, path, true)?;
    let (response, _) = read_response(&mut reader).map_err(|e| {
        context(
            e,
            format_args!("reading the response to GET {path} from {addr}"),
        )
    })?;
    // Wait (briefly: a server that ignores `Connection: close` must not slow every request
    // down) for the server's FIN so that the server closes first: the TIME_WAIT then lands
    // on the server side, and a long load loop cannot exhaust the client's ephemeral ports.
    let stream = reader.get_mut();
    if stream.set_read_timeout(Some(FIN_WAIT)).is_ok() {
        let mut sink = [0; 512];
        while let Ok(1..) = stream.read(&mut sink) {}
    }
    Ok(response)
}

/// A persistent HTTP/1.1 connection: each [`get`](KeepAlive::get) reuses it until the
/// server announces `Connection: close` or an error ends it.
#[derive(Debug)]
pub struct KeepAlive {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    open: bool,
    /// Path of a request sent and not yet answered.
    pending: Option<String>,
}

impl KeepAlive {
    /// Connects to `addr` (timeouts [`HTTP_TIMEOUT`]).
    ///
    /// # Errors
    ///
    /// If `connect(2)` fails or times out.
    pub fn connect(addr: SocketAddr) -> io::Result<KeepAlive> {
        Self::from_stream(connect(None, addr, HTTP_TIMEOUT)?, addr)
    }

    /// Connects to `addr` with `timeout` on the connect and on every read and write.
    ///
    /// # Errors
    ///
    /// If `connect(2)` fails or times out.
    pub fn connect_with_timeout(addr: SocketAddr, timeout: Duration) -> io::Result<KeepAlive> {
        Self::from_stream(connect(None, addr, timeout)?, addr)
    }

    /// Connects to `addr` from `local_ip` (see [`http_get_from`]).
    ///
    /// # Errors
    ///
    /// If `bind(2)` or `connect(2)` fails.
    pub fn connect_from(local_ip: impl Into<IpAddr>, addr: SocketAddr) -> io::Result<KeepAlive> {
        Self::from_stream(connect(Some(local_ip.into()), addr, HTTP_TIMEOUT)?, addr)
    }

    fn from_stream(stream: TcpStream, addr: SocketAddr) -> io::Result<KeepAlive> {
        Ok(KeepAlive {
            addr,
            reader: BufReader::new(stream),
            open: true,
            pending: None,
        })
    }

    /// `GET path` on this connection.
    ///
    /// # Errors
    ///
    /// `NotConnected` if the server announced `Connection: close` on an earlier response or
    /// an earlier request failed (see [`is_open`](KeepAlive::is_open)); otherwise write or
    /// read failures and malformed responses. A connection closed before any byte of the
    /// response is `UnexpectedEof`. After an error the connection is closed.
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        self.send_only(path)?;
        self.read_response()
    }

    /// Sends `GET path` without waiting for the answer (read it with
    /// [`read_response`](KeepAlive::read_response)): for requests that must be queued on
    /// the server side while something else happens.
    ///
    /// # Errors
    ///
    /// If the connection is closed or the write fails.
    pub fn send_only(&mut self, path: &str) -> io::Result<()> {
        if !self.open {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!(
                    "keep-alive connection to {} is closed (announced by the server or ended by \
                     an earlier error)",
                    self.addr
                ),
            ));
        }
        self.pending = Some(path.to_owned());
        send_get(self.reader.get_mut(), self.addr, path, false).inspect_err(|_| self.open = false)
    }

    /// Reads the response to the request sent last.
    ///
    /// # Errors
    ///
    /// If the connection fails or the response is malformed.
    pub fn read_response(&mut self) -> io::Result<Response> {
        let path = self.pending.take().unwrap_or_default();
        let result = read_response(&mut self.reader).map_err(|e| {
            context(
                e,
                format_args!("reading the response to GET {path} from {}", self.addr),
            )
        });
        match result {
            Ok((response, reusable)) => {
                self.open = reusable;
                Ok(response)
            }
            Err(e) => {
                self.open = false;
                Err(e)
            }
        }
    }

    /// Waits up to `timeout` for the answer to start arriving; `true` once it has (read
    /// it with [`read_response`](KeepAlive::read_response)), `false` if nothing came.
    ///
    /// # Errors
    ///
    /// If `poll(2)` fails.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        use std::os::fd::AsRawFd;
        if !self.reader.buffer().is_empty() {
            return Ok(true);
        }
        let mut fds = libc::pollfd {
            fd: self.reader.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut fds, 1, millis) };
        if ready < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ready > 0)
    }

    /// Whether the next [`get`](KeepAlive::get) may use this connection: no error so far and
    /// the last response did not announce `Connection: close`.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The client side's address (`getsockname(2)`).
    ///
    /// # Errors
    ///
    /// If `getsockname(2)` fails.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.reader.get_ref().local_addr()
    }
}

/// Whether `err` came from establishing the connection (refused, reset or timed out in the
/// TCP handshake), before any request byte was sent.
pub(crate) fn failed_in_handshake(err: &io::Error) -> bool {
    err.to_string().starts_with(HANDSHAKE_CONTEXT)
}

/// How every connect error's message starts (see [`failed_in_handshake`]).
const HANDSHAKE_CONTEXT: &str = "connecting to";

/// A connected stream with `timeout` on reads and writes and Nagle off.
fn connect(local_ip: Option<IpAddr>, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = match local_ip {
        None => TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| context(e, format_args!("connecting to {addr}"))),
        Some(ip) => connect_from_ip(ip, addr, timeout),
    }?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn connect_from_ip(ip: IpAddr, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    // socket2 creates the socket with SOCK_CLOEXEC.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| context(e, "creating a TCP socket"))?;
    socket
        .bind(&SockAddr::from(SocketAddr::new(ip, 0)))
        .map_err(|e| context(e, format_args!("binding the client socket to {ip}")))?;
    socket
        .connect_timeout(&SockAddr::from(addr), timeout)
        .map_err(|e| context(e, format_args!("connecting to {addr} from {ip}")))?;
    Ok(TcpStream::from(socket))
}

fn send_get(stream: &mut TcpStream, addr: SocketAddr, path: &str, close: bool) -> io::Result<()> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{connection}\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| context(e, format_args!("sending GET {path} to {addr}")))
}

/// Reads one response; `true` alongside it if the connection may carry another request.
///
/// Interim 1xx responses are skipped.
pub(crate) fn read_response(reader: &mut impl BufRead) -> io::Result<(Response, bool)> {
    loop {
        if reader.fill_buf()?.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the response started",
            ));
        }
        let status_line = read_line(reader, "status line")?;
        let (version, status) = parse_status_line(&status_line)?;
        let headers = read_headers(reader)?;
        let mut response = Response {
            status,
            headers,
            body: String::new(),
        };
        if (100..200).contains(&status) {
            continue;
        }
        let (body, delimited) = read_body(reader, &response)?;
        response.body = String::from_utf8_lossy(&body).into_owned();
        let persistent = if version == "HTTP/1.0" {
            response.header_has_token("connection", "keep-alive")
        } else {
            !response.closes_connection()
        };
        return Ok((response, persistent && delimited));
    }
}

fn parse_status_line(line: &str) -> io::Result<(&str, u16)> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(invalid(format!("malformed status line {line:?}")));
    }
    let status = code
        .parse()
        .map_err(|_| invalid(format!("malformed status code in {line:?}")))?;
    Ok((version, status))
}

fn read_headers(reader: &mut impl BufRead) -> io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, "header line")?;
        if line.is_empty() {
            return Ok(headers);
        }
        if headers.len() == MAX_HEADERS {
            return Err(invalid(format!("more than {MAX_HEADERS} header lines")));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("malformed header line {line:?}")))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
}

/// The body bytes and whether its end was delimited (not merely the connection's EOF).
fn read_body(reader: &mut impl BufRead, response: &Response) -> io::Result<(Vec<u8>, bool)> {
    if matches!(response.status, 204 | 304) {
        return Ok((Vec::new(), true));
    }
    if response.header_has_token("transfer-encoding", "chunked") {
        return Ok((read_chunked(reader)?, true));
    }
    if let Some(length) = response.header("content-length") {
        let length: u64 = length
            .parse()
            .map_err(|_| invalid(format!("malformed Content-Length {length:?}")))?;
        if length > MAX_BODY {
            return Err(invalid(format!(
                "Content-Length {length} exceeds {MAX_BODY}"
            )));
        }
        return Ok((read_exactly(reader, length)?, true));
    }
    let mut body = Vec::new();
    reader.take(MAX_BODY).read_to_end(&mut body)?;
    Ok((body, false))
}

fn read_chunked(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader, "chunk size line")?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| invalid(format!("malformed chunk size line {line:?}")))?;
        if size == 0 {
            // Trailer fields, then the empty line.
            while !read_line(reader, "chunked trailer")?.is_empty() {}
            return Ok(body);
        }
        if body.len() as u64 + size > MAX_BODY {
            return Err(invalid(format!("chunked body exceeds {MAX_BODY}")));
        }
        body.extend(read_exactly(reader, size)?);
        if !read_line(reader, "chunk terminator")?.is_empty() {
            return Err(invalid("chunk data longer than its size".to_owned()));
        }
    }
}

fn read_exactly(reader: &mut impl BufRead, length: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.take(length).read_to_end(&mut bytes)?;
    if (bytes.len() as u64) < length {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "connection closed after {} of {length} body bytes",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// One CRLF- (or LF-) terminated line without its terminator.
fn read_line(reader: &mut impl BufRead, what: &str) -> io::Result<String> {
    let mut line = Vec::new();
    reader.take(MAX_LINE as u64).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(if line.len() >= MAX_LINE {
            invalid(format!("{what} longer than {MAX_LINE} bytes"))
        } else {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed in the middle of the {what}"),
            )
        });
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| invalid(format!("{what} is not UTF-8")))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// `e` with what was being done prefixed, keeping its kind.
fn context(e: io::Error, doing: impl fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{doing}: {e}"))
}

/// Opens new connections to `addr` until one reaches `slot` (at most 200 tries), then sends
/// `GET /block?ms=<ms>` on it: that worker's event loop stalls (demo `--demo-faults`).
/// Returns the connection, whose answer arrives when the block ends.
///
/// # Panics
///
/// If no connection reaches `slot`, or a request fails.
pub fn block_slot(addr: SocketAddr, slot: usize, ms: u64) -> KeepAlive {
    for _ in 0..200 {
        let mut conn = KeepAlive::connect(addr).expect("connect");
        if conn.get("/").expect("hello").worker() == Some(slot) {
            conn.send_only(&format!("/block?ms={ms}"))
                .expect("send /block");
            return conn;
        }
    }
    panic!("no connection to {addr} reached slot {slot} in 200 tries");
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::net::Ipv4Addr;

    use super::*;
    use crate::test_server::{Behaviour, TestServer};

    fn parse(raw: &str) -> io::Result<(Response, bool)> {
        read_response(&mut Cursor::new(raw.as_bytes()))
    }

    #[test]
    fn parses_a_content_length_response() {
        let (response, reusable) =
            parse("HTTP/1.1 200 OK\r\nX-Steer-Worker: 3\r\ncontent-length: 5\r\n\r\nhelloEXTRA")
                .expect("parses");
        assert_eq!(response.status, 200);
        assert_eq!(response.body, "hello");
        assert_eq!(response.header("x-steer-worker"), Some("3"));
        assert_eq!(response.worker(), Some(3));
        assert!(reusable);
    }

    #[test]
    fn parses_a_chunked_response_with_trailers() {
        let (response, reusable) = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
             5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nTrailer: x\r\n\r\n",
        )
        .expect("parses");
        assert_eq!(response.body, "hello, world");
        assert!(reusable);
    }

    #[test]
    fn a_body_without_length_runs_to_eof_and_ends_the_connection() {
        let (response, reusable) =
            parse("HTTP/1.1 200 OK\r\nX: y\r\n\r\nuntil the end").expect("parses");
        assert_eq!(response.body, "until the end");
        assert!(!reusable);
    }

    #[test]
    fn connection_close_and_http_1_0_are_not_reusable() {
        let (response, reusable) =
            parse("HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n")
                .expect("parses");
        assert!(response.closes_connection());
        assert!(!reusable);
        let (_, reusable) = parse("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").expect("parses");
        assert!(!reusable);
        let (_, reusable) =
            parse("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
                .expect("parses");
        assert!(reusable);
    }

    #[test]
    fn skips_interim_responses() {
        let (response, _) = parse(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope",
        )
        .expect("parses");
        assert_eq!(response.status, 404);
        assert_eq!(response.body, "nope");
    }

    #[test]
    fn truncated_and_malformed_responses_are_errors() {
        let eof = |raw| parse(raw).expect_err("fails").kind();
        assert_eq!(eof(""), io::ErrorKind::UnexpectedEof);
        assert_eq!(
            eof("HTTP/1.1 200 OK\r\nContent-Le"),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(
            eof("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(eof("SSH-2.0-OpenSSH\r\n\r\n"), io::ErrorKind::InvalidData);
        assert_eq!(
            eof("HTTP/1.1 200 OK\r\nno colon\r\n\r\n"),
            io::ErrorKind::InvalidData
        );
        assert_eq!(
            eof("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn http_get_talks_to_a_real_server() {
        let server = TestServer::start(Behaviour::Serve {
            per_connection: None,
        });
        let response = must_get(server.addr(), "/hello");
        assert_eq!(response.status, 200, "{response}");
        assert_eq!(response.worker(), Some(TestServer::WORKER));
        assert_eq!(response.body, "GET /hello\n");
        assert!(
            response.closes_connection(),
            "we asked for Connection: close"
        );
    }

    #[test]
    fn http_get_from_uses_the_chosen_source_address() {
        let server = TestServer::start(Behaviour::EchoPeer);
        let response = http_get_from(Ipv4Addr::new(127, 0, 0, 2), server.addr(), "/")
            .expect("GET from 127.0.0.2");
        assert_eq!(response.body, "127.0.0.2");
    }

    #[test]
    fn keep_alive_reuses_one_connection_until_the_server_announces_close() {
        let server = TestServer::start(Behaviour::Serve {
            per_connection: Some(3),
        });
        let mut client = KeepAlive::connect(server.addr()).expect("connect");
        let local = client.local_addr().expect("local addr");
        for i in 0..3 {
            let response = client.get(&format!("/{i}")).expect("get");
            assert_eq!(response.body, format!("GET /{i}\n"));
            assert_eq!(response.header("x-peer"), Some(local.to_string().as_str()));
        }
        assert!(
            !client.is_open(),
            "third response announced Connection: close"
        );
        let err = client.get("/").expect_err("closed");
        assert_eq!(err.kind(), io::ErrorKind::NotConnected);
    }

    #[test]
    fn a_reset_mid_request_is_an_error() {
        let server = TestServer::start(Behaviour::Reset);
        let err = http_get(server.addr(), "/").expect_err("reset");
        assert!(
            err.to_string().contains(&server.addr().to_string()),
            "{err}"
        );
    }

    #[test]
    fn connection_refused_names_the_address() {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, crate::free_port()));
        let err = http_get(addr, "/").expect_err("nothing listens");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(
            err.to_string().contains(&format!("connecting to {addr}")),
            "{err}"
        );
    }
}
