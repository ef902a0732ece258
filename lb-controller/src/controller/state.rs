//! The desired state in memory: the [`Ledger`] behind its lock, the
//! doorbell that asks for a new state, and the builder that answers it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};

use super::forwarders::Forwarders;
use crate::ipam::{Pool, ServiceKey};
use crate::l2::owners::Move;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::publish::Snapshot;

/// How long the builder lets changes accumulate before it builds a state
/// (the publishers' debounce comes on top).
const BUILD_COALESCE: Duration = Duration::from_millis(20);

/// The ledger and the doorbell of the builder.
#[derive(Clone)]
pub(super) struct State {
    ledger: Arc<Mutex<Ledger>>,
    rebuild: Arc<Notify>,
    /// The L2 owner changes of each state built, for their Events.
    moves: mpsc::UnboundedSender<Vec<Move>>,
}

impl State {
    /// An empty ledger over `pools`, and where the L2 owner changes of
    /// each state built go.
    pub(super) fn new(pools: Vec<Pool>) -> (Self, mpsc::UnboundedReceiver<Vec<Move>>) {
        let (moves, rx) = mpsc::unbounded_channel();
        let state = Self {
            ledger: Arc::new(Mutex::new(Ledger::new(pools))),
            rebuild: Arc::new(Notify::new()),
            moves,
        };
        (state, rx)
    }

    /// The ledger, locked.
    pub(super) fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap()
    }

    /// Asks for a new state.
    pub(super) fn rebuild(&self) {
        self.rebuild.notify_one();
    }

    /// Takes the Service out of the desired state; true once every
    /// reachable forwarder runs a state without it.
    pub(super) fn settle_removal(&self, key: &ServiceKey, forwarders: &Forwarders) -> bool {
        let (changed, removed_at) = self.lock().remove(key);
        if changed {
            self.rebuild();
        }
        forwarders.settled(removed_at)
    }

    /// Builds a state and hands it to the publishers.
    pub(super) fn build(&self, snapshots: &watch::Sender<Arc<Snapshot>>, metrics: &Metrics) {
        let mut ledger = self.lock();
        let snapshot = ledger.build();
        let moves = ledger.take_moves();
        for m in &moves {
            let change = if m.from.is_some() { "moved" } else { "chosen" };
            metrics.l2_owner_changes.with_label_values(&[change]).inc();
        }
        metrics.desired_version.set(snapshot.state.version as i64);
        metrics.services.set(ledger.services() as i64);
        drop(ledger);
        snapshots.send_replace(Arc::new(snapshot));
        if !moves.is_empty() {
            let _ = self.moves.send(moves);
        }
    }

    /// The builder: coalesces changes into one new state at a time, at
    /// most one per [`BUILD_COALESCE`] (a burst of reconciles would
    /// otherwise copy every listener once per Service).
    pub(super) async fn run_builder(
        self,
        snapshots: watch::Sender<Arc<Snapshot>>,
        metrics: Metrics,
    ) {
        loop {
            self.rebuild.notified().await;
            tokio::time::sleep(BUILD_COALESCE).await;
            self.build(&snapshots, &metrics);
        }
    }
}
