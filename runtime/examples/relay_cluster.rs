//! A chat room of workers: the primary's message hook broadcasts whatever a worker says,
//! as in the README's `.on_message(|control, from, data| control.broadcast(data))`.
//!
//! ```text
//! cargo run -p steer --example relay_cluster -- --workers 3 --status 127.0.0.1:8001
//! curl -i 127.0.0.1:8000/                  # how many messages this worker has heard
//! cargo run -p steer --example relay_cluster -- --workers 3 --flood-slot 0
//! ```
//!
//! Each worker says hello once; every worker hears every hello, its own included. With
//! `--flood-slot N`, slot N sends messages to the primary as fast as its socket takes them.
//! The hook's fan-out is paid from that worker's relay budget (1,000 messages per second):
//! what is over it is dropped and counted against slot N (`messages_dropped` in
//! `/status`), and the other workers keep serving and answering heartbeats.
//!
//! Workers take connections from [`steer::Worker::accept`] (which answers heartbeats), and
//! answer `hello from relay worker <slot>: <n> messages heard` with `X-Steer-Worker`.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;
use steer::config::{Balance, parse_duration};
use steer::{Control, Worker};

const USAGE: &str = "usage: relay_cluster [--listen ADDR] [--workers N] [--status ADDR] \
                     [--balance POLICY] [--health-interval D] [--health-timeout D] \
                     [--flood-slot N]";

/// Messages the flooding worker sends between two looks at its listener and heartbeat.
const FLOOD_BATCH: usize = 256;

fn main() -> ExitCode {
    let mut cluster = steer::Cluster::builder()
        .listen(SocketAddr::from(([127, 0, 0, 1], 8000)))
        .workers(3);
    let (mut interval, mut timeout) = (Duration::from_secs(1), Duration::from_secs(3));
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        let Some(value) = args.next() else {
            eprintln!("relay_cluster: {flag} needs a value\n{USAGE}");
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
            // Read again by each worker from its own arguments.
            "--flood-slot" => value
                .parse::<usize>()
                .map(|_| cluster)
                .map_err(|e| e.to_string()),
            _ => Err(format!("unknown argument {flag:?}")),
        };
        cluster = match parsed {
            Ok(cluster) => cluster,
            Err(err) => {
                eprintln!("relay_cluster: {flag} {value:?}: {err}\n{USAGE}");
                return ExitCode::from(2);
            }
        };
    }
    cluster
        .health(interval, timeout)
        .on_message(broadcast)
        .run(serve_worker)
}

/// The primary's hook: whatever a worker says, every worker hears.
fn broadcast(control: &mut Control, _from: usize, data: Value) {
    control.broadcast(data);
}

/// The slot named by `--flood-slot`, if any (workers run with the primary's arguments).
fn flood_slot() -> Option<usize> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == "--flood-slot")?;
    args.get(at + 1)?.parse().ok()
}

fn serve_worker(mut worker: Worker) -> io::Result<()> {
    let _ = worker.send(serde_json::json!({ "hello": worker.slot() }));
    if flood_slot() == Some(worker.slot()) {
        return flood(worker);
    }
    let mut heard = 0u64;
    while let Some((stream, _peer)) = worker.accept()? {
        while worker.try_recv().is_some() {
            heard += 1;
        }
        if let Err(err) = answer(&worker, stream, heard) {
            tracing::debug!("worker {}: connection failed: {err}", worker.slot());
        }
        worker.stats().connection_closed();
    }
    Ok(())
}

/// Sends to the primary as fast as the socket takes it, still serving its connections and
/// answering heartbeats between batches, until asked to drain.
fn flood(mut worker: Worker) -> io::Result<()> {
    let listener = worker
        .take_listener()
        .ok_or_else(|| io::Error::other("no listener"))?;
    listener.set_nonblocking(true)?;
    let drain = worker.drain_signal();
    let mut n = 0u64;
    while !drain.is_set() {
        worker.answer_pings();
        while let Ok((stream, _peer)) = listener.accept() {
            stream.set_nonblocking(false)?;
            worker.stats().connection_accepted();
            let _ = answer(&worker, stream, 0);
            worker.stats().connection_closed();
        }
        for _ in 0..FLOOD_BATCH {
            n += 1;
            if worker.send(n).is_err() {
                break;
            }
        }
    }
    Ok(())
}

/// Reads one request head and answers it.
fn answer(worker: &Worker, stream: TcpStream, heard: u64) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let body = format!(
        "hello from relay worker {}: {heard} messages heard\n",
        worker.slot()
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
