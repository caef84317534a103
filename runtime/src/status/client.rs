//! `steer status`: fetch `/status` and print it as a table or as raw JSON.
//!
//! The exchange is bounded, because the address may not be a steer status listener at all:
//! a whole exchange takes at most [`EXCHANGE_TIMEOUT`] (connect, send, every read), and an
//! answer larger than [`MAX_REPLY`] is refused as soon as it passes that size. A server that
//! streams bytes forever costs `steer status` (and `steer top`) a few MiB for a few
//! seconds, then an exit with status 1 and a message that says which limit it hit.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::StatusDocument;

/// The longest a whole exchange with the status listener may take.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest answer accepted, head and body. A `/status` document of 1,024 slots is
/// about 500 KiB.
pub const MAX_REPLY: usize = 4 << 20;

/// The longest response head accepted (the status listener's is about 150 bytes).
pub const MAX_HEAD: usize = 64 << 10;

/// Why a status request failed.
#[derive(Debug, Error)]
pub enum FetchError {
    /// `connect` failed (nothing listens there, or the host is unreachable).
    #[error("cannot connect")]
    Connect(#[source] io::Error),
    /// Connecting, sending or reading did not finish within the exchange's time.
    #[error("no complete answer within {} s", .0.as_secs())]
    TimedOut(Duration),
    /// The answer passed [`MAX_REPLY`].
    #[error("the answer is larger than {} MiB", .0 >> 20)]
    TooLarge(usize),
    /// The answer is not an HTTP/1.1 response with a body.
    #[error("the answer is not a status document: {0}")]
    Malformed(String),
    /// The listener answered, with another status than 200.
    #[error("the status listener answered {0}")]
    Refused(String),
    /// Sending or reading failed.
    #[error("the exchange failed")]
    Io(#[source] io::Error),
}

/// Fetches `GET path` from the status listener at `addr` and returns the body, within
/// [`EXCHANGE_TIMEOUT`] and [`MAX_REPLY`].
pub fn fetch(addr: SocketAddr, path: &str) -> Result<String, FetchError> {
    fetch_within(addr, path, EXCHANGE_TIMEOUT, MAX_REPLY)
}

/// [`fetch`] with other limits: the whole exchange within `timeout`, at most `max_bytes`
/// read.
pub fn fetch_within(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    max_bytes: usize,
) -> Result<String, FetchError> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or(FetchError::TimedOut(timeout))
    };
    let timed_out = |err: io::Error, otherwise: fn(io::Error) -> FetchError| match err.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FetchError::TimedOut(timeout),
        _ => otherwise(err),
    };
    let mut stream = TcpStream::connect_timeout(&addr, left()?)
        .map_err(|e| timed_out(e, FetchError::Connect))?;
    stream
        .set_write_timeout(Some(left()?))
        .map_err(FetchError::Io)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| timed_out(e, FetchError::Io))?;
    let mut reply = Reply::default();
    let mut chunk = vec![0u8; 64 * 1024];
    while !reply.complete() {
        stream
            .set_read_timeout(Some(left()?))
            .map_err(FetchError::Io)?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => reply.take(&chunk[..n], max_bytes)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timed_out(e, FetchError::Io)),
        }
    }
    reply.body()
}

/// An answer as it arrives.
#[derive(Debug, Default)]
struct Reply {
    bytes: Vec<u8>,
    /// Once the head is in: status line, where the body starts, its announced length.
    head: Option<(String, usize, Option<usize>)>,
}

impl Reply {
    fn take(&mut self, data: &[u8], max_bytes: usize) -> Result<(), FetchError> {
        if self.bytes.len() + data.len() > max_bytes {
            return Err(FetchError::TooLarge(max_bytes));
        }
        let seen = self.bytes.len();
        self.bytes.extend_from_slice(data);
        // Parse only once the blank line is in, so an endless head costs one pass.
        let from = seen.saturating_sub(3);
        if self.head.is_none() && self.bytes[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            self.head = parse_head(&self.bytes)?;
            if let Some((_, start, Some(len))) = &self.head
                && start + len > max_bytes
            {
                return Err(FetchError::TooLarge(max_bytes));
            }
        }
        if self.head.is_none() && self.bytes.len() > MAX_HEAD {
            return Err(FetchError::Malformed(format!(
                "no end of the head in its first {} KiB",
                MAX_HEAD >> 10
            )));
        }
        Ok(())
    }

    /// The announced length has arrived (without one, the body ends at end-of-file).
    fn complete(&self) -> bool {
        matches!(&self.head, Some((_, start, Some(len))) if self.bytes.len() >= start + len)
    }

