//! The scrape-time collector: reads the routing snapshot, the plane's
//! draining handles and health cells, and the per-worker counters, and
//! turns them into metric families. Nothing here is on the data path.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts};

use crate::engine::EngineKind;
use crate::plane::Plane;
use crate::routing::ConnectError;
use crate::stats::{Reject, UdpDrop};
use crate::worker::Shared;

/// What the collector reads: the data plane's shared state and the plane
/// (draining handles, health cells), and what the `weir_info` line says.
pub struct DataPlaneView {
    /// What workers share (the routing snapshot, per-worker counters).
    pub shared: Arc<Shared>,
    /// The plane, for draining backends and health cells.
    pub plane: Arc<Mutex<Plane>>,
    /// Engine in use.
    pub engine: EngineKind,
    /// Worker count.
    pub workers: usize,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("static metric")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric")
}

impl Collector for DataPlaneView {
    /// Families vary with the configuration, so none is declared up front
    /// (an unchecked collector, as prometheus allows).
    fn desc(&self) -> Vec<&Desc> {
        Vec::new()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        collect(self)
    }
}

fn collect(view: &DataPlaneView) -> Vec<MetricFamily> {
    let accepted = counter(
        "weir_connections_accepted_total",
        "TCP connections accepted, by listener.",
        &["listener"],
    );
    let rejected = counter(
        "weir_connections_rejected_total",
        "TCP connections refused, by listener and reason (limit, source_range, no_backend).",
        &["listener", "reason"],
    );
    let active = gauge(
        "weir_connections_active",
        "TCP connections open now, by listener.",
        &["listener"],
    );
    let bytes = counter(
        "weir_bytes_total",
        "Bytes forwarded, by listener and direction (to_backend, to_client).",
        &["listener", "direction"],
    );
    let b_active = gauge(
        "weir_backend_connections_active",
        "Connections open to a backend now.",
        &["listener", "backend"],
    );
    let b_total = counter(
        "weir_backend_connections_total",
        "Connections made to a backend.",
        &["listener", "backend"],
    );
    let b_errors = counter(
        "weir_backend_connect_errors_total",
        "Failed connect attempts to a backend, by reason (refused, timeout, local, other).",
        &["listener", "backend", "reason"],
    );
    let b_up = gauge(
        "weir_backend_up",
        "1 when the backend is healthy, 0 when down.",
        &["listener", "backend"],
    );
    let b_draining = gauge(
        "weir_backend_draining",
        "1 for a removed backend whose connections are draining.",
        &["listener", "backend"],
    );
    let checks = counter(
        "weir_health_checks_total",
        "Active health check results, by probed target, check kind and result (ok, fail, not_run: no descriptor or buffer here, so no result).",
        &["target", "kind", "result"],
    );
    let passive = counter(
        "weir_health_passive_failures_total",
        "Failed connects counted as health evidence, by probed target.",
        &["target", "kind"],
    );
    let global = IntGauge::new(
        "weir_connections_active_all",
        "TCP connections open now, all listeners.",
    )
    .expect("static metric");
    let buffers = IntGauge::new(
        "weir_buffer_bytes_held",
        "Forwarding buffer bytes held by connections now (idle connections hold none on epoll, 2 KiB per direction on io_uring).",
    )
    .expect("static metric");
    let pipes = gauge(
        "weir_splice_pipes",
        "Kernel pipes for bulk transfers (two descriptors each), by state: leased (moving a transfer now) or idle (kept for the next).",
        &["state"],
    );
    let per_worker = gauge(
        "weir_worker_connections",
        "TCP connections each worker serves now; the kernel spreads accepts over the workers, and a worker clearly ahead hands new ones to the least loaded.",
        &["worker"],
    );
    let handed_off = counter(
        "weir_worker_handoffs_total",
        "TCP connections a worker accepted and handed to a less loaded worker.",
        &["worker"],
    );
    let info = gauge(
        "weir_info",
        "Engine and worker count of this lbd.",
        &["engine", "workers", "version"],
    );

    let datagrams = counter(
        "weir_udp_datagrams_total",
        "UDP datagrams forwarded, by listener and direction (to_backend, to_client).",
        &["listener", "direction"],
    );
    let flows_created = counter(
        "weir_udp_flows_created_total",
        "UDP flows opened, by listener.",
        &["listener"],
    );
    let flows_expired = counter(
        "weir_udp_flows_expired_total",
        "UDP flows closed (idle, drained or re-picked), by listener.",
        &["listener"],
    );
    let flows_active = gauge(
        "weir_udp_flows_active",
        "UDP flows open now, by listener.",
        &["listener"],
    );
    let udp_drops = counter(
        "weir_udp_drops_total",
        "UDP datagrams dropped, by listener and reason (flow_limit, no_backend, truncated, source_range).",
        &["listener", "reason"],
    );
    let routing = view.shared.routing.load();
    for route in routing.routes.values() {
        let name = route.listener.name.as_str();
        let t = route.stats.totals();
        for b in &route.backends {
            let addr = b.addr.to_string();
            let labels = [name, addr.as_str()];
            b_active
                .with_label_values(&labels)
                .set(b.active.load(Ordering::Relaxed) as i64);
            b_total
                .with_label_values(&labels)
                .inc_by(b.total.load(Ordering::Relaxed));
            for (i, e) in ConnectError::ALL.iter().enumerate() {
                b_errors
                    .with_label_values(&[name, addr.as_str(), e.label()])
                    .inc_by(b.connect_errors[i].load(Ordering::Relaxed));
            }
            b_up.with_label_values(&labels)
                .set(i64::from(b.health.load().is_up()));
            b_draining.with_label_values(&labels).set(0);
        }
        if route.listener.protocol == lb_config::Protocol::Udp {
            datagrams
                .with_label_values(&[name, "to_backend"])
                .inc_by(t.datagrams_to_backend);
            datagrams
                .with_label_values(&[name, "to_client"])
                .inc_by(t.datagrams_to_client);
            flows_created
                .with_label_values(&[name])
                .inc_by(t.flows_created);
            flows_expired
                .with_label_values(&[name])
                .inc_by(t.flows_expired);
            flows_active
                .with_label_values(&[name])
                .set(route.stats.active.load(Ordering::Relaxed) as i64);
            for (i, d) in UdpDrop::ALL.iter().enumerate() {
                udp_drops
                    .with_label_values(&[name, d.label()])
                    .inc_by(t.udp_drops[i]);
            }
            bytes
                .with_label_values(&[name, "to_backend"])
                .inc_by(t.bytes_to_backend);
            bytes
                .with_label_values(&[name, "to_client"])
                .inc_by(t.bytes_to_client);
            continue;
        }
        accepted.with_label_values(&[name]).inc_by(t.accepted);
        for (i, r) in Reject::ALL.iter().enumerate() {
            rejected
                .with_label_values(&[name, r.label()])
                .inc_by(t.rejected[i]);
        }
        active
            .with_label_values(&[name])
            .set(route.stats.active.load(Ordering::Relaxed) as i64);
        bytes
            .with_label_values(&[name, "to_backend"])
            .inc_by(t.bytes_to_backend);
        bytes
            .with_label_values(&[name, "to_client"])
            .inc_by(t.bytes_to_client);
    }
    if let Ok(plane) = view.plane.lock() {
        let names: std::collections::HashMap<_, _> = routing
            .routes
            .iter()
            .map(|(k, r)| (*k, r.listener.name.clone()))
            .collect();
        for (key, h) in plane.draining() {
            let name = names
                .get(key)
                .cloned()
                .unwrap_or_else(|| format!("removed:{}", key.addr));
            let addr = h.addr.to_string();
            b_draining.with_label_values(&[&name, &addr]).set(1);
            b_active
                .with_label_values(&[&name, &addr])
                .set(h.active.load(Ordering::Relaxed) as i64);
        }
        for cell in plane.health().cells() {
            let target = cell.key.target.to_string();
            let kind = format!("{:?}", cell.key.check.kind).to_lowercase();
            checks
                .with_label_values(&[&target, &kind, "ok"])
                .inc_by(cell.checks_ok.load(Ordering::Relaxed));
            checks
                .with_label_values(&[&target, &kind, "fail"])
                .inc_by(cell.checks_failed.load(Ordering::Relaxed));
            checks
                .with_label_values(&[&target, &kind, "not_run"])
                .inc_by(cell.checks_local.load(Ordering::Relaxed));
            passive
                .with_label_values(&[&target, &kind])
                .inc_by(cell.passive_failures.load(Ordering::Relaxed));
        }
    }
    global.set(view.shared.active_total.load(Ordering::Relaxed) as i64);
    buffers.set(crate::stats::sum(&view.shared.buffer_bytes) as i64);
    let open = crate::stats::sum(&view.shared.pipes_open);
    let idle = crate::stats::sum(&view.shared.pipes_idle);
    pipes
        .with_label_values(&["leased"])
        .set(open.saturating_sub(idle) as i64);
    pipes.with_label_values(&["idle"]).set(idle as i64);
    let workers = view
        .shared
        .worker_conns
        .iter()
        .zip(&*view.shared.handed_off);
    for (id, (conns, handed)) in workers.enumerate() {
        let id = id.to_string();
        per_worker
            .with_label_values(&[&id])
            .set(conns.0.load(Ordering::Relaxed) as i64);
        handed_off
            .with_label_values(&[&id])
            .inc_by(handed.0.load(Ordering::Relaxed));
    }
    info.with_label_values(&[
        view.engine.name(),
        &view.workers.to_string(),
        env!("CARGO_PKG_VERSION"),
    ])
    .set(1);

    let mut out = Vec::new();
    for c in [
        &accepted,
        &rejected,
        &bytes,
        &b_total,
        &b_errors,
        &checks,
        &passive,
        &datagrams,
        &flows_created,
        &flows_expired,
        &udp_drops,
        &handed_off,
    ] {
        out.extend(c.collect());
    }
    for g in [
        &active,
        &b_active,
        &b_up,
        &b_draining,
        &info,
        &flows_active,
        &pipes,
        &per_worker,
    ] {
        out.extend(g.collect());
    }
    out.extend(global.collect());
    out.extend(buffers.collect());
    out
}
