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

fn push_ip(buf: &mut Vec<u8>, ip: IpAddr) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => buf.extend_from_slice(&v4.octets()),
        IpAddr::V6(v6) => buf.extend_from_slice(&v6.octets()),
    }
}

/// The stable byte form of an address: IP octets then the port, big endian.
pub fn addr_bytes(addr: SocketAddr) -> Vec<u8> {
    let mut buf = Vec::with_capacity(18);
    push_ip(&mut buf, addr.ip());
    buf.extend_from_slice(&addr.port().to_be_bytes());
    buf
}

/// Hash of a client IP (session affinity).
pub fn client_ip_key(client: IpAddr) -> u64 {
    let mut buf = Vec::with_capacity(16);
    push_ip(&mut buf, client);
    hash(0, &buf)
}

/// Hash of the five-tuple.
pub fn five_tuple_key(client: SocketAddr, local: SocketAddr, protocol: u8) -> u64 {
    let mut buf = addr_bytes(client);
    buf.extend_from_slice(&addr_bytes(local));
    buf.push(protocol);
    hash(0, &buf)
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
}