    fn body(mut self) -> Result<String, FetchError> {
        if self.head.is_none() {
            // A head that ends in bare line feeds is only seen at the end.
            self.head = parse_head(&self.bytes)?;
        }
        let Some((line, start, len)) = self.head.take() else {
            return Err(FetchError::Malformed(
                "the connection closed before a complete head".into(),
            ));
        };
        let end = match len {
            Some(len) if self.bytes.len() < start + len => {
                return Err(FetchError::Malformed(format!(
                    "the connection closed after {} of {len} body bytes",
                    self.bytes.len() - start
                )));
            }
            Some(len) => start + len,
            None => self.bytes.len(),
        };
        if !line.starts_with("HTTP/1.1 200") {
            return Err(FetchError::Refused(line));
        }
        self.bytes.truncate(end);
        let mut bytes = self.bytes.split_off(start);
        bytes.shrink_to_fit();
        String::from_utf8(bytes).map_err(|_| FetchError::Malformed("the body is not UTF-8".into()))
    }
}

/// The status line, body offset and `Content-Length` of a complete head; `None` if more is
/// needed.
fn parse_head(bytes: &[u8]) -> Result<Option<(String, usize, Option<usize>)>, FetchError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let start = match response.parse(bytes) {
        Ok(httparse::Status::Complete(start)) => start,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(FetchError::Malformed(format!("not HTTP: {err}"))),
    };
    let mut len = None;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(FetchError::Malformed(
                "a Transfer-Encoding body, which the status listener never sends".into(),
            ));
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| FetchError::Malformed("a bad Content-Length".into()))?;
            len = Some(value);
        }
    }
    let line = format!(
        "{} {}",
        response.code.unwrap_or_default(),
        response.reason.unwrap_or_default()
    );
    Ok(Some((format!("HTTP/1.1 {line}"), start, len)))
}

/// Prints the cluster's status; exit 1 with what went wrong when it cannot be read.
pub fn print(addr: SocketAddr, json: bool) -> ExitCode {
    let body = match fetch(addr, "/status") {
        Ok(body) => body,
        Err(err) => {
            eprintln!("{}", explain(addr, &err));
            return ExitCode::from(crate::exit::EXIT_FAILURE);
        }
    };
    if json {
        println!("{}", body.trim_end());
        return ExitCode::SUCCESS;
    }
    match serde_json::from_str::<StatusDocument>(&body) {
        Ok(doc) => {
            print!("{}", render_table(&doc));
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("steer: the status document from {addr} is not understood: {err}");
            ExitCode::from(crate::exit::EXIT_FAILURE)
        }
    }
}

/// The one-paragraph message for a failed status request, with what to try.
pub fn explain(addr: SocketAddr, err: &FetchError) -> String {
    let hint = match err {
        FetchError::Connect(_) => {
            format!("start a cluster with `steer run --status {addr}`, or pass --status ADDR")
        }
        FetchError::TooLarge(_) | FetchError::Malformed(_) | FetchError::TimedOut(_) => {
            "is --status the address of a steer status listener?".to_owned()
        }
        FetchError::Refused(_) | FetchError::Io(_) => "try again".to_owned(),
    };
    format!(
        "steer: cannot read the status of a cluster at {addr}: {}\n({hint})",
        crate::errors::error_chain(err)
    )
}

/// The human-readable table `steer status` prints.
pub fn render_table(doc: &StatusDocument) -> String {
    use std::fmt::Write;
    let p = &doc.primary;
    let mut out = format!(
        "steer primary {}  {}  up {}  balance {}  listen {}\n\n",
        p.pid,
        p.phase,
        human_duration(p.uptime_s),
        p.balance,
        p.listen
    );
    let _ = writeln!(
        out,
        "{:>4}  {:>8}  {:>4}  {:<9} {:>8}  {:>8}  {:>10}  {:>9}  LAST EXIT",
        "SLOT", "PID", "GEN", "STATE", "UPTIME", "RESTARTS", "ACCEPTED", "RSS"
    );
    for w in &doc.workers {
        let pid = w.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
        let uptime = w.uptime_s.map_or_else(|| "-".to_owned(), human_duration);
        let rss = w.rss_bytes.map_or_else(|| "-".to_owned(), human_bytes);
        let mut state = w.state.clone();
        if let Some(ms) = w.next_restart_in_ms {
            state = format!("{state} {ms}ms");
        }
        if w.stalled {
            state.push_str(" stalled");
        }
        let _ = writeln!(
            out,
            "{:>4}  {:>8}  {:>4}  {:<9} {:>8}  {:>8}  {:>10}  {:>9}  {}",
            w.slot,
            pid,
            w.generation,
            state,
            uptime,
            w.restarts,
            w.accepted.map_or_else(|| "-".to_owned(), |n| n.to_string()),
            rss,
            w.last_exit.as_deref().unwrap_or("-")
        );
    }
    let t = &doc.totals;
    let _ = writeln!(
        out,
        "\n{} workers, {} ready, {} restarts, {} connections accepted",
        t.workers, t.ready, t.restarts, t.accepted
    );
    if let Some(steering) = &doc.steering {
        let _ = writeln!(
            out,
            "eBPF {}: {} migrated, {} fallbacks, {} dropped",
            steering.policy, steering.migrations, steering.fallbacks, steering.drops
        );
    }
    if doc.listeners.len() > 1 || doc.listeners.iter().any(|l| l.protocol != "tcp") {
        for l in &doc.listeners {
            let _ = write!(out, "listener {} {}://{}", l.name, l.protocol, l.address);
            if let Some(steered) = l.steered {
                let _ = write!(
                    out,
                    ": {steered} steered, {} dropped, {} refused",
                    l.drops, l.refusals
                );
            }
            out.push('\n');
        }
    }
    if let Some(limits) = &doc.client_limits {
        let refused: u64 = limits.refused.iter().map(|l| l.refused).sum();
        let _ = writeln!(
            out,
            "client limit {} (burst {}): {refused} refused, {} of {} clients tracked, {} evicted",
            limits.rate, limits.burst, limits.clients_tracked, limits.table_size, limits.evictions
        );
        for prefix in &limits.top_refused {
            let _ = writeln!(out, "  refused {:>8}  {}", prefix.refused, prefix.prefix);
        }
    }
    out
}

