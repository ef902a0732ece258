//! The order of business before the first reconcile: wait for the caches,
//! seed the ledger from the Services' status ([`desired::seed`]), learn
//! what the forwarders run, then start the builder, the publishers and the
//! handling of their reports, and let reconciles run.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::Store;
use lb_config::DesiredState;
use tokio::sync::{mpsc, watch};

use super::feedback::Feedback;
use super::forwarders::SetForwarders;
use super::state::State;
use super::writer::ServiceWriter;
use crate::config::Config;
use crate::desired::{self, Cluster};
use crate::l2::Book;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::ownership::{self, Owner};
use crate::publish::{self, Snapshot};

/// What the start-up needs, handed over once.
pub(super) struct Start {
    pub(super) cfg: Config,
    /// The Service, Node and EndpointSlice caches' readiness.
    pub(super) caches: [watch::Receiver<bool>; 3],
    pub(super) services: Store<Service>,
    pub(super) nodes: Store<Node>,
    pub(super) slices: Store<EndpointSlice>,
    pub(super) state: State,
    pub(super) writer: Arc<ServiceWriter>,
    pub(super) forwarders: SetForwarders,
    pub(super) snapshots: watch::Sender<Arc<Snapshot>>,
    pub(super) feedback: Feedback,
    /// The L2 owner changes of each state built.
    pub(super) moves: mpsc::UnboundedReceiver<Vec<crate::l2::owners::Move>>,
    pub(super) metrics: Metrics,
}

impl Start {
    /// Waits for the caches, seeds, learns what the forwarders run, then
    /// starts the builder, the publishers, and lets reconciles run: no
    /// condition is judged before the controller knows what every
    /// reachable forwarder has acknowledged, so a restart or failover that
    /// changes nothing on the forwarders changes no condition.
    pub(super) async fn run(self) {
        let started = std::time::Instant::now();
        for mut ready in self.caches {
            if ready.wait_for(|r| *r).await.is_err() {
                tracing::error!("a cache stopped before its initial list finished");
                return;
            }
        }
        let cfg = &self.cfg;
        let services = self.services.state();
        let nodes = self.nodes.state();
        let slices = self.slices.state();
        {
            let seeded = desired::seed(cfg, &services, &Cluster::new(&nodes, &slices));
            let mut ledger = self.state.lock();
            *ledger = Ledger::seeded(seeded);
            self.metrics.set_pool_usage(ledger.allocator());
        }
        // Whether the API server keeps ipMode, from what it stored for us.
        let ours = services.iter().filter(|s| {
            ownership::owner(s, &cfg.load_balancer_class, cfg.default_class) == Owner::Weir
        });
        self.writer.learn_stored(ours.map(|s| s.as_ref()));
        // What every forwarder runs: its version (the counter starts above
        // the highest) and which Services it already runs as they should be.
        let running = running(cfg).await;
        let versions: Vec<u64> = running
            .iter()
            .map(|s| s.as_ref().map_or(0, |s| s.version))
            .collect();
        for (f, version) in cfg.forwarders.iter().zip(&versions) {
            self.metrics
                .acked_version
                .with_label_values(&[&f.name])
                .set(*version as i64);
        }
        {
            let mut ledger = self.state.lock();
            ledger.adopt_running(&running);
            if cfg.l2.enabled() {
                let names = cfg.forwarders.iter().map(|f| f.name.clone()).collect();
                ledger.set_l2(Book::recovered(&cfg.l2, names, &running));
            }
        }
        tracing::info!(
            services = services.len(),
            nodes = nodes.len(),
            start_version = versions.iter().copied().max().unwrap_or(0) + 1,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "caches synced, allocator seeded"
        );

        let (reports_tx, reports) = mpsc::unbounded_channel();
        let timing = publish::Timing {
            debounce: cfg.debounce,
            backoff_max: cfg.backoff_max,
            timeout: cfg.publish_timeout,
        };
        let board = publish::spawn_all(
            &cfg.forwarders,
            &versions,
            &self.snapshots.subscribe(),
            &reports_tx,
            timing,
            &self.metrics,
        );
        self.state.build(&self.snapshots, &self.metrics);
        super::probes::spawn(cfg, &self.state, &self.metrics);
        tokio::spawn(self.state.run_builder(self.snapshots, self.metrics));
        // Reconciles go on from here; the reports' handling sees the board
        // from its first sweep.
        self.forwarders.set(board.into());
        tokio::spawn(self.feedback.run(reports, self.moves));
    }
}

/// The state each forwarder runs now (`None`: it could not be read).
async fn running(cfg: &Config) -> Vec<Option<DesiredState>> {
    let mut running = Vec::new();
    for f in &cfg.forwarders {
        let state = match publish::target(f) {
            Ok(t) => match publish::current_state(&t, cfg.publish_timeout).await {
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
    running
}
