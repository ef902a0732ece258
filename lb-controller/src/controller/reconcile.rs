//! One reconcile: what a Service should have, and the writes that get it
//! there; releasing a Service that is deleted or no longer Weir's.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::ResourceExt;
use serde_json::{json, Value};

use super::{Ctx, Error};
use crate::desired::{key_of, Cluster};
use crate::ipam::ServiceKey;
use crate::ownership::{self, has_finalizer, Disposition, FINALIZER};
use crate::status;

/// A merge patch that fails with 409 unless the object is still at `svc`'s
/// resourceVersion.
fn merge_patch(svc: &Service, body: Value) -> Patch<Value> {
    at_version(svc.metadata.resource_version.clone(), body)
}

fn at_version(resource_version: Option<String>, mut body: Value) -> Patch<Value> {
    body["metadata"]["resourceVersion"] = json!(resource_version);
    Patch::Merge(body)
}

pub(super) async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let mut primed = ctx.primed.subscribe();
    let _ = primed.wait_for(|p| *p).await;
    ctx.metrics.reconciles.inc();
    let key = key_of(&svc);
    if ctx.cache_behind(&key, &svc) {
        // Our last write to it is on its way through the watch, which will
        // reconcile it again; deciding now from the older object would
        // repeat that write, or fail with 409.
        return Ok(Action::await_change());
    }
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let held = ctx.holds(&key);
    match ownership::disposition(
        &svc,
        &ctx.cfg.load_balancer_class,
        ctx.cfg.default_class,
        held,
    ) {
        Disposition::Manage => {}
        Disposition::Ignore => return Ok(Action::await_change()),
        Disposition::Release {
            clear_status,
            remove_finalizer,
            events,
        } => {
            if !held && !clear_status && !remove_finalizer {
                return Ok(Action::await_change());
            }
            let steps = ReleaseSteps {
                clear_status,
                remove_finalizer,
                events,
            };
            return release(&svc, &key, &api, &ctx, steps).await;
        }
    }
    if !has_finalizer(&svc) {
        let mut finalizers = svc.finalizers().to_vec();
        finalizers.push(FINALIZER.to_owned());
        let updated = api
            .patch(
                &key.name,
                &PatchParams::default(),
                &merge_patch(&svc, json!({"metadata": {"finalizers": finalizers}})),
            )
            .await?;
        ctx.wrote(
            &key,
            svc.metadata.resource_version.as_ref(),
            updated.metadata.resource_version.as_ref(),
        );
        // The update comes back through the watch and reconciles again.
        return Ok(Action::await_change());
    }

    let nodes = ctx.nodes.state();
    let slices = ctx.slices.state();
    let cluster = Cluster::new(&nodes, &slices);

    // Allocation, translation and desired-state update, under the lock.
    let reconciled = {
        let mut ledger = ctx.state.lock().unwrap();
        let reconciled = ledger.reconcile(&svc, &cluster, &ctx.settings);
        if reconciled.ingress.is_some() {
            ctx.update_pool_metrics(ledger.allocator());
        }
        reconciled
    };
    if reconciled.addresses.refused.is_some() {
        ctx.metrics.allocation_failures.inc();
    }
    for (reason, message) in reconciled.warnings {
        ctx.event(&svc, EventType::Warning, reason, message);
    }
    let Some(ingress) = reconciled.ingress else {
        // No address: it waits for one to be freed.
        return Ok(Action::requeue(Duration::from_secs(60)));
    };
    if reconciled.addresses.assigned() {
        ctx.metrics.allocations.inc();
        let list: Vec<String> = reconciled
            .addresses
            .ips
            .iter()
            .map(ToString::to_string)
            .collect();
        ctx.event(
            &svc,
            EventType::Normal,
            "IPAllocated",
            format!("assigned {}", list.join(", ")),
        );
    }
    if reconciled.changed {
        ctx.rebuild.notify_one();
    }
    let changed_at = reconciled.changed_at;

    // Status: addresses, port errors, and the programmed condition,
    // written only when the stored status says something else, and for a
    // new Service only once its forwarding is decided.
    let condition = status::programmed(
        status::current_condition(&svc),
        svc.metadata.generation,
        changed_at,
        &ctx.forwarder_views(),
    );
    if status::withheld(&svc, &condition) {
        // Written once the forwarders decide (their report reconciles it).
        return Ok(Action::requeue(Duration::from_secs(600)));
    }
    let ip_mode = *ctx.ip_mode.lock().unwrap();
    let now = crate::now_rfc3339();
    if let Some(body) = status::patch(&svc, &ingress, &condition, ip_mode, &now) {
        let updated = api
            .patch_status(&key.name, &PatchParams::default(), &merge_patch(&svc, body))
            .await?;
        let learnt = ip_mode.learn(&updated);
        if learnt != ip_mode {
            tracing::info!(
                ?learnt,
                "whether the API server keeps status.loadBalancer.ingress[].ipMode"
            );
            *ctx.ip_mode.lock().unwrap() = learnt;
        }
        ctx.wrote(
            &key,
            svc.metadata.resource_version.as_ref(),
            updated.metadata.resource_version.as_ref(),
        );
    }
    Ok(Action::requeue(Duration::from_secs(600)))
}

