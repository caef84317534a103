//! The QUIC load: HTTP/3 clients (quinn, h3, rustls with ring) against one loopback
//! server, in two modes.
//!
//! - [`QuicMode::Handshakes`]: each lane makes one connection after another, each from a
//!   **fresh UDP socket** (a new source port, as a new client has): the handshake, then a
//!   close. Steer keeps a client's Initial packets together per 4-tuple in its flow table,
//!   so one client socket would pin every handshake to one worker; real clients have their
//!   own sockets. TLS session resumption is off: every handshake is a full one. Counts
//!   handshakes per second.
//! - [`QuicMode::Requests`]: each lane is one established connection (its own socket) with
//!   several requests in flight, `GET /` one after another on each. Counts requests per
//!   second, latency, and the answering worker (`x-steer-worker`).
//!
//! The client takes any certificate and checks no signature (the demo makes a self-signed
//! certificate per worker; checking the signature would cost the client, which shares the
//! CPUs with the server, about as much as the server's signing). Each client thread runs
//! its lanes on a single-threaded tokio runtime. Bounded by the run's length (at most
//! [`MAX_DURATION`]); a handshake or request still running at the end is not counted.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use hdrhistogram::Histogram;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;

use crate::load::{Latency, per_second};

/// No run lasts longer than this, whatever it was asked.
pub const MAX_DURATION: Duration = Duration::from_secs(600);

/// What a lane does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuicMode {
    /// A new connection (fresh socket, full handshake) after another.
    Handshakes,
    /// Requests on one established connection.
    Requests,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct QuicSpec {
    /// The server (a loopback address).
    pub target: SocketAddr,
    /// What each lane does.
    pub mode: QuicMode,
    /// Concurrent lanes: handshakes in flight, or connections.
    pub lanes: usize,
    /// Requests: requests in flight on each connection.
    pub streams: usize,
    /// Client threads.
    pub threads: usize,
    /// How long.
    pub length: Duration,
    /// A handshake or request that takes longer fails.
    pub timeout: Duration,
}

impl QuicSpec {
    /// A spec with the defaults: 2 threads, 4 streams per connection, a 5 s timeout.
    pub fn new(target: SocketAddr, mode: QuicMode, lanes: usize, length: Duration) -> QuicSpec {
        QuicSpec {
            target,
            mode,
            lanes,
            streams: 4,
            threads: 2,
            length,
            timeout: Duration::from_secs(5),
        }
    }
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct QuicReport {
    /// What the lanes did.
    pub mode: QuicMode,
    /// Concurrent lanes.
    pub lanes: usize,
    /// Seconds.
    pub elapsed_s: f64,
    /// Handshakes completed, or requests answered 200.
    pub ok: u64,
    /// Handshakes or requests that failed or timed out.
    pub failed: u64,
    /// [`Self::ok`] per second.
    pub rate: f64,
    /// Handshake or request latency.
    pub latency: Latency,
    /// Requests per `x-steer-worker` (requests mode).
    pub per_worker: BTreeMap<String, u64>,
    /// The first failure, as text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    #[serde(skip)]
    histogram: Histogram<u64>,
}

impl QuicReport {
    fn empty(mode: QuicMode, lanes: usize) -> QuicReport {
        QuicReport {
            mode,
            lanes,
            elapsed_s: 0.0,
            ok: 0,
            failed: 0,
            rate: 0.0,
            latency: Latency::default(),
            per_worker: BTreeMap::new(),
            first_error: None,
            histogram: Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("1 us to 60 s, 3 digits: valid bounds"),
        }
    }

    fn merge(&mut self, other: QuicReport) {
        self.ok += other.ok;
        self.failed += other.failed;
        for (worker, count) in other.per_worker {
            *self.per_worker.entry(worker).or_insert(0) += count;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        let _ = self.histogram.add(&other.histogram);
    }

    fn succeed(&mut self, took: Duration, worker: Option<String>) {
        self.ok += 1;
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self.histogram.record(us.min(60_000_000));
        if let Some(worker) = worker {
            *self.per_worker.entry(worker).or_insert(0) += 1;
        }
    }

    fn fail(&mut self, error: String) {
        self.failed += 1;
        if self.first_error.is_none() {
            self.first_error = Some(error);
        }
    }

    fn finish(&mut self, elapsed: Duration) {
        self.elapsed_s = elapsed.as_secs_f64();
        self.rate = per_second(self.ok, self.elapsed_s);
        self.latency = Latency::of(&self.histogram);
    }
}

/// One line: rate, failures, percentiles, per-worker split.
impl std::fmt::Display for QuicReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.latency;
        write!(
            f,
            "{:?}: {} ok in {:.1}s = {:.0}/s; failed {}{}; latency p50 {}us p99 {}us max {}us; \
             per worker {:?}",
            self.mode,
            self.ok,
            self.elapsed_s,
            self.rate,
            self.failed,
            self.first_error
                .as_ref()
                .map_or_else(String::new, |e| format!(" (first: {e})")),
            l.p50_us,
            l.p99_us,
            l.max_us,
            self.per_worker
        )
    }
}

