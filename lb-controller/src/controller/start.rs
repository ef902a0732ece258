//! Start-up and one-shot reads: the allocator seeded from the Services'
//! status, the desired state computed without writing (`plan`), and the
//! order of business before the first reconcile ([`prime`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::Client;
use lb_config::{DesiredState, ListenerSpec};
use tokio::sync::{mpsc, watch};

use super::{key_of, settings_of, slices_of, status_ips, Ctx, Entry, Ready};
use crate::config::Config;
use crate::ipam::{Allocator, Family, Request, ServiceKey};
use crate::ownership::{self, Owner};
use crate::publish::{self, Snapshot};
use crate::status::IpModeSupport;
use crate::translate::{self, SERVICE_NAME_LABEL};

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

/// How long the builder lets changes accumulate before it builds a state
/// (the publishers' debounce comes on top).
const BUILD_COALESCE: Duration = Duration::from_millis(20);

/// Waits for the caches, seeds, learns what the forwarders run, then
/// starts the builder, the publishers, and lets reconciles run: no
/// condition is judged before the controller knows what every reachable
/// forwarder has acknowledged, so a restart or failover that changes
/// nothing on the forwarders changes no condition.
pub(super) async fn prime(
    ctx: Arc<Ctx>,
    caches: [Ready; 3],
    states: watch::Receiver<Arc<Snapshot>>,
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
    // Whether the API server keeps ipMode, from what it stored for us.
    let ours = services.iter().filter(|s| {
        ownership::owner(s, &ctx.cfg.load_balancer_class, ctx.cfg.default_class) == Owner::Weir
    });
    *ctx.ip_mode.lock().unwrap() = IpModeSupport::from_stored(ours.map(|s| s.as_ref()));
    // What every forwarder runs: its version (the counter starts above the
    // highest) and which Services it already runs as they should be.
    let mut running = Vec::new();
    for f in &ctx.cfg.forwarders {
        let state = match publish::target(f) {
            Ok(t) => match publish::current_state(&t, ctx.cfg.publish_timeout).await {
                Ok(state) => Some(state),
                Err(e) => {
                    tracing::warn!(forwarder = %f.name, error = %e, "cannot read its state; it will be retried");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(forwarder = %f.name, error = %e, "bad forwarder settings");
                None
            }
        };
        running.push(state);
    }
    let versions: Vec<u64> = running
        .iter()
        .map(|s| s.as_ref().map_or(0, |s| s.version))
        .collect();
    for (f, version) in ctx.cfg.forwarders.iter().zip(&versions) {
        ctx.metrics
            .acked_version
            .with_label_values(&[&f.name])
            .set(*version as i64);
    }
    let highest = versions.iter().copied().max().unwrap_or(0);
    {
        let mut st = ctx.state.lock().unwrap();
        st.version = highest;
        let desired: BTreeMap<ServiceKey, Vec<ListenerSpec>> = st
            .entries
            .iter()
            .map(|(k, e)| (k.clone(), e.listeners.clone()))
            .collect();
        for (key, version) in publish::already_running(&desired, &running) {
            if let Some(entry) = st.entries.get_mut(&key) {
                entry.changed_at = Some(version);
            }
        }
    }
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
        &versions,
        &states,
        &reports_tx,
        timing,
        &ctx.metrics,
    );
    ctx.build();
    // The builder: coalesces changes into one new state at a time, at
    // most one per BUILD_COALESCE (a burst of reconciles would otherwise
    // copy every listener once per Service).
    let builder = ctx.clone();
    tokio::spawn(async move {
        loop {
            builder.rebuild.notified().await;
            tokio::time::sleep(BUILD_COALESCE).await;
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
                    reporter.on_report(report);
                }
                _ = sweep.tick() => reporter.sweep(),
            }
        }
    });
    ctx.primed.send_replace(true);
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
