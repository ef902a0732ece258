//! End to end against a real cluster. Ignored unless asked for, so that a
//! run with no cluster reports it as ignored, not as passed:
//!
//! ```sh
//! WEIR_E2E_KUBECONFIG=~/.kube/config cargo test -p lb-controller --test real_cluster -- --ignored
//! ```
//!
//! The controller runs as a pure IP provider (no forwarders, so no traffic
//! is sent anywhere) with a load balancer class of its own, so it touches
//! nothing but the namespace the test creates. The pool defaults to
//! 192.0.2.240/28 (TEST-NET-1, never routed); `WEIR_E2E_POOL` overrides it.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real cluster: WEIR_E2E_KUBECONFIG=~/.kube/config cargo test -p lb-controller --test real_cluster -- --ignored"]
async fn real_cluster_assigns_and_releases() {
    let kubeconfig = std::env::var("WEIR_E2E_KUBECONFIG")
        .expect("WEIR_E2E_KUBECONFIG must name the kubeconfig of the cluster to run against");
    scenario(&kubeconfig).await;
}

/// The same scenario against the in-test API server, so that the code above
/// is known to work before anyone points it at a cluster, next to the
/// LoadBalancer Services a real cluster may already have in `default`:
/// another implementation's (its class, its finalizer, its address) and the
/// default implementation's (no class). The scenario writes nothing
/// outside its own namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cluster_scenario_runs_against_the_test_server() {
    let api = ApiServer::start().await;
    let dir = temp_dir("real-rehearsal");
    let kubeconfig = api.kubeconfig(&dir, "e2e");
    foreign(&api, "other", Some("other.example/lb"), "192.0.2.77");
    foreign(&api, "unclassed", None, "192.0.2.241");
    let before = [
        api.get(SERVICES, "default", "other"),
        api.get(SERVICES, "default", "unclassed"),
    ];
    scenario(kubeconfig.to_str().unwrap()).await;
    let after = [
        api.get(SERVICES, "default", "other"),
        api.get(SERVICES, "default", "unclassed"),
    ];
    assert_eq!(before, after);
    let own = format!("{}/", tag());
    let outside: Vec<_> = api
        .writes()
        .into_iter()
        .filter(|w| w.user == "e2e" && w.resource != "namespaces" && !w.about.starts_with(&own))
        .collect();
    assert_eq!(outside, []);
}

/// The namespace (and class suffix) of this run.
fn tag() -> String {
    format!("weir-e2e-{}", std::process::id())
}

async fn scenario(kubeconfig: &str) {
    let pool = std::env::var("WEIR_E2E_POOL").unwrap_or_else(|_| "192.0.2.240/28".into());
    let tag = tag();
    let class = format!("weir.dev/{tag}");
    let client = lb_controller::client(Some(std::path::Path::new(&kubeconfig)))
        .await
        .expect("kubeconfig");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": tag}})).unwrap(),
        )
        .await
        .expect("create namespace");

    let dir = temp_dir("real");
    let cfg = dir.join("controller.toml");
    std::fs::write(
        &cfg,
        format!(
            "[kubernetes]\nkubeconfig = \"{kubeconfig}\"\nload_balancer_class = \"{class}\"\ndefault_class = false\n\n[leader_election]\nnamespace = \"{tag}\"\nlease_name = \"lb-controller\"\n\n[admin]\nmetrics = \"off\"\n\n[[pool]]\nname = \"e2e\"\naddresses = [\"{pool}\"]\n"
        ),
    )
    .unwrap();
    let ctl = start_controller(&cfg, &tag);

    let services: Api<Service> = Api::namespaced(client.clone(), &tag);
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": class,
                 "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]}
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &svc)
        .await
        .expect("create Service");
    let result = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let ip = loop {
            let svc = services.get("web").await?;
            let ips = lb_controller::status::addresses(&svc);
            if let Some(ip) = ips.first() {
                break *ip;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "no address within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let net: ipnet::IpNet = pool.parse()?;
        anyhow::ensure!(net.contains(&ip), "{ip} is outside {pool}");
        let events: Api<Event> = Api::namespaced(client.clone(), &tag);
        let found = events
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("IPAllocated"));
        anyhow::ensure!(found, "no IPAllocated event");
        services.delete("web", &DeleteParams::default()).await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while services.get_opt("web").await?.is_some() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "finalizer not removed within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(())
    }
    .await;
    drop(ctl);
    // Never leave a Service stuck on our finalizer (it would block the
    // namespace's deletion) when the scenario failed half-way.
    if result.is_err() {
        let clear = kube::api::Patch::Merge(json!({"metadata": {"finalizers": null}}));
        let _ = services
            .patch("web", &kube::api::PatchParams::default(), &clear)
            .await;
    }
    let _ = namespaces.delete(&tag, &DeleteParams::default()).await;
    result.expect("real cluster scenario");
}
