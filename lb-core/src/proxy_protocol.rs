//! PROXY protocol headers (HAProxy's `doc/proxy-protocol.txt`), written to
//! the backend before any client byte so it learns the real client address.
//!
//! v1 is one text line (TCP only); v2 is binary (TCP `STREAM` and UDP
//! `DGRAM`). IPv4-mapped IPv6 addresses are sent as IPv4; a mix of families
//! (client IPv6, listener IPv4) is sent as IPv6 with the IPv4 side mapped,
//! as the spec requires both addresses in one family.

use std::net::{IpAddr, SocketAddr};

/// The 12-byte v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Transport carried in a v2 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `STREAM` (TCP).
    Stream,
    /// `DGRAM` (UDP).
    Datagram,
}

fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (src, dst) = (canon(src), canon(dst));
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => (src, dst),
        _ => (v6(src), v6(dst)),
    }
}

/// The v1 line for a TCP connection from `src` (client) to `dst` (listener).
pub fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// The header for a connection the proxy makes on its own behalf (a
/// health check): v1 `PROXY UNKNOWN`, or a v2 `LOCAL` header with no
/// addresses; the receiver then uses the connection's real endpoints.
pub fn local(version: lb_config::ProxyProtocol) -> Option<Vec<u8>> {
    match version {
        lb_config::ProxyProtocol::Off => None,
        lb_config::ProxyProtocol::V1 => Some(b"PROXY UNKNOWN\r\n".to_vec()),
        lb_config::ProxyProtocol::V2 => {
            let mut out = Vec::with_capacity(16);
            out.extend_from_slice(&V2_SIGNATURE);
            out.push(0x20); // version 2, command LOCAL
            out.push(0x00); // AF_UNSPEC, UNSPEC
            out.extend_from_slice(&0u16.to_be_bytes());
            Some(out)
        }
    }
}

/// The v2 header (command `PROXY`, no TLVs) for `src` (client) to `dst` (listener).
pub fn v2(src: SocketAddr, dst: SocketAddr, transport: Transport) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, command PROXY
    let proto = match transport {
        Transport::Stream => 0x1,
        Transport::Datagram => 0x2,
    };
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x10 | proto); // AF_INET
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.push(0x20 | proto); // AF_INET6
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => unreachable!("same_family returns one family"),
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_ipv4_and_ipv6() {
        assert_eq!(
            v1(a("192.0.2.1:56324"), a("198.51.100.10:443")),
            b"PROXY TCP4 192.0.2.1 198.51.100.10 56324 443\r\n"
        );
        assert_eq!(
            v1(a("[2001:db8::1]:56324"), a("[2001:db8::10]:443")),
            b"PROXY TCP6 2001:db8::1 2001:db8::10 56324 443\r\n"
        );
        // A v4 client on a dual-stack socket appears mapped; send it as TCP4.
        assert_eq!(
            v1(a("[::ffff:192.0.2.1]:1"), a("[::ffff:198.51.100.10]:2")),
            b"PROXY TCP4 192.0.2.1 198.51.100.10 1 2\r\n"
        );
        assert_eq!(
            v1(a("192.0.2.1:1"), a("[2001:db8::10]:2")),
            b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::10 1 2\r\n"
        );
    }

    #[test]
    fn v2_ipv4_stream_bytes() {
        let h = v2(
            a("192.0.2.1:56324"),
            a("198.51.100.10:443"),
            Transport::Stream,
        );
        let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
        want.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 10]);
        want.extend_from_slice(&[0xdc, 0x04, 0x01, 0xbb]);
        assert_eq!(h, want);
        assert_eq!(h.len(), 28);
    }

    #[test]
    fn v2_ipv6_and_dgram_bytes() {
        let h = v2(
            a("[2001:db8::1]:53"),
            a("[2001:db8::10]:5353"),
            Transport::Datagram,
        );
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(&h[12..16], &[0x21, 0x22, 0x00, 0x24]);
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        src[15] = 1;
        assert_eq!(&h[16..32], &src);
        assert_eq!(h[47], 0x10);
        assert_eq!(&h[48..52], &[0x00, 0x35, 0x14, 0xe9]);
        assert_eq!(h.len(), 52);
        let h4 = v2(a("10.0.0.1:1"), a("10.0.0.2:2"), Transport::Datagram);
        assert_eq!(h4[13], 0x12);
    }

    #[test]
    fn local_headers_for_health_checks() {
        use lb_config::ProxyProtocol;
        assert_eq!(local(ProxyProtocol::Off), None);
        assert_eq!(local(ProxyProtocol::V1).unwrap(), b"PROXY UNKNOWN\r\n");
        let v2 = local(ProxyProtocol::V2).unwrap();
        assert_eq!(&v2[..12], &V2_SIGNATURE);
        assert_eq!(&v2[12..], &[0x20, 0x00, 0x00, 0x00]);
    }
}
