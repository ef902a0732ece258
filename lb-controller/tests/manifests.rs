//! `deploy/kubernetes/*.yaml`: every document parses as YAML and as its
//! typed Kubernetes object with no field lost on the way (a misspelled or
//! misplaced field would be dropped by the typed form and show up as a
//! difference), and the embedded controller config is valid.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde_json::Value;

fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Value {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc}"));
    serde_json::to_value(typed).unwrap()
}

#[test]
fn manifests_are_valid_objects() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/lb-controller.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&text).unwrap();
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    let mut kinds = Vec::new();
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap().to_owned();
        assert!(doc["metadata"]["name"].is_string(), "{kind} has no name");
        let back = match kind.as_str() {
            "Namespace" => roundtrip::<Namespace>(doc),
            "ServiceAccount" => roundtrip::<ServiceAccount>(doc),
            "ClusterRole" => roundtrip::<ClusterRole>(doc),
            "ClusterRoleBinding" => roundtrip::<ClusterRoleBinding>(doc),
            "Role" => roundtrip::<Role>(doc),
            "RoleBinding" => roundtrip::<RoleBinding>(doc),
            "ConfigMap" => {
                let cm: ConfigMap = serde_json::from_value(doc.clone()).unwrap();
                let toml = &cm.data.as_ref().unwrap()["lb-controller.toml"];
                lb_controller::config::parse(toml).unwrap_or_else(|e| panic!("ConfigMap: {e}"));
                roundtrip::<ConfigMap>(doc)
            }
            "Deployment" => {
                let d: Deployment = serde_json::from_value(doc.clone()).unwrap();
                assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
                roundtrip::<Deployment>(doc)
            }
            other => panic!("unexpected kind {other}"),
        };
        assert_eq!(
            &back, doc,
            "{kind}: a field was lost (misspelled or misplaced?)"
        );
        kinds.push(kind);
    }
    for want in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "Deployment",
        "ConfigMap",
    ] {
        assert!(kinds.iter().any(|k| k == want), "missing {want}");
    }
}