/// Runs the load and returns what it saw. Blocks for the run's length.
pub fn run(spec: &QuicSpec) -> io::Result<QuicReport> {
    if !spec.target.ip().is_loopback() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: the QUIC load is for loopback targets only",
                spec.target
            ),
        ));
    }
    let config = client_config().map_err(io::Error::other)?;
    let lanes = spec.lanes.max(1);
    let threads = spec.threads.clamp(1, lanes);
    let started = Instant::now();
    let end = started + spec.length.min(MAX_DURATION);
    let handles = (0..threads)
        .map(|t| {
            let share = lanes / threads + usize::from(t < lanes % threads);
            let spec = spec.clone();
            let config = config.clone();
            std::thread::Builder::new()
                .name(format!("quic-load-{t}"))
                .spawn(move || run_thread(&spec, &config, share, end))
        })
        .collect::<io::Result<Vec<_>>>()?;
    let mut report = QuicReport::empty(spec.mode, lanes);
    for handle in handles {
        match handle.join() {
            Ok(Ok(part)) => report.merge(part),
            Ok(Err(err)) => return Err(err),
            Err(_) => return Err(io::Error::other("a QUIC load thread panicked")),
        }
    }
    report.finish(end.min(Instant::now()).saturating_duration_since(started));
    Ok(report)
}

/// One client thread: `lanes` lanes on a single-threaded runtime until `end`.
fn run_thread(
    spec: &QuicSpec,
    config: &quinn::ClientConfig,
    lanes: usize,
    end: Instant,
) -> io::Result<QuicReport> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let mut report = QuicReport::empty(spec.mode, lanes);
    local.block_on(&runtime, async {
        let tasks: Vec<_> = (0..lanes)
            .map(|_| {
                let spec = spec.clone();
                let config = config.clone();
                tokio::task::spawn_local(async move {
                    match spec.mode {
                        QuicMode::Handshakes => handshakes(&spec, config, end).await,
                        QuicMode::Requests => requests(&spec, config, end).await,
                    }
                })
            })
            .collect();
        for task in tasks {
            match task.await {
                Ok(part) => report.merge(part),
                Err(err) => report.fail(format!("lane: {err}")),
            }
        }
    });
    Ok(report)
}

/// A client endpoint on a fresh loopback socket.
fn endpoint() -> Result<quinn::Endpoint, String> {
    let socket =
        std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("bind: {e}"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| format!("endpoint: {e}"))
}

/// What is left of the run (or of `timeout`, if shorter), from now.
fn budget(end: Instant, timeout: Duration) -> Option<Duration> {
    let left = end.saturating_duration_since(Instant::now());
    (!left.is_zero()).then(|| left.min(timeout))
}

/// One handshake lane: connect from a fresh socket, close, again, until `end`.
async fn handshakes(spec: &QuicSpec, config: quinn::ClientConfig, end: Instant) -> QuicReport {
    let mut report = QuicReport::empty(spec.mode, 1);
    while let Some(budget) = budget(end, spec.timeout) {
        let began = Instant::now();
        let endpoint = match endpoint() {
            Ok(endpoint) => endpoint,
            Err(err) => {
                report.fail(err);
                continue;
            }
        };
        let connecting = match endpoint.connect_with(config.clone(), spec.target, "localhost") {
            Ok(connecting) => connecting,
            Err(err) => {
                report.fail(format!("connect: {err}"));
                continue;
            }
        };
        match tokio::time::timeout(budget, connecting).await {
            Ok(Ok(connection)) => {
                report.succeed(began.elapsed(), None);
                // The endpoint's driver sends the close once the handles are gone.
                connection.close(0u32.into(), b"");
            }
            Ok(Err(err)) => report.fail(format!("handshake: {err}")),
            // The run ended during it: not counted.
            Err(_) if Instant::now() >= end => {}
            Err(_) => report.fail(format!("no handshake in {budget:?}")),
        }
    }
    report
}

