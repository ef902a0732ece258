//! Prometheus metrics. Data-path counters live in per-worker and per-handle
//! atomics; this collector reads and sums them at scrape time, so the data
//! path never takes a lock or touches a metric family.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::routing::ConnectError;
use crate::server::Inner;
use crate::stats::{Reject, UdpDrop};

/// Registered metrics of one server.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Configuration reloads by result (`applied`, `rejected`).
    pub reloads: IntCounterVec,
    /// Generation of the applied configuration.
    pub generation: IntGauge,
    /// Control API requests by endpoint and status code.
    pub api_requests: IntCounterVec,
    /// `PUT /v1/state` outcomes (`applied`, `conflict`, `invalid`, `error`).
    pub applies: IntCounterVec,
    /// Time to validate, apply and persist a dynamic state.
    pub apply_seconds: Histogram,
    /// Version of the dynamic state in force.
    pub dynamic_version: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Creates the registry; `inner` is read at scrape time.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reloads = IntCounterVec::new(
            Opts::new(
                "weir_config_reloads_total",
                "Configuration reloads by result.",
            ),
            &["result"],
        )
        .expect("static metric");
        let generation = IntGauge::new(
            "weir_config_generation",
            "Generation of the applied configuration (increments per applied change).",
        )
        .expect("static metric");
        let api_requests = IntCounterVec::new(
            Opts::new(
                "weir_api_requests_total",
                "Control API requests by endpoint and status code.",
            ),
            &["endpoint", "code"],
        )
        .expect("static metric");
        let applies = IntCounterVec::new(
            Opts::new(
                "weir_api_applies_total",
                "Dynamic state applies by result (applied, conflict, invalid, error).",
            ),
            &["result"],
        )
        .expect("static metric");
        let apply_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "weir_api_apply_duration_seconds",
                "Time to validate, apply and persist a dynamic state.",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
        )
        .expect("static metric");
        let dynamic_version = IntGauge::new(
            "weir_dynamic_state_version",
            "Version of the dynamic state in force (0 before any).",
        )
        .expect("static metric");
        let collectors: [Box<dyn Collector>; 6] = [
            Box::new(reloads.clone()),
            Box::new(generation.clone()),
            Box::new(api_requests.clone()),
            Box::new(applies.clone()),
            Box::new(apply_seconds.clone()),
            Box::new(dynamic_version.clone()),
        ];
        for c in collectors {
            registry.register(c).expect("unique metric");
        }
        for r in ["applied", "rejected"] {
            reloads.with_label_values(&[r]);
        }
        Self {
            registry,
            reloads,
            generation,
            api_requests,
            applies,
            apply_seconds,
            dynamic_version,
        }
    }

    /// Registers the scrape-time collector over `inner`.
    pub fn attach(&self, inner: Weak<Inner>) {
        let _ = self.registry.register(Box::new(StateCollector {
            inner,
            descs: Vec::new(),
        }));
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

struct StateCollector {
    inner: Weak<Inner>,
    descs: Vec<Desc>,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("static metric")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric")
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(inner) = self.inner.upgrade() else {
            return Vec::new();
        };
        collect(&inner)
    }
}

fn collect(inner: &Arc<Inner>) -> Vec<MetricFamily> {
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
        "Failed connect attempts to a backend, by reason (refused, timeout, other).",
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
        "Active health check results, by probed target, check kind and result (ok, fail).",
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
    let routing = inner.shared.routing.load();
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
    if let Ok(plane) = inner.plane.lock() {
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
            passive
                .with_label_values(&[&target, &kind])
                .inc_by(cell.passive_failures.load(Ordering::Relaxed));
        }
    }
    global.set(inner.shared.active_total.load(Ordering::Relaxed) as i64);
    buffers.set(crate::stats::sum(&inner.shared.buffer_bytes) as i64);
    let open = crate::stats::sum(&inner.shared.pipes_open);
    let idle = crate::stats::sum(&inner.shared.pipes_idle);
    pipes
        .with_label_values(&["leased"])
        .set(open.saturating_sub(idle) as i64);
    pipes.with_label_values(&["idle"]).set(idle as i64);
    let workers = inner
        .shared
        .worker_conns
        .iter()
        .zip(&*inner.shared.handed_off);
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
        inner.engine.name(),
        &inner.workers.to_string(),
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
