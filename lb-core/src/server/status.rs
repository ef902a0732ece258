//! The status snapshot (`GET /v1/status`, `lbd status`): listeners in
//! configuration order, each with its backends (draining ones too), read
//! from the routing snapshot and the plane.

use std::sync::atomic::Ordering;

use lb_api::wire::{BackendStatus, ListenerStatus, Status};

use crate::engine::EngineKind;
use crate::plane::Plane;
use crate::routing::{BindKey, Routing};

/// The status of `plane` (whose routes `routing` holds).
pub fn status(
    plane: &Plane,
    routing: &Routing,
    engine: EngineKind,
    workers: usize,
    dynamic_version: u64,
) -> Status {
    let listeners = plane
        .listeners()
        .iter()
        .filter_map(|l| {
            let key = BindKey::of(l);
            let route = routing.routes.get(&key)?;
            let mut backends: Vec<BackendStatus> = route
                .backends
                .iter()
                .zip(&l.backends)
                .map(|(h, b)| {
                    let cell = h.health.load();
                    BackendStatus {
                        addr: h.addr,
                        weight: b.weight,
                        healthy: cell.is_up(),
                        last_error: cell.last_error(),
                        active: h.active.load(Ordering::Relaxed),
                        draining: false,
                    }
                })
                .collect();
            backends.extend(plane.draining().filter(|(k, _)| **k == key).map(|(_, h)| {
                BackendStatus {
                    addr: h.addr,
                    weight: 0,
                    healthy: h.health.load().is_up(),
                    last_error: h.health.load().last_error(),
                    active: h.active.load(Ordering::Relaxed),
                    draining: true,
                }
            }));
            Some(ListenerStatus {
                name: l.name.clone(),
                bind: plane.bound_addr(&key).unwrap_or(l.bind),
                protocol: l.protocol,
                active: route.stats.active.load(Ordering::Relaxed),
                accepted: route.stats.totals().accepted,
                backends,
            })
        })
        .collect();
    Status {
        engine: engine.name().to_owned(),
        workers,
        generation: routing.generation,
        dynamic_version,
        listeners,
        drain: None,
        announce: None,
    }
}
