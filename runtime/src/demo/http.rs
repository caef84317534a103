//! The small part of HTTP/1.1 the demo speaks: request heads in (parsed with `httparse`,
//! bounded in size), plain-text responses out.

use std::io::Write as _;

/// Most header lines a request may carry; more is answered 431.
pub const MAX_HEADERS: usize = 32;

/// Longest request head (request line and headers) accepted; longer is answered 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Largest request body read (and discarded); larger is answered 413.
pub const MAX_BODY_BYTES: u64 = 1024 * 1024;

/// The interim response owed to a client that sent `Expect: 100-continue` with a body.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A complete request head, borrowing the connection's read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHead<'a> {
    /// The method token, e.g. `GET`.
    pub method: &'a str,
    /// The request target, path and query, e.g. `/sleep?ms=10`.
    pub target: &'a str,
    /// Whether the connection stays open after the response (HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`).
    pub keep_alive: bool,
    /// Body bytes following the head (`Content-Length`, 0 when absent).
    pub content_length: u64,
    /// The client waits for `100 Continue` before it sends the body.
    pub expects_continue: bool,
    /// Bytes of the head, including the blank line that ends it.
    pub len: usize,
}

/// Why a request is refused before it reaches a route; every rejection closes the connection,
/// because the framing of whatever follows can no longer be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Not HTTP/1.x, or contradictory framing headers.
    Malformed,
    /// Head longer than [`MAX_HEAD_BYTES`] or with more than [`MAX_HEADERS`] headers.
    HeadTooLarge,
    /// `Content-Length` above [`MAX_BODY_BYTES`].
    BodyTooLarge,
    /// A `Transfer-Encoding` (chunked) body, which the demo does not decode.
    TransferEncoding,
}

impl Rejection {
    /// The status the rejection is answered with.
    pub fn status(self) -> Status {
        match self {
            Rejection::Malformed => Status::BadRequest,
            Rejection::HeadTooLarge => Status::HeaderFieldsTooLarge,
            Rejection::BodyTooLarge => Status::PayloadTooLarge,
            Rejection::TransferEncoding => Status::NotImplemented,
        }
    }

    /// The response body explaining the rejection.
    pub fn explanation(self) -> &'static str {
        match self {
            Rejection::Malformed => "bad request\n",
            Rejection::HeadTooLarge => "request head too large\n",
            Rejection::BodyTooLarge => "request body too large\n",
            Rejection::TransferEncoding => "transfer-encoding not supported\n",
        }
    }
}

/// Parses the request head at the start of `buf`, all at once.
///
/// Returns `Ok(None)` while the head is incomplete (and still within [`MAX_HEAD_BYTES`]);
/// bytes after the head (a body, pipelined requests) are left alone. Blank lines before the
/// request line are skipped (RFC 9112 section 2.2) and counted in [`RequestHead::len`].
/// A connection reads heads with [`HeadScan`] instead, which looks at each byte once.
pub fn parse_head(buf: &[u8]) -> Result<Option<RequestHead<'_>>, Rejection> {
    let start = blank_lines(buf);
    if start == buf.len() {
        return incomplete(buf.len());
    }
    parse_from(buf, start)
}

/// No complete head in `len` bytes: wait for more, unless that is already too many.
fn incomplete<'a>(len: usize) -> Result<Option<RequestHead<'a>>, Rejection> {
    if len > MAX_HEAD_BYTES {
        Err(Rejection::HeadTooLarge)
    } else {
        Ok(None)
    }
}

/// How many bytes at the start of `buf` are CR or LF.
fn blank_lines(buf: &[u8]) -> usize {
    buf.iter()
        .position(|&byte| byte != b'\r' && byte != b'\n')
        .unwrap_or(buf.len())
}

/// Finds the end of a request head as its bytes arrive, looking at each byte once, so a
/// client that sends its head a byte at a time costs a byte of work per byte (not a parse
/// of everything so far). The request line is checked as soon as it is complete, so
/// garbage is refused without waiting for the rest; the whole head is parsed once, when
/// its blank line has arrived.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HeadScan {
    /// Leading blank-line bytes, once the first other byte has arrived.
    start: Option<usize>,
    /// Where the search for the blank line resumes.
    scanned: usize,
    /// The request line is complete and was checked.
    line_checked: bool,
}

