//! One reconcile: what a Service should have, and the writes that get it
//! there; releasing a Service that is deleted or no longer Weir's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::ResourceExt;
use serde_json::{json, Value};

use super::{key_of, slices_of, Ctx, Error};
use crate::ipam::ServiceKey;
use crate::ownership::{self, has_finalizer, Disposition, CONDITION, FINALIZER};
use crate::translate;

/// The Service's conditions other than ours (a merge patch replaces the
/// whole list, so they are sent back unchanged).
fn other_conditions(svc: &Service) -> Vec<Value> {
    svc.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .filter(|c| c.type_ != CONDITION)
        .filter_map(|c| serde_json::to_value(c).ok())
        .collect()
}

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
        api.patch(
            &key.name,
            &PatchParams::default(),
            &merge_patch(&svc, json!({"metadata": {"finalizers": finalizers}})),
        )
        .await?;
        // The update comes back through the watch and reconciles again.
        return Ok(Action::await_change());
    }

    let nodes = ctx.nodes.state();
    let node_refs: Vec<&Node> = nodes.iter().map(|n| n.as_ref()).collect();
    let all_slices = ctx.slices.state();
    let slices = slices_of(&all_slices, &key);

    // Allocation, translation and desired-state update, under the lock.
    let (ips, skipped, changed_at) = {
        let mut guard = ctx.state.lock().unwrap();
        let st = &mut *guard;
        st.removals.remove(&key);
        let held_before = st.allocator.addresses(&key).to_vec();
        let assigned = translate::request(&svc)
            .map_err(|e| ("InvalidAnnotation", e.to_string()))
            .and_then(|r| {
                st.allocator
                    .assign(&key, &r)
                    .map_err(|e| ("AllocationFailed", e.to_string()))
            });
        let ips = match assigned {
            Ok(ips) => ips,
            Err((reason, msg)) => {
                ctx.metrics.allocation_failures.inc();
                let warned = st.warned.entry(key.clone()).or_default();
                ctx.warn_once(&svc, warned, reason, msg.clone());
                if reason == "InvalidAnnotation" {
                    ctx.warn_once(&svc, warned, "AllocationFailed", msg);
                }
                // Keep what it holds (if anything) and its listeners.
                st.allocator.addresses(&key).to_vec()
            }
        };
        if ips.is_empty() {
            drop(guard);
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
        st.warned.remove(&key);
        if held_before != ips {
            ctx.metrics.allocations.inc();
            let list: Vec<String> = ips.iter().map(ToString::to_string).collect();
            ctx.event(
                &svc,
                EventType::Normal,
                "IPAllocated",
                format!("assigned {}", list.join(", ")),
            );
        }
        ctx.update_pool_metrics(st);
        let entry = st.entries.entry(key.clone()).or_default();
        for a in translate::unknown_annotations(&svc) {
            ctx.warn_once(
                &svc,
                &mut entry.warned,
                "UnknownAnnotation",
                format!("{a} is not a Weir annotation (typo?); ignored"),
            );
        }
        let mut skipped = Vec::new();
        match translate::translate(&svc, &ips, &node_refs, &slices, &ctx.settings) {
            Ok(t) => {
                entry.warned.retain(|(r, _)| {
                    r != "InvalidAnnotation" && r != "UnsupportedProtocol" && r != "NoNodePort"
                });
                for s in &t.skipped {
                    ctx.warn_once(&svc, &mut entry.warned, s.reason, s.message.clone());
                }
                skipped = t.skipped;
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
        (ips, skipped, entry.changed_at)
    };

    // Status: addresses, port errors, and the programmed condition.
    let errors: BTreeMap<(i32, String), String> = skipped
        .iter()
        .map(|s| {
            (
                (s.port, s.protocol.clone()),
                format!("weir.dev/{}", s.reason),
            )
        })
        .collect();
    let ports: Vec<Value> = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            let mut v = json!({"port": p.port, "protocol": proto});
            if let Some(e) = errors.get(&(p.port, proto)) {
                v["error"] = json!(e);
            }
            v
        })
        .collect();
    let ingress: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"ip": ip.to_string(), "ipMode": "Proxy", "ports": ports}))
        .collect();
    let current = svc.status.clone().unwrap_or_default();
    let current_lb =
        serde_json::to_value(current.load_balancer.clone().unwrap_or_default()).unwrap_or_default();
    let want_lb = json!({"ingress": ingress});
    let mut conditions = other_conditions(&svc);
    let old = current
        .conditions
        .as_ref()
        .and_then(|cs| cs.iter().find(|c| c.type_ == CONDITION));
    let mut condition_same = old.is_none();
    if let Some((ok, reason, message)) = ctx.programmed(changed_at) {
        let status = if ok { "True" } else { "False" };
        let transition = match old {
            Some(c) if c.status == status => {
                serde_json::to_value(&c.last_transition_time).unwrap_or_default()
            }
            _ => crate::now_rfc3339(),
        };
        condition_same = old.is_some_and(|c| {
            c.status == status
                && c.reason == reason
                && c.message == message
                && c.observed_generation == svc.metadata.generation
        });
        conditions.push(json!({
            "type": CONDITION, "status": status, "reason": reason, "message": message,
            "observedGeneration": svc.metadata.generation, "lastTransitionTime": transition,
        }));
    }
    if current_lb != want_lb || !condition_same {
        let api_status: Api<Service> = Api::namespaced(ctx.client.clone(), &key.namespace);
        api_status
            .patch_status(
                &key.name,
                &PatchParams::default(),
                &merge_patch(
                    &svc,
                    json!({"status": {"loadBalancer": want_lb, "conditions": conditions}}),
                ),
            )
            .await?;
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
        version = updated.metadata.resource_version;
    }
    if steps.remove_finalizer {
        let finalizers: Vec<&String> = svc
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .collect();
        api.patch(
            &key.name,
            &PatchParams::default(),
            &at_version(version, json!({"metadata": {"finalizers": finalizers}})),
        )
        .await?;
    }
    let freed = {
        let mut st = ctx.state.lock().unwrap();
        st.removals.remove(key);
        st.warned.remove(key);
        let freed = st.allocator.release(key);
        ctx.update_pool_metrics(&st);
        freed
    };
    if !freed.is_empty() {
        let _ = ctx.all_tx.send(());
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
