//! One reconcile: what a Service should have ([`Ledger::reconcile`]), and
//! the writes that get it there; releasing a Service that is deleted or no
//! longer Weir's.
//!
//! [`Ledger::reconcile`]: crate::ledger::Ledger::reconcile

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::mpsc;

use super::events::Events;
use super::forwarders::Forwarders;
use super::state::State;
use super::writer::ServiceWriter;
use crate::desired::{key_of, Cluster};
use crate::ipam::ServiceKey;
use crate::metrics::Metrics;
use crate::ownership::{self, has_finalizer, Disposition};
use crate::status;
use crate::translate::Settings;

/// Why a reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub(super) enum Error {
    /// An API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Asks for a reconcile of one Service (its forwarding changed, or an
/// address it waits for was freed).
#[derive(Clone)]
pub(super) struct Queue(pub(super) mpsc::UnboundedSender<ObjectRef<Service>>);

impl Queue {
    /// Reconciles `key` soon.
    pub(super) fn push(&self, key: &ServiceKey) {
        let _ = self
            .0
            .send(ObjectRef::new(&key.name).within(&key.namespace));
    }
}

/// What a reconcile works with.
pub(super) struct Reconciler {
    /// `spec.loadBalancerClass` we own.
    pub(super) class: String,
    /// Also Services with no class.
    pub(super) default_class: bool,
    pub(super) settings: Settings,
    pub(super) nodes: Store<Node>,
    pub(super) slices: Store<EndpointSlice>,
    pub(super) state: State,
    pub(super) forwarders: Forwarders,
    pub(super) writer: Arc<ServiceWriter>,
    pub(super) events: Events,
    pub(super) queue: Queue,
    pub(super) metrics: Metrics,
}

pub(super) async fn reconcile(svc: Arc<Service>, ctx: Arc<Reconciler>) -> Result<Action, Error> {
    ctx.forwarders.primed().await;
    ctx.metrics.reconciles.inc();
    let key = key_of(&svc);
    if ctx.writer.cache_behind(&svc) {
        // Our last write to it is on its way through the watch, which will
        // reconcile it again; deciding now from the older object would
        // repeat that write, or fail with 409.
        return Ok(Action::await_change());
    }
    let held = ctx.state.lock().holds(&key);
    match ownership::disposition(&svc, &ctx.class, ctx.default_class, held) {
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
            return release(&svc, &key, &ctx, steps).await;
        }
    }
    if !has_finalizer(&svc) {
        // The update comes back through the watch and reconciles again.
        ctx.writer.add_finalizer(&svc).await?;
        return Ok(Action::await_change());
    }

    let nodes = ctx.nodes.state();
    let slices = ctx.slices.state();
    let cluster = Cluster::new(&nodes, &slices);
    let reconciled = {
        let mut ledger = ctx.state.lock();
        let reconciled = ledger.reconcile(&svc, &cluster, &ctx.settings);
        if reconciled.ingress.is_some() {
            ctx.metrics.set_pool_usage(ledger.allocator());
        }
        reconciled
    };
    if reconciled.addresses.refused.is_some() {
        ctx.metrics.allocation_failures.inc();
    }
    for (reason, message) in reconciled.warnings {
        ctx.events
            .publish(&svc, EventType::Warning, reason, message);
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
        let note = format!("assigned {}", list.join(", "));
        ctx.events
            .publish(&svc, EventType::Normal, "IPAllocated", note);
    }
    if reconciled.changed {
        ctx.state.rebuild();
    }

    // Status: addresses, port errors, and the programmed condition,
    // written only when the stored status says something else, and for a
    // new Service only once its forwarding is decided. Invalid annotations
    // and nothing good to keep: nothing forwards it, and the condition says
    // so; the address stays in the status, which keeps it the Service's
    // across a restart.
    let condition = match &reconciled.unconfigured {
        Some(why) => status::invalid(svc.metadata.generation, why),
        None => status::with_announcers(
            status::programmed(
                status::current_condition(&svc),
                svc.metadata.generation,
                reconciled.changed_at,
                &ctx.forwarders.views(),
            ),
            &ctx.state.lock().announced_by(&key),
        ),
    };
    if status::withheld(&svc, &condition) {
        // Written once the forwarders decide (their report reconciles it).
        return Ok(Action::requeue(Duration::from_secs(600)));
    }
    ctx.writer.status(&svc, &ingress, &condition).await?;
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
    ctx: &Reconciler,
    steps: ReleaseSteps,
) -> Result<Action, Error> {
    if !ctx.state.settle_removal(key, &ctx.forwarders) {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    ctx.writer
        .release(svc, steps.clear_status, steps.remove_finalizer)
        .await?;
    let (freed, waiting) = {
        let mut ledger = ctx.state.lock();
        let freed = ledger.release(key);
        ctx.metrics.set_pool_usage(ledger.allocator());
        let waiting: Vec<ServiceKey> = ledger.waiting().cloned().collect();
        (freed, waiting)
    };
    if !freed.is_empty() {
        // The Services waiting for an address may fit now.
        for waiting in &waiting {
            ctx.queue.push(waiting);
        }
        let list: Vec<String> = freed.iter().map(ToString::to_string).collect();
        let note = format!("released {}", list.join(", "));
        if steps.events {
            ctx.events
                .publish(svc, EventType::Normal, "IPReleased", note);
        } else {
            tracing::info!(service = %key, %note, "the Service belongs to another implementation now");
        }
    }
    Ok(Action::await_change())
}

pub(super) fn error_policy(_svc: Arc<Service>, error: &Error, ctx: Arc<Reconciler>) -> Action {
    ctx.metrics.reconcile_errors.inc();
    tracing::warn!(%error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}
