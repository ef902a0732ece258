//! Service + Nodes + EndpointSlices → `lbd` listeners, as pure code.
//!
//! One listener per (external IP, port, protocol). Backends are the eligible
//! nodes at their preferred address and the port's `nodePort`. Health and
//! weights follow `externalTrafficPolicy`: for `Local`, a node weighs its
//! count of ready local endpoints, so one with none gets weight 0 (no new
//! connections) as soon as the EndpointSlices say so, and a Service with no
//! ready endpoint anywhere gets no backend; health checks remain the second
//! line. `weir.dev/` annotations tune the listener (`annotations`). A bad
//! annotation is an error for the whole Service, so the caller keeps the
//! Service's last good listeners.

mod annotations;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_config::{
    BackendSpec, Balance, Defaults, HashKey, HealthKind, HealthSpec, ListenerSpec, Protocol,
};

use crate::config::{ClusterHealth, Config, Requirement};
use crate::ipam::{Family, ServiceKey};

use annotations::{annotation_for, proto_of, tuning, Tuning};
pub use annotations::{
    request, unread_annotations, Invalid, ANN_IPS, ANN_POOL, ANN_SHARED, PREFIX,
};

/// Nodes with this label are never backends.
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
/// EndpointSlice label naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What translation needs from the controller's configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Node address types, preferred first.
    pub address_types: Vec<String>,
    /// Nodes must match all of these.
    pub node_selector: Vec<Requirement>,
    /// ETP=Cluster health.
    pub cluster_health: ClusterHealth,
    /// kube-proxy's health port.
    pub kube_proxy_port: u16,
}

impl Settings {
    /// The settings `cfg` gives.
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            address_types: cfg.address_types.clone(),
            node_selector: cfg.node_selector.clone(),
            cluster_health: cfg.cluster_health,
            kube_proxy_port: cfg.kube_proxy_port,
        }
    }
}

/// A Service port that gets no listener, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The port.
    pub port: i32,
    /// Its protocol as written (`TCP`, `UDP`, `SCTP`).
    pub protocol: String,
    /// Event reason (`UnsupportedProtocol`, `NoNodePort`).
    pub reason: &'static str,
    /// Message; for unsupported protocols it also goes into the port's status `error`.
    pub message: String,
}

/// The outcome for one Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    /// Listeners, in a stable order.
    pub listeners: Vec<ListenerSpec>,
    /// Ports that got no listener.
    pub skipped: Vec<Skipped>,
}

/// `spec.type == LoadBalancer` and the class is ours (or unset and `default_class`).
pub fn is_managed(svc: &Service, class: &str, default_class: bool) -> bool {
    let Some(spec) = &svc.spec else { return false };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return false;
    }
    match spec.load_balancer_class.as_deref() {
        Some(c) => c == class,
        None => default_class,
    }
}

/// Whether `node` may be a backend.
pub fn node_eligible(node: &Node, selector: &[Requirement]) -> bool {
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    node.metadata.deletion_timestamp.is_none()
        && !labels.contains_key(EXCLUDE_LABEL)
        && selector.iter().all(|r| r.matches(labels))
}

/// The node's address to send `family` traffic to: the first configured
/// address type present, preferring the listener's family within a type.
pub fn node_address(node: &Node, address_types: &[String], family: Family) -> Option<IpAddr> {
    let addresses = node.status.as_ref()?.addresses.as_ref()?;
    for kind in address_types {
        let ips: Vec<IpAddr> = addresses
            .iter()
            .filter(|a| &a.type_ == kind)
            .filter_map(|a| a.address.parse().ok())
            .collect();
        if let Some(ip) = ips
            .iter()
            .find(|ip| Family::of(**ip) == family)
            .or(ips.first())
        {
            return Some(*ip);
        }
    }
    None
}

