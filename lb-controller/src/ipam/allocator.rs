//! The allocator: who holds which address, and the decisions that give,
//! keep, share and free them. In memory; no API calls.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use super::pool::{Family, Pool};
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
