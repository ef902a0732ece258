//! The leader's readiness probes of the forwarders, for L2 ownership: each
//! forwarder's control API `GET /readyz` every `l2.probe_interval`, folded
//! by [`Liveness`]; a forwarder going down or up asks for a new state (the
//! ledger's [`Book`](crate::l2::Book) moves what must move).
//!
//! The probes are also how an `lbd` knows the controller can reach it:
//! one that hears none for its lease counts itself cut off.

use std::time::Duration;

use hyper::{Method, StatusCode};
use lb_api::client::{self, Target};
use tokio::time::MissedTickBehavior;

use super::state::State;
use crate::config::{Config, Forwarder};
use crate::l2::owners::{Liveness, Probe};
use crate::metrics::Metrics;
use crate::publish;

/// Starts one probe loop per forwarder (when some pool is `l2`).
pub(super) fn spawn(cfg: &Config, state: &State, metrics: &Metrics) {
    if !cfg.l2.enabled() {
        return;
    }
    for f in &cfg.forwarders {
        let ready = metrics.forwarder_ready.with_label_values(&[&f.name]);
        ready.set(1);
        tokio::spawn(probe_loop(
            f.clone(),
            cfg.l2.probe_interval,
            cfg.l2.probe_failures,
            state.clone(),
            ready,
        ));
    }
}

/// One probe through `target`, answered within `timeout`: 200 is ready,
/// 503 is not ready (a draining or starting `lbd`), anything else (a
/// refused token, a server error, no answer) is a miss.
async fn probe(target: &Target, timeout: Duration) -> Probe {
    match tokio::time::timeout(timeout, client::send(target, Method::GET, "/readyz", None)).await {
        Err(_) => Probe::Missed(format!("no answer within {timeout:?}")),
        Ok(Err(e)) => Probe::Missed(e.to_string()),
        Ok(Ok((StatusCode::OK, _))) => Probe::Ready,
        Ok(Ok((StatusCode::SERVICE_UNAVAILABLE, _))) => Probe::NotReady("503".into()),
        Ok(Ok((status, _))) => Probe::Missed(format!("GET /readyz: {status}")),
    }
}

async fn probe_loop(
    f: Forwarder,
    interval: Duration,
    failures: u32,
    state: State,
    ready: prometheus::IntGauge,
) {
    let mut liveness = Liveness::new(failures);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The target (its token and CA read from files) is built once, and
    // again after a miss (a rotated token).
    let mut target: Option<Target> = None;
    loop {
        tick.tick().await;
        let seen = match &target {
            Some(t) => probe(t, interval).await,
            None => match publish::target(&f) {
                Ok(t) => probe(target.insert(t), interval).await,
                Err(e) => Probe::Missed(e.to_string()),
            },
        };
        if matches!(seen, Probe::Missed(_)) {
            target = None;
        }
        if liveness.observe(&seen) {
            let up = liveness.up();
            ready.set(i64::from(up));
            if up {
                tracing::info!(forwarder = %f.name, "forwarder ready again: it may own L2 VIPs");
            } else {
                tracing::warn!(forwarder = %f.name, why = ?liveness.why, "forwarder down: its L2 VIPs move");
            }
            let changed = state.lock().l2_set_live(&f.name, up, liveness.why.clone());
            if changed {
                state.rebuild();
            }
        }
    }
}
