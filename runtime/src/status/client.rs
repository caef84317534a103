//! `steer status`: fetch `/status` and print it as a table or as raw JSON.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use super::StatusDocument;

/// Fetches `GET path` from the status listener and returns the body.
pub fn fetch(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response")
    })?;
    if !head.starts_with("HTTP/1.1 200") {
        let line = head.lines().next().unwrap_or_default();
        return Err(std::io::Error::other(format!(
            "status listener answered {line}"
        )));
    }
    Ok(body.to_owned())
}

/// Prints the cluster's status; exit 1 with a hint when it cannot be reached.
pub fn print(addr: SocketAddr, json: bool) -> ExitCode {
    let body = match fetch(addr, "/status") {
        Ok(body) => body,
        Err(err) => {
            eprintln!(
                "steer: cannot read the status of a cluster at {addr}: {err}\n\
                 (start it with `steer run --status {addr}`, or pass --status ADDR)"
            );
            return ExitCode::from(crate::cli::EXIT_FAILURE);
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
            ExitCode::from(crate::cli::EXIT_FAILURE)
        }
    }
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
        let _ = writeln!(
            out,
            "{:>4}  {:>8}  {:>4}  {:<9} {:>8}  {:>8}  {:>10}  {:>9}  {}",
            w.slot,
            pid,
            w.generation,
            state,
            uptime,
            w.restarts,
            w.accepted,
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

    #[test]
    fn table_shows_every_slot_and_the_totals() {
        let worker = |slot, state: &str, pid| WorkerStatus {
            slot,
            pid,
            generation: 2,
            state: state.into(),
            uptime_s: pid.map(|_| 75),
            restarts: 1,
            accepted: 100,
            active: 0,
            requests: 100,
            rss_bytes: Some(3 * 1024 * 1024),
            last_exit: Some("signal 9 (SIGKILL)".into()),
            next_restart_in_ms: if pid.is_none() { Some(400) } else { None },
            health_ms: Some(10),
            draining: 0,
            messages_dropped: 0,
        };
        let doc = StatusDocument {
            primary: PrimaryStatus {
                pid: 10,
                uptime_s: 3700,
                balance: "kernel".into(),
                listen: "127.0.0.1:8000".into(),
                phase: "running".into(),
                rss_bytes: None,
                log_lines_dropped: 0,
                stalls: 0,
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
            }),
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
