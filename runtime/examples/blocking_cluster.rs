//! A blocking library worker: one thread per worker process, connections taken from
//! [`steer::Worker::accept`] and answered one at a time.
//!
//! ```text
//! cargo run -p steer --example blocking_cluster -- --workers 4 --status 127.0.0.1:8001
//! curl -i 127.0.0.1:8000/
//! curl -i '127.0.0.1:8000/block?ms=5000'   # stalls one worker: it is replaced as hung
//! ```
//!
//! `accept` answers the primary's heartbeats while it waits for connections, so nothing
//! else is needed for health checks. Because the answer comes from this same loop, a
//! request that stalls the loop (`/block`) stalls the heartbeat too: after
//! `--health-timeout` the primary takes the worker out of steering, hands its queued
//! connections to the others and replaces it.
//!
//! Every response carries `X-Steer-Worker: <slot>` and `Connection: close`.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use steer::Worker;
use steer::config::{Balance, parse_duration};

const USAGE: &str = "usage: blocking_cluster [--listen ADDR] [--workers N] [--status ADDR] \
                     [--balance POLICY] [--health-interval D] [--health-timeout D]";

fn main() -> ExitCode {
    let mut cluster = steer::Cluster::builder()
        .listen(SocketAddr::from(([127, 0, 0, 1], 8000)))
        .workers(2);
    let (mut interval, mut timeout) = (Duration::from_secs(1), Duration::from_secs(3));
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        let Some(value) = args.next() else {
            eprintln!("blocking_cluster: {flag} needs a value\n{USAGE}");
            return ExitCode::from(2);
        };
        let parsed = match flag.as_str() {
            "--listen" => value
                .parse()
                .map(|a| cluster.listen(a))
                .map_err(|e| e.to_string()),
            "--status" => value
                .parse()
                .map(|a| cluster.status(a))
                .map_err(|e| e.to_string()),
            "--workers" => value
                .parse()
                .map(|n| cluster.workers(n))
                .map_err(|e| e.to_string()),
            "--balance" => value.parse::<Balance>().map(|b| cluster.balance(b)),
            "--health-interval" => parse_duration(&value).map(|d| {
                interval = d;
                cluster
            }),
            "--health-timeout" => parse_duration(&value).map(|d| {
                timeout = d;
                cluster
            }),
            _ => Err(format!("unknown argument {flag:?}")),
        };
        cluster = match parsed {
            Ok(cluster) => cluster,
            Err(err) => {
                eprintln!("blocking_cluster: {flag} {value:?}: {err}\n{USAGE}");
                return ExitCode::from(2);
            }
        };
    }
    cluster.health(interval, timeout).run(serve_worker)
}

/// The worker: accept, answer, repeat, until the primary asks it to drain.
fn serve_worker(mut worker: Worker) -> io::Result<()> {
    while let Some((stream, _peer)) = worker.accept()? {
        if let Err(err) = answer(&worker, stream) {
            tracing::debug!("worker {}: connection failed: {err}", worker.slot());
        }
        worker.stats().connection_closed();
    }
    Ok(())
}

/// Reads one request head and answers it.
fn answer(worker: &Worker, stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let target = request_line.split(' ').nth(1).unwrap_or("/");
    if let Some(ms) = target
        .strip_prefix("/block?ms=")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        // Stalls this loop, and with it the heartbeat.
        std::thread::sleep(Duration::from_millis(ms));
    }
    let body = format!(
        "hello from blocking worker {} (pid {})\n",
        worker.slot(),
        std::process::id()
    );
    let mut stream = reader.into_inner();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nX-Steer-Worker: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        worker.slot(),
        body.len()
    )?;
    worker.stats().request_served();
    Ok(())
}
