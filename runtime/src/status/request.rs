//! The status listener's protocol decisions, apart from its sockets: what a request head
//! asks for, how a response is encoded, and which client gives way when the listener is
//! full.

use std::time::Instant;

use crate::config::StatusPath;

/// Request heads larger than this are answered 431.
pub(crate) const MAX_REQUEST: usize = 8 * 1024;

/// What a GET or HEAD asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `/status`: the JSON document.
    Status,
    /// `/metrics`: Prometheus text.
    Metrics,
    /// `/ready`: 200 or 503, from the readiness alone.
    Ready,
    /// `/live`: 200 once the primary publishes a document, like `/status`, without its
    /// contents; 503 if it does not within the render wait.
    Live,
    /// Anything else: 404.
    NotFound,
}

/// Where a request head stands after the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Head {
    /// More bytes are needed.
    Partial,
    /// A GET or HEAD of `endpoint`.
    Read {
        /// What is asked for.
        endpoint: Endpoint,
        /// HEAD: the response carries no body.
        head_only: bool,
    },
    /// Another method: 405, decided from the request line alone, whatever follows it.
    NotAllowed,
    /// Not HTTP/1.x: 400.
    Malformed,
    /// No complete head within [`MAX_REQUEST`] bytes: 431.
    TooLarge,
}

impl Endpoint {
    /// The path it names; `None` for [`Endpoint::NotFound`].
    pub(crate) fn path(self) -> Option<StatusPath> {
        match self {
            Endpoint::Status => Some(StatusPath::Status),
            Endpoint::Metrics => Some(StatusPath::Metrics),
            Endpoint::Ready => Some(StatusPath::Ready),
            Endpoint::Live => Some(StatusPath::Live),
            Endpoint::NotFound => None,
        }
    }
}

/// Reads the request head at the start of `buf`.
pub(crate) fn parse(buf: &[u8]) -> Head {
    match method(buf) {
        Some(Ok(b"GET" | b"HEAD")) | None => {}
        Some(Ok(_)) => return Head::NotAllowed,
        Some(Err(())) => return Head::Malformed,
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST => return Head::TooLarge,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(httparse::Error::TooManyHeaders) => return Head::TooLarge,
        Err(_) => return Head::Malformed,
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Head::Malformed;
    };
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    Head::Read {
        endpoint: match path {
            "/status" => Endpoint::Status,
            "/metrics" => Endpoint::Metrics,
            "/ready" => Endpoint::Ready,
            "/live" => Endpoint::Live,
            _ => Endpoint::NotFound,
        },
        head_only: method == "HEAD",
    }
}

/// The method token, once the space after it has arrived: `Err` if it is not a token.
fn method(buf: &[u8]) -> Option<Result<&[u8], ()>> {
    const LONGEST: usize = 32;
    let end = buf.iter().take(LONGEST + 1).position(|&b| b == b' ');
    let Some(end) = end else {
        return (buf.len() > LONGEST).then_some(Err(()));
    };
    let token = &buf[..end];
    let is_tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if token.is_empty() || !token.iter().all(is_tchar) {
        return Some(Err(()));
    }
    Some(Ok(token))
}

/// A complete response: status line, headers and (unless `head_only`) the body. Returns
/// the bytes and the length of the head, so a HEAD can share a GET's encoding.
pub(crate) fn encode(status: u16, content_type: &str, body: &[u8]) -> (Vec<u8>, usize) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let allow = if status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         {allow}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    let head_len = out.len();
    out.extend_from_slice(body);
    (out, head_len)
}

/// How much a client has to lose when the listener must make room, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Standing {
    /// Answered; only its last bytes are being drained before the close.
    Lingering,
    /// Connected, nothing sent yet.
    Silent,
    /// Part of a head sent.
    Sending,
    /// Being answered, but not reading.
    Reading,
    /// Asked, and waiting for the next document: about to be answered.
    Waiting,
}

/// The client to close to make room: the lowest standing, and among equals the one that
/// connected first (nginx's order for reusable connections). `None` if there is none.
pub(crate) fn victim<K>(clients: impl Iterator<Item = (K, Standing, Instant)>) -> Option<K> {
    clients
        .min_by_key(|&(_, standing, since)| (standing, since))
        .map(|(key, _, _)| key)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn live_is_an_endpoint_with_its_path() {
        assert_eq!(
            parse(b"GET /live HTTP/1.1\r\n\r\n"),
            Head::Read {
                endpoint: Endpoint::Live,
                head_only: false
            }
        );
        assert_eq!(Endpoint::Live.path(), Some(StatusPath::Live));
        assert_eq!(Endpoint::NotFound.path(), None);
    }

    #[test]
    fn get_and_head_of_the_three_endpoints() {
        assert_eq!(
            parse(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"),
            Head::Read {
                endpoint: Endpoint::Status,
                head_only: false
            }
        );
        assert_eq!(
            parse(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Head::Read {
                endpoint: Endpoint::Metrics,
                head_only: true
            }
        );
        assert_eq!(
            parse(b"GET /nope HTTP/1.1\r\n\r\n"),
            Head::Read {
                endpoint: Endpoint::NotFound,
                head_only: false
            }
        );
        assert_eq!(parse(b"GET /ready HTTP/1.1\r\nHost"), Head::Partial);
        assert_eq!(parse(b"GE"), Head::Partial);
    }

    #[test]
    fn other_methods_are_refused_from_the_request_line_whatever_follows() {
        assert_eq!(parse(b"POST "), Head::NotAllowed);
        let mut big = b"POST /status HTTP/1.1\r\nContent-Length: 100000\r\n\r\n".to_vec();
        big.resize(100_000, b'x');
        assert_eq!(parse(&big), Head::NotAllowed);
        let mut long = b"PUT /status HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_REQUEST * 2, b'a');
        assert_eq!(parse(&long), Head::NotAllowed);
        assert_eq!(parse(b"\x00\x01 / HTTP/1.1\r\n\r\n"), Head::Malformed);
        assert_eq!(parse(&[b'A'; 40]), Head::Malformed);
        let mut huge_get = b"GET /status HTTP/1.1\r\nX: ".to_vec();
        huge_get.resize(MAX_REQUEST, b'a');
        assert_eq!(parse(&huge_get), Head::TooLarge);
    }

    #[test]
    fn head_shares_the_encoding_without_the_body() {
        let (bytes, head_len) = encode(405, "text/plain", b"read-only\n");
        let text = String::from_utf8_lossy(&bytes[..head_len]);
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("Allow: GET, HEAD\r\n"));
        assert!(text.contains("Content-Length: 10\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
        assert_eq!(&bytes[head_len..], b"read-only\n");
    }

    #[test]
    fn the_lowest_standing_and_then_the_oldest_gives_way() {
        let t = Instant::now();
        let later = t + Duration::from_millis(5);
        let clients = [
            ("waiting", Standing::Waiting, t),
            ("new silent", Standing::Silent, later),
            ("old silent", Standing::Silent, t),
            ("sending", Standing::Sending, t),
        ];
        assert_eq!(victim(clients.into_iter()), Some("old silent"));
        assert_eq!(victim(clients.into_iter().skip(3)), Some("sending"));
        assert_eq!(victim(std::iter::empty::<((), Standing, Instant)>()), None);
    }
}
