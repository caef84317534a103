//! The demo's HTTP/3 on its QUIC listeners (the `quic` feature): quinn, h3 and rustls on
//! a thread of their own, beside the `mio` loop that serves TCP, UDP and the primary.
//!
//! `GET /` answers `hello from worker <slot> (pid <pid>)` with `x-steer-worker: <slot>`,
//! like the HTTP/1.1 demo. The endpoint issues Steer's connection IDs and uses the
//! cluster's stateless-reset key ([`crate::quic::quinn::endpoint_config`]). The TLS
//! certificate is `--tls-cert`/`--tls-key`'s, or a self-signed one made at start.
//!
//! A drain refuses new connections and keeps serving the established ones, which stay on
//! this process through a rolling restart or an upgrade. At nine tenths of the shutdown
//! timeout (before the primary's kill) every connection left is sent a GOAWAY (h3's
//! graceful shutdown); each closes with `H3_NO_ERROR` once its requests are answered.
//! The thread ends when the last connection has closed, and wakes the `mio` loop.

use std::io;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use h3::server::RequestResolver;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::quic::QuicIdentity;

use super::{ENV_TLS_CERT, ENV_TLS_KEY};

/// HTTP/3's "no error" code, with which a connection closes gracefully.
const H3_NO_ERROR: u32 = 0x100;

/// How long the endpoint may take to send its last packets once every connection closed.
const FLUSH: Duration = Duration::from_secs(1);

/// What the QUIC side is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Taking new connections.
    Serving,
    /// Refusing new connections, serving the established ones.
    Draining,
    /// GOAWAY sent: each connection closes once its requests are answered.
    Closing,
}

/// What the demo's QUIC listeners need besides their sockets.
#[derive(Debug, Clone)]
pub(crate) struct QuicSetup {
    /// The worker's slot, in answers.
    pub slot: usize,
    /// What goes in its connection IDs, and the reset key.
    pub identity: QuicIdentity,
    /// `--tls-cert` and `--tls-key`, or a self-signed certificate.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// After a drain starts, how long until GOAWAY.
    pub goaway_after: Duration,
}

impl QuicSetup {
    /// The setup a demo worker was given: its identity and TLS files from the
    /// environment, GOAWAY at nine tenths of `shutdown`.
    pub(crate) fn from_env(slot: usize, shutdown: Duration) -> Result<QuicSetup, String> {
        let tls = match (
            std::env::var_os(ENV_TLS_CERT),
            std::env::var_os(ENV_TLS_KEY),
        ) {
            (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
            _ => None,
        };
        Ok(QuicSetup {
            slot,
            identity: QuicIdentity::from_env()?,
            tls,
            goaway_after: shutdown.mul_f64(0.9),
        })
    }
}

/// The QUIC side of a demo worker: its thread, and how the `mio` loop talks to it.
pub(crate) struct QuicSide {
    phase: Arc<watch::Sender<Phase>>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl QuicSide {
    /// Builds the TLS and endpoint configuration (so a bad certificate fails the worker's
    /// start), then serves `sockets` on a new thread. `wake` is called once the thread is
    /// done after a drain.
    pub(crate) fn start(
        sockets: Vec<UdpSocket>,
        setup: QuicSetup,
        wake: impl Fn() + Send + 'static,
    ) -> io::Result<QuicSide> {
        let server_config = server_config(setup.tls.as_ref())?;
        let endpoint_config = crate::quic::quinn::endpoint_config(&setup.identity);
        for socket in &sockets {
            socket.set_nonblocking(true)?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (phase, _) = watch::channel(Phase::Serving);
        let phase = Arc::new(phase);
        let done = Arc::new(AtomicBool::new(false));
        let (thread_phase, thread_done) = (phase.clone(), done.clone());
        let thread = std::thread::Builder::new()
            .name("quic".into())
            .spawn(move || {
                runtime.block_on(serve(
                    sockets,
                    endpoint_config,
                    server_config,
                    setup,
                    thread_phase,
                ));
                thread_done.store(true, Ordering::Release);
                wake();
            })?;
        Ok(QuicSide {
            phase,
            done,
            thread: Some(thread),
        })
    }

    /// Refuses new connections from now on; GOAWAY follows after the setup's delay.
    pub(crate) fn drain(&self) {
        self.phase.send_if_modified(|phase| {
            let serving = *phase == Phase::Serving;
            if serving {
                *phase = Phase::Draining;
            }
            serving
        });
    }

    /// Whether every QUIC connection has closed after a drain.
    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

impl Drop for QuicSide {
    fn drop(&mut self) {
        if self.is_done()
            && let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!("the QUIC thread panicked");
        }
    }
}

/// rustls for HTTP/3 (TLS 1.3, ALPN `h3`, ring), with the given certificate or a fresh
/// self-signed one for `localhost`.
fn server_config(tls: Option<&(PathBuf, PathBuf)>) -> io::Result<quinn::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let (chain, key) = match tls {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|err| invalid(format!("{}: {err}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|err| invalid(format!("{}: {err}", key.display())))?;
            (chain, key)
        }
        None => {
            let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
                .map_err(|err| invalid(format!("a self-signed certificate: {err}")))?;
            let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
            (vec![made.cert.der().clone()], key.into())
        }
    };
    #[expect(
        deprecated,
        reason = "ring over aws-lc-rs on purpose (no cmake, a shorter build); ring has no \
                  post-quantum key exchange, which the demo does not need"
    )]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .and_then(|builder| builder.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|err| invalid(format!("TLS: {err}")))?;
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|err| invalid(format!("TLS for QUIC: {err}")))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// Serves every socket until a drain's connections have all closed.
async fn serve(
    sockets: Vec<UdpSocket>,
    endpoint_config: quinn::EndpointConfig,
    server_config: quinn::ServerConfig,
    setup: QuicSetup,
    phase: Arc<watch::Sender<Phase>>,
) {
    // Every accept loop and connection holds a sender: `recv` ends once all are gone.
    let (alive, mut all_gone) = mpsc::channel::<()>(1);
    let mut endpoints = Vec::new();
    for socket in sockets {
        let runtime = Arc::new(quinn::TokioRuntime);
        match quinn::Endpoint::new(
            endpoint_config.clone(),
            Some(server_config.clone()),
            socket,
            runtime,
        ) {
            Ok(endpoint) => {
                tokio::spawn(accept(
                    endpoint.clone(),
                    setup.slot,
                    phase.subscribe(),
                    alive.clone(),
                ));
                endpoints.push(endpoint);
            }
            Err(err) => warn!("cannot serve QUIC on a socket: {err}"),
        }
    }
    until(&mut phase.subscribe(), Phase::Draining).await;
    drop(alive);
    info!("QUIC: draining; GOAWAY in {:?}", setup.goaway_after);
    tokio::select! {
        _ = all_gone.recv() => {}
        () = tokio::time::sleep(setup.goaway_after) => {
            phase.send_replace(Phase::Closing);
            let _ = all_gone.recv().await;
        }
    }
    for endpoint in endpoints {
        let _ = tokio::time::timeout(FLUSH, endpoint.wait_idle()).await;
    }
    info!("QUIC: every connection closed");
}

/// Takes new connections until the drain, then refuses them.
async fn accept(
    endpoint: quinn::Endpoint,
    slot: usize,
    mut phase: watch::Receiver<Phase>,
    alive: mpsc::Sender<()>,
) {
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return };
                let (phase, alive) = (phase.clone(), alive.clone());
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(connection) => serve_connection(connection, slot, phase).await,
                        Err(err) => debug!("QUIC handshake failed: {err}"),
                    }
                    drop(alive);
                });
            }
            () = until(&mut phase, Phase::Draining) => {
                endpoint.set_server_config(None);
                return;
            }
        }
    }
}

