//! The reconciler: Services in, addresses, status, Events and forwarder
//! state out. Level-triggered (kube-runtime's `Controller`): every
//! reconcile recomputes what the Service should have from the caches.
//!
//! Order of business at start: wait for the Service, Node and EndpointSlice
//! caches to finish their initial list; seed the allocator from Service
//! status (a restart never moves an address); translate every Service that
//! already holds addresses; learn the forwarders' versions; only then start
//! publishing and reconciling.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use lb_config::{DesiredState, ListenerSpec};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::ipam::{Allocator, Family, Request, ServiceKey};
use crate::metrics::Metrics;
use crate::ownership::{self, has_finalizer, Disposition, Owner};
use crate::publish::{self, Progress, Report, Snapshot};
use crate::translate::{self, Settings, SERVICE_NAME_LABEL};

pub use crate::ownership::{CONDITION, FINALIZER};
/// The field manager / Event reporter name.
pub const MANAGER: &str = "weir-lb-controller";

/// Why a reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

#[derive(Debug, Default)]
struct Entry {
    listeners: Vec<ListenerSpec>,
    /// Version of the first state that carries these listeners (`None`:
    /// the next one).
    changed_at: Option<u64>,
    /// Warnings already reported (reason, message), so they are not repeated.
    warned: BTreeSet<(String, String)>,
}

#[derive(Debug)]
struct State {
    allocator: Allocator,
    entries: BTreeMap<ServiceKey, Entry>,
    /// Services being released: version of the first state without them.
    removals: BTreeMap<ServiceKey, Option<u64>>,
    /// Version of the last built state.
    version: u64,
    /// Warnings per Service that has no entry (allocation failures).
    warned: BTreeMap<ServiceKey, BTreeSet<(String, String)>>,
}

/// Everything a reconcile needs.
pub struct Ctx {
    client: Client,
    cfg: Config,
    settings: Settings,
    services: Store<Service>,
    nodes: Store<Node>,
    slices: Store<EndpointSlice>,
    state: Mutex<State>,
    rebuild: tokio::sync::Notify,
    snapshots: watch::Sender<Arc<Snapshot>>,
    progress: Mutex<Vec<(String, Arc<Progress>)>>,
    recorder: Recorder,
    metrics: Metrics,
    primed: watch::Sender<bool>,
    /// Reconciles every Service (after a release: a waiting Service may fit now).
    all_tx: mpsc::UnboundedSender<()>,
}

fn key_of(svc: &Service) -> ServiceKey {
    ServiceKey::new(
        svc.metadata.namespace.as_deref().unwrap_or("default"),
        svc.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// Addresses in `status.loadBalancer.ingress`.
pub fn status_ips(svc: &Service) -> Vec<IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

fn settings_of(cfg: &Config) -> Settings {
    Settings {
        address_types: cfg.address_types.clone(),
        node_selector: cfg.node_selector.clone(),
        cluster_health: cfg.cluster_health,
        kube_proxy_port: cfg.kube_proxy_port,
    }
}

fn slices_of<'a>(slices: &'a [Arc<EndpointSlice>], key: &ServiceKey) -> Vec<&'a EndpointSlice> {
    slices
        .iter()
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(key.namespace.as_str())
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .is_some_and(|n| *n == key.name)
        })
        .map(|s| s.as_ref())
        .collect()
}

/// The allocator request, or the default one if the Service's is invalid
/// (used only for seeding: what a Service already holds stays its own).
fn request_or_default(svc: &Service) -> Request {
    translate::request(svc).unwrap_or(Request {
        policy: crate::ipam::FamilyPolicy::Single(Family::V4),
        addresses: Vec::new(),
        pool: None,
        sharing_key: None,
        ports: Vec::new(),
    })
}

/// Seeds an allocator from the status of our Services (by class alone:
/// another implementation's addresses never count), in a stable order.
/// Returns the allocator.
pub fn seeded_allocator(cfg: &Config, services: &[Arc<Service>]) -> Allocator {
    let mut allocator = Allocator::new(cfg.pools.clone());
    let mut held: Vec<&Arc<Service>> = services
        .iter()
        .filter(|s| ownership::owner(s, &cfg.load_balancer_class, cfg.default_class) == Owner::Weir)
        .filter(|s| !status_ips(s).is_empty())
        .collect();
    held.sort_by_key(|s| key_of(s));
    for svc in held {
        allocator.seed(&key_of(svc), &status_ips(svc), &request_or_default(svc));
    }
    for (svc, ip) in allocator.orphans() {
        tracing::warn!(service = %svc, %ip, "address is outside every configured pool; kept until the Service lets it go");
    }
    allocator
}

