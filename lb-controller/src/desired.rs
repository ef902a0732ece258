//! What each Service should have, as pure code: its addresses, its
//! listeners, and the addresses and port errors of its status.
//!
//! This is the one path from Services, Nodes and EndpointSlices to the
//! desired state: `lb-controller plan` ([`plan`]), the start-up seeding
//! ([`seed`]) and every reconcile ([`service`]) call it, so they cannot
//! disagree. It builds on [`crate::ipam`] (addresses) and
//! [`crate::translate`] (listeners).
//!
//! Not here: the condition (it follows the forwarders: [`crate::status`]),
//! versions, writes and Events.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_config::DesiredState;
use serde_json::Value;

use crate::config::Config;
use crate::ipam::{Allocator, Family, FamilyPolicy, Request, ServiceKey};
use crate::ownership::{self, Owner};
use crate::status;
use crate::translate::{self, Invalid, Settings, Translation, SERVICE_NAME_LABEL};

/// The key of a Service (`default` when it names no namespace).
pub fn key_of(svc: &Service) -> ServiceKey {
    ServiceKey::new(
        svc.metadata.namespace.as_deref().unwrap_or("default"),
        svc.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// Whether the controller gives `svc` addresses and listeners: ours by
/// class, and not being deleted.
pub fn is_served(svc: &Service, cfg: &Config) -> bool {
    translate::is_managed(svc, &cfg.load_balancer_class, cfg.default_class)
        && svc.metadata.deletion_timestamp.is_none()
}

/// The Nodes and EndpointSlices every Service's listeners are made of.
#[derive(Clone, Debug)]
pub struct Cluster<'a> {
    nodes: Vec<&'a Node>,
    slices: &'a [Arc<EndpointSlice>],
}

impl<'a> Cluster<'a> {
    /// The cluster as the caches (or a list) show it.
    pub fn new(nodes: &'a [Arc<Node>], slices: &'a [Arc<EndpointSlice>]) -> Self {
        Self {
            nodes: nodes.iter().map(|n| n.as_ref()).collect(),
            slices,
        }
    }

    /// The EndpointSlices of the Service `key`.
    fn slices_of(&self, key: &ServiceKey) -> Vec<&'a EndpointSlice> {
        self.slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(key.namespace.as_str())
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL))
                        .is_some_and(|n| *n == key.name)
            })
            .map(|s| s.as_ref())
            .collect()
    }
}

/// Why a Service got no new addresses (it keeps what it holds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Event reason: `InvalidAnnotation` (the request cannot be read) or
    /// `AllocationFailed` (the allocator refused it).
    pub reason: &'static str,
    /// What is wrong.
    pub message: String,
}

/// The addresses a Service should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addresses {
    /// What it should hold (empty: nothing, it waits for an address).
    pub ips: Vec<IpAddr>,
    /// What it held before.
    pub before: Vec<IpAddr>,
    /// Why the request was refused, if it was.
    pub refused: Option<Refused>,
}

impl Addresses {
    /// Whether it got addresses it did not hold (a first assignment, or a move).
    pub fn assigned(&self) -> bool {
        !self.ips.is_empty() && self.ips != self.before
    }
}

/// The listeners and status of a Service holding addresses.
#[derive(Clone, Debug, PartialEq)]
pub struct Forwarding {
    /// Its listeners and the ports that got none; an error when an
    /// annotation is invalid (the Service keeps its last good listeners).
    pub translation: Result<Translation, Vec<Invalid>>,
    /// `status.loadBalancer.ingress`.
    pub ingress: Vec<Value>,
}

/// What one Service should have.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// Its addresses.
    pub addresses: Addresses,
    /// Its listeners and status; `None` while it has no address.
    pub forwarding: Option<Forwarding>,
}

/// The allocator's answer for `svc`: what it asks for, or on a refusal
/// what it already holds.
pub fn addresses(svc: &Service, allocator: &mut Allocator) -> Addresses {
    let key = key_of(svc);
    let before = allocator.addresses(&key).to_vec();
    let assigned = translate::request(svc)
        .map_err(|e| Refused {
            reason: "InvalidAnnotation",
            message: e.to_string(),
        })
        .and_then(|r| {
            allocator.assign(&key, &r).map_err(|e| Refused {
                reason: "AllocationFailed",
                message: e.to_string(),
            })
        });
    match assigned {
        Ok(ips) => Addresses {
            ips,
            before,
            refused: None,
        },
        Err(refused) => Addresses {
            ips: before.clone(),
            before,
            refused: Some(refused),
        },
    }
}

/// The listeners and status of `svc` holding `ips`.
pub fn forwarding(
    svc: &Service,
    ips: &[IpAddr],
    cluster: &Cluster<'_>,
    settings: &Settings,
) -> Forwarding {
    let slices = cluster.slices_of(&key_of(svc));
    let translation = translate::translate(svc, ips, &cluster.nodes, &slices, settings);
    let skipped = translation
        .as_ref()
        .map(|t| t.skipped.as_slice())
        .unwrap_or_default();
    Forwarding {
        ingress: status::ingress(svc, ips, skipped),
        translation,
    }
}

/// What `svc` should have: addresses from `allocator`, then its
/// forwarding. Used by `plan` and by every reconcile.
pub fn service(
    svc: &Service,
    allocator: &mut Allocator,
    cluster: &Cluster<'_>,
    settings: &Settings,
) -> Desired {
    let addresses = addresses(svc, allocator);
    let forwarding =
        (!addresses.ips.is_empty()).then(|| forwarding(svc, &addresses.ips, cluster, settings));
    Desired {
        addresses,
        forwarding,
    }
}