/// Answers requests on one connection until it closes, or until the GOAWAY and the last
/// request after it.
async fn serve_connection(
    connection: quinn::Connection,
    slot: usize,
    mut phase: watch::Receiver<Phase>,
) {
    let peer = connection.remote_address();
    let mut h3 = match h3::server::Connection::<_, Bytes>::new(h3_quinn::Connection::new(
        connection.clone(),
    ))
    .await
    {
        Ok(h3) => h3,
        Err(err) => {
            debug!(%peer, "HTTP/3 setup failed: {err}");
            return;
        }
    };
    let mut goaway_sent = false;
    loop {
        tokio::select! {
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    tokio::spawn(answer(resolver, slot));
                }
                Ok(None) => break,
                Err(err) => {
                    if !err.is_h3_no_error() {
                        debug!(%peer, "HTTP/3 connection ended: {err}");
                    }
                    return;
                }
            },
            () = until(&mut phase, Phase::Closing), if !goaway_sent => {
                goaway_sent = true;
                if h3.shutdown(0).await.is_err() {
                    return;
                }
            }
        }
    }
    connection.close(H3_NO_ERROR.into(), b"");
}

/// Returns once the phase is `at` or later (or the sender is gone).
async fn until(phase: &mut watch::Receiver<Phase>, at: Phase) {
    let _reached = phase.wait_for(|p| *p as u8 >= at as u8).await.is_ok();
}

/// Answers one request: `GET /` (or `HEAD /`) the greeting, anything else 404 or 405.
async fn answer<C>(resolver: RequestResolver<C, Bytes>, slot: usize)
where
    C: h3::quic::Connection<Bytes>,
{
    let Ok((request, mut stream)) = resolver.resolve_request().await else {
        return;
    };
    let method = request.method();
    let (status, body) = if method != http::Method::GET && method != http::Method::HEAD {
        (
            http::StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".to_owned(),
        )
    } else if request.uri().path() == "/" {
        (
            http::StatusCode::OK,
            format!("hello from worker {slot} (pid {})\n", std::process::id()),
        )
    } else {
        (http::StatusCode::NOT_FOUND, "not found\n".to_owned())
    };
    let head = http::Response::builder()
        .status(status)
        .header("x-steer-worker", slot)
        .header("content-type", "text/plain; charset=utf-8")
        .header("content-length", body.len())
        .body(());
    let Ok(head) = head else { return };
    let sent = async {
        stream.send_response(head).await?;
        if method != http::Method::HEAD {
            stream.send_data(Bytes::from(body)).await?;
        }
        stream.finish().await
    };
    if let Err(err) = sent.await {
        debug!("HTTP/3 answer not sent: {err}");
    }
}
