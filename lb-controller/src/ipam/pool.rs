//! The address space: families, ranges (`CIDR` or `first-last`) and
//! pools, with the addresses a pool offers in order.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// An inclusive range of addresses of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrRange {
    first: u128,
    last: u128,
    family: Family,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

fn from_u128(n: u128, family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

impl AddrRange {
    /// Parses `CIDR` or `first-last`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some((a, b)) = text.split_once('-') {
            let (a, b): (IpAddr, IpAddr) = (
                a.trim()
                    .parse()
                    .map_err(|_| format!("{text:?}: {a:?} is not an address"))?,
                b.trim()
                    .parse()
                    .map_err(|_| format!("{text:?}: {b:?} is not an address"))?,
            );
            if Family::of(a) != Family::of(b) {
                return Err(format!("{text:?} mixes IPv4 and IPv6"));
            }
            if to_u128(a) > to_u128(b) {
                return Err(format!("{text:?} ends before it starts"));
            }
            return Ok(Self {
                first: to_u128(a),
                last: to_u128(b),
                family: Family::of(a),
            });
        }
        let (addr, len) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is neither a CIDR nor a range (a-b)"))?;
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?}: {addr:?} is not an address"))?;
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        let len: u32 = len
            .parse()
            .ok()
            .filter(|l| *l <= bits)
            .ok_or_else(|| format!("{text:?}: bad prefix length"))?;
        let host_bits = bits - len;
        let mask = if host_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        let first = to_u128(ip) & !mask;
        if first != to_u128(ip) {
            return Err(format!("{text:?} has host bits set"));
        }
        Ok(Self {
            first,
            last: first | mask,
            family: Family::of(ip),
        })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family && (self.first..=self.last).contains(&to_u128(ip))
    }

    /// Whether some address lies in both ranges.
    pub fn overlaps(&self, other: &AddrRange) -> bool {
        self.family == other.family && self.first <= other.last && other.first <= self.last
    }

    fn size(&self) -> u128 {
        self.last - self.first + 1
    }
}

/// A pool of addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    /// Unique name.
    pub name: String,
    /// Its ranges, in order.
    pub ranges: Vec<AddrRange>,
    /// Whether Services without `weir.dev/pool` may get addresses from it.
    pub auto_assign: bool,
    /// Skip IPv4 addresses ending in .0 and .255 (some clients drop them).
    pub avoid_buggy_ips: bool,
}

impl Pool {
    /// A pool from `addresses` (CIDRs or ranges).
    pub fn new(
        name: &str,
        addresses: &[&str],
        auto_assign: bool,
        avoid_buggy_ips: bool,
    ) -> Result<Self, String> {
        let ranges = addresses
            .iter()
            .map(|a| AddrRange::parse(a))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: name.to_owned(),
            ranges,
            auto_assign,
            avoid_buggy_ips,
        })
    }

    /// Whether `ip` is one of the pool's addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip)) && self.offers(ip)
    }

    /// Whether the pool gives out `ip` where a range holds it (not if it
    /// ends in .0 or .255 and `avoid_buggy_ips` is set).
    fn offers(&self, ip: IpAddr) -> bool {
        !(self.avoid_buggy_ips && buggy(ip))
    }

    /// Addresses of `family` in the pool (after `avoid_buggy_ips`), capped at u64.
    pub fn size(&self, family: Family) -> u64 {
        let total: u128 = self
            .ranges
            .iter()
            .filter(|r| r.family == family)
            .map(|r| {
                let n = r.size();
                if self.avoid_buggy_ips && family == Family::V4 {
                    // Counted, not walked: the metrics ask on every
                    // reconcile, and a /8 has 16 million addresses.
                    n - ending_in(r.first, r.last, 0) - ending_in(r.first, r.last, 255)
                } else {
                    n
                }
            })
            .sum();
        total.min(u128::from(u64::MAX)) as u64
    }

    /// Every candidate address of `family`, in order (the tests' reference
    /// for [`Pool::first_free`]).
    #[cfg(test)]
    pub(super) fn candidates(&self, family: Family) -> impl Iterator<Item = IpAddr> + '_ {
        self.ranges
            .iter()
            .filter(move |r| r.family == family)
            .flat_map(move |r| (r.first..=r.last).map(move |n| from_u128(n, family)))
            .filter(move |ip| self.offers(*ip))
    }
}