/// `42s`, `3m5s`, `2h10m`: an uptime for a terminal table.
pub(crate) fn human_duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{}s", secs / 60, secs % 60),
        _ => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
    }
}

/// Bytes in MiB with one decimal, for a terminal table.
pub(crate) fn human_bytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{PrimaryStatus, SteeringStatus, Totals, WorkerStatus};

    fn reply_of(parts: &[&[u8]], max_bytes: usize) -> Result<String, FetchError> {
        let mut reply = Reply::default();
        for part in parts {
            reply.take(part, max_bytes)?;
        }
        reply.body()
    }

    #[test]
    fn replies_end_at_their_length_and_are_refused_past_the_limit() {
        let ok = reply_of(
            &[b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 3\r\n\r\nabc"],
            100,
        );
        assert_eq!(ok.expect("complete"), "abc");
        let mut partial = Reply::default();
        partial
            .take(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", 100)
            .expect("within the limit");
        assert!(!partial.complete());
        assert!(matches!(partial.body(), Err(FetchError::Malformed(_))));
        let announced = reply_of(&[b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"], 100);
        assert!(matches!(announced, Err(FetchError::TooLarge(100))));
        let endless = reply_of(&[b"HTTP/1.1 200 OK\r\nX: ", &[b'x'; 60], &[b'x'; 60]], 100);
        assert!(matches!(endless, Err(FetchError::TooLarge(100))));
        let refused = reply_of(&[b"HTTP/1.1 503 Service Unavailable\r\n\r\nbusy"], 100);
        assert!(matches!(refused, Err(FetchError::Refused(line)) if line.contains("503")));
        let garbage = reply_of(&[b"SSH-2.0-OpenSSH\r\n\r\n"], 100);
        assert!(matches!(garbage, Err(FetchError::Malformed(_))));
    }

    #[test]
    fn table_shows_every_slot_and_the_totals() {
        let worker = |slot, state: &str, pid| WorkerStatus {
            slot,
            pid,
            generation: 2,
            state: state.into(),
            uptime_s: pid.map(|_| 75),
            restarts: 1,
            accepted: Some(100),
            active: Some(0),
            requests: Some(100),
            rss_bytes: Some(3 * 1024 * 1024),
            last_exit: Some("signal 9 (SIGKILL)".into()),
            next_restart_in_ms: if pid.is_none() { Some(400) } else { None },
            health_ms: Some(10),
            draining: 0,
            messages_dropped: 0,
            output_dropped: 0,
            stalled: false,
            stalls: 0,
        };
        let doc = StatusDocument {
            listeners: Vec::new(),
            primary: PrimaryStatus {
                pid: 10,
                uptime_s: 3700,
                balance: "kernel".into(),
                listen: "127.0.0.1:8000".into(),
                phase: "running".into(),
                rss_bytes: None,
                log_lines_dropped: 0,
                stalls: 0,
                roll_abandoned: None,
                foreign_listeners: 0,
                foreign_listener_addresses: Vec::new(),
            },
            workers: vec![worker(0, "ready", Some(11)), worker(1, "backoff", None)],
            totals: Totals {
                workers: 2,
                ready: 1,
                restarts: 2,
                accepted: 200,
            },
            steering: Some(SteeringStatus {
                policy: "hash".into(),
                selections: vec![100, 100],
                fallbacks: 3,
                drops: 0,
                migrations: 7,
                takeovers: 0,
                turns_lost: 0,
            }),
            client_limits: None,
        };
        let table = render_table(&doc);
        assert!(
            table.contains("eBPF hash: 7 migrated, 3 fallbacks, 0 dropped"),
            "{table}"
        );
        assert!(table.contains("up 1h1m"), "{table}");
        assert!(table.contains("backoff 400ms"), "{table}");
        assert!(table.contains("signal 9 (SIGKILL)"), "{table}");
        assert!(
            table.contains("2 workers, 1 ready, 2 restarts, 200 connections accepted"),
            "{table}"
        );
    }
}
