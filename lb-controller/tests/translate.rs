//! Service + Nodes + EndpointSlices → listeners (pure).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_config::{Balance, HashKey, HealthKind, ProxyProtocol};
use lb_controller::config::{parse_selector, ClusterHealth};
use lb_controller::translate::{self, Settings, Translation};
use serde_json::{json, Value};

fn settings() -> Settings {
    Settings {
        address_types: vec!["InternalIP".into(), "ExternalIP".into()],
        node_selector: Vec::new(),
        cluster_health: ClusterHealth::KubeProxy,
        kube_proxy_port: 10256,
    }
}

fn node(name: &str, addrs: &[(&str, &str)], labels: Value) -> Node {
    let addresses: Vec<Value> = addrs
        .iter()
        .map(|(t, a)| json!({"type": t, "address": a}))
        .collect();
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels},
                                  "status": {"addresses": addresses}}))
    .unwrap()
}

fn nodes() -> Vec<Node> {
    vec![
        node("n1", &[("InternalIP", "10.0.0.1")], json!({})),
        node("n2", &[("InternalIP", "10.0.0.2")], json!({})),
        node("n3", &[("InternalIP", "10.0.0.3")], json!({})),
    ]
}

fn service(patch: Value) -> Service {
    let mut v = json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Cluster",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}
    });
    merge(&mut v, &patch);
    serde_json::from_value(v).unwrap()
}

fn merge(t: &mut Value, p: &Value) {
    match p {
        Value::Object(m) => {
            for (k, v) in m {
                merge(t.as_object_mut().unwrap().entry(k).or_insert(json!({})), v);
            }
        }
        other => *t = other.clone(),
    }
}

fn slice(endpoints: Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": "web-abc", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "endpoints": endpoints}))
    .unwrap()
}

const VIP: &str = "192.0.2.10";

fn run(
    svc: &Service,
    nodes: &[Node],
    slices: &[EndpointSlice],
) -> Result<Translation, Vec<String>> {
    let ips: Vec<IpAddr> = vec![VIP.parse().unwrap()];
    run_ips(svc, &ips, nodes, slices, &settings())
}

fn run_ips(
    svc: &Service,
    ips: &[IpAddr],
    nodes: &[Node],
    slices: &[EndpointSlice],
    settings: &Settings,
) -> Result<Translation, Vec<String>> {
    let n: Vec<&Node> = nodes.iter().collect();
    let s: Vec<&EndpointSlice> = slices.iter().collect();
    translate::translate(svc, ips, &n, &s, settings)
        .map_err(|e| e.into_iter().map(|e| e.to_string()).collect())
}

fn backends(t: &Translation) -> Vec<(String, Option<u32>)> {
    t.listeners[0]
        .backends
        .iter()
        .map(|b| (b.addr.clone(), b.weight))
        .collect()
}

#[test]
fn cluster_policy_uses_every_node_and_kube_proxy_health() {
    let t = run(&service(json!({})), &nodes(), &[]).unwrap();
    assert_eq!(t.listeners.len(), 1);
    let l = &t.listeners[0];
    assert_eq!(l.name, "shop/web:80/tcp/192.0.2.10");
    assert_eq!(l.bind, "192.0.2.10:80");
    assert_eq!(l.balance, Some(Balance::Maglev));
    assert_eq!(l.hash_key, None);
    assert_eq!(
        backends(&t),
        vec![
            ("10.0.0.1:30080".into(), None),
            ("10.0.0.2:30080".into(), None),
            ("10.0.0.3:30080".into(), None)
        ]
    );
    let h = l.health.as_ref().unwrap();
    assert_eq!(h.kind, Some(HealthKind::Http));
    assert_eq!(h.port, Some(10256));
    assert_eq!(h.path.as_deref(), Some("/healthz"));

    // health.cluster = tcp: a TCP connect to the NodePort.
    let mut s = settings();
    s.cluster_health = ClusterHealth::Tcp;
    let ips = [VIP.parse().unwrap()];
    let t = run_ips(&service(json!({})), &ips, &nodes(), &[], &s).unwrap();
    let h = t.listeners[0].health.as_ref().unwrap();
    assert_eq!(
        (h.kind, h.port, h.path.clone()),
        (Some(HealthKind::Tcp), None, None)
    );
}