/// The desired forwarder state for a set of Services, computed once
/// without writing anything (`lb-controller plan`). Services without an
/// address get one from a copy of the allocator.
pub fn plan(
    cfg: &Config,
    services: &[Arc<Service>],
    nodes: &[Arc<Node>],
    slices: &[Arc<EndpointSlice>],
) -> (DesiredState, Vec<String>) {
    let mut allocator = seeded_allocator(cfg, services);
    let settings = settings_of(cfg);
    let node_refs: Vec<&Node> = nodes.iter().map(|n| n.as_ref()).collect();
    let mut notes = Vec::new();
    let mut listeners = Vec::new();
    let mut managed: Vec<&Arc<Service>> = services
        .iter()
        .filter(|s| translate::is_managed(s, &cfg.load_balancer_class, cfg.default_class))
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .collect();
    managed.sort_by_key(|s| (status_ips(s).is_empty(), key_of(s)));
    for svc in managed {
        let key = key_of(svc);
        let ips = match translate::request(svc)
            .map_err(|e| e.to_string())
            .and_then(|r| allocator.assign(&key, &r).map_err(|e| e.to_string()))
        {
            Ok(ips) => ips,
            Err(e) => {
                notes.push(format!("{key}: no address: {e}"));
                continue;
            }
        };
        if status_ips(svc) != ips {
            let list: Vec<String> = ips.iter().map(ToString::to_string).collect();
            notes.push(format!("{key}: would be assigned {}", list.join(", ")));
        }
        match translate::translate(svc, &ips, &node_refs, &slices_of(slices, &key), &settings) {
            Ok(t) => {
                for s in &t.skipped {
                    notes.push(format!(
                        "{key}: port {}/{}: {}",
                        s.port, s.protocol, s.message
                    ));
                }
                listeners.extend(t.listeners);
            }
            Err(errors) => {
                for e in errors {
                    notes.push(format!("{key}: {e}"));
                }
            }
        }
    }
    (
        DesiredState {
            version: 0,
            listeners,
        },
        notes,
    )
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

    /// A Warning once per distinct (reason, message) while it persists.
    fn warn_once(
        &self,
        svc: &Service,
        warned: &mut BTreeSet<(String, String)>,
        reason: &str,
        msg: String,
    ) {
        if warned.insert((reason.to_owned(), msg.clone())) {
            self.event(svc, EventType::Warning, reason, msg);
        }
    }

    /// Whether the controller holds anything for `key`: an address,
    /// listeners, or a removal in progress.
    fn holds(&self, key: &ServiceKey) -> bool {
        let st = self.state.lock().unwrap();
        !st.allocator.addresses(key).is_empty()
            || st.entries.contains_key(key)
            || st.removals.contains_key(key)
    }

    fn progress(&self) -> Vec<(String, Arc<Progress>)> {
        self.progress.lock().unwrap().clone()
    }

    /// Builds and hands the publishers a new state (called by one task).
    fn build(&self) {
        let mut st = self.state.lock().unwrap();
        st.version += 1;
        let version = st.version;
        let mut snapshot = Snapshot {
            state: DesiredState {
                version,
                listeners: Vec::new(),
            },
            owners: Vec::new(),
        };
        for (key, entry) in st.entries.iter_mut() {
            entry.changed_at.get_or_insert(version);
            for l in &entry.listeners {
                snapshot.state.listeners.push(l.clone());
                snapshot.owners.push(key.clone());
            }
        }
        for v in st.removals.values_mut() {
            v.get_or_insert(version);
        }
        self.metrics.desired_version.set(version as i64);
        self.metrics.services.set(st.entries.len() as i64);
        drop(st);
        self.snapshots.send_replace(Arc::new(snapshot));
    }

    fn update_pool_metrics(&self, st: &State) {
        for pool in &self.cfg.pools {
            for (family, label) in [(Family::V4, "ipv4"), (Family::V6, "ipv6")] {
                if let Some((size, used)) = st.allocator.usage(&pool.name, family) {
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

    /// The condition for a Service whose listeners are `entry`'s.
    fn programmed(&self, changed_at: Option<u64>) -> Option<(bool, String, String)> {
        let progress = self.progress();
        if progress.is_empty() {
            return None;
        }
        let Some(version) = changed_at else {
            return Some((false, "Pending".into(), "waiting to be published".into()));
        };
        let mut behind = Vec::new();
        for (name, p) in &progress {
            let acked = p.acked.load(std::sync::atomic::Ordering::Acquire);
            if acked < version {
                let why = p
                    .last_error
                    .lock()
                    .unwrap()
                    .clone()
                    .unwrap_or_else(|| format!("at version {acked}"));
                behind.push(format!("{name}: {why}"));
            }
        }
        Some(if behind.is_empty() {
            (
                true,
                "AllForwardersCurrent".into(),
                format!("every forwarder runs version {version} or later"),
            )
        } else {
            (
                false,
                "ForwardersBehind".into(),
                format!("needs version {version}; {}", behind.join("; ")),
            )
        })
    }
}

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

async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action, Error> {
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
fn settle_removal(key: &ServiceKey, ctx: &Ctx) -> bool {
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

fn error_policy(_svc: Arc<Service>, error: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.reconcile_errors.inc();
    tracing::warn!(%error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
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
        settings: settings_of(&cfg),
        services: services.clone(),
        nodes: nodes.clone(),
        slices: slices.clone(),
        state: Mutex::new(State {
            allocator: Allocator::new(cfg.pools.clone()),
            entries: BTreeMap::new(),
            removals: BTreeMap::new(),
            version: 0,
            warned: BTreeMap::new(),
        }),
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
        all_tx: all_tx.clone(),
        cfg,
    });

    tokio::spawn(prime(
        ctx.clone(),
        [services_ready, nodes_ready, slices_ready],
        states,
        all_tx.clone(),
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

/// Waits for the caches, seeds, learns forwarder versions, then starts the
/// builder, the publishers, and lets reconciles run.
async fn prime(
    ctx: Arc<Ctx>,
    caches: [Ready; 3],
    states: watch::Receiver<Arc<Snapshot>>,
    all_tx: mpsc::UnboundedSender<()>,
) {
    let started = std::time::Instant::now();
    for mut ready in caches {
        if ready.wait_for(|r| *r).await.is_err() {
            tracing::error!("a cache stopped before its initial list finished");
            return;
        }
    }
    let services = ctx.services.state();
    let nodes = ctx.nodes.state();
    let all_slices = ctx.slices.state();
    let node_refs: Vec<&Node> = nodes.iter().map(|n| n.as_ref()).collect();
    {
        let mut st = ctx.state.lock().unwrap();
        st.allocator = seeded_allocator(&ctx.cfg, &services);
        for svc in &services {
            let key = key_of(svc);
            let ips = st.allocator.addresses(&key).to_vec();
            let managed =
                translate::is_managed(svc, &ctx.cfg.load_balancer_class, ctx.cfg.default_class)
                    && svc.metadata.deletion_timestamp.is_none();
            if ips.is_empty() || !managed {
                continue;
            }
            if let Ok(t) = translate::translate(
                svc,
                &ips,
                &node_refs,
                &slices_of(&all_slices, &key),
                &ctx.settings,
            ) {
                st.entries.insert(
                    key,
                    Entry {
                        listeners: t.listeners,
                        ..Entry::default()
                    },
                );
            }
        }
        ctx.update_pool_metrics(&st);
    }
    // Start above the highest version any forwarder runs.
    let mut highest = 0;
    for f in &ctx.cfg.forwarders {
        match publish::target(f) {
            Ok(t) => match publish::current_version(&t, ctx.cfg.publish_timeout).await {
                Ok(v) => highest = highest.max(v),
                Err(e) => {
                    tracing::warn!(forwarder = %f.name, error = %e, "cannot read its version; it will be retried")
                }
            },
            Err(e) => tracing::warn!(forwarder = %f.name, error = %e, "bad forwarder settings"),
        }
    }
    ctx.state.lock().unwrap().version = highest;
    tracing::info!(
        services = services.len(),
        nodes = nodes.len(),
        start_version = highest + 1,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "caches synced, allocator seeded"
    );

    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let timing = publish::Timing {
        debounce: ctx.cfg.debounce,
        backoff_max: ctx.cfg.backoff_max,
        timeout: ctx.cfg.publish_timeout,
    };
    *ctx.progress.lock().unwrap() = publish::spawn_all(
        &ctx.cfg.forwarders,
        &states,
        &reports_tx,
        timing,
        &ctx.metrics,
    );
    ctx.build();
    // The builder: coalesces changes into one new state at a time.
    let builder = ctx.clone();
    tokio::spawn(async move {
        loop {
            builder.rebuild.notified().await;
            builder.build();
        }
    });
    // Reports from publishers.
    let reporter = ctx.clone();
    tokio::spawn(async move {
        let mut sweep = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                report = reports.recv() => {
                    let Some(report) = report else { return };
                    reporter.on_report(report, &all_tx);
                }
                _ = sweep.tick() => reporter.sweep(),
            }
        }
    });
    ctx.primed.send_replace(true);
}

impl Ctx {
    fn on_report(&self, report: Report, all_tx: &mpsc::UnboundedSender<()>) {
        match report {
            Report::Acked { forwarder, version } => {
                self.metrics
                    .acked_version
                    .with_label_values(&[&forwarder])
                    .set(version as i64);
                tracing::debug!(%forwarder, version, "forwarder acknowledged");
            }
            Report::Rejected { forwarder, errors } => {
                let mut by_owner: BTreeMap<Option<ServiceKey>, Vec<String>> = BTreeMap::new();
                for (owner, msg) in errors {
                    by_owner.entry(owner).or_default().push(msg);
                }
                for (owner, msgs) in by_owner {
                    let note = format!(
                        "forwarder {forwarder} rejected the state: {}",
                        msgs.join("; ")
                    );
                    match owner.and_then(|k| {
                        self.services
                            .get(&ObjectRef::new(&k.name).within(&k.namespace))
                    }) {
                        Some(svc) => {
                            self.event(&svc, EventType::Warning, "ForwarderRejected", note)
                        }
                        None => tracing::warn!("{note}"),
                    }
                }
            }
            Report::Stale { forwarder, current } => {
                let mut st = self.state.lock().unwrap();
                if current >= st.version {
                    tracing::warn!(%forwarder, current, "forwarder runs a newer version; moving above it");
                    st.version = current;
                    drop(st);
                    self.rebuild.notify_one();
                }
            }
            Report::Failed { .. } => {}
        }
        let _ = all_tx.send(());
    }

    /// Releases Services that vanished without going through their
    /// finalizer (it was removed by hand, or they were never ours).
    fn sweep(&self) {
        let gone: Vec<ServiceKey> = {
            let st = self.state.lock().unwrap();
            st.allocator
                .holdings()
                .into_iter()
                .map(|h| h.service)
                .chain(st.entries.keys().cloned())
                .filter(|k| {
                    self.services
                        .get(&ObjectRef::new(&k.name).within(&k.namespace))
                        .is_none()
                })
                .collect()
        };
        for key in gone {
            if settle_removal(&key, self) {
                let mut st = self.state.lock().unwrap();
                st.removals.remove(&key);
                let freed = st.allocator.release(&key);
                self.update_pool_metrics(&st);
                tracing::info!(service = %key, ?freed, "released addresses of a vanished Service");
            }
        }
    }
}

/// Reads the cluster once (no watch) for `lb-controller plan`.
pub async fn read_cluster(
    client: &Client,
    cfg: &Config,
) -> anyhow::Result<(Vec<Arc<Service>>, Vec<Arc<Node>>, Vec<Arc<EndpointSlice>>)> {
    let mut node_params = ListParams::default();
    if let Some(s) = &cfg.node_selector_text {
        node_params = node_params.labels(s);
    }
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let nodes = Api::<Node>::all(client.clone()).list(&node_params).await?;
    let slices = Api::<EndpointSlice>::all(client.clone())
        .list(&ListParams::default().labels(SERVICE_NAME_LABEL))
        .await?;
    Ok((
        services.items.into_iter().map(Arc::new).collect(),
        nodes.items.into_iter().map(Arc::new).collect(),
        slices.items.into_iter().map(Arc::new).collect(),
    ))
}
