//! One desired state, whoever computes it: for generated clusters
//! (Services of every shape, Nodes, EndpointSlices, some Services already
//! holding addresses), `plan`, the start-up seeding and reconcile give
//! every Service the same addresses, listeners and status.
//!
//! Each path runs as the controller runs it, as far as it is pure:
//! `desired::plan`, `Ledger::seeded(desired::seed(..))`, and
//! `Ledger::reconcile` on a seeded ledger, Service by Service.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_config::ListenerSpec;
use lb_controller::config::{self, Config};
use lb_controller::desired::{self, key_of, Cluster, Desired};
use lb_controller::ipam::ServiceKey;
use lb_controller::ledger::Ledger;
use lb_controller::translate::Settings;
use proptest::prelude::*;
use serde_json::{json, Value};

/// Annotations and the values a Service may carry: valid ones, then an
/// invalid one (or, for addresses, one outside every pool and one that is
/// not an address).
const ANNOTATIONS: &[(&str, &[&str])] = &[
    ("weir.dev/proxy-protocol", &["v1", "v2", "off", "v3"]),
    (
        "weir.dev/balance",
        &["round_robin", "least_conn", "maglev", "fastest"],
    ),
    ("weir.dev/idle-timeout", &["5m", "0s"]),
    ("weir.dev/max-connections", &["100", "many"]),
    (
        "weir.dev/health-check-kind",
        &["tcp", "http", "none", "icmp"],
    ),
    ("weir.dev/health-check-port", &["8080", "0"]),
    ("weir.dev/pool", &["main", "reserved", "nope"]),
    ("weir.dev/allow-shared-ip", &["k1", "k2"]),
    (
        "weir.dev/load-balancer-ips",
        &[
            "192.0.2.3",
            "2001:db8::5",
            "198.51.100.1",
            "203.0.113.1",
            "x",
        ],
    ),
    ("weir.dev/helth-check-path", &["/typo"]),
];

const PORTS: [i32; 3] = [80, 443, 53];
const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];

#[derive(Clone, Debug)]
struct Shape {
    /// 0: our class, 1: no class, 2: another class, 3: not a LoadBalancer.
    class: u8,
    /// (port, protocol, has a nodePort).
    ports: Vec<(usize, usize, bool)>,
    /// Index into the family policies of `service`.
    family: usize,
    local: bool,
    health_node_port: bool,
    affinity: bool,
    /// (annotation, value, the invalid value instead).
    annotations: Vec<(usize, usize, bool)>,
    /// 0: none, 1: valid, 2: invalid.
    source_ranges: u8,
    deleting: bool,
    /// Ready or not, per node index.
    endpoints: Vec<(usize, bool)>,
    /// Whether its status carries the addresses an earlier plan gave it.
    held: bool,
    /// Whether its annotations came after that plan (it may hold addresses
    /// its request no longer allows).
    annotated_later: bool,
}

fn shape() -> impl Strategy<Value = Shape> {
    let port = (
        0..PORTS.len(),
        0..PROTOCOLS.len(),
        prop::bool::weighted(0.9),
    );
    let annotation = (0..ANNOTATIONS.len(), 0..4usize, prop::bool::weighted(0.1));
    let source_ranges = prop_oneof![6 => Just(0u8), 3 => Just(1u8), 1 => Just(2u8)];
    (
        (0..4u8, prop::collection::vec(port, 0..4), 0..5usize),
        (any::<bool>(), any::<bool>(), prop::bool::weighted(0.2)),
        prop::collection::vec(annotation, 0..3),
        (source_ranges, prop::bool::weighted(0.1)),
        prop::collection::vec((0..4usize, any::<bool>()), 0..4),
        (prop::bool::weighted(0.6), prop::bool::weighted(0.3)),
    )
        .prop_map(
            |(
                (class, ports, family),
                (local, health_node_port, affinity),
                annotations,
                (source_ranges, deleting),
                endpoints,
                (held, annotated_later),
            )| Shape {
                class,
                ports,
                family,
                local,
                health_node_port,
                affinity,
                annotations,
                source_ranges,
                deleting,
                endpoints,
                held,
                annotated_later,
            },
        )
}

