//! A Steer cluster of quinn workers serving HTTP/3: Steer's QUIC connection IDs and reset
//! key from the library (`steer::quic`, the `quic` feature).
//!
//! ```text
//! cargo run -p steer --example quic_worker -- --quic 127.0.0.1:4433 --workers 2 \
//!     --balance hash
//! ```
//!
//! Each worker takes its socket of the `h3` listener, reads what the primary gave it
//! ([`steer::quic::QuicIdentity::from_env`]: its slot and generation, the cluster's
//! reset key) and builds its quinn endpoint with
//! [`steer::quic::quinn::endpoint_config`], so every connection ID it issues names it.
//! `GET /` answers `hello from quinn worker <slot> (pid <pid>)` with `x-steer-worker`,
//! on a self-signed certificate for `localhost`. On a drain it refuses new connections,
//! lets the open ones finish (each is closed at once if idle), and returns.
//!
//! `--listen ADDR` (default 127.0.0.1:8000) is a TCP listener the workers hold but do not
//! serve: the library's first listener, and what a test harness waits on.

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use steer::Worker;
use steer::config::{Balance, Listener};

const USAGE: &str = "usage: quic_worker [--listen ADDR] [--quic ADDR] [--workers N] [--status ADDR] [--balance POLICY]";

fn main() -> ExitCode {
    let mut listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8000));
    let mut quic: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 4433));
    let mut workers = 2;
    let mut status = None;
    let mut balance = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            eprintln!("quic_worker: {flag} needs a value\n{USAGE}");
            return ExitCode::from(2);
        };
        let parsed = match flag.as_str() {
            "--listen" => value.parse().map(|a| listen = a).map_err(|e| e.to_string()),
            "--quic" => value.parse().map(|a| quic = a).map_err(|e| e.to_string()),
            "--workers" => value
                .parse::<usize>()
                .map(|n| workers = n)
                .map_err(|e| e.to_string()),
            "--status" => value
                .parse::<SocketAddr>()
                .map(|a| status = Some(a))
                .map_err(|e| e.to_string()),
            "--balance" => value
                .parse::<Balance>()
                .map(|b| balance = Some(b))
                .map_err(|e| e.to_string()),
            _ => Err(format!("unknown argument {flag:?}")),
        };
        if let Err(err) = parsed {
            eprintln!("quic_worker: {flag} {value:?}: {err}\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    let h3: Listener = match format!("h3=quic://{quic}").parse() {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("quic_worker: {err}");
            return ExitCode::from(2);
        }
    };
    let mut cluster = steer::Cluster::builder()
        .listen(listen)
        .listener(h3)
        .workers(workers);
    if let Some(status) = status {
        cluster = cluster.status(status);
    }
    if let Some(balance) = balance {
        cluster = cluster.balance(balance);
    }
    cluster.run(serve_worker)
}

/// What each worker process runs.
fn serve_worker(worker: Worker) -> io::Result<()> {
    let socket = worker
        .udp_socket("h3")
        .ok_or_else(|| io::Error::other("no h3 socket"))?
        .try_clone()?;
    socket.set_nonblocking(true)?;
    let identity = steer::quic::QuicIdentity::from_env().map_err(io::Error::other)?;
    let slot = worker.slot();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::spawn(worker.heartbeat());
        let endpoint = quinn::Endpoint::new(
            steer::quic::quinn::endpoint_config(&identity),
            Some(server_config()?),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let drain = worker.drain_signal();
        let mut drain_requested = tokio::task::spawn_blocking(move || drain.wait());
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    tokio::spawn(async move {
                        if let Ok(connection) = incoming.await {
                            serve_connection(connection, slot).await;
                        }
                    });
                }
                _ = &mut drain_requested => break,
            }
        }
        // Draining: no new connection; the open ones finish (bounded by the primary's
        // shutdown timeout).
        endpoint.set_server_config(None);
        endpoint.wait_idle().await;
        Ok(())
    })
}

/// TLS 1.3 with ALPN `h3` on a fresh self-signed certificate for `localhost`.
fn server_config() -> io::Result<quinn::ServerConfig> {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .map_err(io::Error::other)?;
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
    #[expect(deprecated, reason = "ring over aws-lc-rs: no cmake, a shorter build")]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(vec![made.cert.der().clone()], key.into())
        .map_err(io::Error::other)?;
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(io::Error::other)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        Duration::from_secs(10)
            .try_into()
            .map_err(io::Error::other)?,
    ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Answers every request on one connection until it closes.
async fn serve_connection(connection: quinn::Connection, slot: usize) {
    let Ok(mut h3) =
        h3::server::Connection::<_, Bytes>::new(h3_quinn::Connection::new(connection)).await
    else {
        return;
    };
    while let Ok(Some(resolver)) = h3.accept().await {
        tokio::spawn(async move {
            let Ok((request, mut stream)) = resolver.resolve_request().await else {
                return;
            };
            let (status, body) = if request.uri().path() == "/" {
                (
                    200,
                    format!(
                        "hello from quinn worker {slot} (pid {})\n",
                        std::process::id()
                    ),
                )
            } else {
                (404, "not found\n".to_owned())
            };
            let Ok(head) = http::Response::builder()
                .status(status)
                .header("x-steer-worker", slot)
                .body(())
            else {
                return;
            };
            if stream.send_response(head).await.is_ok()
                && stream.send_data(Bytes::from(body)).await.is_ok()
            {
                let _ = stream.finish().await;
            }
        });
    }
}
