//! Ownership by class alone: the real controller next to Services of other
//! load balancer implementations, which carry the same finalizer and a
//! status of their own, and next to Services that change type.

mod support;

use std::time::Duration;

use serde_json::json;
use support::apiserver::Release;
use support::*;

const WAIT: Duration = Duration::from_secs(20);
const FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";
/// Weir's pool; the foreign Services claim addresses inside and outside it.
const POOL: &str =
    "[[pool]]\nname = \"test\"\naddresses = [\"127.0.10.1-127.0.10.2\"]\n[leader_election]\nenabled = false\n";

/// Writes by the controller (user `ctl`) about `default/name`, and Events
/// regarding it from anyone.
fn touched(api: &ApiServer, name: &str) -> Vec<String> {
    let object = format!("default/{name}");
    let mut out: Vec<String> = api
        .writes()
        .into_iter()
        .filter(|w| w.about == object && (w.user == "ctl" || w.resource == "events"))
        .map(|w| format!("{} {} {} by {}", w.verb, w.resource, w.object, w.user))
        .collect();
    out.extend(
        api.rejections()
            .into_iter()
            .filter(|r| r.object == object && r.user == "ctl")
            .map(|r| format!("refused {} {} {}", r.verb, r.resource, r.code)),
    );
    out
}

/// Services of another class, and unclassed ones when Weir is not the
/// default, keep their finalizer and status, get no Event, and their
/// addresses do not count in Weir's pool: not while the controller runs, not
/// when they are deleted or change type, not across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_of_other_implementations_are_never_touched() {
    let dir = temp_dir("foreign");
    let api = ApiServer::start().await;
    api.create(NODES, "", node("node-0", "127.0.0.2"));
    // Another class, with an address outside our pool (the shape)
    // and one inside it; no class while Weir is not the default.
    foreign(&api, "other-class", Some("other.example/lb"), "192.0.2.77");
    foreign(
        &api,
        "other-in-pool",
        Some("other.example/lb"),
        "127.0.10.1",
    );
    foreign(&api, "unclassed", None, "192.0.2.78");
    foreign(
        &api,
        "other-deleted",
        Some("other.example/lb"),
        "192.0.2.79",
    );
    foreign(
        &api,
        "other-to-clusterip",
        Some("other.example/lb"),
        "192.0.2.80",
    );
    let cfg = controller_config(&dir, &api.kubeconfig(&dir, "ctl"), POOL);
    // controller_config writes default_class = true; this controller is not the default.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("default_class = true", "default_class = false");
    std::fs::write(&cfg, text).unwrap();
    let mut ctl = start_controller(&cfg, "a");

    // While it runs: one foreign Service is deleted (its finalizer holds
    // it), another stops being a LoadBalancer (the server wipes its class
    // and status; the finalizer is its implementation's to remove).
    api.delete(SERVICES, "default", "other-deleted");
    api.patch(
        SERVICES,
        "default",
        "other-to-clusterip",
        json!({"spec": {"type": "ClusterIP"}}),
    );
    // Ours asks for the address the foreign status shows in our pool: it
    // gets it, as foreign Services do not count in the pool.
    let mut ours = lb_service("ours", &[(80, 0)]);
    ours["spec"]["loadBalancerClass"] = json!("weir.dev/lb");
    ours["metadata"]["annotations"] = json!({"weir.dev/load-balancer-ips": "127.0.10.1"});
    api.create(SERVICES, "default", ours);
    let got = assigned(&api, "default", "ours").await;
    assert_eq!(ingress_ips(&got), ["127.0.10.1"]);
    // A ClusterIP Service that becomes a LoadBalancer of our class is ours.
    api.create(
        SERVICES,
        "default",
        json!({"metadata": {"name": "becomes-ours"}, "spec": {"type": "ClusterIP",
               "ports": [{"port": 80, "protocol": "TCP"}]}}),
    );
    api.patch(
        SERVICES,
        "default",
        "becomes-ours",
        json!({"spec": {"type": "LoadBalancer", "loadBalancerClass": "weir.dev/lb"}}),
    );
    let became = assigned(&api, "default", "becomes-ours").await;
    assert_eq!(ingress_ips(&became), ["127.0.10.2"]);

    // Restart: seeding must not count the foreign Services either.
    ctl.kill();
    api.delete(SERVICES, "default", "ours");
    api.try_patch(
        "admin",
        SERVICES,
        "default",
        "ours",
        false,
        json!({"metadata": {"finalizers": null}}),
    )
    .unwrap();
    let _ctl = start_controller(&cfg, "b");
    let mut again = lb_service("again", &[(80, 0)]);
    again["spec"]["loadBalancerClass"] = json!("weir.dev/lb");
    again["metadata"]["annotations"] = json!({"weir.dev/load-balancer-ips": "127.0.10.1"});
    api.create(SERVICES, "default", again);
    let again = assigned(&api, "default", "again").await;
    assert_eq!(ingress_ips(&again), ["127.0.10.1"]);

    for (name, ip) in [
        ("other-class", Some("192.0.2.77")),
        ("other-in-pool", Some("127.0.10.1")),
        ("unclassed", Some("192.0.2.78")),
        ("other-deleted", Some("192.0.2.79")),
        ("other-to-clusterip", None),
    ] {
        let svc = api.get(SERVICES, "default", name).unwrap();
        assert_eq!(svc["metadata"]["finalizers"], json!([FINALIZER]), "{name}");
        assert_eq!(
            ingress_ips(&svc),
            ip.into_iter().map(str::to_owned).collect::<Vec<_>>(),
            "{name}"
        );
        assert!(svc["status"]["conditions"].is_null(), "{name}: {svc}");
        assert_eq!(touched(&api, name), Vec::<String>::new(), "{name}");
    }
}