/// Ready endpoints per node name, across the Service's slices (an endpoint
/// whose `ready` is unset counts as ready, as the API defines).
pub fn ready_per_node(slices: &[&EndpointSlice]) -> HashMap<String, u32> {
    let mut seen = HashSet::new();
    let mut out = HashMap::new();
    for slice in slices {
        for ep in &slice.endpoints {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let Some(node) = &ep.node_name else { continue };
            let Some(addr) = ep.addresses.first() else {
                continue;
            };
            if ready && seen.insert((node.clone(), addr.clone())) {
                *out.entry(node.clone()).or_insert(0) += 1;
            }
        }
    }
    out
}

/// The stable, readable listener name: `namespace/name:port/proto/ip`.
pub fn listener_name(namespace: &str, name: &str, port: i32, proto: &str, ip: IpAddr) -> String {
    format!(
        "{namespace}/{name}:{port}/{}/{ip}",
        proto.to_ascii_lowercase()
    )
}

/// The Service a listener named by [`listener_name`] belongs to.
pub fn listener_owner(listener: &str) -> Option<ServiceKey> {
    let (service, _) = listener.split_once(':')?;
    let (namespace, name) = service.split_once('/')?;
    Some(ServiceKey::new(namespace, name))
}

/// Translates one managed Service holding `ips`.
pub fn translate(
    svc: &Service,
    ips: &[IpAddr],
    nodes: &[&Node],
    slices: &[&EndpointSlice],
    settings: &Settings,
) -> Result<Translation, Vec<Invalid>> {
    let mut t = tuning(svc)?;
    let spec = svc.spec.clone().unwrap_or_default();
    let namespace = svc.metadata.namespace.as_deref().unwrap_or("default");
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    let affinity = spec.session_affinity.as_deref() == Some("ClientIP");
    let mut errors = Vec::new();
    if affinity && t.balance.is_some_and(|b| b != Balance::Maglev) {
        errors.push(Invalid {
            field: format!("{PREFIX}balance"),
            message: "conflicts with sessionAffinity: ClientIP (which needs maglev)".into(),
        });
    }
    let mut source_ranges = Vec::new();
    for (i, r) in spec
        .load_balancer_source_ranges
        .clone()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        match lb_config::validate::parse_cidr(r.trim()) {
            Ok(net) => source_ranges.push(net.to_string()),
            Err(e) => errors.push(Invalid {
                field: format!("spec.loadBalancerSourceRanges[{i}]"),
                message: e,
            }),
        }
    }
    if local && spec.health_check_node_port.is_none() && t.health_kind.is_none() {
        // Without it a probe cannot tell which nodes have local endpoints.
        t.health_kind = Some(HealthKind::Tcp);
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let weights = if local {
        Some(ready_per_node(slices))
    } else {
        None
    };
    let mut eligible: Vec<&Node> = nodes
        .iter()
        .copied()
        .filter(|n| node_eligible(n, &settings.node_selector))
        .collect();
    eligible.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    let mut out = Translation::default();
    for port in spec.ports.clone().unwrap_or_default() {
        let proto_text = proto_of(&port).to_owned();
        let protocol = match proto_text.as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                out.skipped.push(Skipped {
                    port: port.port,
                    protocol: other.to_owned(),
                    reason: "UnsupportedProtocol",
                    message: format!("protocol {other} is not supported by Weir (TCP and UDP are)"),
                });
                continue;
            }
        };
        let Some(node_port) = port
            .node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
        else {
            out.skipped.push(Skipped {
                port: port.port,
                protocol: proto_text,
                reason: "NoNodePort",
                message: format!(
                    "port {} has no nodePort (allocateLoadBalancerNodePorts: false?); Weir forwards to NodePorts",
                    port.port
                ),
            });
            continue;
        };
        let Ok(vip_port) = u16::try_from(port.port) else {
            continue;
        };
        let health = health_for(&t, &spec, local, protocol, settings);
        for ip in ips {
            let family = Family::of(*ip);
            let mut backends: Vec<BackendSpec> = Vec::new();
            for node in &eligible {
                let Some(addr) = node_address(node, &settings.address_types, family) else {
                    continue;
                };
                let weight = weights.as_ref().map(|w| {
                    let n = node.metadata.name.as_deref().unwrap_or_default();
                    w.get(n).copied().unwrap_or(0)
                });
                backends.push(BackendSpec {
                    addr: SocketAddr::new(addr, node_port).to_string(),
                    weight,
                });
            }
            if backends.iter().all(|b| b.weight == Some(0)) {
                // ETP=Local and no ready endpoint on any node: nowhere to
                // send new connections (and lbd refuses all-zero weights).
                backends.clear();
            }
            out.listeners.push(ListenerSpec {
                name: listener_name(namespace, name, port.port, &proto_text, *ip),
                bind: SocketAddr::new(*ip, vip_port).to_string(),
                protocol: Some(protocol),
                balance: Some(if affinity {
                    Balance::Maglev
                } else {
                    t.balance.unwrap_or(Balance::Maglev)
                }),
                hash_key: affinity.then_some(HashKey::ClientIp),
                proxy_protocol: t.proxy_protocol,
                source_ranges: (!source_ranges.is_empty()).then(|| source_ranges.clone()),
                max_connections: t.max_connections,
                on_all_unhealthy: None,
                connect_timeout: t.connect_timeout,
                idle_timeout: t.idle_timeout,
                drain_timeout: None,
                backends,
                health: Some(health.clone()),
            });
        }
    }
    // The forwarder must accept what we send: check with lbd's own rules.
    if let Err(errs) =
        lb_config::resolve_listeners(&out.listeners, &Defaults::default(), "listener")
    {
        return Err(errs
            .into_iter()
            .map(|e| Invalid {
                field: annotation_for(&e.path),
                message: e.message,
            })
            .collect());
    }
    Ok(out)
}

