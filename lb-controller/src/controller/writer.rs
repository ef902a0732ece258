//! The controller's writes to Services: the finalizer and the status,
//! each made at the `resourceVersion` it was decided from (a merge patch
//! replaces lists whole, so a write over a newer object is refused with
//! 409 instead).
//!
//! It remembers, per Service, the version its last write was made at, so
//! that a reconcile of a cached object that has not seen that write yet
//! waits for the watch instead of writing again; and whether the API server
//! keeps `ipMode`, learnt from its answers.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};

use crate::desired::key_of;
use crate::ipam::ServiceKey;
use crate::ownership::{self, FINALIZER};
use crate::status::{self, IpModeSupport, Programmed};

/// Writes to Services.
pub(super) struct ServiceWriter {
    client: Client,
    /// Per Service, the resourceVersion our last write was made at, when
    /// the server's answer was a newer one: a cached object still at that
    /// version has not seen our write yet.
    written_at: Mutex<HashMap<ServiceKey, String>>,
    /// Whether the API server keeps `ipMode`, as learnt from it.
    ip_mode: Mutex<IpModeSupport>,
}

fn at_version(resource_version: Option<String>, mut body: Value) -> Patch<Value> {
    body["metadata"]["resourceVersion"] = json!(resource_version);
    Patch::Merge(body)
}

impl ServiceWriter {
    /// A writer through `client`.
    pub(super) fn new(client: Client) -> Self {
        Self {
            client,
            written_at: Mutex::new(HashMap::new()),
            ip_mode: Mutex::new(IpModeSupport::default()),
        }
    }

    /// Learns whether the server keeps `ipMode` from the statuses it
    /// stored for `ours` (before the first write).
    pub(super) fn learn_stored<'a>(&self, ours: impl IntoIterator<Item = &'a Service>) {
        *self.ip_mode.lock().unwrap() = IpModeSupport::from_stored(ours);
    }

    /// Whether the cache shows `svc` as it was before our last write to it
    /// (its update is still on the way through the watch, which will
    /// reconcile it again).
    pub(super) fn cache_behind(&self, svc: &Service) -> bool {
        let key = key_of(svc);
        let mut written = self.written_at.lock().unwrap();
        match (written.get(&key), &svc.metadata.resource_version) {
            (Some(at), Some(rv)) if at == rv => true,
            _ => {
                written.remove(&key);
                false
            }
        }
    }

    /// Forgets what it remembers of the Services `exists` denies.
    pub(super) fn forget(&self, exists: impl Fn(&ServiceKey) -> bool) {
        self.written_at.lock().unwrap().retain(|k, _| exists(k));
    }

    /// Remembers a write to `key` made at `before` that the server answered
    /// with `after`.
    fn wrote(&self, key: &ServiceKey, before: Option<&String>, after: Option<&String>) {
        let mut written = self.written_at.lock().unwrap();
        match (before, after) {
            (Some(b), Some(a)) if a != b => {
                written.insert(key.clone(), b.clone());
            }
            _ => {
                written.remove(key);
            }
        }
    }

    fn api(&self, key: &ServiceKey) -> Api<Service> {
        Api::namespaced(self.client.clone(), &key.namespace)
    }

    /// Adds the finalizer (the update comes back through the watch).
    pub(super) async fn add_finalizer(&self, svc: &Service) -> Result<(), kube::Error> {
        let key = key_of(svc);
        let mut finalizers = svc.finalizers().to_vec();
        finalizers.push(FINALIZER.to_owned());
        let body = json!({"metadata": {"finalizers": finalizers}});
        let version = svc.metadata.resource_version.clone();
        self.patch(&key, version, body, false).await?;
        Ok(())
    }

    /// Makes the status say `ingress` and `condition`, unless it already
    /// does.
    pub(super) async fn status(
        &self,
        svc: &Service,
        ingress: &[Value],
        condition: &Programmed,
    ) -> Result<(), kube::Error> {
        let ip_mode = *self.ip_mode.lock().unwrap();
        let now = crate::now_rfc3339();
        let Some(body) = status::patch(svc, ingress, condition, ip_mode, &now) else {
            return Ok(());
        };
        let version = svc.metadata.resource_version.clone();
        let updated = self.patch(&key_of(svc), version, body, true).await?;
        let learnt = ip_mode.learn(&updated);
        if learnt != ip_mode {
            tracing::info!(
                ?learnt,
                "whether the API server keeps status.loadBalancer.ingress[].ipMode"
            );
            *self.ip_mode.lock().unwrap() = learnt;
        }
        Ok(())
    }

    /// Removes what Weir wrote into the status (if `clear_status`), then
    /// the finalizer (if `remove_finalizer`).
    pub(super) async fn release(
        &self,
        svc: &Service,
        clear_status: bool,
        remove_finalizer: bool,
    ) -> Result<(), kube::Error> {
        let key = key_of(svc);
        let mut version = svc.metadata.resource_version.clone();
        if let Some(body) = clear_status
            .then(|| ownership::clear_status_patch(svc))
            .flatten()
        {
            version = self
                .patch(&key, version, body, true)
                .await?
                .resource_version();
        }
        if remove_finalizer {
            let finalizers: Vec<&String> = svc
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .collect();
            let body = json!({"metadata": {"finalizers": finalizers}});
            self.patch(&key, version, body, false).await?;
        }
        Ok(())
    }

    /// A merge patch of the object (or its status) that fails with 409
    /// unless it is still at `version`.
    async fn patch(
        &self,
        key: &ServiceKey,
        version: Option<String>,
        body: Value,
        status: bool,
    ) -> Result<Service, kube::Error> {
        let api = self.api(key);
        let params = PatchParams::default();
        let patch = at_version(version.clone(), body);
        let updated = if status {
            api.patch_status(&key.name, &params, &patch).await?
        } else {
            api.patch(&key.name, &params, &patch).await?
        };
        self.wrote(
            key,
            version.as_ref(),
            updated.metadata.resource_version.as_ref(),
        );
        Ok(updated)
    }
}
