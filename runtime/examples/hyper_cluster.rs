//! A Steer cluster of tokio + hyper workers: Steer as a library in the async ecosystem.
//!
//! ```text
//! cargo run -p steer --example hyper_cluster -- --workers 2
//! cargo run -p steer --example hyper_cluster -- --listen 127.0.0.1:8000 --workers 2 \
//!     --status 127.0.0.1:8001
//! curl -i http://127.0.0.1:8000/        # X-Steer-Worker: <slot>
//! ```
//!
//! The process you start is the primary; Steer starts this same executable again (with the
//! same arguments) once per worker and calls the closure given to
//! [`steer::ClusterBuilder::run`] there. Each worker:
//!
//! - takes its own `SO_REUSEPORT` listener from [`steer::Worker::take_listener`] and serves
//!   HTTP/1.1 on it with hyper on a current-thread tokio runtime: every request gets `200`,
//!   `X-Steer-Worker: <slot>` and `hello from hyper worker <slot> (pid <pid>)`;
//! - bumps [`steer::WorkerStats`], which the primary shows per slot in `/status`;
//! - answers the primary's heartbeats from its runtime by spawning
//!   [`steer::Worker::heartbeat`], so a runtime stuck in a blocking call is seen as hung;
//! - says `{"hello": slot}` to the primary, whose message hook logs it and broadcasts
//!   `{"welcome": slot}` to every worker; workers log what they receive;
//! - drains when the primary asks (SIGTERM or SIGINT to the primary, SIGUSR2 rolling
//!   restart): it stops accepting, closes its listener so connections still queued on it
//!   move to other workers, lets hyper finish the requests in flight, and returns.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use steer::{Control, Worker};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

const USAGE: &str = "usage: hyper_cluster [--listen ADDR] [--workers N] [--status ADDR]   (default 127.0.0.1:8000, 2 workers)";

/// The header naming the slot that answered, as in Steer's demo app.
const WORKER_HEADER: HeaderName = HeaderName::from_static("x-steer-worker");

/// How often a worker also looks for connections without an epoll event: connections the
/// kernel migrates from a closed listener to this one raise none (see Steer's DESIGN.md).
const MIGRATED_POLL: Duration = Duration::from_millis(100);

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("hyper_cluster: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut cluster = steer::Cluster::builder()
        .listen(args.listen)
        .workers(args.workers);
    if let Some(status) = args.status {
        cluster = cluster.status(status);
    }
    // `run` supervises here, in the primary, and calls `serve_worker` in each worker.
    cluster.on_message(on_message).run(serve_worker)
}

/// The command line, parsed by hand to keep the example free of argument crates.
struct Args {
    listen: SocketAddr,
    workers: usize,
    status: Option<SocketAddr>,
}

impl Args {
    /// `Ok(None)` for `--help`.
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
        let mut parsed = Args {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            workers: 2,
            status: None,
        };
        while let Some(flag) = args.next() {
            if flag == "-h" || flag == "--help" {
                return Ok(None);
            }
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let bad = |err: &dyn std::fmt::Display| format!("{flag} {value:?}: {err}");
            match flag.as_str() {
                "--listen" => parsed.listen = value.parse().map_err(|e| bad(&e))?,
                "--workers" => parsed.workers = value.parse().map_err(|e| bad(&e))?,
                "--status" => parsed.status = Some(value.parse().map_err(|e| bad(&e))?),
                _ => return Err(format!("unknown argument {flag:?}")),
            }
        }
        Ok(Some(parsed))
    }
}

/// The primary's message hook: log what a worker says, welcome it to everyone.
fn on_message(control: &mut Control, from: usize, data: Value) {
    tracing::info!("primary received {data} from worker {from}");
    if data.get("hello").is_some() {
        control.broadcast(json!({ "welcome": from }));
    }
}

