//! The listening TCP sockets of a port in this network namespace, from `sock_diag(7)`
//! (`NETLINK_SOCK_DIAG`, the interface `ss -lt` reads): their addresses, inodes and
//! real accept-queue lengths.
//!
//! For a listener the kernel reports `idiag_rqueue` = `sk_ack_backlog`: handshakes that
//! completed and wait for `accept`. Half-open requests (SYNs that never complete) are not
//! in it, which is exactly why `least-loaded` settles its estimate against it.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr as IpSocketAddr;

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
        Ok(self
            .listeners(ipv6, port)?
            .into_iter()
            .map(|l| (l.inode, l.queued))
            .collect())
    }

    /// Every listening TCP socket of `family` (v4 or v6) bound to `port`.
    pub fn listeners(&mut self, ipv6: bool, port: u16) -> io::Result<Vec<Listener>> {
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
        let mut listeners = Vec::new();
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
                        let id = &header.socket_id;
                        if id.source_port == port {
                            listeners.push(Listener {
                                address: IpSocketAddr::new(id.source_address, port),
                                ipv6,
                                interface: id.interface_id,
                                inode: u64::from(header.inode),
                                queued: header.recv_queue,
                                backlog: header.send_queue,
                            });
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(listeners),
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

/// One listening socket, as `sock_diag` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    /// The address it is bound to (`0.0.0.0`, `::` or one address) and the port.
    pub address: IpSocketAddr,
    /// An `AF_INET6` socket (whatever its address: an IPv4-mapped one stays IPv6).
    pub ipv6: bool,
    /// The interface it is bound to (`SO_BINDTODEVICE`), 0 for none.
    pub interface: u32,
    /// Its inode (`socket:[inode]` in `/proc/<pid>/fd`).
    pub inode: u64,
    /// Completed handshakes waiting for `accept` (`sk_ack_backlog`).
    pub queued: u32,
    /// The accept queue's bound (`sk_max_ack_backlog`).
    pub backlog: u32,
}

impl Listener {
    /// Whether the kernel drops new SYNs for it: its accept queue is over its bound
    /// (`sk_acceptq_is_full`).
    pub fn is_full(&self) -> bool {
        self.queued > self.backlog
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
