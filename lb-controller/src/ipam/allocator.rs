//! The allocator: who holds which address, and the decisions that give,
//! keep, share and free them. In memory; no API calls.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use super::pool::{Cursors, Family, Pool};
use super::request::{FamilyPolicy, Proto, Request, ServiceKey};

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
    /// Where searches for a free address resume.
    cursors: Cursors,
    /// Addresses held, per pool (by index) and family; kept with
    /// `holders`, recounted when the pools change.
    used: HashMap<(usize, Family), u64>,
}

impl Allocator {
    /// An allocator over `pools` (config order is the auto-assign order).
    pub fn new(pools: Vec<Pool>) -> Self {
        Self {
            pools,
            ..Self::default()
        }
    }

    /// Counts `ip` in (`delta` 1) or out of (`delta` -1) the pools
    /// holding it, as it gets its first holder or loses its last.
    fn count(&mut self, ip: IpAddr, delta: i64) {
        let family = Family::of(ip);
        for (i, _) in self
            .pools
            .iter()
            .enumerate()
            .filter(|(_, p)| p.contains(ip))
        {
            let used = self.used.entry((i, family)).or_default();
            *used = used.saturating_add_signed(delta);
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
        self.used.clear();
        let held: Vec<IpAddr> = self.holders.keys().copied().collect();
        for ip in held {
            self.count(ip, 1);
        }
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
        let (i, p) = self
            .pools
            .iter()
            .enumerate()
            .find(|(_, p)| p.name == pool)?;
        let used = self.used.get(&(i, family)).copied().unwrap_or(0);
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
                    self.count(*ip, -1);
                    self.cursors.freed(*ip);
                }
            }
        }
        ips
    }

    fn hold(&mut self, service: &ServiceKey, ip: IpAddr, request: &Request) {
        if !self.holders.contains_key(&ip) {
            self.count(ip, 1);
        }
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

    /// The pools (their indices) that `request` may get addresses from.
    fn pools_for(&self, request: &Request) -> Result<Vec<usize>, Refusal> {
        let indexed = self.pools.iter().enumerate();
        match &request.pool {
            Some(name) => indexed
                .filter(|(_, p)| &p.name == name)
                .map(|(i, _)| vec![i])
                .next()
                .ok_or_else(|| Refusal::NoSuchPool(name.clone())),
            None => Ok(indexed
                .filter(|(_, p)| p.auto_assign)
                .map(|(i, _)| i)
                .collect()),
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

    fn choose(&mut self, service: &ServiceKey, request: &Request) -> Result<Vec<IpAddr>, Refusal> {
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
        &mut self,
        service: &ServiceKey,
        request: &Request,
        pools: &[usize],
        family: Family,
    ) -> Option<IpAddr> {
        self.first_shared(service, request, pools, family)
            .or_else(|| self.first_unheld(service, pools, family))
    }

    /// The first address (in address order) already held under the
    /// request's sharing key that it may share.
    fn first_shared(
        &self,
        service: &ServiceKey,
        request: &Request,
        pools: &[usize],
        family: Family,
    ) -> Option<IpAddr> {
        if request.sharing_key.is_some() {
            let mut shared: Vec<IpAddr> = self
                .holders
                .iter()
                .filter(|(ip, hs)| {
                    Family::of(**ip) == family
                        && pools.iter().any(|&p| self.pools[p].contains(**ip))
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
        None
    }

    /// The first address (in pool order) held by no one, or by `service`
    /// alone. With [`Self::first_shared`] first, the same as the first
    /// address the request may use: one held by others it may use only by
    /// sharing, and the shared ones were all tried.
    fn first_unheld(
        &mut self,
        service: &ServiceKey,
        pools: &[usize],
        family: Family,
    ) -> Option<IpAddr> {
        let own: Vec<IpAddr> = self
            .addresses(service)
            .iter()
            .copied()
            .filter(|ip| {
                self.holders
                    .get(ip)
                    .into_iter()
                    .flatten()
                    .all(|h| &h.service == service)
            })
            .collect();
        let Self {
            pools: all,
            holders,
            cursors,
            ..
        } = self;
        pools
            .iter()
            .find_map(|&p| all[p].first_free(family, cursors, |ip| holders.contains_key(&ip), &own))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::request::Proto;
    use proptest::prelude::*;

    /// The search before the cursors: the shared addresses, then every
    /// candidate from the start of each pool, the first one the request
    /// may use.
    fn first_free_by_walking(
        a: &Allocator,
        service: &ServiceKey,
        request: &Request,
        pools: &[usize],
        family: Family,
    ) -> Option<IpAddr> {
        a.first_shared(service, request, pools, family).or_else(|| {
            pools
                .iter()
                .flat_map(|&p| a.pools[p].candidates(family))
                .find(|ip| !a.holders.contains_key(ip) || a.check(service, *ip, request).is_ok())
        })
    }

    /// What `usage` counted before the counters: every held address.
    fn used_by_walking(a: &Allocator, pool: usize, family: Family) -> u64 {
        let p = &a.pools[pool];
        a.holders
            .keys()
            .filter(|ip| Family::of(**ip) == family && p.contains(**ip))
            .count() as u64
    }

    fn pools(avoid_buggy: bool) -> Vec<Pool> {
        vec![
            Pool::new(
                "a",
                &["10.0.0.253-10.0.1.2", "10.0.3.0/30", "fd00::/126"],
                true,
                avoid_buggy,
            )
            .unwrap(),
            Pool::new("b", &["10.0.9.0/29", "fd00:1::/127"], true, false).unwrap(),
        ]
    }

    #[derive(Clone, Debug)]
    enum Step {
        Assign {
            service: u8,
            key: Option<u8>,
            port: u16,
            family: u8,
        },
        Release(u8),
        EditPools(bool),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u8..24, proptest::option::of(0u8..2), 1u16..3, 0u8..3).prop_map(
                |(service, key, port, family)| Step::Assign { service, key, port, family }
            ),
            2 => (0u8..24).prop_map(Step::Release),
            1 => any::<bool>().prop_map(Step::EditPools),
        ]
    }

    proptest! {
        /// The cursors and counters answer exactly what walking the pools
        /// and the holders answered, through assignments, releases (which
        /// move cursors back) and pool edits.
        #[test]
        fn cursors_and_counters_agree_with_walking(steps in proptest::collection::vec(step(), 1..120)) {
            let mut a = Allocator::new(pools(true));
            for s in steps {
                match s {
                    Step::Assign { service, key, port, family } => {
                        let service = ServiceKey::new("t", &format!("s{service}"));
                        let request = Request {
                            policy: match family {
                                0 => FamilyPolicy::Single(Family::V4),
                                1 => FamilyPolicy::Single(Family::V6),
                                _ => FamilyPolicy::PreferDual(Family::V4),
                            },
                            addresses: vec![],
                            pool: None,
                            sharing_key: key.map(|k| format!("k{k}")),
                            ports: vec![(port, Proto::Tcp)],
                        };
                        let pools = a.pools_for(&request).unwrap();
                        for f in [Family::V4, Family::V6] {
                            let expected = first_free_by_walking(&a, &service, &request, &pools, f);
                            let found = a.first_free(&service, &request, &pools, f);
                            prop_assert_eq!(found, expected, "{:?}", f);
                        }
                        let _ = a.assign(&service, &request);
                    }
                    Step::Release(service) => {
                        a.release(&ServiceKey::new("t", &format!("s{service}")));
                    }
                    Step::EditPools(avoid_buggy) => {
                        a.set_pools(pools(avoid_buggy));
                    }
                }
                for p in 0..a.pools.len() {
                    for f in [Family::V4, Family::V6] {
                        let name = a.pools[p].name.clone();
                        prop_assert_eq!(a.usage(&name, f).map(|u| u.1), Some(used_by_walking(&a, p, f)));
                    }
                }
            }
        }
    }
}
