//! The UDP half of a drain: read what is queued on a socket until it is empty.
//!
//! Before it asks a worker to drain, the primary takes the worker's UDP sockets out of
//! steering: no new datagram reaches them. What is queued there is the worker's to
//! answer, and is freed unread if the socket is closed first. So a draining worker reads
//! each UDP socket until `recvfrom` says `EAGAIN`, answers what it read, then closes it.

use std::io;
use std::net::{SocketAddr, UdpSocket};

/// The largest UDP payload.
const LARGEST_DATAGRAM: usize = 65_535;

/// Reads every datagram queued on `socket` until none is left, calling `each(payload,
/// sender)` for each in the order they arrived, and returns how many there were. Sets the
/// socket non-blocking (`fcntl(F_SETFL)`), then `recvfrom(2)` until `EAGAIN`: it never
/// waits for a datagram still to come. Call it once the primary has asked for the drain,
/// then drop the socket.
///
/// ```no_run
/// # fn drained(worker: &steer::Worker) -> std::io::Result<()> {
/// let dns = worker.udp_socket("dns").expect("a UDP listener named dns");
/// steer::drain_datagrams(dns, |query, client| {
///     let _ = dns.send_to(query, client); // answer it as any other
/// })?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// What `fcntl(2)` or `recvfrom(2)` report, other than `EAGAIN`, `EINTR` and the
/// `ECONNREFUSED` an earlier answer's ICMP error leaves on the socket. The datagrams read
/// before the error have been handed to `each`.
pub fn drain_datagrams(
    socket: &UdpSocket,
    mut each: impl FnMut(&[u8], SocketAddr),
) -> io::Result<usize> {
    socket.set_nonblocking(true)?;
    let mut buffer = vec![0u8; LARGEST_DATAGRAM];
    let mut read = 0;
    loop {
        match socket.recv_from(&mut buffer) {
            Ok((len, sender)) => {
                read += 1;
                each(&buffer[..len], sender);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(read),
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionRefused
                ) => {}
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queued_datagram_is_handed_over_and_answered_then_it_returns() {
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let client = UdpSocket::bind("127.0.0.1:0").expect("client");
        for socket in [&server, &client] {
            socket2::SockRef::from(socket)
                .set_recv_buffer_size(4 << 20)
                .expect("SO_RCVBUF");
        }
        let to = server.local_addr().expect("addr");
        let queued = 700;
        for i in 0..queued {
            client.send_to(format!("{i}").as_bytes(), to).expect("send");
        }
        let mut seen = Vec::new();
        let read = drain_datagrams(&server, |payload, sender| {
            seen.push(String::from_utf8_lossy(payload).into_owned());
            server.send_to(payload, sender).expect("answer");
        })
        .expect("drained");
        assert_eq!(read, queued);
        let expected: Vec<String> = (0..queued).map(|i| i.to_string()).collect();
        assert_eq!(seen, expected, "each once, in order");
        client.set_nonblocking(true).expect("nonblocking");
        let mut answers = 0;
        let mut buffer = [0u8; 64];
        while client.recv(&mut buffer).is_ok() {
            answers += 1;
        }
        assert_eq!(answers, queued);
        let again = drain_datagrams(&server, |_, _| panic!("nothing is left"));
        assert_eq!(again.expect("empty"), 0, "an empty socket returns at once");
    }
}