/// One request lane: one connection, `streams` request loops on it, until `end`.
async fn requests(spec: &QuicSpec, config: quinn::ClientConfig, end: Instant) -> QuicReport {
    let mut report = QuicReport::empty(spec.mode, 1);
    let setup = async {
        let endpoint = endpoint()?;
        let connecting = endpoint
            .connect_with(config, spec.target, "localhost")
            .map_err(|e| format!("connect: {e}"))?;
        let connection = tokio::time::timeout(spec.timeout, connecting)
            .await
            .map_err(|_| "no handshake".to_owned())?
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(connection.clone()))
            .await
            .map_err(|e| format!("HTTP/3 setup: {e}"))?;
        tokio::task::spawn_local(async move {
            let _closed = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok::<_, String>((endpoint, connection, send))
    };
    let (_endpoint, connection, send) = match setup.await {
        Ok(parts) => parts,
        Err(err) => {
            report.fail(err);
            return report;
        }
    };
    let loops: Vec<_> = (0..spec.streams.max(1))
        .map(|_| {
            let mut send = send.clone();
            let timeout = spec.timeout;
            tokio::task::spawn_local(async move {
                let mut part = QuicReport::empty(QuicMode::Requests, 1);
                while let Some(budget) = budget(end, timeout) {
                    let began = Instant::now();
                    match tokio::time::timeout(budget, get(&mut send)).await {
                        Ok(Ok((200, worker))) => part.succeed(began.elapsed(), worker),
                        Ok(Ok((status, _))) => part.fail(format!("status {status}")),
                        Ok(Err(err)) => {
                            part.fail(err);
                            // A broken connection fails at once: do not spin on it.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(_) if Instant::now() >= end => {}
                        Err(_) => part.fail(format!("no answer in {budget:?}")),
                    }
                }
                part
            })
        })
        .collect();
    for task in loops {
        match task.await {
            Ok(part) => report.merge(part),
            Err(err) => report.fail(format!("request loop: {err}")),
        }
    }
    connection.close(0x100u32.into(), b"");
    report
}

/// `GET /`: the status and `x-steer-worker`.
async fn get(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
) -> Result<(u16, Option<String>), String> {
    let request = http::Request::get("https://localhost/")
        .body(())
        .map_err(|e| format!("request: {e}"))?;
    let mut stream = send
        .send_request(request)
        .await
        .map_err(|e| format!("send: {e}"))?;
    stream.finish().await.map_err(|e| format!("finish: {e}"))?;
    let response = stream
        .recv_response()
        .await
        .map_err(|e| format!("response: {e}"))?;
    while let Some(mut chunk) = stream.recv_data().await.map_err(|e| format!("body: {e}"))? {
        chunk.advance(chunk.remaining());
    }
    let worker = response
        .headers()
        .get("x-steer-worker")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((response.status().as_u16(), worker))
}

/// TLS 1.3 with ALPN `h3`, any certificate, no resumption (every handshake a full one).
fn client_config() -> Result<quinn::ClientConfig, String> {
    let provider = Arc::new(ring_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier {
            expect: None,
            check_signatures: false,
            provider,
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| format!("QUIC TLS: {e}"))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// rustls's ring provider: the one the demo serves with (no cmake, no C toolchain beyond
/// cc); the bench and the tests need no post-quantum exchange.
#[expect(
    deprecated,
    reason = "ring, as the server: no cmake, and the bench needs no post-quantum exchange"
)]
pub fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A client's certificate check for the demo's self-signed certificates: takes `expect`
/// only (any certificate if `None`), and checks the handshake's signatures if
/// `check_signatures`. The bench checks none (it measures the server, and the check would
/// cost the shared CPUs as much as the server's signing); the tests check them.
#[derive(Debug)]
pub struct Verifier {
    /// The certificate the server must present; any if `None`.
    pub expect: Option<CertificateDer<'static>>,
    /// Whether the handshake's signatures are checked.
    pub check_signatures: bool,
    /// The provider whose algorithms check them.
    pub provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match &self.expect {
            Some(expect) if expect.as_ref() != end_entity.as_ref() => Err(rustls::Error::General(
                "not the expected certificate".into(),
            )),
            _ => Ok(rustls::client::danger::ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        if !self.check_signatures {
            return Ok(rustls::client::danger::HandshakeSignatureValid::assertion());
        }
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        if !self.check_signatures {
            return Ok(rustls::client::danger::HandshakeSignatureValid::assertion());
        }
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
