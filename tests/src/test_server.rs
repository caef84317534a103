//! A tiny std-only HTTP server with scripted misbehaviour, for this crate's own unit tests.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use socket2::SockRef;

/// What the server does on each connection.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Behaviour {
    /// Answers `GET <path>` with 200, body `GET <path>\n`, `X-Steer-Worker: 7` and
    /// `X-Peer: <client addr>`; keeps the connection open unless the client asked for close
    /// or `per_connection` requests were served (the last one announces `Connection: close`).
    Serve { per_connection: Option<usize> },
    /// Serves `after` requests like `Serve`, then closes without announcing it.
    CloseUnannounced { after: usize },
    /// Answers with the client's IP as the body and closes.
    EchoPeer,
    /// Reads the request, then resets the connection (`SO_LINGER` 0 and close).
    Reset,
}

/// A listening server on 127.0.0.1 whose threads live until the test process exits.
pub(crate) struct TestServer {
    addr: SocketAddr,
}

impl TestServer {
    /// The slot the server claims in `X-Steer-Worker`.
    pub(crate) const WORKER: usize = 7;

    pub(crate) fn start(behaviour: Behaviour) -> TestServer {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind test server");
        let addr = listener.local_addr().expect("test server addr");
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || serve(stream, behaviour));
            }
        });
        TestServer { addr }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn serve(stream: TcpStream, behaviour: Behaviour) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let peer = stream.peer_addr().expect("peer addr");
    let mut reader = BufReader::new(stream);
    let mut served = 0;
    while let Some((path, wants_close)) = read_request(&mut reader) {
        served += 1;
        let stream = reader.get_mut();
        let (body, close) = match behaviour {
            Behaviour::Reset => {
                let _ = SockRef::from(&*stream).set_linger(Some(Duration::ZERO));
                return;
            }
            Behaviour::EchoPeer => (peer.ip().to_string(), true),
            Behaviour::Serve { per_connection } => (
                format!("GET {path}\n"),
                wants_close || per_connection.is_some_and(|limit| served >= limit),
            ),
            Behaviour::CloseUnannounced { .. } => (format!("GET {path}\n"), wants_close),
        };
        let connection = if close { "Connection: close\r\n" } else { "" };
        let response = format!(
            "HTTP/1.1 200 OK\r\nX-Steer-Worker: {}\r\nX-Peer: {peer}\r\n{connection}\
             Content-Length: {}\r\n\r\n{body}",
            TestServer::WORKER,
            body.len()
        );
        if stream.write_all(response.as_bytes()).is_err() || close {
            return;
        }
        if let Behaviour::CloseUnannounced { after } = behaviour
            && served >= after
        {
            return;
        }
    }
}

/// The path of the next request and whether it asked for `Connection: close`.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<(String, bool)> {
    let mut line = String::new();
    reader.read_line(&mut line).ok().filter(|&n| n > 0)?;
    let path = line.split(' ').nth(1)?.to_owned();
    let mut wants_close = false;
    loop {
        line.clear();
        reader.read_line(&mut line).ok().filter(|&n| n > 0)?;
        let header = line.trim_end();
        if header.is_empty() {
            return Some((path, wants_close));
        }
        wants_close |= header.eq_ignore_ascii_case("connection: close");
    }
}
