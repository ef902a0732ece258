//! The real `lb-controller` binary against the in-test API server (and, where
//! the scenario needs a forwarder, a real `lbd`).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use support::*;

const POOL: &str =
    "[[pool]]\nname = \"test\"\naddresses = [\"127.0.10.0/24\"]\navoid_buggy_ips = true\n";
const SOLO: &str = "[leader_election]\nenabled = false\n";
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_assigns_ip_status_and_event() {
    let dir = temp_dir("create");
    let api = ApiServer::start().await;
    three_nodes(&api);
    let cfg = controller_config(&dir, &api.kubeconfig(&dir, "ctl"), &format!("{POOL}{SOLO}"));
    let _ctl = start_controller(&cfg, "a");
    api.create(
        SERVICES,
        "default",
        lb_service("web", &[(80, 30080), (443, 30443)]),
    );
    // An SCTP port gets a port error; a Service of another class is left alone.
    let mut sctp = lb_service("mixed", &[(81, 30081)]);
    sctp["spec"]["ports"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "s", "port": 9000, "protocol": "SCTP", "nodePort": 30900}));
    api.create(SERVICES, "default", sctp);
    let mut other = lb_service("other", &[(82, 30082)]);
    other["spec"]["loadBalancerClass"] = json!("example.com/other");
    api.create(SERVICES, "default", other);

    let svc = assigned(&api, "default", "web").await;
    let ip = ingress_ips(&svc)[0].clone();
    assert!(ip.starts_with("127.0.10."), "{ip}");
    assert_ne!(ip, "127.0.10.0", "avoid_buggy_ips");
    let ingress = &svc["status"]["loadBalancer"]["ingress"][0];
    assert_eq!(ingress["ipMode"], "Proxy");
    assert_eq!(
        ingress["ports"],
        json!([{"port": 80, "protocol": "TCP"}, {"port": 443, "protocol": "TCP"}])
    );
    assert_eq!(
        svc["metadata"]["finalizers"],
        json!(["service.kubernetes.io/load-balancer-cleanup"])
    );
    eventually(WAIT, "IPAllocated event", || {
        events_for(&api, "web", "IPAllocated")
            .into_iter()
            .find(|e| e["note"].as_str().unwrap_or_default().contains(&ip) && e["type"] == "Normal")
    })
    .await;

    let mixed = assigned(&api, "default", "mixed").await;
    assert_ne!(ingress_ips(&mixed)[0], ip, "no sharing without a key");
    assert_eq!(
        mixed["status"]["loadBalancer"]["ingress"][0]["ports"][1],
        json!({"port": 9000, "protocol": "SCTP", "error": "weir.dev/UnsupportedProtocol"})
    );
    eventually(WAIT, "UnsupportedProtocol warning", || {
        events_for(&api, "mixed", "UnsupportedProtocol")
            .into_iter()
            .find(|e| e["type"] == "Warning")
    })
    .await;
    let other = api.get(SERVICES, "default", "other").unwrap();
    assert!(ingress_ips(&other).is_empty());
    assert!(other["metadata"]["finalizers"].is_null());

    // A bad annotation: Warning naming it; the address stays.
    api.patch(
        SERVICES,
        "default",
        "web",
        json!({"metadata": {"annotations": {"weir.dev/idle-timeout": "forever"}}}),
    );
    let note = event_note(&api, "web", "InvalidAnnotation").await;
    assert!(note.contains("weir.dev/idle-timeout"), "{note}");
    assert_eq!(
        ingress_ips(&api.get(SERVICES, "default", "web").unwrap()),
        vec![ip]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_fifty_services_moves_no_ip() {
    let dir = temp_dir("restart");
    let api = ApiServer::start().await;
    three_nodes(&api);
    let cfg = controller_config(&dir, &api.kubeconfig(&dir, "ctl"), &format!("{POOL}{SOLO}"));
    // Created in an order that differs from name order, half before start.
    let names: Vec<String> = (0..50)
        .map(|i| format!("svc-{:02}", (i * 37) % 50))
        .collect();
    for n in &names[..25] {
        api.create(SERVICES, "default", lb_service(n, &[(80, 0)]));
    }
    let mut ctl = start_controller(&cfg, "a");
    for n in &names[25..] {
        api.create(SERVICES, "default", lb_service(n, &[(80, 0)]));
    }
    let before: BTreeMap<String, Vec<String>> = eventually(WAIT, "50 addresses", || {
        let all: BTreeMap<_, _> = api
            .list(SERVICES)
            .iter()
            .map(|s| {
                (
                    s["metadata"]["name"].as_str().unwrap().to_owned(),
                    ingress_ips(s),
                )
            })
            .filter(|(_, ips)| !ips.is_empty())
            .collect();
        (all.len() == 50).then_some(all)
    })
    .await;
    let distinct: std::collections::BTreeSet<_> = before.values().collect();
    assert_eq!(distinct.len(), 50);
    ctl.kill();
    // While it is down a new Service arrives: the restart must not hand it
    // an address somebody already holds.
    api.create(SERVICES, "default", lb_service("late", &[(80, 0)]));
    let writes_before = api.writes().len();
    let _ctl = start_controller(&cfg, "b");
    let late = assigned(&api, "default", "late").await;
    assert!(
        !distinct.contains(&ingress_ips(&late)),
        "late got a held address"
    );
    let after: BTreeMap<String, Vec<String>> = api
        .list(SERVICES)
        .iter()
        .filter(|s| s["metadata"]["name"] != "late")
        .map(|s| {
            (
                s["metadata"]["name"].as_str().unwrap().to_owned(),
                ingress_ips(s),
            )
        })
        .collect();
    assert_eq!(before, after);
    // And the restarted controller rewrote none of the 50 statuses.
    let rewrites: Vec<_> = api.writes()[writes_before..]
        .iter()
        .filter(|w| w.resource == "services/status" && !w.object.ends_with("/late"))
        .cloned()
        .collect();
    assert!(rewrites.is_empty(), "{rewrites:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_from_forwarder_before_freeing_the_ip() {
    let dir = temp_dir("delete");
    let api = ApiServer::start().await;
    three_nodes(&api);
    let edge = start_forwarder(&dir, "").await;
    let socket = &edge.socket;
    let cfg = controller_config(
        &dir,
        &api.kubeconfig(&dir, "ctl"),
        &format!("{POOL}{SOLO}{}[health]\ncluster = \"tcp\"\n", edge.toml),
    );
    let _ctl = start_controller(&cfg, "a");
    api.create(SERVICES, "default", lb_service("web", &[(8080, 30080)]));
    let svc = eventually(WAIT, "programmed condition", || {
        api.get(SERVICES, "default", "web").filter(|s| {
            s["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "weir.dev/ForwardersProgrammed" && c["status"] == "True")
            })
        })
    })
    .await;
    let ip = ingress_ips(&svc)[0].clone();
    let state = lbd_state(socket).await.unwrap();
    assert_eq!(
        state["listeners"][0]["name"],
        "default/web:8080/tcp/".to_owned() + &ip
    );
    assert_eq!(state["listeners"][0]["bind"], format!("{ip}:8080"));
    let backends: Vec<&str> = state["listeners"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["addr"].as_str().unwrap())
        .collect();
    assert_eq!(
        backends,
        ["127.0.0.2:30080", "127.0.0.3:30080", "127.0.0.4:30080"]
    );

    api.delete(SERVICES, "default", "web");
    eventually(WAIT, "Service gone", || {
        api.get(SERVICES, "default", "web").is_none().then_some(())
    })
    .await;
    // By the time the finalizer went, the forwarder had no listener for it.
    let state = lbd_state(socket).await.unwrap();
    assert_eq!(state["listeners"], json!([]), "{state}");
    // Ordering in the write log: the finalizer removal is the last write.
    let writes: Vec<_> = api
        .writes()
        .into_iter()
        .filter(|w| w.object == "default/web" && w.user == "ctl")
        .collect();
    assert_eq!(writes.last().unwrap().resource, "services", "{writes:?}");
    // The address is free again: a new Service asking for it gets it.
    let mut again = lb_service("again", &[(8080, 30081)]);
    again["metadata"]["annotations"] = json!({"weir.dev/load-balancer-ips": ip});
    api.create(SERVICES, "default", again);
    let again = assigned(&api, "default", "again").await;
    assert_eq!(ingress_ips(&again), vec![ip]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_a_standby_takes_over() {
    let dir = temp_dir("leader");
    let api = ApiServer::start().await;
    three_nodes(&api);
    let le = "[leader_election]\nnamespace = \"weir-system\"\nlease_name = \"lb-controller\"\nlease_duration = \"3s\"\nrenew_interval = \"500ms\"\n";
    let cfg_a = controller_config(&dir, &api.kubeconfig(&dir, "alpha"), &format!("{POOL}{le}"));
    let cfg_b = controller_config(&dir, &api.kubeconfig(&dir, "beta"), &format!("{POOL}{le}"));
    // Both replicas run with exactly the RBAC of deploy/kubernetes.
    api.enforce_rbac("alpha", manifest_rules());
    api.enforce_rbac("beta", manifest_rules());
    let mut a = start_controller(&cfg_a, "alpha");
    let leader = eventually(WAIT, "alpha leads", || {
        api.get(LEASES, "weir-system", "lb-controller")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
    })
    .await;
    assert_eq!(leader, "alpha");
    let _b = start_controller(&cfg_b, "beta");
    for i in 0..5 {
        api.create(
            SERVICES,
            "default",
            lb_service(&format!("s{i}"), &[(80, 0)]),
        );
    }
    eventually(WAIT, "5 addresses", || {
        (api.list(SERVICES)
            .iter()
            .filter(|s| !ingress_ips(s).is_empty())
            .count()
            == 5)
            .then_some(())
    })
    .await;
    let service_writers: std::collections::BTreeSet<String> = api
        .writes()
        .iter()
        .filter(|w| w.resource.starts_with("services") && w.user != "admin")
        .map(|w| w.user.clone())
        .collect();
    assert_eq!(service_writers, ["alpha".to_owned()].into());

    // The leader dies without releasing: beta takes over within the lease
    // duration (plus at most half a second) and serves new Services.
    a.kill();
    let killed = std::time::Instant::now();
    eventually(Duration::from_secs(10), "beta leads", || {
        api.get(LEASES, "weir-system", "lb-controller")
            .filter(|l| l["spec"]["holderIdentity"] == "beta")
    })
    .await;
    // Lease 3 s: at most 3.5 s after the last renewal, which came at most
    // 0.5 s before the kill; with room for a loaded CI machine.
    let takeover = killed.elapsed();
    println!(
        "standby took over {:.2}s after the leader died",
        takeover.as_secs_f64()
    );
    assert!(takeover < Duration::from_secs(5), "{takeover:?}");
    api.create(SERVICES, "default", lb_service("after", &[(80, 0)]));
    let after = assigned(&api, "default", "after").await;
    let taken: Vec<Vec<String>> = api
        .list(SERVICES)
        .iter()
        .filter(|s| s["metadata"]["name"] != "after")
        .map(ingress_ips)
        .collect();
    assert!(!taken.contains(&ingress_ips(&after)));
    assert_eq!(
        api.denied(),
        Vec::<String>::new(),
        "the manifest's RBAC is not enough"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_that_close_or_expire_are_resumed() {
    let dir = temp_dir("resume");
    let api = ApiServer::start().await;
    three_nodes(&api);
    let cfg = controller_config(&dir, &api.kubeconfig(&dir, "ctl"), &format!("{POOL}{SOLO}"));
    let _ctl = start_controller(&cfg, "a");
    api.create(SERVICES, "default", lb_service("one", &[(80, 0)]));
    assigned(&api, "default", "one").await;
    api.close_watches();
    api.create(SERVICES, "default", lb_service("two", &[(80, 0)]));
    assigned(&api, "default", "two").await;
    // History compacted and watches closed: resuming gets 410 Gone, the
    // client relists, and still sees the new Service.
    api.compact();
    api.close_watches();
    api.create(SERVICES, "default", lb_service("three", &[(80, 0)]));
    assigned(&api, "default", "three").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarder_rejection_becomes_a_warning_on_the_service() {
    let dir = temp_dir("reject");
    let api = ApiServer::start().await;
    three_nodes(&api);
    // The forwarder already serves 127.0.10.1:8080 from its own file: the
    // controller's listener for that address collides and is refused (422).
    let port = free_port("127.0.0.1");
    let edge = start_forwarder(
        &dir,
        &format!(
            "[[listener]]\nname = \"static\"\nbind = \"127.0.10.1:{port}\"\nbackends = [{{ addr = \"127.0.0.2:{port}\" }}]\n"
        ),
    )
    .await;
    let (socket, forwarder) = (&edge.socket, &edge.toml);
    let cfg = controller_config(
        &dir,
        &api.kubeconfig(&dir, "ctl"),
        &format!("{POOL}{SOLO}{forwarder}"),
    );
    let _ctl = start_controller(&cfg, "a");
    let mut svc = lb_service("clash", &[(port, 30080)]);
    svc["metadata"]["annotations"] = json!({"weir.dev/load-balancer-ips": "127.0.10.1"});
    api.create(SERVICES, "default", svc);
    let warning = eventually(WAIT, "ForwarderRejected warning", || {
        events_for(&api, "clash", "ForwarderRejected")
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(warning["type"], "Warning");
    let note = warning["note"].as_str().unwrap();
    assert!(
        note.contains("edge") && note.contains("listeners[0].bind"),
        "{note}"
    );
    let svc = eventually(WAIT, "condition False", || {
        api.get(SERVICES, "default", "clash").filter(|s| {
            s["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "weir.dev/ForwardersProgrammed" && c["status"] == "False")
            })
        })
    })
    .await;
    assert_eq!(ingress_ips(&svc), vec!["127.0.10.1".to_owned()]);
    // The forwarder kept its previous state (nothing of the refused one).
    assert_eq!(lbd_state(socket).await.unwrap()["listeners"], json!([]));
}

/// 1,000 LoadBalancer Services already in the API server when the
/// controller starts: every one gets an address and the forwarder runs all
/// 1,000 listeners. The time it took is printed (not asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_services_are_programmed() {
    let dir = temp_dir("scale");
    let api = ApiServer::start().await;
    three_nodes(&api);
    for i in 0..1000 {
        api.create(
            SERVICES,
            &format!("ns-{}", i % 10),
            lb_service(&format!("svc-{i:04}"), &[(80, 0)]),
        );
    }
    let edge = start_forwarder(&dir, "").await;
    let (socket, forwarder) = (&edge.socket, &edge.toml);
    let pool = "[[pool]]\nname = \"big\"\naddresses = [\"127.0.8.0/22\"]\navoid_buggy_ips = true\n[health]\ncluster = \"tcp\"\n";
    let cfg = controller_config(
        &dir,
        &api.kubeconfig(&dir, "ctl"),
        &format!("{pool}{SOLO}{forwarder}"),
    );
    let started = std::time::Instant::now();
    let _ctl = start_controller(&cfg, "a");
    let mut programmed = None;
    let deadline = started + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        let state = lbd_state(socket).await;
        if state
            .as_ref()
            .and_then(|s| s["listeners"].as_array().map(Vec::len))
            == Some(1000)
        {
            programmed = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let programmed = programmed.expect("1,000 listeners on the forwarder within 120 s");
    let statuses = eventually(Duration::from_secs(60), "1,000 statuses", || {
        let ips: std::collections::BTreeSet<Vec<String>> = api
            .list(SERVICES)
            .iter()
            .map(ingress_ips)
            .filter(|ips| !ips.is_empty())
            .collect();
        (ips.len() == 1000).then(|| started.elapsed())
    })
    .await;
    println!(
        "1,000 Services: forwarder programmed {:.2}s, all statuses written {:.2}s after start",
        programmed.as_secs_f64(),
        statuses.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_waits_for_a_release_and_plan_writes_nothing() {
    let dir = temp_dir("exhaust");
    let api = ApiServer::start().await;
    three_nodes(&api);
    let metrics = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let extra = format!(
        "[[pool]]\nname = \"tiny\"\naddresses = [\"127.0.10.1-127.0.10.2\"]\n{SOLO}[admin]\nmetrics = \"{metrics}\"\n"
    );
    let cfg = controller_config(&dir, &api.kubeconfig(&dir, "ctl"), &extra);
    let _ctl = start_controller(&cfg, "a");
    for name in ["first", "second", "third"] {
        api.create(SERVICES, "default", lb_service(name, &[(80, 0)]));
        // In order, so that "third" is the one left without an address.
        eventually(WAIT, "reconciled", || {
            api.get(SERVICES, "default", name)
                .filter(|s| s["metadata"]["finalizers"].is_array())
        })
        .await;
    }
    let warning = eventually(WAIT, "AllocationFailed", || {
        events_for(&api, "third", "AllocationFailed")
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(warning["type"], "Warning");
    assert!(
        warning["note"].as_str().unwrap().contains("no free"),
        "{warning}"
    );
    assert!(ingress_ips(&api.get(SERVICES, "default", "third").unwrap()).is_empty());

    let text = eventually(WAIT, "metrics", || http_get(&metrics, "/metrics")).await;
    let used = r#"weir_controller_pool_addresses_used{family="ipv4",pool="tiny"}"#;
    let size = r#"weir_controller_pool_addresses{family="ipv4",pool="tiny"}"#;
    assert_eq!(metric(&text, used), Some(2.0), "{text}");
    assert_eq!(metric(&text, size), Some(2.0));
    assert!(metric(&text, "weir_controller_allocation_failures_total") >= Some(1.0));
    assert_eq!(metric(&text, "weir_controller_leader"), Some(1.0));
    assert!(http_get(&metrics, "/readyz")
        .unwrap()
        .starts_with("HTTP/1.0 200"));

    // plan: reads, prints the desired state, writes nothing.
    let plan_cfg = controller_config(
        &dir,
        &api.kubeconfig(&dir, "plan"),
        &format!("[[pool]]\nname = \"tiny\"\naddresses = [\"127.0.10.1-127.0.10.2\"]\n{SOLO}"),
    );
    let writes = api.writes().len();
    let out = std::process::Command::new(CONTROLLER)
        .args(["plan", "--config"])
        .arg(&plan_cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = state["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("default/third: no address"));
    assert!(api.writes()[writes..].iter().all(|w| w.user != "plan"));

    // A release makes room: "third" gets the freed address without waiting.
    let freed = ingress_ips(&api.get(SERVICES, "default", "first").unwrap());
    api.delete(SERVICES, "default", "first");
    let third = eventually(
        Duration::from_secs(10),
        "third gets the freed address",
        || {
            api.get(SERVICES, "default", "third")
                .filter(|s| !ingress_ips(s).is_empty())
        },
    )
    .await;
    assert_eq!(ingress_ips(&third), freed);
}

/// ETP=Local: the forwarder's weights follow the EndpointSlices as they
/// change: a node whose last ready endpoint goes gets weight 0 in the next
/// state, without waiting for a health check to fail there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_weights_follow_endpoint_slices() {
    // Addresses of its own: the tests run at once, each with its own lbd,
    // and an lbd shares no address and port with another process.
    let pool = POOL.replace("127.0.10.0/24", "127.0.11.0/24");
    let Bed { api, edge, cfg, .. } = bed(
        "local",
        apiserver::Release::default(),
        &format!("{pool}{SOLO}"),
    )
    .await;
    let _ctl = start_controller(&cfg, "a");
    let mut svc = lb_service("web", &[(8080, 30080)]);
    svc["spec"]["externalTrafficPolicy"] = json!("Local");
    api.create(SERVICES, "default", svc);
    let endpoint = |ip: &str, node: &str, ready: bool| json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": ready}});
    api.create(
        SLICES,
        "default",
        json!({"metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4",
               "endpoints": [endpoint("10.1.0.1", "node-0", true), endpoint("10.1.0.2", "node-0", true),
                             endpoint("10.1.0.3", "node-1", true)]}),
    );
    let weights = |state: &serde_json::Value| -> Vec<(String, u64)> {
        state["listeners"][0]["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                (
                    b["addr"].as_str().unwrap_or_default().to_owned(),
                    b["weight"].as_u64().unwrap_or(1),
                )
            })
            .collect()
    };
    let expect = |w: [u64; 3]| -> Vec<(String, u64)> {
        ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
            .iter()
            .zip(w)
            .map(|(ip, w)| (format!("{ip}:30080"), w))
            .collect()
    };
    let deadline = std::time::Instant::now() + WAIT;
    for want in [expect([2, 1, 0]), expect([2, 0, 0])] {
        loop {
            let got = lbd_state(&edge.socket).await.map(|s| weights(&s));
            if got.as_ref() == Some(&want) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "weights {want:?}, forwarder has {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // node-1's only endpoint stops being ready.
        api.patch(
            SLICES,
            "default",
            "web-1",
            json!({"endpoints": [endpoint("10.1.0.1", "node-0", true), endpoint("10.1.0.2", "node-0", true),
                                 endpoint("10.1.0.3", "node-1", false)]}),
        );
    }
}

/// A new Service whose annotations are invalid has no good configuration
/// to keep: nothing forwards it, and its condition says so (False, with
/// the reason) however many states are built meanwhile; it keeps its
/// address in the status (which keeps it its own across restarts). Fixed,
/// it is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_service_with_invalid_annotations_is_not_reported_forwarded() {
    let pool = POOL.replace("127.0.10.0/24", "127.0.12.0/24");
    let Bed { api, edge, cfg, .. } = bed(
        "invalid-new",
        apiserver::Release::default(),
        &format!("{pool}{SOLO}"),
    )
    .await;
    let _ctl = start_controller(&cfg, "a");
    let mut bad = lb_service("bad", &[(81, 30081)]);
    bad["metadata"]["annotations"] = json!({"weir.dev/balance": "fastest"});
    api.create(SERVICES, "default", bad);
    let condition = |svc: &serde_json::Value| {
        svc["status"]["conditions"]
            .as_array()
            .and_then(|c| {
                c.iter()
                    .find(|c| c["type"] == "weir.dev/ForwardersProgrammed")
                    .cloned()
            })
            .unwrap_or_default()
    };
    let svc = eventually(WAIT, "an InvalidAnnotation condition", || {
        api.get(SERVICES, "default", "bad")
            .filter(|s| condition(s)["reason"] == "InvalidAnnotation")
    })
    .await;
    assert_eq!(condition(&svc)["status"], "False", "{svc}");
    let ip = ingress_ips(&svc);
    assert!(ip[0].starts_with("127.0.12."), "{svc}");
    // Another Service makes the controller build and push new states: the
    // forwarder runs that one only, and the condition stays False.
    api.create(SERVICES, "default", lb_service("good", &[(82, 30082)]));
    programmed(&api, "default", "good").await;
    listeners_become(&edge, 1).await;
    let svc = api.get(SERVICES, "default", "bad").unwrap();
    assert_eq!(condition(&svc)["status"], "False", "{svc}");
    assert_eq!(ingress_ips(&svc), ip);
    let note = event_note(&api, "bad", "InvalidAnnotation").await;
    assert!(
        note.contains("nothing forwards this Service until it is fixed"),
        "{note}"
    );
    // Fixed: forwarded, on the same address.
    api.patch(
        SERVICES,
        "default",
        "bad",
        json!({"metadata": {"annotations": {"weir.dev/balance": "round_robin"}}}),
    );
    let svc = programmed(&api, "default", "bad").await;
    assert_eq!(ingress_ips(&svc), ip);
    listeners_become(&edge, 2).await;
}

/// An annotation Weir does not read is reported whether or not the Service
/// got an address: a typo in `weir.dev/pool` is often why it has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_annotations_are_reported_before_an_address() {
    let dir = temp_dir("unread");
    let api = ApiServer::start().await;
    three_nodes(&api);
    let pool = "[[pool]]\nname = \"one\"\naddresses = [\"127.0.13.1-127.0.13.1\"]\n";
    let cfg = controller_config(&dir, &api.kubeconfig(&dir, "ctl"), &format!("{pool}{SOLO}"));
    let _ctl = start_controller(&cfg, "a");
    api.create(SERVICES, "default", lb_service("first", &[(80, 30080)]));
    assigned(&api, "default", "first").await;
    let mut typo = lb_service("typo", &[(81, 30081)]);
    typo["metadata"]["annotations"] =
        json!({"weir.dev/poool": "big", "metallb.universe.tf/address-pool": "big"});
    api.create(SERVICES, "default", typo);
    eventually(WAIT, "AllocationFailed for the pool-less Service", || {
        events_for(&api, "typo", "AllocationFailed")
            .into_iter()
            .next()
    })
    .await;
    let notes: Vec<String> = eventually(WAIT, "both UnknownAnnotation warnings", || {
        let notes: Vec<String> = events_for(&api, "typo", "UnknownAnnotation")
            .iter()
            .map(|e| e["note"].as_str().unwrap_or_default().to_owned())
            .collect();
        (notes.len() == 2).then_some(notes)
    })
    .await;
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("weir.dev/poool is not a Weir annotation")),
        "{notes:?}"
    );
    assert!(
        notes.iter().any(|n| n.contains("use weir.dev/pool")),
        "{notes:?}"
    );
    assert!(ingress_ips(&api.get(SERVICES, "default", "typo").unwrap()).is_empty());
}

/// A pool that shrinks under a Service: the Service keeps its address
/// (nothing is yanked) and a Warning says it lies outside every pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_outside_every_pool_is_kept_and_reported() {
    let dir = temp_dir("outside");
    let api = ApiServer::start().await;
    three_nodes(&api);
    let kubeconfig = api.kubeconfig(&dir, "ctl");
    let before = dir.join("before");
    std::fs::create_dir_all(&before).unwrap();
    let pool = |range: &str| format!("[[pool]]\nname = \"p\"\naddresses = [\"{range}\"]\n{SOLO}");
    let cfg = controller_config(&before, &kubeconfig, &pool("127.0.14.1-127.0.14.1"));
    let mut ctl = start_controller(&cfg, "a");
    api.create(SERVICES, "default", lb_service("web", &[(80, 30080)]));
    let svc = assigned(&api, "default", "web").await;
    assert_eq!(ingress_ips(&svc), ["127.0.14.1"]);
    ctl.kill();
    let after = dir.join("after");
    std::fs::create_dir_all(&after).unwrap();
    let cfg = controller_config(&after, &kubeconfig, &pool("127.0.14.2-127.0.14.3"));
    let _ctl = start_controller(&cfg, "a");
    let note = event_note(&api, "web", "AddressOutsidePools").await;
    assert!(
        note.starts_with("127.0.14.1 is outside every configured pool"),
        "{note}"
    );
    assert_eq!(
        ingress_ips(&api.get(SERVICES, "default", "web").unwrap()),
        ["127.0.14.1"]
    );
}

/// A Service whose annotations turned invalid while no controller ran
/// keeps what the forwarders run for it, its last good configuration: the
/// restarted controller does not drop it from the forwarders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_last_good_configuration_of_an_invalid_service() {
    let pool = POOL.replace("127.0.10.0/24", "127.0.15.0/24");
    let Bed { api, edge, cfg, .. } = bed(
        "invalid-restart",
        apiserver::Release::default(),
        &format!("{pool}{SOLO}"),
    )
    .await;
    let mut ctl = start_controller(&cfg, "a");
    api.create(SERVICES, "default", lb_service("web", &[(80, 30080)]));
    let svc = programmed(&api, "default", "web").await;
    let ip = ingress_ips(&svc);
    listeners_become(&edge, 1).await;
    ctl.kill();
    api.patch(
        SERVICES,
        "default",
        "web",
        json!({"metadata": {"annotations": {"weir.dev/balance": "fastest"}}}),
    );
    let _ctl = start_controller(&cfg, "a");
    let note = event_note(&api, "web", "InvalidAnnotation").await;
    assert!(
        note.contains("keeping the last good configuration"),
        "{note}"
    );
    // A new state goes out (another Service): web is still in it.
    api.create(SERVICES, "default", lb_service("other", &[(81, 30081)]));
    programmed(&api, "default", "other").await;
    listeners_become(&edge, 2).await;
    let svc = api.get(SERVICES, "default", "web").unwrap();
    assert_eq!(ingress_ips(&svc), ip);
    assert_eq!(programmed_status(&svc), Some("True"), "{svc}");
}
