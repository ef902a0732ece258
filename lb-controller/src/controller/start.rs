//! Start-up: the order of business before the first reconcile
//! ([`prime`]), and the one-shot read of the cluster for `plan`.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::Client;
use tokio::sync::{mpsc, watch};

use super::{Ctx, Ready};
use crate::config::Config;
use crate::desired::{self, Cluster};
use crate::ledger::Ledger;
use crate::ownership::{self, Owner};
use crate::publish::{self, Snapshot};
use crate::status::IpModeSupport;
use crate::translate::SERVICE_NAME_LABEL;

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
    let slices = ctx.slices.state();
    {
        let seeded = desired::seed(&ctx.cfg, &services, &Cluster::new(&nodes, &slices));
        let mut ledger = ctx.state.lock().unwrap();
        *ledger = Ledger::seeded(seeded);
        ctx.update_pool_metrics(ledger.allocator());
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
    ctx.state.lock().unwrap().adopt_running(&running);
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
