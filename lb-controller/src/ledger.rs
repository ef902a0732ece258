//! What the controller remembers between reconciles, as pure code: the
//! allocator, each Service's listeners and the first state version that
//! carried them, the Services being taken out of the forwarders, and the
//! warnings already reported.
//!
//! Every Service's listeners come from [`crate::desired`]: the ledger is
//! seeded from [`desired::seed`] and a reconcile applies
//! [`desired::service`]. It builds the full state every forwarder gets
//! ([`Ledger::build`]), numbered by one counter.
//!
//! Not here: locks, clocks, writes, Events (the shell turns
//! [`Reconciled::warnings`] into Events).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use lb_config::{DesiredState, ListenerSpec};
use serde_json::Value;

use crate::desired::{self, key_of, Addresses, Cluster, Seeded};
use crate::ipam::{Allocator, Pool, ServiceKey};
use crate::l2::owners::Move;
use crate::l2::Book;
use crate::publish::Snapshot;
use crate::translate::{self, Settings};

/// A warning: Event reason and message.
pub type Warning = (&'static str, String);

#[derive(Debug, Default)]
struct Entry {
    listeners: Vec<ListenerSpec>,
    /// Version of the first state that carries these listeners (`None`:
    /// the next one).
    changed_at: Option<u64>,
    /// Warnings about its forwarding already reported.
    warned: BTreeSet<Warning>,
    /// Its annotations were valid once: it has a good configuration to
    /// keep while they are not.
    configured: bool,
}

/// The controller's memory of the desired state.
#[derive(Debug, Default)]
pub struct Ledger {
    allocator: Allocator,
    entries: BTreeMap<ServiceKey, Entry>,
    /// Services being released: version of the first state without them.
    removals: BTreeMap<ServiceKey, Option<u64>>,
    /// Version of the last built state.
    version: u64,
    /// Warnings about addresses already reported, per Service.
    warned: BTreeMap<ServiceKey, BTreeSet<Warning>>,
    /// Standing warnings already reported, per Service: annotations Weir
    /// does not read (typos, MetalLB's) and addresses held outside every
    /// pool. Checked from its first reconcile on, with an address or not
    /// (a typo in `weir.dev/pool` is why it may have none).
    standing_warned: BTreeMap<ServiceKey, BTreeSet<Warning>>,
    /// Our Services that got no address: tried again when one is freed.
    waiting: BTreeSet<ServiceKey>,
    /// L2 owners, when some pool is `announce = "l2"`.
    l2: Option<Book>,
}

/// What a reconcile decided for one Service.
#[derive(Clone, Debug, PartialEq)]
pub struct Reconciled {
    /// Its addresses.
    pub addresses: Addresses,
    /// Its `status.loadBalancer.ingress`; `None` while it has no address
    /// (it waits for one).
    pub ingress: Option<Vec<Value>>,
    /// Version of the first state that carries its current listeners
    /// (`None`: the next one).
    pub changed_at: Option<u64>,
    /// Its listeners changed: a new state is due.
    pub changed: bool,
    /// Warnings not reported before.
    pub warnings: Vec<Warning>,
    /// Why it forwards nothing: its annotations are invalid and it never
    /// had a good configuration to keep (`None`: it has one).
    pub unconfigured: Option<String>,
}

impl Ledger {
    /// An empty ledger over `pools`.
    pub fn new(pools: Vec<Pool>) -> Self {
        Self {
            allocator: Allocator::new(pools),
            ..Self::default()
        }
    }

    /// The ledger at start: what the Services hold and the listeners that
    /// go with it (a Service whose annotations are invalid gets none until
    /// its reconcile).
    pub fn seeded(seeded: Seeded) -> Self {
        let entries = seeded
            .services
            .into_iter()
            .filter_map(|(key, forwarding)| {
                let listeners = forwarding.translation.ok()?.listeners;
                Some((
                    key,
                    Entry {
                        listeners,
                        configured: true,
                        ..Entry::default()
                    },
                ))
            })
            .collect();
        Self {
            allocator: seeded.allocator,
            entries,
            ..Self::default()
        }
    }

    /// Takes in what the forwarders were found running at start (`None`:
    /// not known): the counter goes on from the highest version, and a
    /// Service every forwarder already runs exactly counts as programmed.
    pub fn adopt_running(&mut self, running: &[Option<DesiredState>]) {
        self.version = running
            .iter()
            .flatten()
            .map(|s| s.version)
            .max()
            .unwrap_or(0);
        let desired: BTreeMap<ServiceKey, Vec<ListenerSpec>> = self
            .entries
            .iter()
            .map(|(k, e)| (k.clone(), e.listeners.clone()))
            .collect();
        for (key, version) in already_running(&desired, running) {
            if let Some(entry) = self.entries.get_mut(&key) {
                entry.changed_at = Some(version);
            }
        }
        // A Service whose annotations are invalid now got no listeners at
        // seeding; what the forwarders run for it is its last good
        // configuration, which it keeps (a restart must not drop it).
        let unseeded: BTreeSet<ServiceKey> = self
            .allocator
            .holdings()
            .into_iter()
            .map(|h| h.service)
            .filter(|k| !self.entries.contains_key(k))
            .collect();
        for (key, (listeners, version)) in last_running(&unseeded, running) {
            self.entries.insert(
                key,
                Entry {
                    listeners,
                    changed_at: Some(version),
                    configured: true,
                    ..Entry::default()
                },
            );
        }
    }

    /// The allocator.
    pub fn allocator(&self) -> &Allocator {
        &self.allocator
    }

    /// The listeners the ledger holds for `key`.
    pub fn listeners(&self, key: &ServiceKey) -> Option<&[ListenerSpec]> {
        self.entries.get(key).map(|e| e.listeners.as_slice())
    }

    /// Whether it holds anything for `key`: an address, listeners, or a
    /// removal in progress.
    pub fn holds(&self, key: &ServiceKey) -> bool {
        !self.allocator.addresses(key).is_empty()
            || self.entries.contains_key(key)
            || self.removals.contains_key(key)
    }

    /// Applies what `svc` should have ([`desired::service`]): its
    /// addresses, and its listeners unless its annotations are invalid
    /// (then it keeps its last good ones).
    pub fn reconcile(
        &mut self,
        svc: &Service,
        cluster: &Cluster<'_>,
        settings: &Settings,
    ) -> Reconciled {
        let key = key_of(svc);
        self.removals.remove(&key);
        let desired = desired::service(svc, &mut self.allocator, cluster, settings);
        let mut warnings = Vec::new();
        let mut warn = |warned: &mut BTreeSet<Warning>, warning: Warning| {
            if warned.insert(warning.clone()) {
                warnings.push(warning);
            }
        };
        // Held outside every pool (a pool shrank, or an address adopted
        // from the status at start): kept, and said once.
        let outside: Vec<IpAddr> = self
            .allocator
            .addresses(&key)
            .iter()
            .copied()
            .filter(|ip| !self.allocator.pools().iter().any(|p| p.contains(*ip)))
            .collect();
        let noted = self.standing_warned.entry(key.clone()).or_default();
        for message in translate::unread_annotations(svc) {
            warn(noted, ("UnknownAnnotation", message));
        }
        for ip in outside {
            let message = format!(
                "{ip} is outside every configured pool; the Service keeps it until it lets it go (a recreated Service gets one from a pool)"
            );
            warn(noted, ("AddressOutsidePools", message));
        }
        if let Some(refused) = &desired.addresses.refused {
            let warned = self.warned.entry(key.clone()).or_default();
            warn(warned, (refused.reason, refused.message.clone()));
            if refused.reason == "InvalidAnnotation" {
                warn(warned, ("AllocationFailed", refused.message.clone()));
            }
        }
        let Some(forwarding) = desired.forwarding else {
            self.waiting.insert(key);
            return Reconciled {
                addresses: desired.addresses,
                ingress: None,
                changed_at: None,
                changed: false,
                warnings,
                unconfigured: None,
            };
        };
        self.waiting.remove(&key);
        if desired.addresses.refused.is_none() {
            // Its request is met: a refusal it is warned about again if
            // it comes back.
            self.warned.remove(&key);
        }
        let entry = self.entries.entry(key).or_default();
        let mut changed = false;
        let mut unconfigured = None;
        match forwarding.translation {
            Ok(t) => {
                entry.configured = true;
                entry.warned.retain(|(r, _)| {
                    *r != "InvalidAnnotation" && *r != "UnsupportedProtocol" && *r != "NoNodePort"
                });
                for s in &t.skipped {
                    warn(&mut entry.warned, (s.reason, s.message.clone()));
                }
                if entry.listeners != t.listeners
                    || entry.changed_at.is_none() && t.listeners.is_empty()
                {
                    entry.listeners = t.listeners;
                    entry.changed_at = None;
                    changed = true;
                }
            }
            Err(errors) => {
                // With no good configuration to keep, nothing forwards it:
                // its status must not say otherwise.
                let then = if entry.configured {
                    "keeping the last good configuration"
                } else {
                    "nothing forwards this Service until it is fixed"
                };
                let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
                for e in &all {
                    warn(
                        &mut entry.warned,
                        ("InvalidAnnotation", format!("{e}; {then}")),
                    );
                }
                if !entry.configured {
                    unconfigured = Some(all.join("; "));
                }
            }
        }
        Reconciled {
            addresses: desired.addresses,
            ingress: Some(forwarding.ingress),
            changed_at: entry.changed_at,
            changed,
            warnings,
            unconfigured,
        }
    }

    /// Takes `key` out of the desired state. Returns whether that changed
    /// it (a new state is due), and the version of the first state without
    /// it, once built.
    pub fn remove(&mut self, key: &ServiceKey) -> (bool, Option<u64>) {
        let changed = self.entries.remove(key).is_some() || !self.removals.contains_key(key);
        if changed {
            self.removals.insert(key.clone(), None);
        }
        (changed, self.removals.get(key).copied().flatten())
    }

    /// Frees the addresses of `key` (once the forwarders dropped it) and
    /// forgets it; returns the addresses freed.
    pub fn release(&mut self, key: &ServiceKey) -> Vec<IpAddr> {
        self.removals.remove(key);
        self.warned.remove(key);
        self.standing_warned.remove(key);
        self.waiting.remove(key);
        self.allocator.release(key)
    }

    /// The Services waiting for an address.
    pub fn waiting(&self) -> impl Iterator<Item = &ServiceKey> {
        self.waiting.iter()
    }

    /// Forgets the waiting Services `exists` denies, and returns the
    /// Services it holds something for that `exists` denies.
    pub fn gone(&mut self, exists: impl Fn(&ServiceKey) -> bool) -> Vec<ServiceKey> {
        self.waiting.retain(|k| exists(k));
        self.standing_warned.retain(|k, _| exists(k));
        let held: BTreeSet<ServiceKey> = self
            .allocator
            .holdings()
            .into_iter()
            .map(|h| h.service)
            .chain(self.entries.keys().cloned())
            .collect();
        held.into_iter().filter(|k| !exists(k)).collect()
    }

    /// Per Service with listeners, the first version that carries them.
    pub fn changed_at(&self) -> impl Iterator<Item = (&ServiceKey, Option<u64>)> {
        // One never configured has no forwarding to report on.
        self.entries
            .iter()
            .filter(|(_, e)| e.configured)
            .map(|(k, e)| (k, e.changed_at))
    }

    /// Per Service being removed, the first version without it.
    pub fn removals(&self) -> impl Iterator<Item = (&ServiceKey, Option<u64>)> {
        self.removals.iter().map(|(k, v)| (k, *v))
    }

    /// The version of the last state built.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Moves the counter up to `current` (a forwarder runs it); returns
    /// whether it moved.
    pub fn move_above(&mut self, current: u64) -> bool {
        let moved = current >= self.version;
        if moved {
            self.version = current;
        }
        moved
    }

    /// The number of Services with listeners.
    pub fn services(&self) -> usize {
        self.entries.len()
    }

    /// Gives VIPs of `announce = "l2"` pools an owner from now on.
    pub fn set_l2(&mut self, book: Book) {
        self.l2 = Some(book);
    }

    /// Marks a forwarder up or down for L2 ownership; returns whether a
    /// new state is due.
    pub fn l2_set_live(&mut self, name: &str, up: bool, why: Option<String>) -> bool {
        self.l2.as_mut().is_some_and(|b| b.set_live(name, up, why))
    }

    /// The L2 owner changes since the last call.
    pub fn take_moves(&mut self) -> Vec<Move> {
        self.l2.as_mut().map(Book::take_moves).unwrap_or_default()
    }

    /// The Services with a listener on `ip`.
    pub fn services_on(&self, ip: IpAddr) -> Vec<ServiceKey> {
        self.entries
            .iter()
            .filter(|(_, e)| {
                e.listeners
                    .iter()
                    .any(|l| bind_ip(l) == Some(ip.to_canonical()))
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The L2 owner of each of the Service's VIPs that has one.
    pub fn announced_by(&self, key: &ServiceKey) -> Vec<(IpAddr, String)> {
        let Some(book) = &self.l2 else {
            return Vec::new();
        };
        let ips: BTreeSet<IpAddr> = self
            .entries
            .get(key)
            .map(|e| e.listeners.iter().filter_map(bind_ip).collect())
            .unwrap_or_default();
        ips.into_iter()
            .filter_map(|ip| Some((ip, book.owner_of(ip)?.to_owned())))
            .collect()
    }

    /// Builds the next full state.
    pub fn build(&mut self) -> Snapshot {
        self.version += 1;
        let version = self.version;
        let mut snapshot = Snapshot {
            state: DesiredState {
                version,
                listeners: Vec::new(),
                l2: None,
            },
            owners: Vec::new(),
            urgent: false,
        };
        for (key, entry) in self.entries.iter_mut() {
            entry.changed_at.get_or_insert(version);
            for l in &entry.listeners {
                snapshot.state.listeners.push(l.clone());
                snapshot.owners.push(key.clone());
            }
        }
        for v in self.removals.values_mut() {
            v.get_or_insert(version);
        }
        if let Some(book) = &mut self.l2 {
            let vips: Vec<IpAddr> = snapshot
                .state
                .listeners
                .iter()
                .filter_map(bind_ip)
                .collect();
            snapshot.state.l2 = Some(book.build(vips, version));
            snapshot.urgent = book.failover();
        }
        snapshot
    }
}

/// The address a listener binds (`None` when its bind does not parse).
fn bind_ip(l: &ListenerSpec) -> Option<IpAddr> {
    l.bind
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.ip().to_canonical())
}

/// The Services that every forwarder already runs exactly as `desired`
/// says, from the states the forwarders were found running at start
/// (`None`: not known), with the lowest version among those states: their
/// listeners were programmed at that version.
pub fn already_running(
    desired: &BTreeMap<ServiceKey, Vec<ListenerSpec>>,
    running: &[Option<DesiredState>],
) -> BTreeMap<ServiceKey, u64> {
    let Some(states) = running
        .iter()
        .map(Option::as_ref)
        .collect::<Option<Vec<_>>>()
    else {
        return BTreeMap::new();
    };
    let Some(lowest) = states.iter().map(|s| s.version).min() else {
        return BTreeMap::new();
    };
    let by_owner: Vec<BTreeMap<ServiceKey, Vec<&ListenerSpec>>> = states
        .iter()
        .map(|s| {
            let mut owned: BTreeMap<ServiceKey, Vec<&ListenerSpec>> = BTreeMap::new();
            for l in &s.listeners {
                if let Some(owner) = translate::listener_owner(&l.name) {
                    owned.entry(owner).or_default().push(l);
                }
            }
            owned
        })
        .collect();
    desired
        .iter()
        .filter(|(key, listeners)| {
            by_owner.iter().all(|owned| {
                let running = owned.get(*key).map(Vec::as_slice).unwrap_or_default();
                running.len() == listeners.len() && listeners.iter().all(|l| running.contains(&l))
            })
        })
        .map(|(key, _)| (key.clone(), lowest))
        .collect()
}

/// For each of `keys`, the listeners it has in the newest state a
/// forwarder was found running (the last one sent; a forwarder that did
/// not answer, or lags, does not hide it), and that state's version.
fn last_running(
    keys: &BTreeSet<ServiceKey>,
    running: &[Option<DesiredState>],
) -> BTreeMap<ServiceKey, (Vec<ListenerSpec>, u64)> {
    let Some(newest) = running.iter().flatten().max_by_key(|s| s.version) else {
        return BTreeMap::new();
    };
    let mut out: BTreeMap<ServiceKey, (Vec<ListenerSpec>, u64)> = BTreeMap::new();
    for l in &newest.listeners {
        if let Some(owner) = translate::listener_owner(&l.name).filter(|o| keys.contains(o)) {
            out.entry(owner)
                .or_insert_with(|| (Vec::new(), newest.version))
                .0
                .push(l.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    /// A Service that holds an address while its request is refused keeps
    /// the address and its listeners, and is warned once, not at every
    /// reconcile (a Node change reconciles every Service).
    #[test]
    fn a_refusal_while_holding_an_address_is_warned_once() {
        let cfg = crate::config::parse(
            "[kubernetes]\ndefault_class = true\n[[pool]]\nname = \"p\"\naddresses = [\"192.0.2.0/29\"]\n",
        )
        .unwrap();
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default",
                         "annotations": {"weir.dev/load-balancer-ips": "203.0.113.9"}},
            "spec": {"type": "LoadBalancer",
                     "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}}))
        .unwrap();
        let services = [Arc::new(svc)];
        let cluster = Cluster::new(&[], &[]);
        let mut ledger = Ledger::seeded(desired::seed(&cfg, &services, &cluster));
        let settings = Settings::from_config(&cfg);
        let first = ledger.reconcile(&services[0], &cluster, &settings);
        assert_eq!(
            first.addresses.ips,
            ["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
        assert!(first.ingress.is_some());
        let reasons: Vec<&str> = first.warnings.iter().map(|(r, _)| *r).collect();
        assert_eq!(reasons, ["AllocationFailed"]);
        let again = ledger.reconcile(&services[0], &cluster, &settings);
        assert_eq!(again.warnings, []);
        assert_eq!(again.addresses.ips, first.addresses.ips);
    }

    /// At start: a Service counts as programmed (at the lowest running
    /// version) only if every forwarder is known and runs exactly its
    /// listeners, no more, no fewer.
    #[test]
    fn services_already_running_everywhere_are_recognised() {
        let l = |name: &str, bind: &str| ListenerSpec::new(name, bind);
        let web = vec![
            l("a/web:80/tcp/192.0.2.1", "192.0.2.1:80"),
            l("a/web:443/tcp/192.0.2.1", "192.0.2.1:443"),
        ];
        let db = vec![l("a/db:5432/tcp/192.0.2.2", "192.0.2.2:5432")];
        let api = vec![l("b/api:80/tcp/2001:db8::1", "[2001:db8::1]:80")];
        let desired: BTreeMap<ServiceKey, Vec<ListenerSpec>> = [
            (ServiceKey::new("a", "web"), web.clone()),
            (ServiceKey::new("a", "db"), db.clone()),
            (ServiceKey::new("b", "api"), api.clone()),
        ]
        .into();
        let state = |version, listeners: Vec<ListenerSpec>| DesiredState {
            version,
            listeners,
            l2: None,
        };
        let mut stale_db = db.clone();
        stale_db[0].bind = "192.0.2.9:5432".into();
        let running = [
            Some(state(7, [web.clone(), db.clone(), api.clone()].concat())),
            // An older db, and an api listener the Service no longer has.
            Some(state(
                5,
                [
                    web.clone(),
                    stale_db,
                    api.clone(),
                    vec![l("b/api:81/tcp/2001:db8::1", "[2001:db8::1]:81")],
                ]
                .concat(),
            )),
        ];
        assert_eq!(
            already_running(&desired, &running),
            [(ServiceKey::new("a", "web"), 5)].into()
        );
        assert_eq!(
            already_running(&desired, &[running[0].clone(), None]),
            BTreeMap::new(),
            "a forwarder whose state is unknown runs nothing as far as we know"
        );
    }
}
