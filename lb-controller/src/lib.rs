//! `lb-controller`: the Kubernetes side of Weir.
//!
//! Pure parts (no API calls, no clock): [`ipam`] assigns addresses,
//! [`translate`] turns a Service, the Nodes and the EndpointSlices into
//! `lbd` listeners, [`desired`] is the one path from a Service to its
//! addresses, listeners and status (used by `plan`, the start-up seeding and
//! every reconcile), [`ledger`] is what the controller remembers between
//! reconciles and the state it builds, [`l2`] which forwarder answers
//! ARP/NDP for each VIP of an `announce = "l2"` pool, [`ownership`] says
//! which Services are ours, [`status`] what their status should say. The shell: [`controller`]
//! reconciles Services through kube-runtime, [`publish`] programs the
//! forwarders, [`leader`] holds the Lease, [`metrics`] exports Prometheus
//! metrics.

#![forbid(unsafe_code)]

pub mod config;
pub mod controller;
pub mod desired;
pub mod ipam;
pub mod l2;
pub mod leader;
pub mod ledger;
pub mod metrics;
pub mod ownership;
pub mod publish;
pub mod status;
#[cfg(feature = "test-support")]
pub mod test_apiserver;
pub mod translate;

/// The current time as a Kubernetes `Time` (RFC 3339, seconds).
pub fn now_rfc3339() -> serde_json::Value {
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    serde_json::to_value(now).unwrap_or_default()
}

/// A client from `kubeconfig`, or the usual inference (in-cluster service
/// account, then `KUBECONFIG`, then `~/.kube/config`).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}