#[test]
fn local_policy_probes_health_check_node_port_and_weights_by_local_endpoints() {
    let svc =
        service(json!({"spec": {"externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}}));
    let slices = [slice(json!([
        {"addresses": ["10.1.0.1"], "nodeName": "n1", "conditions": {"ready": true}},
        {"addresses": ["10.1.0.2"], "nodeName": "n1"},
        {"addresses": ["10.1.0.3"], "nodeName": "n1", "conditions": {"ready": false}},
        {"addresses": ["10.1.0.4"], "nodeName": "n2", "conditions": {"ready": true}},
        {"addresses": ["10.1.0.5"], "nodeName": "n2", "conditions": {"ready": true}},
        {"addresses": ["10.1.0.6"], "nodeName": "n2", "conditions": {"ready": true}},
    ]))];
    let t = run(&svc, &nodes(), &slices).unwrap();
    // n1: 2 ready (unset counts as ready), n2: 3, n3: none: weight 0, so it
    // gets no new connection at once, without waiting for the health check
    // (which kube-proxy fails there) to count `fall` failures.
    assert_eq!(
        backends(&t),
        vec![
            ("10.0.0.1:30080".into(), Some(2)),
            ("10.0.0.2:30080".into(), Some(3)),
            ("10.0.0.3:30080".into(), Some(0))
        ]
    );
    let h = t.listeners[0].health.as_ref().unwrap();
    assert_eq!(h.kind, Some(HealthKind::Http));
    assert_eq!(h.port, Some(32000));
    assert_eq!(h.path.as_deref(), Some("/healthz"));
}

/// ETP=Local with no ready endpoint on any node (none yet, all terminating
/// or not ready): no backend at all (lbd refuses a listener whose backends
/// all weigh 0), so new connections are refused rather than sent to nodes
/// that would drop them.
#[test]
fn local_policy_with_no_ready_endpoint_anywhere_has_no_backend() {
    let svc =
        service(json!({"spec": {"externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}}));
    let not_ready = [slice(json!([
        {"addresses": ["10.1.0.1"], "nodeName": "n1", "conditions": {"ready": false}},
        {"addresses": ["10.1.0.2"], "nodeName": "n2",
         "conditions": {"ready": false, "serving": true, "terminating": true}},
    ]))];
    for slices in [&not_ready[..], &[]] {
        let t = run(&svc, &nodes(), slices).unwrap();
        assert_eq!(backends(&t), vec![], "{slices:?}");
        lb_config::resolve_listeners(&t.listeners, &lb_config::Defaults::default(), "listener")
            .expect("lbd accepts it");
    }
}

#[test]
fn excluded_and_unselected_nodes_are_not_backends() {
    let mut ns = nodes();
    ns.push(node(
        "n4",
        &[("InternalIP", "10.0.0.4")],
        json!({"node.kubernetes.io/exclude-from-external-load-balancers": ""}),
    ));
    ns.push(node("n5", &[("Hostname", "n5")], json!({})));
    ns.push(node(
        "n6",
        &[("ExternalIP", "203.0.113.6")],
        json!({"pool": "edge"}),
    ));
    let t = run(&service(json!({})), &ns, &[]).unwrap();
    let addrs: Vec<String> = backends(&t).into_iter().map(|b| b.0).collect();
    assert_eq!(
        addrs,
        [
            "10.0.0.1:30080",
            "10.0.0.2:30080",
            "10.0.0.3:30080",
            "203.0.113.6:30080"
        ]
    );

    let mut s = settings();
    s.node_selector = parse_selector("pool=edge").unwrap();
    let ips = [VIP.parse().unwrap()];
    let t = run_ips(&service(json!({})), &ips, &ns, &[], &s).unwrap();
    let addrs: Vec<String> = backends(&t).into_iter().map(|b| b.0).collect();
    assert_eq!(addrs, ["203.0.113.6:30080"]);
    assert!(parse_selector("a=b,!c,d!=e,f").is_ok());
    assert!(parse_selector("bad key=x").is_err());
}

#[test]
fn address_preference_follows_types_then_family() {
    let n = node(
        "dual",
        &[
            ("ExternalIP", "203.0.113.1"),
            ("InternalIP", "10.0.0.9"),
            ("InternalIP", "fd00::9"),
        ],
        json!({}),
    );
    let svc = service(json!({}));
    let ips: Vec<IpAddr> = vec![
        "192.0.2.10".parse().unwrap(),
        "2001:db8::10".parse().unwrap(),
    ];
    let t = run_ips(&svc, &ips, &[n], &[], &settings()).unwrap();
    assert_eq!(t.listeners.len(), 2, "one listener per address");
    assert_eq!(t.listeners[0].backends[0].addr, "10.0.0.9:30080");
    assert_eq!(t.listeners[1].name, "shop/web:80/tcp/2001:db8::10");
    assert_eq!(t.listeners[1].bind, "[2001:db8::10]:80");
    assert_eq!(t.listeners[1].backends[0].addr, "[fd00::9]:30080");
}

#[test]
fn missing_node_port_and_sctp_get_no_listener() {
    let svc = service(json!({"spec": {"ports": [
        {"name": "a", "port": 80, "protocol": "TCP"},
        {"name": "b", "port": 5000, "protocol": "SCTP", "nodePort": 30500},
        {"name": "c", "port": 53, "protocol": "UDP", "nodePort": 30053},
    ]}}));
    let t = run(&svc, &nodes(), &[]).unwrap();
    let reasons: Vec<(i32, &str)> = t.skipped.iter().map(|s| (s.port, s.reason)).collect();
    assert_eq!(reasons, [(80, "NoNodePort"), (5000, "UnsupportedProtocol")]);
    assert_eq!(t.listeners.len(), 1);
    let udp = &t.listeners[0];
    assert_eq!(udp.name, "shop/web:53/udp/192.0.2.10");
    assert_eq!(udp.protocol, Some(lb_config::Protocol::Udp));
    // A UDP NodePort cannot be probed with TCP: kube-proxy's endpoint is used.
    assert_eq!(udp.health.as_ref().unwrap().port, Some(10256));
}

#[test]
fn source_ranges_and_affinity() {
    let svc = service(
        json!({"spec": {"loadBalancerSourceRanges": ["10.0.0.0/8", " 192.168.1.0/24 "],
                                      "sessionAffinity": "ClientIP"}}),
    );
    let t = run(&svc, &nodes(), &[]).unwrap();
    let l = &t.listeners[0];
    assert_eq!(
        l.source_ranges.as_deref(),
        Some(&["10.0.0.0/8".to_owned(), "192.168.1.0/24".to_owned()][..])
    );
    assert_eq!(l.balance, Some(Balance::Maglev));
    assert_eq!(l.hash_key, Some(HashKey::ClientIp));

    let bad = service(json!({"spec": {"loadBalancerSourceRanges": ["10.0.0.0/33"]}}));
    let err = run(&bad, &nodes(), &[]).unwrap_err();
    assert!(
        err[0].starts_with("spec.loadBalancerSourceRanges[0]"),
        "{err:?}"
    );

    let conflict = service(json!({"spec": {"sessionAffinity": "ClientIP"},
                                  "metadata": {"annotations": {"weir.dev/balance": "round_robin"}}}));
    let err = run(&conflict, &nodes(), &[]).unwrap_err();
    assert!(err[0].contains("weir.dev/balance"), "{err:?}");
}

#[test]
fn every_annotation_good_values() {
    let svc = service(json!({"metadata": {"annotations": {
        "weir.dev/proxy-protocol": "v2",
        "weir.dev/balance": "least_conn",
        "weir.dev/idle-timeout": "5m",
        "weir.dev/connect-timeout": "750ms",
        "weir.dev/max-connections": "1000",
        "weir.dev/health-check-kind": "http",
        "weir.dev/health-check-path": "/ready",
        "weir.dev/health-check-port": "8081",
        "weir.dev/health-check-interval": "5s",
        "weir.dev/health-check-timeout": "2s",
        "weir.dev/health-check-rise": "3",
        "weir.dev/health-check-fall": "4",
    }}}));
    let t = run(&svc, &nodes(), &[]).unwrap();
    let l = &t.listeners[0];
    assert_eq!(l.proxy_protocol, Some(ProxyProtocol::V2));
    assert_eq!(l.balance, Some(Balance::LeastConn));
    assert_eq!(l.idle_timeout, Some("5m".parse().unwrap()));
    assert_eq!(l.connect_timeout, Some("750ms".parse().unwrap()));
    assert_eq!(l.max_connections, Some(1000));
    let h = l.health.as_ref().unwrap();
    assert_eq!(h.kind, Some(HealthKind::Http));
    assert_eq!(h.path.as_deref(), Some("/ready"));
    assert_eq!(h.port, Some(8081));
    assert_eq!(h.interval, Some("5s".parse().unwrap()));
    assert_eq!(h.timeout, Some("2s".parse().unwrap()));
    assert_eq!((h.rise, h.fall), (Some(3), Some(4)));

    // Kebab-case spellings of enum values are accepted too.
    let svc = service(
        json!({"metadata": {"annotations": {"weir.dev/balance": "random-two",
                                                           "weir.dev/health-check-kind": "tcp"}}}),
    );
    let t = run(&svc, &nodes(), &[]).unwrap();
    assert_eq!(t.listeners[0].balance, Some(Balance::RandomTwo));
    let h = t.listeners[0].health.as_ref().unwrap();
    assert_eq!(
        (h.kind, h.port, h.path.clone()),
        (Some(HealthKind::Tcp), None, None)
    );

    let svc = service(json!({"metadata": {"annotations": {"weir.dev/health-check-kind": "none"}}}));
    let h = run(&svc, &nodes(), &[]).unwrap().listeners[0]
        .health
        .clone()
        .unwrap();
    assert_eq!((h.kind, h.port), (Some(HealthKind::None), None));

    // A path of the application's alone: kube-proxy's node health port
    // serves only /healthz, so the NodePort is probed, even when the kind
    // named is the one kube-proxy's check already has; a Local Service's
    // check stays on its healthCheckNodePort, as before.
    for (policy, extra, port) in [
        ("Cluster", json!({}), None),
        (
            "Cluster",
            json!({"weir.dev/health-check-kind": "http"}),
            None,
        ),
        ("Local", json!({}), Some(32000)),
    ] {
        let mut annotations = json!({"weir.dev/health-check-path": "/ready"});
        merge(&mut annotations, &extra);
        let svc = service(json!({"metadata": {"annotations": annotations},
                                 "spec": {"externalTrafficPolicy": policy, "healthCheckNodePort": 32000}}));
        let h = run(&svc, &nodes(), &[]).unwrap().listeners[0]
            .health
            .clone()
            .unwrap();
        assert_eq!(
            (h.kind, h.port, h.path.as_deref()),
            (Some(HealthKind::Http), port, Some("/ready")),
            "{policy} {extra}"
        );
    }
}

#[test]
fn every_annotation_bad_values_name_the_annotation() {
    let cases = [
        ("weir.dev/proxy-protocol", "v3"),
        ("weir.dev/balance", "fastest"),
        ("weir.dev/idle-timeout", "forever"),
        ("weir.dev/idle-timeout", "0s"),
        ("weir.dev/connect-timeout", "3"),
        ("weir.dev/max-connections", "-1"),
        ("weir.dev/health-check-kind", "icmp"),
        ("weir.dev/health-check-path", "healthz"),
        ("weir.dev/health-check-port", "0"),
        ("weir.dev/health-check-port", "70000"),
        ("weir.dev/health-check-interval", "soon"),
        ("weir.dev/health-check-timeout", "1 s"),
        ("weir.dev/health-check-rise", "0"),
        ("weir.dev/health-check-fall", "many"),
    ];
    for (key, value) in cases {
        let svc = service(json!({"metadata": {"annotations": {key: value}}}));
        let err = run(&svc, &nodes(), &[]).unwrap_err();
        assert_eq!(err.len(), 1, "{key}={value}: {err:?}");
        assert!(
            err[0].starts_with(&format!("{key}: ")),
            "{key}={value}: {err:?}"
        );
    }
    // Unknown weir.dev keys are reported (likely typos) but block nothing;
    // so are MetalLB's request annotations, with what to use instead.
    let svc = service(json!({"metadata": {"annotations": {
        "weir.dev/proxy-protcol": "v1",
        "metallb.universe.tf/address-pool": "lan",
        "metallb.io/loadBalancerIPs": "192.0.2.10",
        "metallb.io/ip-allocated-from-pool": "lan",
        "example.com/other": "x"}}}));
    assert!(run(&svc, &nodes(), &[]).is_ok());
    assert_eq!(
        translate::unread_annotations(&svc),
        [
            "metallb.io/loadBalancerIPs is MetalLB's annotation, which Weir does not read; use weir.dev/load-balancer-ips",
            "metallb.universe.tf/address-pool is MetalLB's annotation, which Weir does not read; use weir.dev/pool",
            "weir.dev/proxy-protcol is not a Weir annotation (typo?); ignored",
        ]
    );
}

#[test]
fn allocation_requests_from_spec_and_annotations() {
    use lb_controller::ipam::{Family, FamilyPolicy, Proto};
    let svc = service(json!({"metadata": {"annotations": {
            "weir.dev/load-balancer-ips": "192.0.2.5, 2001:db8::5",
            "weir.dev/pool": "gold", "weir.dev/allow-shared-ip": "k"}},
        "spec": {"ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "RequireDualStack",
                 "loadBalancerIP": "192.0.2.99",
                 "ports": [{"port": 53, "protocol": "UDP", "nodePort": 30053}]}}));
    let r = translate::request(&svc).unwrap();
    assert_eq!(r.policy, FamilyPolicy::RequireDual(Family::V6));
    assert_eq!(
        r.addresses,
        vec![
            "192.0.2.5".parse::<IpAddr>().unwrap(),
            "2001:db8::5".parse().unwrap()
        ],
        "the annotation wins over spec.loadBalancerIP"
    );
    assert_eq!(r.pool.as_deref(), Some("gold"));
    assert_eq!(r.sharing_key.as_deref(), Some("k"));
    assert_eq!(r.ports, vec![(53, Proto::Udp)]);

    let svc = service(
        json!({"spec": {"loadBalancerIP": "192.0.2.99", "ipFamilyPolicy": "PreferDualStack"}}),
    );
    let r = translate::request(&svc).unwrap();
    assert_eq!(r.addresses, vec!["192.0.2.99".parse::<IpAddr>().unwrap()]);
    assert_eq!(r.policy, FamilyPolicy::PreferDual(Family::V4));

    let bad = service(
        json!({"metadata": {"annotations": {"weir.dev/load-balancer-ips": "192.0.2.300"}}}),
    );
    assert_eq!(
        translate::request(&bad).unwrap_err().field,
        "weir.dev/load-balancer-ips"
    );
}

#[test]
fn class_selection() {
    let plain = service(json!({}));
    assert!(translate::is_managed(&plain, "weir.dev/lb", true));
    assert!(!translate::is_managed(&plain, "weir.dev/lb", false));
    let ours = service(json!({"spec": {"loadBalancerClass": "weir.dev/lb"}}));
    assert!(translate::is_managed(&ours, "weir.dev/lb", false));
    let theirs = service(json!({"spec": {"loadBalancerClass": "example.com/x"}}));
    assert!(!translate::is_managed(&theirs, "weir.dev/lb", true));
    let cluster_ip = service(json!({"spec": {"type": "ClusterIP"}}));
    assert!(!translate::is_managed(&cluster_ip, "weir.dev/lb", true));
}

#[test]
fn controller_example_config_parses() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/examples/lb-controller.toml"
    ))
    .unwrap();
    let cfg = lb_controller::config::parse(&text).unwrap();
    assert_eq!(cfg.pools.len(), 1);
    assert_eq!(cfg.forwarders.len(), 1);
}

#[test]
fn controller_config_errors_name_field_and_line() {
    let err = lb_controller::config::parse(
        "[[pool]]\nname = \"a\"\naddresses = [\"10.0.0.0/8\"]\n\n[[pool]]\nname = \"a\"\naddresses = [\"bogus\"]\n\n[nodes]\naddress_types = [\"Internal\"]\n\n[[forwarder]]\nname = \"x\"\nurl = \"http://x:1\"\n",
    )
    .unwrap_err()
    .to_string();
    for want in [
        "line 6: pool[1].name",
        "line 7: pool[1].addresses[0]",
        "line 10: nodes.address_types[0]",
        "line 14: forwarder[0].url",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn controller_config_refuses_what_cannot_work_and_warns_of_overlaps() {
    let errors = |text: &str| match lb_controller::config::parse(text) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    // An address in two ranges, across pools or within one: a warning with
    // path and line (files with overlapping pools loaded before).
    let cfg = lb_controller::config::parse(
        "[[pool]]\nname = \"a\"\naddresses = [\"192.0.2.0/28\"]\n\
         [[pool]]\nname = \"b\"\naddresses = [\"198.51.100.0/24\", \"192.0.2.8/29\"]\n\
         [[pool]]\nname = \"c\"\naddresses = [\"203.0.113.0/28\", \"203.0.113.10-203.0.113.20\"]\n",
    )
    .unwrap();
    let warnings: Vec<String> = cfg.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    assert!(
        warnings[0].starts_with(
            "line 6: pool[1].addresses[1]: \"192.0.2.8/29\" overlaps pool[0].addresses[0]"
        ),
        "{warnings:#?}"
    );
    assert!(
        warnings[1].starts_with("line 9: pool[2].addresses[1]: \"203.0.113.10-203.0.113.20\" overlaps pool[2].addresses[0]"),
        "{warnings:#?}"
    );
    // Adjacent ranges, or the same numbers in another family, earn none.
    let cfg = lb_controller::config::parse(
        "[[pool]]\nname = \"a\"\naddresses = [\"192.0.2.0/28\", \"192.0.2.16/28\", \"::c000:200/124\"]\n",
    )
    .unwrap();
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
    // A label value the API server would refuse.
    let err = errors("[nodes]\nselector = \"weir.dev/backend===\"\n");
    assert!(
        err.contains("line 2: nodes.selector: bad label value"),
        "{err}"
    );
    assert_eq!(
        errors("[nodes]\nselector = \"weir.dev/backend=true,!weir.dev/off\"\n"),
        ""
    );
    // Node names only: no node would ever be a backend.
    let err = errors("[nodes]\naddress_types = [\"Hostname\", \"InternalDNS\"]\n");
    assert!(
        err.contains("line 2: nodes.address_types: lists no IP type"),
        "{err}"
    );
    assert_eq!(
        errors("[nodes]\naddress_types = [\"Hostname\", \"InternalIP\"]\n"),
        ""
    );
}

#[test]
fn controller_l2_settings_parse_and_errors_name_the_field() {
    let cfg = lb_controller::config::parse(
        "[[pool]]\nname = \"lan\"\naddresses = [\"192.0.2.0/28\"]\nannounce = \"l2\"\n\n[[pool]]\nname = \"bgp\"\naddresses = [\"198.51.100.0/28\"]\n\n[l2]\nprobe_interval = \"100ms\"\nprobe_failures = 2\n",
    )
    .unwrap();
    assert!(cfg.l2.covers("192.0.2.3".parse().unwrap()));
    assert!(!cfg.l2.covers("198.51.100.3".parse().unwrap()));
    assert_eq!(cfg.l2.probe_interval, std::time::Duration::from_millis(100));
    assert_eq!(cfg.l2.probe_failures, 2);
    assert_eq!(cfg.l2.lease(), std::time::Duration::from_secs(1));
    let defaults = lb_controller::config::parse("").unwrap();
    assert!(!defaults.l2.enabled());
    assert_eq!(
        defaults.l2.probe_interval,
        std::time::Duration::from_millis(200)
    );
    assert_eq!(defaults.l2.probe_failures, 3);

    let err = lb_controller::config::parse(
        "[[pool]]\nname = \"lan\"\naddresses = [\"192.0.2.0/28\"]\nannounce = \"arp\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("pool"), "{err}");
    let err = lb_controller::config::parse(
        "[[pool]]\nname = \"lan\"\naddresses = [\"192.0.2.0/28\"]\nannounce = \"l2\"\n\n[l2]\nprobe_interval = \"1ms\"\nprobe_failures = 0\n\n[[forwarder]]\nname = \"edge 1\"\nurl = \"unix:///run/x.sock\"\n",
    )
    .unwrap_err()
    .to_string();
    for want in [
        "line 7: l2.probe_interval",
        "line 8: l2.probe_failures",
        "line 11: forwarder[0].name",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    let err = lb_controller::config::parse("[l2]\nprobe_interval = \"60s\"\nprobe_failures = 31\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 3: l2.probe_failures"), "{err}");
}