/// What each worker process runs; the cluster's exit status follows from its result.
fn serve_worker(mut worker: Worker) -> io::Result<()> {
    let listener = worker
        .take_listener()
        .ok_or_else(|| io::Error::other("the listener was already taken"))?;
    listener.set_nonblocking(true)?;
    // From here on only `&Worker` is needed, so it can be shared with threads and tasks.
    let worker = Arc::new(worker);
    let slot = worker.slot();

    // Messages: `recv` blocks, so it gets a thread of its own. The thread is left detached:
    // `recv` returns `None` only once the link to the primary is closed, which in practice
    // is when this process exits.
    let inbox = Arc::clone(&worker);
    std::thread::Builder::new()
        .name("inbox".into())
        .spawn(move || {
            while let Some(message) = inbox.recv() {
                let sender = message
                    .from
                    .map_or_else(|| "the primary".to_owned(), |from| format!("worker {from}"));
                tracing::info!("worker {slot} received {} from {sender}", message.data);
            }
        })?;
    if let Err(err) = worker.send(json!({ "hello": slot })) {
        tracing::warn!("worker {slot} cannot say hello to the primary: {err}");
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(serve_http(listener, Arc::clone(&worker)));
    // Do not wait for blocking tasks still parked (the drain waiter, on an error path).
    runtime.shutdown_background();
    tracing::info!("worker {slot} (generation {}) is done", worker.generation());
    result
}

/// Accepts and serves connections until the primary asks this worker to drain, then lets
/// the open connections finish.
async fn serve_http(listener: std::net::TcpListener, worker: Arc<Worker>) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    // Heartbeats are answered by this runtime: if it stops running tasks, they stop.
    tokio::spawn(worker.heartbeat());
    let drain = worker.drain_signal();
    let mut drain_requested = tokio::task::spawn_blocking(move || drain.wait());
    let (shutdown, shutdown_seen) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut migrated_poll = tokio::time::interval(MIGRATED_POLL);
    migrated_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            _ = &mut drain_requested => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let worker = Arc::clone(&worker);
                    connections.spawn(serve_connection(stream, worker, shutdown_seen.clone()));
                }
                Err(err) => {
                    // E.g. out of fds: back off instead of spinning.
                    tracing::warn!("worker {}: accept failed: {err}", worker.slot());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = migrated_poll.tick() => {
                while let Some(stream) = accept_without_event(&listener)? {
                    let worker = Arc::clone(&worker);
                    connections.spawn(serve_connection(stream, worker, shutdown_seen.clone()));
                }
            }
            Some(finished) = connections.join_next(), if !connections.is_empty() => {
                report_panic(finished);
            }
        }
    }

    tracing::info!(
        "worker {} draining: {} connection(s) open",
        worker.slot(),
        connections.len()
    );
    // Closing the listener hands the connections still queued on it to the other workers.
    drop(listener);
    // Every connection finishes its current request and closes; idle ones close now.
    shutdown.send_replace(true);
    while let Some(finished) = connections.join_next().await {
        report_panic(finished);
    }
    Ok(())
}

/// One non-blocking `accept(2)` that does not wait for readiness: `Ok(None)` when the queue
/// is empty.
fn accept_without_event(listener: &TcpListener) -> io::Result<Option<TcpStream>> {
    match socket2::SockRef::from(listener).accept() {
        Ok((socket, _peer)) => {
            socket.set_nonblocking(true)?;
            TcpStream::from_std(socket.into()).map(Some)
        }
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(err) => Err(err),
    }
}

/// Serves one connection with hyper; on drain, finishes the request in flight (if any)
/// and closes instead of keeping the connection alive.
async fn serve_connection(
    stream: TcpStream,
    worker: Arc<Worker>,
    mut shutdown: watch::Receiver<bool>,
) {
    worker.stats().connection_accepted();
    let slot = worker.slot();
    let stats_worker = Arc::clone(&worker);
    let service = service_fn(move |request| respond(Arc::clone(&stats_worker), request));
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let mut draining = false;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            _ = shutdown.wait_for(|&drain| drain), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    };
    if let Err(err) = result {
        tracing::debug!("worker {slot}: connection ended with an error: {err}");
    }
    worker.stats().connection_closed();
}

/// The one route: `200`, `X-Steer-Worker: <slot>`, `hello from hyper worker <slot> (pid ..)`.
async fn respond(
    worker: Arc<Worker>,
    _request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    worker.stats().request_served();
    let slot = worker.slot();
    let body = format!(
        "hello from hyper worker {slot} (pid {})\n",
        std::process::id()
    );
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(WORKER_HEADER, HeaderValue::from(slot));
    Ok(response)
}

/// A connection task that panicked is logged; the worker keeps serving.
fn report_panic(finished: Result<(), tokio::task::JoinError>) {
    if let Err(err) = finished {
        tracing::error!("a connection task failed: {err}");
    }
}
