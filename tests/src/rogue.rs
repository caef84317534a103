//! A rogue of the same user on a cluster's port: it joins the `SO_REUSEPORT` group, and may
//! replace the group's program with a classic BPF filter.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// A non-blocking listener on `addr` with `SO_REUSEPORT`: it joins the port's group.
///
/// # Panics
///
/// If it cannot bind (another user's group, or no `SO_REUSEPORT` on the port).
pub fn rogue_listener(addr: SocketAddr) -> TcpListener {
    rogue_listener_with_backlog(addr, 1024)
}

/// [`rogue_listener`] with an accept queue of `backlog`: a rogue that never accepts and
/// has a full queue drops every SYN handed to it, without a reset.
///
/// # Panics
///
/// As [`rogue_listener`].
pub fn rogue_listener_with_backlog(addr: SocketAddr, backlog: i32) -> TcpListener {
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).expect("socket");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    socket.bind(&addr.into()).expect("the rogue binds the port");
    socket.listen(backlog).expect("listen");
    socket.set_nonblocking(true).expect("nonblocking");
    socket.into()
}

/// Replaces the group's program with a one-instruction classic BPF filter that returns
/// `index`: the rogue's own place in the group's socket array.
///
/// # Panics
///
/// If the kernel refuses the filter.
pub fn attach_classic_bpf_returning(socket: &TcpListener, index: u32) {
    // BPF_RET | BPF_K
    let code = [libc::sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: index,
    }];
    let program = libc::sock_fprog {
        len: 1,
        filter: code.as_ptr().cast_mut(),
    };
    // SAFETY: a valid sock_fprog pointing at `code`, which outlives the call; the kernel
    // copies the program.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&raw const program).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    assert_eq!(
        ret,
        0,
        "SO_ATTACH_REUSEPORT_CBPF: {}",
        std::io::Error::last_os_error()
    );
}

/// Opens `n` connections to `addr`, the i-th from `clients[i % len]` (the handshake
/// completes in the kernel either way), and returns how many `rogue` took.
///
/// # Panics
///
/// If a connection fails.
pub fn rogue_share(addr: SocketAddr, rogue: &TcpListener, clients: &[IpAddr], n: usize) -> usize {
    let mut got = 0;
    let mut open = Vec::with_capacity(n);
    for i in 0..n {
        let client = clients[i % clients.len()];
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .expect("socket");
        socket
            .bind(&SocketAddr::new(client, 0).into())
            .expect("bind client");
        socket
            .connect_timeout(&addr.into(), Duration::from_secs(2))
            .expect("connect");
        open.push(socket);
        loop {
            match rogue.accept() {
                Ok(_) => got += 1,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("rogue accept: {e}"),
            }
        }
    }
    got
}