/// A Service that leaves Weir by changing type is cleaned up once: out of
/// the forwarder, its address released (and reusable), our condition and
/// the finalizer removed (nobody else owns it), one Event; after that the
/// controller leaves it alone. Back to a LoadBalancer of our class, it is
/// ours again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_leaves_weir_is_cleaned_up_once() {
    let Bed { api, edge, cfg, .. } = bed("leave", Release::default(), POOL).await;
    let _ctl = start_controller(&cfg, "a");
    api.create(SERVICES, "default", lb_service("web", &[(9001, 30091)]));
    let svc = programmed(&api, "default", "web").await;
    let ip = ingress_ips(&svc)[0].clone();
    listeners_become(&edge, 1).await;
    eventually(WAIT, "IPAllocated event", || {
        events_for(&api, "web", "IPAllocated").into_iter().next()
    })
    .await;
    let before = api.writes().len();

    api.patch(
        SERVICES,
        "default",
        "web",
        json!({"spec": {"type": "ClusterIP"}}),
    );
    let svc = eventually(WAIT, "finalizer removed", || {
        api.get(SERVICES, "default", "web").filter(|s| {
            s["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty())
        })
    })
    .await;
    assert!(svc["status"]["conditions"]
        .as_array()
        .is_none_or(|c| c.iter().all(|c| c["type"] != CONDITION)));
    assert_eq!(
        lbd_state(&edge.socket).await.unwrap()["listeners"],
        json!([]),
        "removed from the forwarder before the finalizer went"
    );
    eventually(WAIT, "IPReleased event", || {
        events_for(&api, "web", "IPReleased")
            .into_iter()
            .find(|e| e["note"].as_str().unwrap_or_default().contains(&ip))
    })
    .await;
    // Its address is free: a new Service asking for it gets it. Once that
    // one is programmed, the controller has long finished with "web".
    let mut next = lb_service("next", &[(9002, 30092)]);
    next["metadata"]["annotations"] = json!({"weir.dev/load-balancer-ips": ip});
    api.create(SERVICES, "default", next);
    assert_eq!(
        ingress_ips(&programmed(&api, "default", "next").await),
        std::slice::from_ref(&ip)
    );
    let cleanup: Vec<(String, String)> = api.writes()[before..]
        .iter()
        .filter(|w| w.about == "default/web" && w.user == "ctl")
        .map(|w| (w.verb.clone(), w.resource.clone()))
        .collect();
    assert_eq!(
        cleanup,
        [
            ("patch".to_owned(), "services/status".to_owned()),
            ("patch".to_owned(), "services".to_owned()),
            ("create".to_owned(), "events".to_owned()),
        ],
        "one status write (our condition), one finalizer write, one Event"
    );

    // Back to a LoadBalancer (of no class: ours, as the default): ours again.
    api.patch(
        SERVICES,
        "default",
        "web",
        json!({"spec": {"type": "LoadBalancer"}}),
    );
    let back = programmed(&api, "default", "web").await;
    assert_eq!(back["metadata"]["finalizers"], json!([FINALIZER]));
    assert_eq!(ingress_ips(&back).len(), 1);
    assert_ne!(ingress_ips(&back), [ip]);
}

/// A Service that changed class while no controller ran (LoadBalancer →
/// ClusterIP → LoadBalancer of another class) is the other
/// implementation's: the restarted controller neither seeds its address nor
/// writes to it, and the forwarder stops serving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_moved_to_another_class_while_down_is_left_to_it() {
    // Addresses of its own: the tests run at once, each with its own lbd,
    // and an lbd shares no address and port with another process.
    let pool = POOL.replace("127.0.10.1-127.0.10.2", "127.0.11.1-127.0.11.2");
    let Bed { api, edge, cfg, .. } = bed("moved", Release::default(), &pool).await;
    let mut ctl = start_controller(&cfg, "a");
    api.create(SERVICES, "default", lb_service("web", &[(9001, 30091)]));
    let ip = ingress_ips(&programmed(&api, "default", "web").await)[0].clone();
    listeners_become(&edge, 1).await;
    ctl.kill();
    api.patch(
        SERVICES,
        "default",
        "web",
        json!({"spec": {"type": "ClusterIP"}}),
    );
    api.patch(
        SERVICES,
        "default",
        "web",
        json!({"spec": {"type": "LoadBalancer", "loadBalancerClass": "other.example/lb"}}),
    );
    let moved = api.get(SERVICES, "default", "web").unwrap();
    let before = api.writes().len();
    let _ctl = start_controller(&cfg, "b");
    listeners_become(&edge, 0).await;
    let mut next = lb_service("next", &[(9002, 30092)]);
    next["metadata"]["annotations"] = json!({"weir.dev/load-balancer-ips": ip});
    api.create(SERVICES, "default", next);
    programmed(&api, "default", "next").await;
    assert_eq!(api.get(SERVICES, "default", "web").unwrap(), moved);
    assert!(
        api.writes()[before..]
            .iter()
            .all(|w| w.about != "default/web"),
        "{:?}",
        api.writes()[before..].to_vec()
    );
}

const CONDITION: &str = "weir.dev/ForwardersProgrammed";