fn health_for(
    t: &Tuning,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    local: bool,
    protocol: Protocol,
    settings: &Settings,
) -> HealthSpec {
    // Base: what kube-proxy offers for this traffic policy.
    let (mut kind, mut port, mut path) = if local {
        match spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
        {
            Some(p) => (HealthKind::Http, Some(p), Some("/healthz".to_owned())),
            None => (HealthKind::Tcp, None, None),
        }
    } else if settings.cluster_health == ClusterHealth::KubeProxy || protocol == Protocol::Udp {
        // A UDP NodePort cannot be probed with TCP: use kube-proxy's endpoint.
        (
            HealthKind::Http,
            Some(settings.kube_proxy_port),
            Some("/healthz".to_owned()),
        )
    } else {
        (HealthKind::Tcp, None, None)
    };
    if let Some(k) = t.health_kind.filter(|k| *k != kind) {
        // Another kind than kube-proxy's: probe the NodePort unless told otherwise.
        kind = k;
        port = None;
        path = (k == HealthKind::Http).then(|| "/healthz".to_owned());
    }
    if t.health_port.is_some() {
        port = t.health_port;
    }
    if kind == HealthKind::Http && t.health_path.is_some() {
        path = t.health_path.clone();
        // kube-proxy's node health port serves only /healthz: a path of the
        // application's is asked of the application, on the NodePort, unless
        // a port was given. (A Local Service's check, on its
        // healthCheckNodePort, stays as it always was. A UDP NodePort
        // cannot take an HTTP check: a UDP Service needs the port too.)
        if t.health_port.is_none()
            && port == Some(settings.kube_proxy_port)
            && protocol == Protocol::Tcp
        {
            port = None;
        }
    }
    if kind == HealthKind::Tcp && protocol == Protocol::Udp && port.is_none() {
        port = Some(settings.kube_proxy_port);
    }
    HealthSpec {
        kind: Some(kind),
        port: if kind == HealthKind::None { None } else { port },
        path: if kind == HealthKind::Http { path } else { None },
        interval: t.health_interval,
        timeout: t.health_timeout,
        rise: t.health_rise,
        fall: t.health_fall,
        // lbd's default: on when the check probes the NodePort itself and
        // the listener sends PROXY protocol.
        send_proxy: None,
    }
}
