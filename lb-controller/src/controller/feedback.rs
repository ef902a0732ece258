//! What the publishers report back (acknowledged, refused, stale,
//! unreachable), and the periodic sweep of Services that vanished.
//!
//! A report re-evaluates only the Services whose programmed state it
//! changes: those whose condition would now read differently, and those
//! whose removal every forwarder has now settled.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::mpsc;

use super::events::Events;
use super::forwarders::Forwarders;
use super::reconcile::Queue;
use super::state::State;
use super::writer::ServiceWriter;
use crate::ipam::ServiceKey;
use crate::l2::owners::Move;
use crate::metrics::Metrics;
use crate::publish::Report;
use crate::status;

/// How often Services that vanished are looked for.
const SWEEP: Duration = Duration::from_secs(10);

/// What the handling of reports and the sweep work with.
pub(super) struct Feedback {
    pub(super) services: Store<Service>,
    pub(super) state: State,
    pub(super) forwarders: Forwarders,
    pub(super) writer: Arc<ServiceWriter>,
    pub(super) events: Events,
    pub(super) queue: Queue,
    pub(super) metrics: Metrics,
}

impl Feedback {
    /// Handles `reports` until they end, and sweeps every [`SWEEP`].
    /// Also records an Event on the Services of each VIP whose L2 owner
    /// changes (`moves`).
    pub(super) async fn run(
        self,
        mut reports: mpsc::UnboundedReceiver<Report>,
        mut moves: mpsc::UnboundedReceiver<Vec<Move>>,
    ) {
        let mut sweep = tokio::time::interval(SWEEP);
        loop {
            tokio::select! {
                report = reports.recv() => {
                    let Some(report) = report else { return };
                    self.on_report(report);
                }
                Some(moved) = moves.recv() => self.on_moves(&moved),
                _ = sweep.tick() => self.sweep(),
            }
        }
    }

    /// An Event on every Service of each VIP that has a new owner, and a
    /// reconcile (its condition names the owner).
    fn on_moves(&self, moves: &[Move]) {
        for m in moves {
            let keys = self.state.lock().services_on(m.vip);
            let note = match (&m.from, &m.why) {
                (Some(from), Some(why)) => format!(
                    "{} is now announced (ARP/NDP) by {}, was {from}: {why}",
                    m.vip, m.to
                ),
                _ => format!("{} is announced (ARP/NDP) by {}", m.vip, m.to),
            };
            let reason = if m.from.is_some() {
                "AnnouncerChanged"
            } else {
                "AnnouncerChosen"
            };
            for key in keys {
                if let Some(svc) = self.service(&key) {
                    self.events
                        .publish(&svc, EventType::Normal, reason, note.clone());
                }
                self.queue.push(&key);
            }
        }
    }

    fn service(&self, key: &ServiceKey) -> Option<Arc<Service>> {
        self.services
            .get(&ObjectRef::new(&key.name).within(&key.namespace))
    }

    fn on_report(&self, report: Report) {
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
                    match owner.and_then(|k| self.service(&k)) {
                        Some(svc) => {
                            self.events
                                .publish(&svc, EventType::Warning, "ForwarderRejected", note)
                        }
                        None => tracing::warn!("{note}"),
                    }
                }
            }
            Report::Stale { forwarder, current } => {
                if self.state.lock().move_above(current) {
                    tracing::warn!(%forwarder, current, "forwarder runs a newer version; moving above it");
                    self.state.rebuild();
                }
            }
            Report::Failed { .. } => {}
        }
        for key in self.affected_by_progress() {
            self.queue.push(&key);
        }
    }

    /// The Services a change in the forwarders' progress concerns: ours
    /// whose condition would read differently now, and those being released
    /// that every forwarder has now dropped.
    fn affected_by_progress(&self) -> Vec<ServiceKey> {
        let views = self.forwarders.views();
        let ledger = self.state.lock();
        let conditions = ledger.changed_at().filter(|(key, changed_at)| {
            self.service(key).is_some_and(|svc| {
                let current = status::current_condition(&svc);
                let wanted = status::with_announcers(
                    status::programmed(current, svc.metadata.generation, *changed_at, &views),
                    &ledger.announced_by(key),
                );
                current.is_none_or(|c| !status::same(c, &wanted))
                    && !status::withheld(&svc, &wanted)
            })
        });
        let removals = ledger
            .removals()
            .filter(|(_, removed_at)| removed_at.is_some() && self.forwarders.settled(*removed_at));
        conditions
            .map(|(key, _)| key.clone())
            .chain(removals.map(|(key, _)| key.clone()))
            .collect()
    }

    /// Releases Services that vanished without going through their
    /// finalizer (it was removed by hand), and forgets what it remembers of
    /// Services that are gone.
    fn sweep(&self) {
        let exists = |k: &ServiceKey| self.service(k).is_some();
        self.writer.forget(exists);
        let gone = self.state.lock().gone(exists);
        for key in gone {
            if self.state.settle_removal(&key, &self.forwarders) {
                let mut ledger = self.state.lock();
                let freed = ledger.release(&key);
                self.metrics.set_pool_usage(ledger.allocator());
                tracing::info!(service = %key, ?freed, "released addresses of a vanished Service");
            }
        }
    }
}
