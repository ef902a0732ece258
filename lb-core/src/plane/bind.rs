//! Binding listening sockets: one per worker, each with `SO_REUSEPORT`
//! (the kernel spreads connections and flows over the workers) and
//! `IP_FREEBIND` (a VIP not yet on the host still binds).

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};

/// Binds one `SO_REUSEPORT` socket per worker on `addr`, with
/// `IP_FREEBIND` so a VIP not yet on the host still binds. With port 0, the
/// first socket's port is reused by the others. `Type::STREAM` sockets are
/// put in listening state, with `TCP_NODELAY` for the sockets they accept.
fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
    kind: Type,
) -> io::Result<(Vec<Socket>, SocketAddr)> {
    let mut out = Vec::with_capacity(count);
    let mut actual = addr;
    for _ in 0..count.max(1) {
        let s = Socket::new(Domain::for_address(addr), kind, None)?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        if addr.is_ipv4() {
            s.set_freebind_v4(true)?;
        } else {
            s.set_freebind_v6(true)?;
        }
        s.set_nonblocking(true)?;
        if kind == Type::DGRAM {
            // Room for bursts: a worker busy for a moment should not drop.
            let _ = s.set_recv_buffer_size(4 << 20);
        }
        s.bind(&actual.into())?;
        if kind == Type::STREAM {
            // Accepted sockets inherit TCP_NODELAY from the listener, so no
            // connection needs its own setsockopt (test `accepted_sockets_inherit_nodelay`).
            s.set_tcp_nodelay(true)?;
            s.listen(4096)?;
        }
        if actual.port() == 0 {
            actual = s
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("not an IP socket"))?;
        }
        out.push(s);
    }
    Ok((out, actual))
}

/// One listening TCP socket per worker, each with `SO_REUSEPORT` and
/// `IP_FREEBIND` (a VIP not yet on the host still binds).
pub fn bind_tcp(
    addr: SocketAddr,
    count: usize,
) -> io::Result<(Vec<std::net::TcpListener>, SocketAddr)> {
    let (sockets, actual) = bind_reuseport(addr, count, Type::STREAM)?;
    Ok((sockets.into_iter().map(Into::into).collect(), actual))
}

/// One UDP socket per worker, each with `SO_REUSEPORT` and `IP_FREEBIND`.
pub fn bind_udp(
    addr: SocketAddr,
    count: usize,
) -> io::Result<(Vec<std::net::UdpSocket>, SocketAddr)> {
    let (sockets, actual) = bind_reuseport(addr, count, Type::DGRAM)?;
    Ok((sockets.into_iter().map(Into::into).collect(), actual))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forwarder relies on this instead of setting `TCP_NODELAY` on each
    /// accepted connection.
    #[test]
    fn accepted_sockets_inherit_nodelay() {
        let (listeners, addr) = bind_tcp("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let listener = &listeners[0];
        listener.set_nonblocking(false).unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
        assert!(
            !client.nodelay().unwrap(),
            "the check itself tells the two apart"
        );
    }
}
