//! The wiring: the caches and what their changes reconcile, the channels
//! between the parts, and the handles each part gets.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::{mpsc, watch};

use super::events::Events;
use super::feedback::Feedback;
use super::forwarders::forwarders;
use super::reconcile::{error_policy, reconcile, Queue, Reconciler};
use super::start::Start;
use super::state::State;
use super::writer::ServiceWriter;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::publish::Snapshot;
use crate::translate::{Settings, SERVICE_NAME_LABEL};

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
) -> (Store<K>, watch::Receiver<bool>)
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
    let (nodes, nodes_ready) =
        spawn_reflector(Api::<Node>::all(client.clone()), nodes_cfg, move |_| {
            let _ = all_tx.send(());
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
    let (services, store_writer) = reflector::store();
    let (services_tx, services_ready) = watch::channel(false);
    let service_events = reflector::reflector(
        store_writer,
        watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .inspect(move |event| mark_ready(&services_tx, event))
    .applied_objects();
    let controller = Controller::for_stream(service_events, services.clone());

    // The handles.
    let (state, moves) = State::new(cfg.pools.clone());
    let (set_forwarders, forwarders) = forwarders();
    let writer = Arc::new(ServiceWriter::new(client.clone()));
    let events = Events::new(client, identity);
    let queue = Queue(one_tx);
    let (snapshots, _) = watch::channel(Arc::new(Snapshot::default()));

    let reconciler = Arc::new(Reconciler {
        class: cfg.load_balancer_class.clone(),
        default_class: cfg.default_class,
        settings: Settings::from_config(&cfg),
        nodes: nodes.clone(),
        slices: slices.clone(),
        state: state.clone(),
        forwarders: forwarders.clone(),
        writer: writer.clone(),
        events: events.clone(),
        queue: queue.clone(),
        metrics: metrics.clone(),
    });
    let feedback = Feedback {
        services: services.clone(),
        state: state.clone(),
        forwarders,
        writer: writer.clone(),
        events,
        queue,
        metrics: metrics.clone(),
    };
    let start = Start {
        cfg,
        caches: [services_ready, nodes_ready, slices_ready],
        services,
        nodes,
        slices,
        state,
        writer,
        forwarders: set_forwarders,
        snapshots,
        feedback,
        moves,
        metrics,
    };
    tokio::spawn(start.run());

    controller
        .reconcile_all_on(channel_stream(all_rx))
        .reconcile_on(channel_stream(one_rx))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, reconciler)
        .for_each(|_| async {})
        .await;
    Ok(())
}