/// What [`release`] writes once the forwarders have dropped the Service.
struct ReleaseSteps {
    clear_status: bool,
    remove_finalizer: bool,
    events: bool,
}

/// Releasing: out of the forwarders first, then (as `steps` say) our
/// status and the finalizer, and the address is freed last: if a write
/// fails, the address is still held and the next attempt starts over.
async fn release(
    svc: &Service,
    key: &ServiceKey,
    api: &Api<Service>,
    ctx: &Ctx,
    steps: ReleaseSteps,
) -> Result<Action, Error> {
    if !settle_removal(key, ctx) {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let mut version = svc.metadata.resource_version.clone();
    if let Some(body) = steps
        .clear_status
        .then(|| ownership::clear_status_patch(svc))
        .flatten()
    {
        let updated = api
            .patch_status(&key.name, &PatchParams::default(), &merge_patch(svc, body))
            .await?;
        ctx.wrote(
            key,
            version.as_ref(),
            updated.metadata.resource_version.as_ref(),
        );
        version = updated.metadata.resource_version;
    }
    if steps.remove_finalizer {
        let finalizers: Vec<&String> = svc
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .collect();
        let updated = api
            .patch(
                &key.name,
                &PatchParams::default(),
                &at_version(
                    version.clone(),
                    json!({"metadata": {"finalizers": finalizers}}),
                ),
            )
            .await?;
        ctx.wrote(
            key,
            version.as_ref(),
            updated.metadata.resource_version.as_ref(),
        );
    }
    let (freed, waiting) = {
        let mut ledger = ctx.state.lock().unwrap();
        let freed = ledger.release(key);
        ctx.update_pool_metrics(ledger.allocator());
        let waiting: Vec<ServiceKey> = ledger.waiting().cloned().collect();
        (freed, waiting)
    };
    if !freed.is_empty() {
        // The Services waiting for an address may fit now.
        for waiting in &waiting {
            ctx.enqueue(waiting);
        }
        let list: Vec<String> = freed.iter().map(ToString::to_string).collect();
        let note = format!("released {}", list.join(", "));
        if steps.events {
            ctx.event(svc, EventType::Normal, "IPReleased", note);
        } else {
            tracing::info!(service = %key, %note, "the Service belongs to another implementation now");
        }
    }
    Ok(Action::await_change())
}

/// Takes the Service out of the desired state; true once every reachable
/// forwarder runs a state without it.
pub(super) fn settle_removal(key: &ServiceKey, ctx: &Ctx) -> bool {
    let (changed, version) = ctx.state.lock().unwrap().remove(key);
    if changed {
        ctx.rebuild.notify_one();
    }
    let progress = ctx.progress();
    if progress.is_empty() {
        return true;
    }
    version.is_some_and(|v| progress.iter().all(|(_, p)| p.settled(v)))
}

pub(super) fn error_policy(_svc: Arc<Service>, error: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.reconcile_errors.inc();
    tracing::warn!(%error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}
