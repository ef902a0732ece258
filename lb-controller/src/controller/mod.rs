//! The reconciler: Services in, addresses, status, Events and forwarder
//! state out. Level-triggered (kube-runtime's `Controller`): every
//! reconcile recomputes what the Service should have from the caches.
//!
//! Order of business at start: wait for the Service, Node and EndpointSlice
//! caches to finish their initial list; seed the allocator from Service
//! status (a restart never moves an address); translate every Service that
//! already holds addresses; learn the forwarders' versions; only then start
//! publishing and reconciling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::desired::key_of;
use crate::ipam::{Allocator, Family, ServiceKey};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::publish::{Progress, Snapshot};
use crate::status::{ForwarderView, IpModeSupport};
use crate::translate::{Settings, SERVICE_NAME_LABEL};

mod feedback;
mod reconcile;
mod start;

pub use crate::ownership::{CONDITION, FINALIZER};
use reconcile::{error_policy, reconcile};
use start::prime;
pub use start::read_cluster;
/// The field manager / Event reporter name.
pub const MANAGER: &str = "weir-lb-controller";

/// Why a reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Everything a reconcile needs.
pub struct Ctx {
    client: Client,
    cfg: Config,
    settings: Settings,
    services: Store<Service>,
    nodes: Store<Node>,
    slices: Store<EndpointSlice>,
    state: Mutex<Ledger>,
    rebuild: tokio::sync::Notify,
    snapshots: watch::Sender<Arc<Snapshot>>,
    progress: Mutex<Vec<(String, Arc<Progress>)>>,
    recorder: Recorder,
    metrics: Metrics,
    primed: watch::Sender<bool>,
    /// Reconciles one Service (its forwarding changed, or an address it
    /// waits for was freed).
    one_tx: mpsc::UnboundedSender<ObjectRef<Service>>,
    /// Whether the API server keeps `ipMode`, as learnt from it.
    ip_mode: Mutex<IpModeSupport>,
    /// Per Service, the resourceVersion our last write was made at, when
    /// the server's answer was a newer one: a cached object still at that
    /// version has not seen our write yet.
    written_at: Mutex<HashMap<ServiceKey, String>>,
}

impl Ctx {
    fn event(&self, svc: &Service, type_: EventType, reason: &str, note: String) {
        let recorder = self.recorder.clone();
        let reference = svc.object_ref(&());
        let reason = reason.to_owned();
        tracing::info!(service = %key_of(svc), %reason, %note, "event");
        tokio::spawn(async move {
            let ev = Event {
                type_,
                reason: reason.clone(),
                note: Some(note.chars().take(1000).collect()),
                action: reason,
                secondary: None,
            };
            if let Err(e) = recorder.publish(&ev, &reference).await {
                tracing::warn!(error = %e, "cannot record event");
            }
        });
    }

    /// Whether the controller holds anything for `key`: an address,
    /// listeners, or a removal in progress.
    fn holds(&self, key: &ServiceKey) -> bool {
        self.state.lock().unwrap().holds(key)
    }

    fn progress(&self) -> Vec<(String, Arc<Progress>)> {
        self.progress.lock().unwrap().clone()
    }

    /// Builds and hands the publishers a new state (called by one task).
    fn build(&self) {
        let mut ledger = self.state.lock().unwrap();
        let snapshot = ledger.build();
        self.metrics
            .desired_version
            .set(snapshot.state.version as i64);
        self.metrics.services.set(ledger.services() as i64);
        drop(ledger);
        self.snapshots.send_replace(Arc::new(snapshot));
    }

    fn update_pool_metrics(&self, allocator: &Allocator) {
        for pool in &self.cfg.pools {
            for (family, label) in [(Family::V4, "ipv4"), (Family::V6, "ipv6")] {
                if let Some((size, used)) = allocator.usage(&pool.name, family) {
                    self.metrics
                        .pool_size
                        .with_label_values(&[&pool.name, label])
                        .set(size.min(i64::MAX as u64) as i64);
                    self.metrics
                        .pool_used
                        .with_label_values(&[&pool.name, label])
                        .set(used.min(i64::MAX as u64) as i64);
                }
            }
        }
    }