fn service(i: usize, s: &Shape) -> Service {
    let name = format!("svc-{i}");
    let policies = [
        ("SingleStack", vec!["IPv4"]),
        ("SingleStack", vec!["IPv6"]),
        ("PreferDualStack", vec!["IPv4", "IPv6"]),
        ("RequireDualStack", vec!["IPv4", "IPv6"]),
        ("PreferDualStack", vec!["IPv6", "IPv4"]),
    ];
    let (policy, families) = &policies[s.family];
    let ports: Vec<Value> = s
        .ports
        .iter()
        .enumerate()
        .map(|(n, &(port, proto, node_port))| {
            let mut p = json!({"name": format!("p{n}"), "port": PORTS[port] + n as i32,
                               "protocol": PROTOCOLS[proto]});
            if node_port {
                p["nodePort"] = json!(30000 + 10 * i as i32 + n as i32);
            }
            p
        })
        .collect();
    let mut spec = json!({
        "type": if s.class == 3 { "ClusterIP" } else { "LoadBalancer" },
        "ports": ports, "ipFamilyPolicy": policy, "ipFamilies": families,
        "externalTrafficPolicy": if s.local { "Local" } else { "Cluster" },
    });
    match s.class {
        0 => spec["loadBalancerClass"] = json!("weir.dev/lb"),
        2 => spec["loadBalancerClass"] = json!("other.example/lb"),
        _ => {}
    }
    if s.local && s.health_node_port {
        spec["healthCheckNodePort"] = json!(32000 + i as i32);
    }
    if s.affinity {
        spec["sessionAffinity"] = json!("ClientIP");
    }
    match s.source_ranges {
        1 => spec["loadBalancerSourceRanges"] = json!(["10.0.0.0/8", "2001:db8:1::/48"]),
        2 => spec["loadBalancerSourceRanges"] = json!(["10.0.0.0/33"]),
        _ => {}
    }
    let annotations: BTreeMap<&str, &str> = s
        .annotations
        .iter()
        .map(|&(a, v, invalid)| {
            let (key, values) = ANNOTATIONS[a];
            let valid = values.len().saturating_sub(1).max(1);
            (
                key,
                values[if invalid { values.len() - 1 } else { v % valid }],
            )
        })
        .collect();
    let mut metadata = json!({"name": name, "namespace": "default", "annotations": annotations});
    if s.deleting {
        metadata["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        metadata["finalizers"] = json!(["service.kubernetes.io/load-balancer-cleanup"]);
    }
    serde_json::from_value(json!({"metadata": metadata, "spec": spec})).unwrap()
}

fn slice(i: usize, s: &Shape) -> EndpointSlice {
    let endpoints: Vec<Value> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(n, &(node, ready))| {
            json!({"addresses": [format!("10.1.{i}.{n}")], "nodeName": format!("node-{node}"),
                   "conditions": {"ready": ready}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}-abc"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4", "endpoints": endpoints}))
    .unwrap()
}

/// (excluded, labelled role=edge, has an ExternalIP, has an IPv6 address).
fn node(i: usize, (excluded, edge, external, v6): (bool, bool, bool, bool)) -> Node {
    let mut labels = json!({});
    if excluded {
        labels["node.kubernetes.io/exclude-from-external-load-balancers"] = json!("");
    }
    if edge {
        labels["role"] = json!("edge");
    }
    let mut addresses = vec![json!({"type": "InternalIP", "address": format!("10.0.0.{}", i + 1)})];
    if external {
        addresses.push(json!({"type": "ExternalIP", "address": format!("203.0.113.{}", i + 1)}));
    }
    if v6 {
        addresses.push(json!({"type": "InternalIP", "address": format!("fd00::{}", i + 1)}));
    }
    serde_json::from_value(
        json!({"metadata": {"name": format!("node-{i}"), "labels": labels},
                                  "status": {"addresses": addresses}}),
    )
    .unwrap()
}

/// (default_class, a node selector, TCP health checks for ETP=Cluster).
fn controller_config((default_class, selector, tcp): (bool, bool, bool)) -> Config {
    let mut text = format!(
        "[kubernetes]\ndefault_class = {default_class}\n\
         [[pool]]\nname = \"main\"\naddresses = [\"192.0.2.0/29\", \"2001:db8::/125\"]\navoid_buggy_ips = true\n\
         [[pool]]\nname = \"reserved\"\naddresses = [\"198.51.100.0/30\"]\nauto_assign = false\n"
    );
    if selector {
        text.push_str("[nodes]\nselector = \"role=edge\"\n");
    }
    if tcp {
        text.push_str("[health]\ncluster = \"tcp\"\n");
    }
    config::parse(&text).unwrap()
}

/// Writes `ips` into the Service's status, as the controller would.
fn with_status(svc: &Service, ips: &[IpAddr]) -> Service {
    let mut v = serde_json::to_value(svc).unwrap();
    let ingress: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"ip": ip.to_string(), "ipMode": "Proxy"}))
        .collect();
    v["status"] = json!({"loadBalancer": {"ingress": ingress}});
    serde_json::from_value(v).unwrap()
}

