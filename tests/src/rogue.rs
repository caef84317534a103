//! A rogue of the same user on a cluster's port: it joins the `SO_REUSEPORT` group (TCP or
//! UDP), and may replace the group's program with a classic BPF filter or an eBPF program
//! of its own.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// `SO_ATTACH_REUSEPORT_EBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;

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

/// A non-blocking UDP socket bound to `addr` with `SO_REUSEPORT`: it joins the port's
/// group (as a worker's socket does), and never connects.
///
/// # Panics
///
/// If it cannot bind (another user's group, or no `SO_REUSEPORT` on the port).
pub fn rogue_udp_socket(addr: SocketAddr) -> UdpSocket {
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).expect("socket");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    socket.bind(&addr.into()).expect("the rogue binds the port");
    socket.set_nonblocking(true).expect("nonblocking");
    socket.into()
}

/// The UDP sockets bound to exactly `addr` (IPv4), from `/proc/net/udp`: the members of
/// its `SO_REUSEPORT` group, when all of them are the same user's. A socket joins the
/// group's socket array at its end, so the last one bound sits at this count minus one.
///
/// # Panics
///
/// If `/proc/net/udp` cannot be read, or `addr` is IPv6.
pub fn udp_sockets_bound_to(addr: SocketAddr) -> usize {
    let SocketAddr::V4(addr) = addr else {
        panic!("udp_sockets_bound_to reads IPv4 sockets only");
    };
    // `0100007F:1F90`: the address as a native-endian u32 in hex, then the port.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(addr.ip().octets()),
        addr.port()
    );
    std::fs::read_to_string("/proc/net/udp")
        .expect("read /proc/net/udp")
        .lines()
        .skip(1)
        .filter(|line| line.split_whitespace().nth(1) == Some(local.as_str()))
        .count()
}

/// Replaces the group's program with a one-instruction classic BPF filter that returns
/// `index`: the rogue's own place in the group's socket array.
///
/// # Panics
///
/// If the kernel refuses the filter.
pub fn attach_classic_bpf_returning(socket: &impl AsRawFd, index: u32) {
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

/// Replaces the group's program with an eBPF `SK_REUSEPORT` program of the rogue's own,
/// loaded here, that drops everything (`r0 = SK_DROP; exit`): no socket of the group gets
/// anything. Returns the program's fd (the group holds its own reference too).
///
/// # Panics
///
/// If the kernel refuses to load or attach it (no `CAP_BPF`).
pub fn attach_ebpf_dropping_everything(socket: &impl AsRawFd) -> OwnedFd {
    // `mov64 r0, 0` (BPF_ALU64 | BPF_MOV | BPF_K), then `exit` (BPF_JMP | BPF_EXIT).
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = c"GPL";
    // `union bpf_attr` for BPF_PROG_LOAD, as far as it is used; the rest stays zero.
    let mut attr = [0u8; 128];
    let mut put = |offset: usize, bytes: &[u8]| {
        attr[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0, &21u32.to_ne_bytes()); // prog_type: BPF_PROG_TYPE_SK_REUSEPORT
    put(4, &2u32.to_ne_bytes()); // insn_cnt
    put(8, &(insns.as_ptr() as u64).to_ne_bytes()); // insns
    put(16, &(license.as_ptr() as u64).to_ne_bytes()); // license
    put(68, &39u32.to_ne_bytes()); // expected_attach_type: BPF_SK_REUSEPORT_SELECT
    // SAFETY: BPF_PROG_LOAD (5) with a zeroed attr of the kernel's layout, whose pointers
    // (`insns`, `license`) outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 5, attr.as_ptr(), attr.len()) };
    assert!(
        fd >= 0,
        "BPF_PROG_LOAD: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd of our own, which nothing else owns.
    let program = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let raw = program.as_raw_fd();
    // SAFETY: an int option value that outlives the call.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_EBPF,
            (&raw const raw).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        ret,
        0,
        "SO_ATTACH_REUSEPORT_EBPF: {}",
        std::io::Error::last_os_error()
    );
    program
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
