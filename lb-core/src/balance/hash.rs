//! The pinned hash: FNV-1a over the bytes, then the MurmurHash3 64-bit
//! finaliser for avalanche. Fixed forever, so every `lbd` (any version, any
//! host) maps the same key to the same value. Never `DefaultHasher`, whose
//! algorithm and seed may change.

use std::net::{IpAddr, SocketAddr};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Hashes `bytes` with `seed` mixed in.
pub fn hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET ^ seed.wrapping_mul(FNV_PRIME);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    fmix64(h)
}

/// MurmurHash3's 64-bit finaliser.
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// Key bytes on the stack: two addresses (16 + 2 bytes each) and a
/// protocol byte at most, so hashing a key never allocates.
struct KeyBytes {
    buf: [u8; 40],
    len: usize,
}

impl KeyBytes {
    fn new() -> Self {
        Self {
            buf: [0; 40],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        self
    }

    fn ip(&mut self, ip: IpAddr) -> &mut Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => self.push(&v4.octets()),
            IpAddr::V6(v6) => self.push(&v6.octets()),
        }
    }

    /// IP octets then the port, big endian.
    fn addr(&mut self, addr: SocketAddr) -> &mut Self {
        self.ip(addr.ip()).push(&addr.port().to_be_bytes())
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The stable byte form of an address: IP octets then the port, big endian.
pub fn addr_bytes(addr: SocketAddr) -> Vec<u8> {
    KeyBytes::new().addr(addr).bytes().to_vec()
}

/// Hash of a client IP (session affinity).
pub fn client_ip_key(client: IpAddr) -> u64 {
    hash(0, KeyBytes::new().ip(client).bytes())
}

/// Hash of the five-tuple.
pub fn five_tuple_key(client: SocketAddr, local: SocketAddr, protocol: u8) -> u64 {
    hash(
        0,
        KeyBytes::new()
            .addr(client)
            .addr(local)
            .push(&[protocol])
            .bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINNED_WEIR_7: u64 = 2_580_866_113_004_988_079;

    #[test]
    fn pinned_values() {
        // These numbers are the contract: two lbds must agree on them.
        assert_eq!(hash(0, b""), fmix64(FNV_OFFSET));
        assert_ne!(hash(0, b"a"), hash(1, b"a"));
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(client_ip_key(v4), client_ip_key(mapped));
        assert_eq!(hash(7, b"weir"), PINNED_WEIR_7);
    }

    /// The keys hash exactly the documented bytes (the pinned contract).
    #[test]
    fn key_bytes_are_the_documented_form() {
        let c: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        let l: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let mut want = vec![10, 1, 2, 3, 0x0f, 0xa0];
        assert_eq!(addr_bytes(c), want);
        want.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        want.extend_from_slice(&[0x01, 0xbb, 6]);
        assert_eq!(five_tuple_key(c, l, 6), hash(0, &want));
        assert_eq!(client_ip_key(c.ip()), hash(0, &[10, 1, 2, 3]));
    }
}