impl HeadScan {
    /// Looks at what `buf` (the head so far, from its first byte) gained since the last
    /// call; the answer is [`parse_head`]'s for a complete head. Start a new scan for the
    /// next head once this one is consumed.
    pub fn advance<'a>(&mut self, buf: &'a [u8]) -> Result<Option<RequestHead<'a>>, Rejection> {
        let start = match self.start {
            Some(start) => start,
            None => {
                let blank = blank_lines(buf);
                if blank == buf.len() {
                    return incomplete(buf.len());
                }
                self.start = Some(blank);
                self.scanned = blank;
                blank
            }
        };
        let mut at = self.scanned;
        while let Some(offset) = buf[at..].iter().position(|&byte| byte == b'\n') {
            let lf = at + offset;
            if !self.line_checked {
                self.line_checked = true;
                check_request_line(&buf[start..=lf])?;
            }
            let end = match (buf.get(lf + 1), buf.get(lf + 2)) {
                (Some(b'\n'), _) => lf + 2,
                (Some(b'\r'), Some(b'\n')) => lf + 3,
                (None, _) | (Some(b'\r'), None) => {
                    // The next line has not begun (or only its CR has): look here again.
                    self.scanned = lf;
                    return incomplete(buf.len());
                }
                _ => {
                    at = lf + 1;
                    continue;
                }
            };
            return match parse_from(&buf[..end], start)? {
                Some(head) => Ok(Some(head)),
                // The parser wants more although the blank line is in: keep looking.
                None => {
                    at = end;
                    continue;
                }
            };
        }
        self.scanned = buf.len();
        incomplete(buf.len())
    }
}

/// Refuses a request line that cannot start an HTTP/1.x request.
fn check_request_line(line: &[u8]) -> Result<(), Rejection> {
    let mut headers = [httparse::EMPTY_HEADER; 1];
    match httparse::Request::new(&mut headers).parse(line) {
        Ok(_) | Err(httparse::Error::TooManyHeaders) => Ok(()),
        Err(_) => Err(Rejection::Malformed),
    }
}

/// Parses the head that starts at `start` (after blank lines) in `buf`.
fn parse_from(buf: &[u8], start: usize) -> Result<Option<RequestHead<'_>>, Rejection> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(&buf[start..]) {
        Ok(httparse::Status::Complete(len)) => start + len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(Rejection::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Rejection::HeadTooLarge),
        Err(_) => return Err(Rejection::Malformed),
    };
    if len > MAX_HEAD_BYTES {
        return Err(Rejection::HeadTooLarge);
    }
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Err(Rejection::Malformed);
    };

    let mut asked_close = false;
    let mut asked_keep_alive = false;
    let mut content_length = None;
    let mut expects_continue = false;
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("connection") {
            for option in header
                .value
                .split(|&byte| byte == b',')
                .map(<[u8]>::trim_ascii)
            {
                asked_close |= option.eq_ignore_ascii_case(b"close");
                asked_keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let length = parse_content_length(header.value)?;
            if content_length.is_some_and(|seen| seen != length) {
                return Err(Rejection::Malformed);
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Rejection::TransferEncoding);
        } else if name.eq_ignore_ascii_case("expect") {
            expects_continue = header
                .value
                .trim_ascii()
                .eq_ignore_ascii_case(b"100-continue");
        }
    }

    Ok(Some(RequestHead {
        method,
        target,
        keep_alive: keeps_alive(version, asked_close, asked_keep_alive),
        content_length: content_length.unwrap_or(0),
        expects_continue,
        len,
    }))
}

/// The persistence rule of RFC 9112 section 9.3: HTTP/1.1 (`version` 1) keeps the
/// connection unless the client asked to close it; HTTP/1.0 only when it asked to keep it.
pub fn keeps_alive(version: u8, asked_close: bool, asked_keep_alive: bool) -> bool {
    !asked_close && (version >= 1 || asked_keep_alive)
}

/// A `Content-Length` value: ASCII digits only (no sign, no list).
fn parse_content_length(value: &[u8]) -> Result<u64, Rejection> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(Rejection::Malformed);
    }
    let length = digits
        .iter()
        .try_fold(0u64, |sum, &digit| {
            sum.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
        })
        .ok_or(Rejection::BodyTooLarge)?;
    if length > MAX_BODY_BYTES {
        return Err(Rejection::BodyTooLarge);
    }
    Ok(length)
}

/// The response statuses the demo uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// 200.
    Ok,
    /// 400: malformed request or bad query value.
    BadRequest,
    /// 404: unknown path (or a fault route without `--demo-faults`).
    NotFound,
    /// 405: a method other than GET or HEAD.
    MethodNotAllowed,
    /// 413: body above [`MAX_BODY_BYTES`].
    PayloadTooLarge,
    /// 431: head above [`MAX_HEAD_BYTES`] or [`MAX_HEADERS`].
    HeaderFieldsTooLarge,
    /// 501: a `Transfer-Encoding` body.
    NotImplemented,
}

impl Status {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::PayloadTooLarge => 413,
            Status::HeaderFieldsTooLarge => 431,
            Status::NotImplemented => 501,
        }
    }

    /// The reason phrase of the status line.
    pub fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::PayloadTooLarge => "Content Too Large",
            Status::HeaderFieldsTooLarge => "Request Header Fields Too Large",
            Status::NotImplemented => "Not Implemented",
        }
    }
}