/// A Service's listeners as a plan gives them (none without an address or
/// with invalid annotations).
fn planned_listeners(desired: &Desired) -> Vec<ListenerSpec> {
    desired
        .forwarding
        .as_ref()
        .and_then(|f| f.translation.as_ref().ok())
        .map(|t| t.listeners.clone())
        .unwrap_or_default()
}

fn sorted(mut listeners: Vec<ListenerSpec>) -> Vec<ListenerSpec> {
    listeners.sort_by(|a, b| a.name.cmp(&b.name));
    listeners
}

/// Plan, seeding and reconcile agree on every Service of the cluster.
/// Seeding gives each Service what it holds, which a reconcile changes
/// only when the Service's request changed since (`steady`: none did).
fn agree(
    cfg: &Config,
    services: &[Arc<Service>],
    cluster: &Cluster<'_>,
    steady: bool,
) -> Result<(), TestCaseError> {
    let settings = Settings::from_config(cfg);
    let plan = desired::plan(cfg, services, cluster);
    let seeded = Ledger::seeded(desired::seed(cfg, services, cluster));
    let mut reconciled = Ledger::seeded(desired::seed(cfg, services, cluster));
    let by_key: BTreeMap<ServiceKey, &Arc<Service>> =
        services.iter().map(|s| (key_of(s), s)).collect();
    // Reconciles in plan's order: Services holding addresses first.
    for (key, planned) in &plan.services {
        let svc = by_key[key];
        let held = lb_controller::status::addresses(svc);
        if steady {
            prop_assert_eq!(&planned.addresses.ips, &held, "{} keeps its addresses", key);
        }
        let r = reconciled.reconcile(svc, cluster, &settings);
        prop_assert_eq!(
            &r.addresses.ips,
            &planned.addresses.ips,
            "{} addresses",
            key
        );
        let planned_ingress = planned.forwarding.as_ref().map(|f| f.ingress.clone());
        prop_assert_eq!(&r.ingress, &planned_ingress, "{} status", key);
        let listeners = planned_listeners(planned);
        prop_assert_eq!(
            reconciled.listeners(key).unwrap_or_default(),
            listeners.as_slice(),
            "{} listeners: reconcile and plan",
            key
        );
        if !held.is_empty() && held == planned.addresses.ips {
            prop_assert_eq!(
                seeded.listeners(key).unwrap_or_default(),
                listeners.as_slice(),
                "{} listeners: seeding and plan",
                key
            );
        }
    }
    // The state every forwarder gets is the same.
    prop_assert_eq!(
        sorted(reconciled.build().state.listeners),
        sorted(plan.state().listeners)
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn plan_seeding_and_reconcile_compute_the_same_desired_state(
        shapes in prop::collection::vec(shape(), 1..12),
        nodes in prop::collection::vec(any::<(bool, bool, bool, bool)>(), 0..4),
        settings in any::<(bool, bool, bool)>(),
    ) {
        let cfg = controller_config(settings);
        let nodes: Vec<Arc<Node>> = nodes.into_iter().enumerate().map(|(i, n)| Arc::new(node(i, n))).collect();
        let slices: Vec<Arc<EndpointSlice>> = shapes.iter().enumerate().map(|(i, s)| Arc::new(slice(i, s))).collect();
        let cluster = Cluster::new(&nodes, &slices);
        // A first plan, before any Service is being deleted, gives the
        // addresses that some Services hold in their status.
        let fresh: Vec<Arc<Service>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let annotations = if s.annotated_later { Vec::new() } else { s.annotations.clone() };
                Arc::new(service(i, &Shape { deleting: false, annotations, ..s.clone() }))
            })
            .collect();
        let first: BTreeMap<ServiceKey, Vec<IpAddr>> = desired::plan(&cfg, &fresh, &cluster)
            .services
            .into_iter()
            .map(|(k, d)| (k, d.addresses.ips))
            .collect();
        let services: Vec<Arc<Service>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let svc = service(i, s);
                match first.get(&key_of(&svc)) {
                    Some(ips) if s.held => Arc::new(with_status(&svc, ips)),
                    _ => Arc::new(svc),
                }
            })
            .collect();
        agree(&cfg, &services, &cluster, false)?;
        // Once every Service holds what the plan gives it, the three agree
        // on all of them.
        let plan = desired::plan(&cfg, &services, &cluster);
        let steady: Vec<Arc<Service>> = services
            .iter()
            .map(|svc| {
                match plan.services.iter().find(|(k, _)| *k == key_of(svc)) {
                    Some((_, d)) if !d.addresses.ips.is_empty() => Arc::new(with_status(svc, &d.addresses.ips)),
                    _ => svc.clone(),
                }
            })
            .collect();
        agree(&cfg, &steady, &cluster, true)?;
    }
}
