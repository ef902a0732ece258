//! What the publishers report back (acknowledged, refused, stale,
//! unreachable), and the periodic sweep of Services that vanished.
//!
//! A report re-evaluates only the Services whose programmed state it
//! changes: those whose condition would now read differently, and those
//! whose removal every forwarder has now settled.

use std::collections::BTreeMap;

use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;

use super::reconcile::settle_removal;
use super::Ctx;
use crate::ipam::ServiceKey;
use crate::publish::Report;
use crate::status;

impl Ctx {
    pub(super) fn on_report(&self, report: Report) {
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
                if self.state.lock().unwrap().move_above(current) {
                    tracing::warn!(%forwarder, current, "forwarder runs a newer version; moving above it");
                    self.rebuild.notify_one();
                }
            }
            Report::Failed { .. } => {}
        }
        for key in self.affected_by_progress() {
            self.enqueue(&key);
        }
    }

    /// The Services a change in the forwarders' progress concerns: ours
    /// whose condition would read differently now, and those being released
    /// that every forwarder has now dropped.
    fn affected_by_progress(&self) -> Vec<ServiceKey> {
        let views = self.forwarder_views();
        let progress = self.progress();
        let ledger = self.state.lock().unwrap();
        let conditions = ledger.changed_at().filter(|(key, changed_at)| {
            self.services
                .get(&ObjectRef::new(&key.name).within(&key.namespace))
                .is_some_and(|svc| {
                    let current = status::current_condition(&svc);
                    let wanted =
                        status::programmed(current, svc.metadata.generation, *changed_at, &views);
                    current.is_none_or(|c| !status::same(c, &wanted))
                        && !status::withheld(&svc, &wanted)
                })
        });
        let removals = ledger.removals().filter(|(_, removed_at)| {
            removed_at.is_some_and(|v| progress.iter().all(|(_, p)| p.settled(v)))
        });
        conditions
            .map(|(key, _)| key.clone())
            .chain(removals.map(|(key, _)| key.clone()))
            .collect()
    }

    /// Releases Services that vanished without going through their
    /// finalizer (it was removed by hand), and forgets what it remembers of
    /// Services that are gone.
    pub(super) fn sweep(&self) {
        let exists = |k: &ServiceKey| {
            self.services
                .get(&ObjectRef::new(&k.name).within(&k.namespace))
                .is_some()
        };
        self.written_at.lock().unwrap().retain(|k, _| exists(k));
        let gone = self.state.lock().unwrap().gone(exists);
        for key in gone {
            if settle_removal(&key, self) {
                let mut ledger = self.state.lock().unwrap();
                let freed = ledger.release(&key);
                self.update_pool_metrics(ledger.allocator());
                tracing::info!(service = %key, ?freed, "released addresses of a vanished Service");
            }
        }
    }
}
