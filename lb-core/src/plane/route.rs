//! A listener's route as an apply builds it: backend handles kept across
//! applies (or revived from draining), counters kept by listener name, and
//! the selector kept unless the backends changed.

use std::sync::Arc;

use lb_config::Listener;

use super::Plane;
use crate::balance::Selector;
use crate::routing::{BackendHandle, BindKey, Route, Routing};
use crate::stats::ListenerStats;

impl Plane {
    /// A route for `l`: its handles (kept, revived from draining, or new),
    /// its counters (kept by name), and its selector (the previous one
    /// unless `reselect`).
    pub(super) fn route(&mut self, l: &Listener, previous: &Routing, reselect: bool) -> Route {
        let key = BindKey::of(l);
        let backends = l
            .backends
            .iter()
            .map(|b| {
                let hk = (key, b.addr);
                let cell = self.health.cell(b.addr, &l.health, &self.rt);
                let reuse = self.handles.get(&hk).cloned().or_else(|| {
                    let revived = self.draining.get(&hk).filter(|h| h.revive()).cloned();
                    if revived.is_some() {
                        self.draining.remove(&hk);
                    }
                    revived
                });
                let handle = match reuse {
                    Some(h) => {
                        if !Arc::ptr_eq(&h.health.load(), &cell) {
                            h.health.store(cell);
                        }
                        h
                    }
                    None => Arc::new(BackendHandle::new(b.addr, cell)),
                };
                self.handles.insert(hk, handle.clone());
                handle
            })
            .collect();
        let stats = self
            .stats
            .get(&l.name)
            .cloned()
            .unwrap_or_else(|| Arc::new(ListenerStats::new(self.workers.len())));
        let kept = previous
            .routes
            .get(&key)
            .filter(|_| !reselect)
            .map(|r| r.selector.clone());
        let selector = kept.unwrap_or_else(|| Arc::new(Selector::new(l.balance, &l.backends)));
        Route {
            listener: l.clone(),
            selector,
            backends,
            stats,
        }
    }
}
