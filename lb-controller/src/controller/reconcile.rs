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
use crate::desired::{self, key_of, Cluster};
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
    let (ingress, changed_at) = {
        let mut guard = ctx.state.lock().unwrap();
        let st = &mut *guard;
        st.removals.remove(&key);
        let desired = desired::service(&svc, &mut st.allocator, &cluster, &ctx.settings);
        let addresses = desired.addresses;
        if let Some(refused) = &addresses.refused {
            ctx.metrics.allocation_failures.inc();
            let warned = st.warned.entry(key.clone()).or_default();
            ctx.warn_once(&svc, warned, refused.reason, refused.message.clone());
            if refused.reason == "InvalidAnnotation" {
                ctx.warn_once(&svc, warned, "AllocationFailed", refused.message.clone());
            }
        }
        let Some(forwarding) = desired.forwarding else {
            // No address: kept waiting for one.
            st.waiting.insert(key.clone());
            drop(guard);
            return Ok(Action::requeue(Duration::from_secs(60)));
        };
        st.waiting.remove(&key);
        st.warned.remove(&key);
        if addresses.assigned() {
            ctx.metrics.allocations.inc();
            let list: Vec<String> = addresses.ips.iter().map(ToString::to_string).collect();
            ctx.event(
                &svc,
                EventType::Normal,
                "IPAllocated",
                format!("assigned {}", list.join(", ")),
            );
        }
        ctx.update_pool_metrics(st);
        let entry = st.entries.entry(key.clone()).or_default();
        for a in forwarding.unknown_annotations {
            ctx.warn_once(
                &svc,
                &mut entry.warned,
                "UnknownAnnotation",
                format!("{a} is not a Weir annotation (typo?); ignored"),
            );
        }
        match forwarding.translation {
            Ok(t) => {
                entry.warned.retain(|(r, _)| {
                    r != "InvalidAnnotation" && r != "UnsupportedProtocol" && r != "NoNodePort"
                });
                for s in &t.skipped {
                    ctx.warn_once(&svc, &mut entry.warned, s.reason, s.message.clone());
                }
                if entry.listeners != t.listeners
                    || entry.changed_at.is_none() && t.listeners.is_empty()
                {
                    entry.listeners = t.listeners;
                    entry.changed_at = None;
                    ctx.rebuild.notify_one();
                }
            }
            Err(errors) => {
                for e in errors {
                    ctx.warn_once(
                        &svc,
                        &mut entry.warned,
                        "InvalidAnnotation",
                        format!("{e}; keeping the last good configuration"),
                    );
                }
            }
        }
        (forwarding.ingress, entry.changed_at)
    };

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
        let mut st = ctx.state.lock().unwrap();
        st.removals.remove(key);
        st.warned.remove(key);
        st.waiting.remove(key);
        let freed = st.allocator.release(key);
        ctx.update_pool_metrics(&st);
        (freed, st.waiting.clone())
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
    let version = {
        let mut st = ctx.state.lock().unwrap();
        if st.entries.remove(key).is_some() || !st.removals.contains_key(key) {
            st.removals.insert(key.clone(), None);
            ctx.rebuild.notify_one();
        }
        st.removals.get(key).copied().flatten()
    };
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
