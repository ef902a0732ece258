//! IP address management for LoadBalancer Services, as pure code: pools of
//! CIDRs and ranges (IPv4 and IPv6), requested addresses, pool selection,
//! dual-stack, and sharing an address between Services whose sharing keys
//! match and whose (port, protocol) sets do not overlap.
//!
//! Guarantees: an address is held by two Services only when both carry the
//! same sharing key and their ports are disjoint; an assignment that still
//! satisfies a Service's request is returned unchanged (a restart, or a
//! reseed from status, never moves an address); a refusal changes nothing.
//! Service status is the source of truth: [`Allocator::seed`] records what a
//! Service already holds, even outside today's pools (kept, with a warning).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A Service, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ServiceKey {
    /// `namespace/name`.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

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

/// A Service port's transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP (reserved: forwarders do not carry it, but it still occupies the port).
    Sctp,
}

/// The families a Service asks for (`ipFamilies` + `ipFamilyPolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FamilyPolicy {
    /// One address of this family.
    Single(Family),
    /// Both families if possible, else the primary one (or the other).
    PreferDual(Family),
    /// Both families, or nothing.
    RequireDual(Family),
}

impl FamilyPolicy {
    fn families(self) -> Vec<Family> {
        let other = |f| {
            if f == Family::V4 {
                Family::V6
            } else {
                Family::V4
            }
        };
        match self {
            FamilyPolicy::Single(f) => vec![f],
            FamilyPolicy::PreferDual(f) | FamilyPolicy::RequireDual(f) => vec![f, other(f)],
        }
    }
}

/// What a Service asks of the allocator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Families wanted.
    pub policy: FamilyPolicy,
    /// Specific addresses (`weir.dev/load-balancer-ips` or `spec.loadBalancerIP`).
    pub addresses: Vec<IpAddr>,
    /// `weir.dev/pool`: only this pool.
    pub pool: Option<String>,
    /// `weir.dev/allow-shared-ip`.
    pub sharing_key: Option<String>,
    /// The Service's (port, protocol) pairs.
    pub ports: Vec<(u16, Proto)>,
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

    fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip)) && !(self.avoid_buggy_ips && buggy(ip))
    }

    /// Addresses of `family` in the pool (after `avoid_buggy_ips`), capped at u64.
    pub fn size(&self, family: Family) -> u64 {
        let total: u128 = self
            .ranges
            .iter()
            .filter(|r| r.family == family)
            .map(|r| {
                let mut n = r.size();
                if self.avoid_buggy_ips && family == Family::V4 {
                    n -= (r.first..=r.last)
                        .filter(|&a| a as u32 & 0xff == 0 || a as u32 & 0xff == 255)
                        .count()
                        .min(n as usize) as u128;
                }
                n
            })
            .sum();
        total.min(u128::from(u64::MAX)) as u64
    }

    fn candidates(&self, family: Family) -> impl Iterator<Item = IpAddr> + '_ {
        self.ranges
            .iter()
            .filter(move |r| r.family == family)
            .flat_map(move |r| (r.first..=r.last).map(move |n| from_u128(n, family)))
            .filter(move |ip| !(self.avoid_buggy_ips && buggy(*ip)))
    }
}

fn buggy(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v) if v.octets()[3] == 0 || v.octets()[3] == 255)
}

/// Why a request was refused. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `weir.dev/pool` names no pool.
    #[error("no pool named {0:?}")]
    NoSuchPool(String),
    /// A requested address lies in no pool.
    #[error("{0} is not in any pool")]
    NotInAnyPool(IpAddr),
    /// A requested address lies outside the requested pool.
    #[error("{ip} is not in pool {pool:?}")]
    NotInPool {
        /// The address.
        ip: IpAddr,
        /// The pool.
        pool: String,
    },
    /// A requested address is held by a Service it may not be shared with.
    #[error(
        "{ip} is in use by {holder} (sharing needs the same weir.dev/allow-shared-ip key on both)"
    )]
    InUse {
        /// The address.
        ip: IpAddr,
        /// Who holds it.
        holder: ServiceKey,
    },
    /// Sharing keys match but ports overlap.
    #[error("{ip} is shared with {holder}, which already uses port {port} ({proto:?})")]
    PortConflict {
        /// The address.
        ip: IpAddr,
        /// Who holds it.
        holder: ServiceKey,
        /// The overlapping port.
        port: u16,
        /// Its protocol.
        proto: Proto,
    },
    /// No free address of a family that the Service needs.
    #[error("no free {family:?} address in {scope}")]
    Exhausted {
        /// The family.
        family: Family,
        /// Which pools were searched.
        scope: String,
    },
    /// The requested addresses do not fit the family policy.
    #[error("requested addresses do not match the Service's IP families: {0}")]
    FamilyMismatch(String),
}

/// One Service holding one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holding {
    /// The address.
    pub ip: IpAddr,
    /// The Service.
    pub service: ServiceKey,
    /// Its sharing key.
    pub sharing_key: Option<String>,
    /// Its (port, protocol) pairs.
    pub ports: Vec<(u16, Proto)>,
}

