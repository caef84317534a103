//! A blocking HTTP/3 client (quinn + h3) for the QUIC tests: one connection, many
//! requests on it, and what the server said about who answered.
//!
//! It trusts any certificate (the demo makes a self-signed one per worker) unless it is
//! given the one to expect.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use rustls::pki_types::CertificateDer;

/// The answer to one request.
#[derive(Debug, Clone)]
pub struct H3Answer {
    /// HTTP status.
    pub status: u16,
    /// `x-steer-worker`, if present.
    pub worker: Option<String>,
    /// The body, as text.
    pub body: String,
}

impl H3Answer {
    /// The pid in a demo greeting (`hello from worker <slot> (pid <pid>)`).
    pub fn pid(&self) -> Option<u32> {
        let start = self.body.find("(pid ")? + 5;
        let end = start + self.body[start..].find(')')?;
        self.body[start..end].parse().ok()
    }
}

/// One HTTP/3 connection, driven by its own single-threaded runtime.
pub struct H3Connection {
    runtime: tokio::runtime::Runtime,
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    connection: quinn::Connection,
    /// The client endpoint; kept so its socket lives as long as the connection.
    pub endpoint: quinn::Endpoint,
}

/// How [`H3Connection::connect_with`] connects.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// The certificate the server must present; any if `None`.
    pub expect: Option<CertificateDer<'static>>,
    /// ALPN names offered after `h3`, 40 bytes each: 40 of them make a ClientHello that
    /// needs two Initial datagrams.
    pub extra_alpn: usize,
    /// The client's address; an ephemeral port on loopback if `None`. Bound with
    /// `SO_REUSEADDR`, so a test can come back from the same port.
    pub local: Option<SocketAddr>,
}

/// A UDP socket on `addr` with `SO_REUSEADDR`.
fn bind_reusable(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Whatever went wrong, as text (the tests print it).
pub type H3Error = String;

impl H3Connection {
    /// Connects to `addr` (SNI `localhost`, ALPN `h3`) within `timeout`. With `expect`,
    /// the server must present that certificate; without, any is taken.
    pub fn connect(
        addr: SocketAddr,
        expect: Option<CertificateDer<'static>>,
        timeout: Duration,
    ) -> Result<H3Connection, H3Error> {
        H3Connection::connect_with(
            addr,
            &ConnectOptions {
                expect,
                ..ConnectOptions::default()
            },
            timeout,
        )
    }

    /// [`H3Connection::connect`] with `options`.
    pub fn connect_with(
        addr: SocketAddr,
        options: &ConnectOptions,
        timeout: Duration,
    ) -> Result<H3Connection, H3Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        let provider = Arc::new(steer_bench::quic::ring_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(steer_bench::quic::Verifier {
                expect: options.expect.clone(),
                check_signatures: true,
                provider,
            }))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h3".to_vec()];
        // Protocols no server speaks, offered after h3: they only make the ClientHello
        // longer (a 40-byte name each).
        for i in 0..options.extra_alpn {
            tls.alpn_protocols
                .push(format!("x-padding-{i:030}").into_bytes());
        }
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| format!("QUIC TLS: {e}"))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(1)));
        config.transport_config(Arc::new(transport));
        let local = options
            .local
            .unwrap_or_else(|| (std::net::Ipv4Addr::LOCALHOST, 0).into());
        let (send, connection, endpoint) = runtime.block_on(async {
            let socket = bind_reusable(local).map_err(|e| format!("bind {local}: {e}"))?;
            let mut endpoint = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .map_err(|e| format!("client endpoint: {e}"))?;
            endpoint.set_default_client_config(config);
            let connecting = endpoint
                .connect(addr, "localhost")
                .map_err(|e| format!("connect: {e}"))?;
            let connection = tokio::time::timeout(timeout, connecting)
                .await
                .map_err(|_| format!("no handshake with {addr} in {timeout:?}"))?
                .map_err(|e| format!("handshake: {e}"))?;
            let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(connection.clone()))
                .await
                .map_err(|e| format!("HTTP/3 setup: {e}"))?;
            tokio::spawn(async move {
                let _closed = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            });
            Ok::<_, H3Error>((send, connection, endpoint))
        })?;
        Ok(H3Connection {
            runtime,
            send,
            connection,
            endpoint,
        })
    }

    /// The client's address (its UDP socket's).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Moves the connection to a new UDP socket on a fresh port (a client whose NAT
    /// binding changed): its next packets come from there.
    pub fn rebind(&self) -> Result<SocketAddr, H3Error> {
        let _entered = self.runtime.enter();
        let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| format!("bind: {e}"))?;
        let addr = socket.local_addr().map_err(|e| format!("address: {e}"))?;
        self.endpoint
            .rebind(socket)
            .map_err(|e| format!("rebind: {e}"))?;
        Ok(addr)
    }

    /// Waits up to `timeout` for the connection to close; why it did, if it did.
    pub fn wait_closed(&self, timeout: Duration) -> Option<quinn::ConnectionError> {
        let connection = self.connection.clone();
        self.runtime.block_on(async {
            tokio::time::timeout(timeout, connection.closed())
                .await
                .ok()
        })
    }

    /// `GET path` on this connection, answered within `timeout`.
    pub fn get(&mut self, path: &str, timeout: Duration) -> Result<H3Answer, H3Error> {
        let send = &mut self.send;
        self.runtime.block_on(async {
            let request = async {
                let request = http::Request::get(format!("https://localhost{path}"))
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
                let mut body = Vec::new();
                while let Some(mut chunk) =
                    stream.recv_data().await.map_err(|e| format!("body: {e}"))?
                {
                    while chunk.has_remaining() {
                        let piece = chunk.chunk();
                        body.extend_from_slice(piece);
                        let n = piece.len();
                        chunk.advance(n);
                    }
                }
                Ok(H3Answer {
                    status: response.status().as_u16(),
                    worker: response
                        .headers()
                        .get("x-steer-worker")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned),
                    body: String::from_utf8_lossy(&body).into_owned(),
                })
            };
            tokio::time::timeout(timeout, request)
                .await
                .map_err(|_| format!("no answer in {timeout:?}"))?
        })
    }

    /// Why the connection closed, if it has.
    pub fn close_reason(&self) -> Option<quinn::ConnectionError> {
        self.connection.close_reason()
    }

    /// The certificate the server presented (the first of its chain).
    pub fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        let identity = self.connection.peer_identity()?;
        let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
        chain.first().cloned()
    }

    /// Closes the connection (`H3_NO_ERROR`) and lets the close go out.
    pub fn close(self) {
        self.connection.close(0x100u32.into(), b"");
        let endpoint = self.endpoint.clone();
        self.runtime.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        });
    }
}