    /// What every forwarder has acknowledged, for the condition.
    fn forwarder_views(&self) -> Vec<ForwarderView> {
        self.progress()
            .iter()
            .map(|(name, p)| ForwarderView {
                name: name.clone(),
                acked: p.acked.load(std::sync::atomic::Ordering::Acquire),
                error: p.last_error.lock().unwrap().clone(),
            })
            .collect()
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

    /// Whether the cache shows `svc` as it was before our last write to it
    /// (its update is still on the way through the watch, which will
    /// reconcile it again).
    fn cache_behind(&self, key: &ServiceKey, svc: &Service) -> bool {
        let mut written = self.written_at.lock().unwrap();
        match (written.get(key), &svc.metadata.resource_version) {
            (Some(at), Some(rv)) if at == rv => true,
            _ => {
                written.remove(key);
                false
            }
        }
    }

    /// Reconciles `key` soon.
    fn enqueue(&self, key: &ServiceKey) {
        let _ = self
            .one_tx
            .send(ObjectRef::new(&key.name).within(&key.namespace));
    }
}

/// A stream from an unbounded channel.
fn channel_stream<T: Send + 'static>(
    rx: mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// Readiness of a cache: set once its initial list is in the store.
///
/// (`Store::wait_until_ready` is not used: it wakes only the last of
/// several concurrent waiters, and the kube-runtime `Controller` waits on
/// the Service store too.)
type Ready = watch::Receiver<bool>;

fn mark_ready<K>(tx: &watch::Sender<bool>, event: &Result<watcher::Event<K>, watcher::Error>) {
    if let Ok(watcher::Event::InitDone) = event {
        tx.send_replace(true);
    }
}

/// Drives a reflector for `api` and calls `on_event` for each change.
fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    on_event: impl Fn(&K) + Send + 'static,
) -> (Store<K>, Ready)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let (ready_tx, ready) = watch::channel(false);
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            mark_ready(&ready_tx, &event);
            match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => on_event(&o),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "watch failed; retrying"),
            }
        }
    });
    (reader, ready)
}

/// Runs the controller (as leader) until `shutdown` resolves.
pub async fn run(
    client: Client,
    cfg: Config,
    identity: &str,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    // Every Service is reconciled when a Node changes (every Service's
    // backends do); one Service when its EndpointSlices change, when its
    // forwarding changes, or when an address it waits for is freed.
    let (all_tx, all_rx) = mpsc::unbounded_channel::<()>();
    let (one_tx, one_rx) = mpsc::unbounded_channel::<ObjectRef<Service>>();

    let nodes_cfg = match &cfg.node_selector_text {
        Some(s) => watcher::Config::default().labels(s),
        None => watcher::Config::default(),
    };
    let tx = all_tx.clone();
    let (nodes, nodes_ready) =
        spawn_reflector(Api::<Node>::all(client.clone()), nodes_cfg, move |_| {
            let _ = tx.send(());
        });
    let tx = one_tx.clone();
    let (slices, slices_ready) = spawn_reflector(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
        move |s: &EndpointSlice| {
            let service = s.labels().get(SERVICE_NAME_LABEL);
            if let (Some(name), Some(ns)) = (service, s.namespace()) {
                let _ = tx.send(ObjectRef::new(name).within(&ns));
            }
        },
    );
    let (services, writer) = reflector::store();
    let (services_tx, services_ready) = watch::channel(false);
    let service_events = reflector::reflector(
        writer,
        watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .inspect(move |event| mark_ready(&services_tx, event))
    .applied_objects();
    let controller = Controller::for_stream(service_events, services.clone());
    let (snapshots, states) = watch::channel(Arc::new(Snapshot::default()));
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        settings: Settings::from_config(&cfg),
        services: services.clone(),
        nodes: nodes.clone(),
        slices: slices.clone(),
        state: Mutex::new(Ledger::new(cfg.pools.clone())),
        rebuild: tokio::sync::Notify::new(),
        snapshots,
        progress: Mutex::new(Vec::new()),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: Some(identity.to_owned()),
            },
        ),
        metrics: metrics.clone(),
        primed: watch::channel(false).0,
        one_tx,
        ip_mode: Mutex::new(IpModeSupport::default()),
        written_at: Mutex::new(HashMap::new()),
        cfg,
    });

    tokio::spawn(prime(
        ctx.clone(),
        [services_ready, nodes_ready, slices_ready],
        states,
    ));

    controller
        .reconcile_all_on(channel_stream(all_rx))
        .reconcile_on(channel_stream(one_rx))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
    Ok(())
}