#[derive(Clone, Debug)]
struct Holder {
    service: ServiceKey,
    sharing_key: Option<String>,
    ports: Vec<(u16, Proto)>,
}

/// The allocator: in memory, no API calls.
#[derive(Debug, Default)]
pub struct Allocator {
    pools: Vec<Pool>,
    holders: HashMap<IpAddr, Vec<Holder>>,
    by_service: BTreeMap<ServiceKey, Vec<IpAddr>>,
}

impl Allocator {
    /// An allocator over `pools` (config order is the auto-assign order).
    pub fn new(pools: Vec<Pool>) -> Self {
        Self {
            pools,
            ..Self::default()
        }
    }

    /// The pools, in config order.
    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// Replaces the pools. Addresses held outside the new pools stay held
    /// (returned, so the caller can warn); nothing is yanked.
    pub fn set_pools(&mut self, pools: Vec<Pool>) -> Vec<(ServiceKey, IpAddr)> {
        self.pools = pools;
        self.orphans()
    }

    /// Held addresses that no pool contains any more.
    pub fn orphans(&self) -> Vec<(ServiceKey, IpAddr)> {
        self.by_service
            .iter()
            .flat_map(|(k, ips)| ips.iter().map(move |ip| (k.clone(), *ip)))
            .filter(|(_, ip)| !self.pools.iter().any(|p| p.contains(*ip)))
            .collect()
    }