/// Where the search for a free address resumes in each range: every
/// candidate address of the range below its cursor is held. Sequential
/// assignments then cost one step each instead of a walk over every held
/// address from the start of the pool (n Services: O(n), not O(n²)).
/// Keyed by the range and the pool's `avoid_buggy_ips` (which decides the
/// candidates), not by pool, so that editing the pools keeps it valid.
#[derive(Debug, Default)]
pub struct Cursors(HashMap<(Family, u128, u128, bool), u128>);

impl Cursors {
    /// `ip` is held by nobody any more: no search may start past it.
    pub fn freed(&mut self, ip: IpAddr) {
        let (family, n) = (Family::of(ip), to_u128(ip));
        for ((f, first, last, _), at) in &mut self.0 {
            if *f == family && (*first..=*last).contains(&n) && *at > n {
                *at = n;
            }
        }
    }
}

impl Pool {
    /// The first candidate address of `family`, in the pool's order, that
    /// nobody holds (`held`) or that only the asking Service holds (`own`,
    /// its addresses held by no one else). Moves the cursors past what it
    /// finds held.
    pub(super) fn first_free(
        &self,
        family: Family,
        cursors: &mut Cursors,
        held: impl Fn(IpAddr) -> bool,
        own: &[IpAddr],
    ) -> Option<IpAddr> {
        for r in self.ranges.iter().filter(|r| r.family == family) {
            let key = (family, r.first, r.last, self.avoid_buggy_ips);
            let mut n = cursors.0.get(&key).map_or(r.first, |&at| at.max(r.first));
            let unheld = loop {
                let ip = from_u128(n, family);
                if self.offers(ip) && !held(ip) {
                    break Some(n);
                }
                if n >= r.last {
                    break None;
                }
                n += 1;
            };
            // Everything below `n` is held (or no candidate).
            cursors.0.insert(key, n);
            let own = own
                .iter()
                .filter(|ip| r.contains(**ip) && self.offers(**ip))
                .map(|ip| to_u128(*ip))
                .min();
            if let Some(best) = unheld.into_iter().chain(own).min() {
                return Some(from_u128(best, family));
            }
        }
        None
    }
}

/// How many of the addresses `first..=last` have `octet` as their last
/// byte.
fn ending_in(first: u128, last: u128, octet: u128) -> u128 {
    // Those in 0..=x.
    let upto = |x: u128| if x < octet { 0 } else { (x - octet) / 256 + 1 };
    upto(last) - if first == 0 { 0 } else { upto(first - 1) }
}

fn buggy(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v) if v.octets()[3] == 0 || v.octets()[3] == 255)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counted size matches a walk over the addresses, for ranges that
    /// start and end on and off the .0 and .255 boundaries.
    #[test]
    fn size_without_buggy_addresses_matches_a_walk() {
        for range in [
            "10.0.0.0/24",
            "10.0.0.0/22",
            "10.0.0.255-10.0.1.0",
            "10.0.0.1-10.0.0.254",
            "10.0.0.7-10.0.3.9",
            "10.0.0.255-10.0.0.255",
            "0.0.0.0-0.0.2.3",
            "255.255.254.200-255.255.255.255",
        ] {
            let pool = Pool::new("p", &[range], true, true).unwrap();
            let walked = pool.candidates(Family::V4).count() as u64;
            assert_eq!(pool.size(Family::V4), walked, "{range}");
        }
        // A /8 answers without walking 16 million addresses.
        let big = Pool::new("big", &["10.0.0.0/8"], true, true).unwrap();
        assert_eq!(big.size(Family::V4), (1 << 24) - 2 * (1 << 16));
    }
}
