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
        lb_controller::status::addresses(&patched),
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
    assert_eq!(lb_controller::status::addresses(&patched).len(), 1);
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

/// `status.loadBalancer.ingress[].ipMode` as each release treats it: 1.28
/// does not know the field (dropped, with a warning; refused when the
/// client asks for strict validation), 1.29's default gates drop it, 1.30
/// keeps it.
#[tokio::test]
async fn ip_mode_is_dropped_or_kept_as_each_release_does() {
    use apiserver::Release;
    for (release, kept) in [
        (Release::V1_28, false),
        (Release::V1_29, false),
        (Release::V1_30, true),
    ] {
        let api = ApiServer::start_as(release).await;
        let dir = temp_dir("apiserver-ipmode");
        let client = lb_controller::client(Some(&api.kubeconfig(&dir, "t")))
            .await
            .unwrap();
        api.create(SERVICES, "default", lb_service("web", &[(80, 0)]));
        let body = json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1", "ipMode": "Proxy"}]}}});
        let request = hyper::Request::patch("/api/v1/namespaces/default/services/web/status")
            .header("content-type", "application/merge-patch+json")
            .body(body.to_string().into_bytes())
            .unwrap();
        let response = client.send(request.map(Into::into)).await.unwrap();
        assert_eq!(response.status(), 200, "{release:?}");
        let warnings: Vec<String> = response
            .headers()
            .get_all("warning")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        let stored = api.get(SERVICES, "default", "web").unwrap();
        let ingress = &stored["status"]["loadBalancer"]["ingress"][0];
        assert_eq!(ingress["ip"], "192.0.2.1", "{release:?}");
        assert_eq!(
            ingress.get("ipMode").is_some(),
            kept,
            "{release:?}: {stored}"
        );
        if release == Release::V1_28 {
            assert_eq!(
                warnings,
                [r#"299 - "unknown field \"status.loadBalancer.ingress[0].ipMode\"""#]
            );
            let strict = Api::<Service>::namespaced(client.clone(), "default")
                .patch_status(
                    "web",
                    &PatchParams {
                        field_validation: Some(kube::api::ValidationDirective::Strict),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(&body),
                )
                .await
                .unwrap_err();
            assert!(
                matches!(strict, kube::Error::Api(ref e) if e.code == 400),
                "{strict}"
            );
        } else {
            assert!(warnings.is_empty(), "{release:?}: {warnings:?}");
        }
    }
}

/// Leaving LoadBalancer: the server wipes the class, the NodePorts, the
/// health-check NodePort, the traffic policy and `status.loadBalancer`
/// (conditions stay), as the real registry does.
#[tokio::test]
async fn leaving_load_balancer_wipes_what_only_a_load_balancer_uses() {
    let (api, _) = setup("leave-lb").await;
    let mut svc = lb_service("web", &[(80, 0)]);
    svc["spec"]["loadBalancerClass"] = json!("example.com/x");
    svc["spec"]["externalTrafficPolicy"] = json!("Local");
    api.create(SERVICES, "default", svc);
    let created = api.get(SERVICES, "default", "web").unwrap();
    assert!(created["spec"]["healthCheckNodePort"].is_number());
    assert!(created["spec"]["ports"][0]["nodePort"].is_number());
    api.try_patch(
        "other-lb",
        SERVICES,
        "default",
        "web",
        true,
        json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.7"}]},
                          "conditions": [{"type": "example.com/Ready", "status": "True", "reason": "Up",
                                          "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}),
    )
    .unwrap();
    let after = api.patch(
        SERVICES,
        "default",
        "web",
        json!({"spec": {"type": "ClusterIP"}}),
    );
    let spec = &after["spec"];
    for field in [
        "loadBalancerClass",
        "healthCheckNodePort",
        "externalTrafficPolicy",
    ] {
        assert!(spec.get(field).is_none(), "{field}: {after}");
    }
    assert!(spec["ports"][0].get("nodePort").is_none(), "{after}");
    assert_eq!(after["status"]["loadBalancer"], json!({}));
    assert_eq!(
        after["status"]["conditions"][0]["type"],
        "example.com/Ready"
    );
}

/// `loadBalancerClass` cannot change while the Service stays a
/// LoadBalancer (not even from unset), and exists only on LoadBalancers;
/// the way to another class is through another type.
#[tokio::test]
async fn load_balancer_class_changes_only_through_another_type() {
    let (api, _) = setup("class").await;
    api.create(SERVICES, "default", lb_service("web", &[(80, 0)]));
    let set = json!({"spec": {"loadBalancerClass": "example.com/x"}});
    let (code, message) = api
        .try_patch("admin", SERVICES, "default", "web", false, set.clone())
        .unwrap_err();
    assert_eq!(code, 422);
    assert!(
        message.contains("spec.loadBalancerClass") && message.contains("may not change once set"),
        "{message}"
    );
    let to_cluster_ip =
        json!({"spec": {"type": "ClusterIP", "loadBalancerClass": "example.com/x"}});
    let (code, message) = api
        .try_patch("admin", SERVICES, "default", "web", false, to_cluster_ip)
        .unwrap_err();
    assert_eq!(code, 422);
    assert!(message.contains("may only be used when"), "{message}");
    api.patch(
        SERVICES,
        "default",
        "web",
        json!({"spec": {"type": "ClusterIP"}}),
    );
    let back = api.patch(
        SERVICES,
        "default",
        "web",
        json!({"spec": {"type": "LoadBalancer", "loadBalancerClass": "example.com/x"}}),
    );
    assert_eq!(back["spec"]["loadBalancerClass"], "example.com/x");
    assert_eq!(
        api.rejections()
            .iter()
            .map(|r| (r.user.as_str(), r.code))
            .collect::<Vec<_>>(),
        [("admin", 422), ("admin", 422)]
    );
}

/// Writes are counted per caller and object (an Event with the object it
/// regards), no-op writes included; refusals are counted apart.
#[tokio::test]
async fn writes_and_refusals_are_counted_per_caller_and_object() {
    let (api, services) = setup("counts").await;
    api.create(SERVICES, "default", lb_service("web", &[(80, 0)]));
    let label = Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}}));
    services
        .patch("web", &PatchParams::default(), &label)
        .await
        .unwrap();
    // The same patch again changes nothing, and is still a write.
    services
        .patch("web", &PatchParams::default(), &label)
        .await
        .unwrap();
    let stale = Patch::Merge(json!({"metadata": {"resourceVersion": "1", "labels": {"c": "d"}}}));
    services
        .patch("web", &PatchParams::default(), &stale)
        .await
        .unwrap_err();
    api.create(
        EVENTS,
        "default",
        json!({"metadata": {"name": "web.1"}, "reason": "Test",
               "regarding": {"kind": "Service", "namespace": "default", "name": "web"}}),
    );
    let counts = api.write_counts("t", "default/web");
    assert_eq!(
        counts,
        [(("patch".to_owned(), "services".to_owned()), 2)].into()
    );
    let admin = api.write_counts("admin", "default/web");
    assert_eq!(admin[&("create".to_owned(), "events".to_owned())], 1);
    assert_eq!(admin[&("create".to_owned(), "services".to_owned())], 1);
    let refused = api.rejections();
    assert_eq!(refused.len(), 1);
    assert_eq!(
        (
            refused[0].user.as_str(),
            refused[0].code,
            refused[0].verb.as_str()
        ),
        ("t", 409, "patch")
    );
}
