//! The real accept-queue length of every listening TCP socket in this network namespace,
//! by inode, from `sock_diag(7)` (`NETLINK_SOCK_DIAG`, the interface `ss -lt` reads).
//!
//! For a listener the kernel reports `idiag_rqueue` = `sk_ack_backlog`: handshakes that
//! completed and wait for `accept`. Half-open requests (SYNs that never complete) are not
//! in it, which is exactly why `least-loaded` settles its estimate against it.

use std::collections::HashMap;
use std::io;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// A `NETLINK_SOCK_DIAG` socket, opened once and asked once per health interval.
#[derive(Debug)]
pub struct ListenQueues {
    socket: Socket,
    buffer: Vec<u8>,
}

impl ListenQueues {
    /// Opens the netlink socket (no privilege needed to read one's own namespace).
    pub fn open() -> io::Result<ListenQueues> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(ListenQueues {
            socket,
            buffer: vec![0; 64 * 1024],
        })
    }

    /// Inode -> accept-queue length of every listening TCP socket of `family` (v4 or v6)
    /// bound to `port`.
    pub fn lengths(&mut self, ipv6: bool, port: u16) -> io::Result<HashMap<u64, u32>> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family: if ipv6 { AF_INET6 } else { AF_INET },
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::LISTEN,
                socket_id: if ipv6 {
                    SocketId::new_v6()
                } else {
                    SocketId::new_v4()
                },
            })
            .into(),
        );
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        let mut lengths = HashMap::new();
        loop {
            let size = self.socket.recv(&mut &mut self.buffer[..], 0)?;
            let mut offset = 0;
            while offset < size {
                let message =
                    NetlinkMessage::<SockDiagMessage>::deserialize(&self.buffer[offset..size])
                        .map_err(|e| io::Error::other(format!("sock_diag reply: {e}")))?;
                let length = message.header.length as usize;
                match message.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                        let header = &response.header;
                        if header.socket_id.source_port == port {
                            lengths.insert(u64::from(header.inode), header.recv_queue);
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(lengths),
                    NetlinkPayload::Error(err) => {
                        return Err(err.to_io());
                    }
                    _ => {}
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn reports_a_listeners_accept_queue_by_inode() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let inode = nix::sys::stat::fstat(listener.as_fd())
            .expect("fstat")
            .st_ino;
        let mut queues = ListenQueues::open().expect("sock_diag socket");
        assert_eq!(queues.lengths(false, addr.port()).expect("dump")[&inode], 0);
        let _clients: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        assert_eq!(
            queues.lengths(false, addr.port()).expect("dump")[&inode],
            3,
            "three completed handshakes wait for accept"
        );
        let _accepted = listener.accept().expect("accept");
        assert_eq!(queues.lengths(false, addr.port()).expect("dump")[&inode], 2);
    }
}