    /// The addresses `service` holds.
    pub fn addresses(&self, service: &ServiceKey) -> &[IpAddr] {
        self.by_service
            .get(service)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// (size, used) of a pool per family.
    pub fn usage(&self, pool: &str, family: Family) -> Option<(u64, u64)> {
        let p = self.pools.iter().find(|p| p.name == pool)?;
        let used = self
            .holders
            .keys()
            .filter(|ip| Family::of(**ip) == family && p.contains(**ip))
            .count() as u64;
        Some((p.size(family), used))
    }

    /// Records what `service` already holds (from its status), as is.
    /// Call for already-assigned Services first, before any [`Self::assign`].
    pub fn seed(&mut self, service: &ServiceKey, ips: &[IpAddr], request: &Request) {
        self.release(service);
        for ip in ips {
            self.hold(service, *ip, request);
        }
    }

    /// Frees every address of `service`.
    pub fn release(&mut self, service: &ServiceKey) -> Vec<IpAddr> {
        let ips = self.by_service.remove(service).unwrap_or_default();
        for ip in &ips {
            if let Some(list) = self.holders.get_mut(ip) {
                list.retain(|h| &h.service != service);
                if list.is_empty() {
                    self.holders.remove(ip);
                }
            }
        }
        ips
    }

    fn hold(&mut self, service: &ServiceKey, ip: IpAddr, request: &Request) {
        self.holders.entry(ip).or_default().push(Holder {
            service: service.clone(),
            sharing_key: request.sharing_key.clone(),
            ports: request.ports.clone(),
        });
        self.by_service.entry(service.clone()).or_default().push(ip);
    }

    /// Whether `service` (with `request`) may use `ip` now.
    fn check(&self, service: &ServiceKey, ip: IpAddr, request: &Request) -> Result<(), Refusal> {
        for h in self
            .holders
            .get(&ip)
            .into_iter()
            .flatten()
            .filter(|h| &h.service != service)
        {
            match (&h.sharing_key, &request.sharing_key) {
                (Some(a), Some(b)) if a == b => {
                    if let Some(&(port, proto)) = request.ports.iter().find(|p| h.ports.contains(p))
                    {
                        return Err(Refusal::PortConflict {
                            ip,
                            holder: h.service.clone(),
                            port,
                            proto,
                        });
                    }
                }
                _ => {
                    return Err(Refusal::InUse {
                        ip,
                        holder: h.service.clone(),
                    })
                }
            }
        }
        Ok(())
    }

    fn pools_for(&self, request: &Request) -> Result<Vec<&Pool>, Refusal> {
        match &request.pool {
            Some(name) => self
                .pools
                .iter()
                .find(|p| &p.name == name)
                .map(|p| vec![p])
                .ok_or_else(|| Refusal::NoSuchPool(name.clone())),
            None => Ok(self.pools.iter().filter(|p| p.auto_assign).collect()),
        }
    }

    /// Gives `service` addresses satisfying `request`, keeping what it
    /// holds when that still satisfies it. On refusal nothing changes.
    pub fn assign(
        &mut self,
        service: &ServiceKey,
        request: &Request,
    ) -> Result<Vec<IpAddr>, Refusal> {
        let held = self.addresses(service).to_vec();
        if !held.is_empty() && self.satisfies(service, &held, request) {
            return Ok(held);
        }
        let chosen = self.choose(service, request)?;
        self.release(service);
        for ip in &chosen {
            self.hold(service, *ip, request);
        }
        Ok(chosen)
    }

    fn satisfies(&self, service: &ServiceKey, held: &[IpAddr], request: &Request) -> bool {
        let families: Vec<Family> = held.iter().map(|ip| Family::of(*ip)).collect();
        let family_ok = match request.policy {
            FamilyPolicy::Single(f) => families == [f],
            FamilyPolicy::RequireDual(_) => {
                families.len() == 2
                    && families.contains(&Family::V4)
                    && families.contains(&Family::V6)
            }
            // Keep what it has: upgrading to dual would be a new address, not a move.
            FamilyPolicy::PreferDual(_) => !families.is_empty() && families.len() <= 2,
        };
        let requested_ok = request.addresses.is_empty() || {
            let mut a = request.addresses.clone();
            let mut b = held.to_vec();
            a.sort();
            b.sort();
            a == b
        };
        let pool_ok = match &request.pool {
            Some(name) => self
                .pools
                .iter()
                .find(|p| &p.name == name)
                .is_some_and(|p| held.iter().all(|ip| p.contains(*ip))),
            None => true,
        };
        family_ok
            && requested_ok
            && pool_ok
            && held
                .iter()
                .all(|ip| self.check(service, *ip, request).is_ok())
    }

    fn choose(&self, service: &ServiceKey, request: &Request) -> Result<Vec<IpAddr>, Refusal> {
        let pools = self.pools_for(request)?;
        if !request.addresses.is_empty() {
            return self.choose_requested(service, request);
        }
        let mut out = Vec::new();
        for (i, family) in request.policy.families().into_iter().enumerate() {
            match self.first_free(service, request, &pools, family) {
                Some(ip) => out.push(ip),
                None => {
                    let required = i == 0 && !matches!(request.policy, FamilyPolicy::PreferDual(_))
                        || matches!(request.policy, FamilyPolicy::RequireDual(_));
                    if required {
                        let scope = match &request.pool {
                            Some(p) => format!("pool {p:?}"),
                            None => "the auto-assign pools".to_owned(),
                        };
                        return Err(Refusal::Exhausted { family, scope });
                    }
                }
            }
        }
        if out.is_empty() {
            let family = request.policy.families()[0];
            return Err(Refusal::Exhausted {
                family,
                scope: "any pool".into(),
            });
        }
        Ok(out)
    }

    /// Prefers an address already shared under the same key (so Services
    /// that asked to share do share), then the first free one.
    fn first_free(
        &self,
        service: &ServiceKey,
        request: &Request,
        pools: &[&Pool],
        family: Family,
    ) -> Option<IpAddr> {
        if request.sharing_key.is_some() {
            let mut shared: Vec<IpAddr> = self
                .holders
                .iter()
                .filter(|(ip, hs)| {
                    Family::of(**ip) == family
                        && pools.iter().any(|p| p.contains(**ip))
                        && hs.iter().any(|h| h.sharing_key == request.sharing_key)
                })
                .map(|(ip, _)| *ip)
                .collect();
            shared.sort();
            if let Some(ip) = shared
                .into_iter()
                .find(|ip| self.check(service, *ip, request).is_ok())
            {
                return Some(ip);
            }
        }
        pools
            .iter()
            .flat_map(|p| p.candidates(family))
            .find(|ip| !self.holders.contains_key(ip) || self.check(service, *ip, request).is_ok())
    }

    fn choose_requested(
        &self,
        service: &ServiceKey,
        request: &Request,
    ) -> Result<Vec<IpAddr>, Refusal> {
        let families: Vec<Family> = request.addresses.iter().map(|ip| Family::of(*ip)).collect();
        let distinct = families
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        if distinct != families.len() {
            return Err(Refusal::FamilyMismatch(
                "two addresses of one family".into(),
            ));
        }
        match request.policy {
            FamilyPolicy::Single(f) if families != [f] => {
                return Err(Refusal::FamilyMismatch(format!(
                    "a single-stack {f:?} Service needs one {f:?} address"
                )));
            }
            FamilyPolicy::RequireDual(_) if families.len() != 2 => {
                return Err(Refusal::FamilyMismatch(
                    "RequireDualStack needs one IPv4 and one IPv6 address".into(),
                ));
            }
            _ => {}
        }
        for ip in &request.addresses {
            match &request.pool {
                Some(name) => {
                    let pool = self
                        .pools
                        .iter()
                        .find(|p| &p.name == name)
                        .ok_or_else(|| Refusal::NoSuchPool(name.clone()))?;
                    if !pool.contains(*ip) {
                        return Err(Refusal::NotInPool {
                            ip: *ip,
                            pool: name.clone(),
                        });
                    }
                }
                None => {
                    if !self.pools.iter().any(|p| p.contains(*ip)) {
                        return Err(Refusal::NotInAnyPool(*ip));
                    }
                }
            }
            self.check(service, *ip, request)?;
        }
        Ok(request.addresses.clone())
    }

    /// Every (address, holder) pair, sorted, for invariant checks and metrics.
    pub fn holdings(&self) -> Vec<Holding> {
        let mut out: Vec<Holding> = self
            .holders
            .iter()
            .flat_map(|(ip, hs)| {
                hs.iter().map(move |h| Holding {
                    ip: *ip,
                    service: h.service.clone(),
                    sharing_key: h.sharing_key.clone(),
                    ports: h.ports.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| (a.ip, &a.service).cmp(&(b.ip, &b.service)));
        out
    }
}
