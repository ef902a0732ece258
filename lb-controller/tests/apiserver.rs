//! The in-test API server behaves like the real one where the controller
//! depends on it. Exercised through kube's own client, as the controller is.

mod support;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;
use support::*;

async fn setup(tag: &str) -> (ApiServer, Api<Service>) {
    let api = ApiServer::start().await;
    let dir = temp_dir(&format!("apiserver-{tag}"));
    let client = lb_controller::client(Some(&api.kubeconfig(&dir, "t")))
        .await
        .unwrap();
    (api, Api::namespaced(client, "default"))
}

#[tokio::test]
async fn status_subresource_and_object_writes_are_separate() {
    let (api, services) = setup("status").await;
    api.create(SERVICES, "default", lb_service("web", &[(80, 0)]));
    // A status patch that also tries to change the spec: only status changes.
    let patched = services
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"type": "ClusterIP"},
                                 "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.spec.as_ref().unwrap().type_.as_deref(),
        Some("LoadBalancer")
    );
    assert_eq!(
        lb_controller::controller::status_ips(&patched),
        vec!["192.0.2.1".parse::<std::net::IpAddr>().unwrap()]
    );
    // An object patch that tries to change status: status is kept.
    let patched = services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}},
                                 "status": {"loadBalancer": {"ingress": null}}})),
        )
        .await
        .unwrap();
    assert_eq!(lb_controller::controller::status_ips(&patched).len(), 1);
    assert_eq!(patched.metadata.labels.unwrap()["a"], "b");
    // Invalid status is refused with 422, as the real validation does.
    let err = services
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": "nope"}]}}})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 422),
        "{err}"
    );
}

#[tokio::test]
async fn stale_writes_get_409_and_apply_merges_or_creates() {
    let (api, services) = setup("stale").await;
    api.create(SERVICES, "default", lb_service("web", &[(80, 0)]));
    let old = services.get("web").await.unwrap();
    api.patch(
        SERVICES,
        "default",
        "web",
        json!({"metadata": {"labels": {"x": "1"}}}),
    );
    // Replace with the old resourceVersion: conflict.
    let err = services
        .replace("web", &PostParams::default(), &old)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409),
        "{err}"
    );
    // A merge patch carrying a stale resourceVersion: conflict too.
    let stale = Patch::Merge(
        json!({"metadata": {"resourceVersion": old.metadata.resource_version,
                                                 "finalizers": ["x/y"]}}),
    );
    let err = services
        .patch("web", &PatchParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409),
        "{err}"
    );
    // Server-side apply: merged, and creating when absent.
    let apply = PatchParams::apply("test").force();
    let applied = services
        .patch(
            "fresh",
            &apply,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service",
                                 "metadata": {"name": "fresh"},
                                 "spec": {"type": "LoadBalancer", "ports": [{"port": 81}]}})),
        )
        .await
        .unwrap();
    assert_eq!(applied.metadata.name.as_deref(), Some("fresh"));
    let node_port = applied.spec.unwrap().ports.unwrap()[0].node_port;
    assert!(
        node_port.is_some_and(|p| (30000..32768).contains(&p)),
        "{node_port:?}"
    );
    assert_eq!(api.writes().last().unwrap().verb, "create");
}

#[tokio::test]
async fn list_pages_and_watch_resume_from_a_version() {
    let (api, services) = setup("list").await;
    for i in 0..7 {
        api.create(
            SERVICES,
            "default",
            lb_service(&format!("s{i}"), &[(80, 0)]),
        );
    }
    // Pages of 3: 3 + 3 + 1, with continue tokens.
    let first = services
        .list(&ListParams::default().limit(3))
        .await
        .unwrap();
    assert_eq!(first.items.len(), 3);
    let token = first.metadata.continue_.clone().unwrap();
    let second = services
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .unwrap();
    let third = services
        .list(
            &ListParams::default()
                .limit(3)
                .continue_token(second.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(second.items.len() + third.items.len(), 4);
    assert!(third.metadata.continue_.is_none_or(|c| c.is_empty()));

    // Changes after the list's version are replayed to a watch from it.
    let rv = first.metadata.resource_version.clone().unwrap();
    api.patch(
        SERVICES,
        "default",
        "s1",
        json!({"metadata": {"labels": {"k": "v"}}}),
    );
    api.delete(SERVICES, "default", "s2");
    let mut stream = services
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match stream.try_next().await.unwrap().unwrap() {
            WatchEvent::Modified(s) => seen.push(format!("modified {}", s.metadata.name.unwrap())),
            WatchEvent::Deleted(s) => seen.push(format!("deleted {}", s.metadata.name.unwrap())),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["modified s1", "deleted s2"]);
    // After compaction an old version is gone: the watch says 410.
    api.compact();
    let mut stream = services
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn deletion_waits_for_finalizers() {
    let (api, services) = setup("delete").await;
    let mut svc = lb_service("web", &[(80, 0)]);
    svc["metadata"]["finalizers"] = json!(["example.com/hold"]);
    api.create(SERVICES, "default", svc);
    api.delete(SERVICES, "default", "web");
    let held = services.get("web").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert!(services.get_opt("web").await.unwrap().is_none());
}