/// The allocator request, or the default one if the Service's is invalid
/// (used only for seeding: what a Service already holds stays its own).
fn request_or_default(svc: &Service) -> Request {
    translate::request(svc).unwrap_or(Request {
        policy: FamilyPolicy::Single(Family::V4),
        addresses: Vec::new(),
        pool: None,
        sharing_key: None,
        ports: Vec::new(),
    })
}

/// Seeds an allocator from the status of our Services (by class alone:
/// another implementation's addresses never count), in a stable order.
pub fn seeded_allocator(cfg: &Config, services: &[Arc<Service>]) -> Allocator {
    let mut allocator = Allocator::new(cfg.pools.clone());
    let mut held: Vec<&Arc<Service>> = services
        .iter()
        .filter(|s| ownership::owner(s, &cfg.load_balancer_class, cfg.default_class) == Owner::Weir)
        .filter(|s| !status::addresses(s).is_empty())
        .collect();
    held.sort_by_key(|s| key_of(s));
    for svc in held {
        allocator.seed(
            &key_of(svc),
            &status::addresses(svc),
            &request_or_default(svc),
        );
    }
    for (svc, ip) in allocator.orphans() {
        tracing::warn!(service = %svc, %ip, "address is outside every configured pool; kept until the Service lets it go");
    }
    allocator
}

/// The start-up state: the allocator seeded from the Services' status,
/// and the forwarding of every served Service that holds addresses.
#[derive(Debug)]
pub struct Seeded {
    /// The allocator.
    pub allocator: Allocator,
    /// Per Service holding addresses, its forwarding.
    pub services: BTreeMap<ServiceKey, Forwarding>,
}

/// Seeds from what the Services hold: a restart moves no address, and the
/// first state carries every Service that has one.
pub fn seed(cfg: &Config, services: &[Arc<Service>], cluster: &Cluster<'_>) -> Seeded {
    let allocator = seeded_allocator(cfg, services);
    let settings = Settings::from_config(cfg);
    let mut seeded = BTreeMap::new();
    for svc in services.iter().filter(|s| is_served(s, cfg)) {
        let key = key_of(svc);
        let ips = allocator.addresses(&key);
        if !ips.is_empty() {
            seeded.insert(key, forwarding(svc, ips, cluster, &settings));
        }
    }
    Seeded {
        allocator,
        services: seeded,
    }
}

/// The desired state of a whole cluster, computed once without writing
/// anything (`lb-controller plan`).
#[derive(Debug)]
pub struct Plan {
    /// Per served Service, in the order they were planned: those already
    /// holding addresses first, then by key.
    pub services: Vec<(ServiceKey, Desired)>,
    /// What a reader should know (assignments, refusals, skipped ports).
    pub notes: Vec<String>,
}

impl Plan {
    /// The state every forwarder would get (version 0).
    pub fn state(&self) -> DesiredState {
        let listeners = self
            .services
            .iter()
            .filter_map(|(_, d)| d.forwarding.as_ref()?.translation.as_ref().ok())
            .flat_map(|t| t.listeners.iter().cloned())
            .collect();
        DesiredState {
            version: 0,
            listeners,
            l2: None,
        }
    }
}

/// Plans every served Service: Services without an address get one from
/// the seeded allocator, as the controller would give it at start.
pub fn plan(cfg: &Config, services: &[Arc<Service>], cluster: &Cluster<'_>) -> Plan {
    let mut allocator = seeded_allocator(cfg, services);
    let settings = Settings::from_config(cfg);
    let mut served: Vec<&Arc<Service>> = services.iter().filter(|s| is_served(s, cfg)).collect();
    served.sort_by_key(|s| (status::addresses(s).is_empty(), key_of(s)));
    let mut plan = Plan {
        services: Vec::new(),
        notes: Vec::new(),
    };
    for svc in served {
        let key = key_of(svc);
        let desired = service(svc, &mut allocator, cluster, &settings);
        plan.notes.extend(notes(&key, svc, &desired));
        plan.services.push((key, desired));
    }
    plan
}

fn notes(key: &ServiceKey, svc: &Service, desired: &Desired) -> Vec<String> {
    let mut notes = Vec::new();
    let list = |ips: &[IpAddr]| {
        let list: Vec<String> = ips.iter().map(ToString::to_string).collect();
        list.join(", ")
    };
    let ips = &desired.addresses.ips;
    match &desired.addresses.refused {
        Some(r) if ips.is_empty() => notes.push(format!("{key}: no address: {}", r.message)),
        Some(r) => notes.push(format!("{key}: keeps {}: {}", list(ips), r.message)),
        None => {}
    }
    if !ips.is_empty() && status::addresses(svc) != *ips {
        notes.push(format!("{key}: would be assigned {}", list(ips)));
    }
    match desired.forwarding.as_ref().map(|f| &f.translation) {
        Some(Ok(t)) => notes.extend(
            t.skipped
                .iter()
                .map(|s| format!("{key}: port {}/{}: {}", s.port, s.protocol, s.message)),
        ),
        Some(Err(errors)) => notes.extend(errors.iter().map(|e| format!("{key}: {e}"))),
        None => {}
    }
    notes
}