/// One response, about to be serialized.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    /// The status line's status.
    pub status: Status,
    /// The plain-text body (its length is sent even when the body is not, for HEAD).
    pub body: &'a str,
    /// The worker slot, sent as `X-Steer-Worker`.
    pub slot: usize,
    /// Answering a HEAD request: headers only.
    pub head_only: bool,
    /// `Connection: keep-alive` rather than `Connection: close`.
    pub keep_alive: bool,
}

/// Appends `response` to a connection's output buffer.
pub fn write_response(out: &mut Vec<u8>, response: &Response<'_>) {
    let Response {
        status,
        body,
        slot,
        head_only,
        keep_alive,
    } = *response;
    let connection = if keep_alive { "keep-alive" } else { "close" };
    // Writing into a Vec<u8> cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         X-Steer-Worker: {slot}\r\nConnection: {connection}\r\n",
        status.code(),
        status.reason(),
        body.len(),
    );
    if status == Status::MethodNotAllowed {
        out.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(buf: &[u8]) -> RequestHead<'_> {
        parse_head(buf)
            .expect("a valid head")
            .expect("a complete head")
    }

    #[test]
    fn simple_get_is_parsed_and_kept_alive() {
        let request = b"GET /sleep?ms=5 HTTP/1.1\r\nHost: example\r\n\r\n";
        let parsed = head(request);
        assert_eq!(parsed.method, "GET");
        assert_eq!(parsed.target, "/sleep?ms=5");
        assert!(parsed.keep_alive);
        assert_eq!(parsed.content_length, 0);
        assert_eq!(parsed.len, request.len());
    }

    #[test]
    fn pipelined_requests_are_parsed_one_after_the_other() {
        let buf = b"GET /a HTTP/1.1\r\n\r\nHEAD /b HTTP/1.1\r\nConnection: close\r\n\r\nGET /c HT";
        let first = head(buf);
        assert_eq!(first.target, "/a");
        let rest = &buf[first.len..];
        let second = head(rest);
        assert_eq!(
            (second.method, second.target, second.keep_alive),
            ("HEAD", "/b", false)
        );
        let tail = &rest[second.len..];
        assert_eq!(
            parse_head(tail),
            Ok(None),
            "a partial third request waits for more bytes"
        );
    }

    #[test]
    fn keep_alive_follows_version_and_connection_header() {
        assert!(!head(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!head(b"GET / HTTP/1.1\r\nConnection: upgrade, close\r\n\r\n").keep_alive);
        assert!(head(b"GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n").keep_alive);
        assert!(keeps_alive(1, false, false));
        assert!(!keeps_alive(1, true, true));
        assert!(!keeps_alive(0, false, false));
        assert!(keeps_alive(0, false, true));
    }

    #[test]
    fn malformed_requests_are_rejected_with_400() {
        for garbage in [
            &b"\x00\x01\x02 nonsense\r\n\r\n"[..],
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        ] {
            let rejection = parse_head(garbage).expect_err("garbage must be rejected");
            assert_eq!(rejection, Rejection::Malformed, "{garbage:?}");
            assert_eq!(rejection.status().code(), 400);
        }
    }

    #[test]
    fn oversize_heads_are_rejected_with_431() {
        let mut long = b"GET / HTTP/1.1\r\nX-Filler: ".to_vec();
        long.resize(MAX_HEAD_BYTES + 1, b'a');
        assert_eq!(
            parse_head(&long),
            Err(Rejection::HeadTooLarge),
            "incomplete and too long"
        );
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            parse_head(&long),
            Err(Rejection::HeadTooLarge),
            "complete but too long"
        );

        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for n in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{n}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&many), Err(Rejection::HeadTooLarge));
        assert_eq!(Rejection::HeadTooLarge.status().code(), 431);
    }

    #[test]
    fn body_framing_is_checked() {
        let with_body =
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello";
        let parsed = head(with_body);
        assert_eq!(parsed.content_length, 5);
        assert!(parsed.expects_continue);
        assert_eq!(&with_body[parsed.len..], b"hello");

        let huge = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert_eq!(parse_head(huge.as_bytes()), Err(Rejection::BodyTooLarge));
        let overflow = b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert_eq!(parse_head(overflow), Err(Rejection::BodyTooLarge));
        let chunked =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert_eq!(parse_head(chunked), Err(Rejection::TransferEncoding));
    }

    #[test]
    fn responses_carry_length_type_worker_and_connection() {
        let mut out = Vec::new();
        let response = Response {
            status: Status::Ok,
            body: "hi\n",
            slot: 4,
            head_only: false,
            keep_alive: true,
        };
        write_response(&mut out, &response);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\n\
             X-Steer-Worker: 4\r\nConnection: keep-alive\r\n\r\nhi\n"
        );

        out.clear();
        let head_only = Response {
            status: Status::MethodNotAllowed,
            head_only: true,
            keep_alive: false,
            ..response
        };
        write_response(&mut out, &head_only);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("Content-Length: 3\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.contains("Allow: GET, HEAD\r\n"));
        assert!(text.ends_with("\r\n\r\n"), "HEAD answers carry no body");
    }
}
