//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoint.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::ipam::{Allocator, Family};

/// Every metric the controller exports.
#[derive(Clone)]
pub struct Metrics {
    /// The registry.
    pub registry: Registry,
    /// Addresses per pool and family.
    pub pool_size: IntGaugeVec,
    /// Addresses in use per pool and family.
    pub pool_used: IntGaugeVec,
    /// Addresses given to Services.
    pub allocations: IntCounter,
    /// Refused allocations.
    pub allocation_failures: IntCounter,
    /// Reconciles run.
    pub reconciles: IntCounter,
    /// Reconciles that failed (and were retried).
    pub reconcile_errors: IntCounter,
    /// Per forwarder: acknowledged version.
    pub acked_version: IntGaugeVec,
    /// Per forwarder: failed publishes.
    pub publish_errors: IntCounterVec,
    /// The version of the desired state.
    pub desired_version: IntGauge,
    /// 1 while this instance leads.
    pub leader: IntGauge,
    /// Managed Services holding addresses.
    pub services: IntGauge,
    /// Per forwarder: 1 while the leader's readiness probes find it up
    /// (L2 pools only).
    pub forwarder_ready: IntGaugeVec,
    /// L2 owners chosen for new VIPs (`chosen`) and VIPs moved (`moved`).
    pub l2_owner_changes: IntCounterVec,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let publish_errors = IntCounterVec::new(
            Opts::new(
                "weir_controller_publish_errors_total",
                "Failed publishes per forwarder (unreachable, rejected, stale).",
            ),
            &["forwarder"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(publish_errors.clone()))
            .expect("unique metric");
        let l2_owner_changes = IntCounterVec::new(
            Opts::new(
                "weir_controller_l2_owner_changes_total",
                "L2 VIPs given an owner: chosen (a new VIP) or moved (its owner was down or left).",
            ),
            &["change"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(l2_owner_changes.clone()))
            .expect("unique metric");
        Self {
            pool_size: gauge_vec(
                "weir_controller_pool_addresses",
                "Addresses in the pool (after avoid_buggy_ips).",
                &["pool", "family"],
            ),
            pool_used: gauge_vec(
                "weir_controller_pool_addresses_used",
                "Addresses of the pool held by Services.",
                &["pool", "family"],
            ),
            allocations: counter(
                "weir_controller_allocations_total",
                "Addresses assigned to Services.",
            ),
            allocation_failures: counter(
                "weir_controller_allocation_failures_total",
                "Allocation requests refused (exhausted pool, bad request, conflict).",
            ),
            reconciles: counter("weir_controller_reconciles_total", "Service reconciles."),
            reconcile_errors: counter(
                "weir_controller_reconcile_errors_total",
                "Service reconciles that failed and were retried.",
            ),
            acked_version: gauge_vec(
                "weir_controller_forwarder_acked_version",
                "Desired-state version each forwarder acknowledged.",
                &["forwarder"],
            ),
            publish_errors,
            desired_version: gauge(
                "weir_controller_desired_version",
                "Version of the desired forwarder state.",
            ),
            leader: gauge(
                "weir_controller_leader",
                "1 while this instance holds the Lease.",
            ),
            services: gauge(
                "weir_controller_services",
                "Managed Services that hold addresses.",
            ),
            forwarder_ready: gauge_vec(
                "weir_controller_forwarder_ready",
                "1 while the leader's readiness probes find the forwarder up (L2 pools only).",
                &["forwarder"],
            ),
            l2_owner_changes,
            registry,
        }
    }

    /// Sets the size and use of every pool of `allocator`, per family.
    pub fn set_pool_usage(&self, allocator: &Allocator) {
        for pool in allocator.pools() {
            for (family, label) in [(Family::V4, "ipv4"), (Family::V6, "ipv6")] {
                if let Some((size, used)) = allocator.usage(&pool.name, family) {
                    self.pool_size
                        .with_label_values(&[&pool.name, label])
                        .set(size.min(i64::MAX as u64) as i64);
                    self.pool_used
                        .with_label_values(&[&pool.name, label])
                        .set(used.min(i64::MAX as u64) as i64);
                }
            }
        }
    }

    fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/metrics`, `/healthz` (alive) and `/readyz` (caches synced and
/// leading, or standing by) on `addr`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let (code, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, metrics.render()),
                        "/healthz" => (StatusCode::OK, b"ok\n".to_vec()),
                        "/readyz" if ready.load(Ordering::Acquire) => {
                            (StatusCode::OK, b"ready\n".to_vec())
                        }
                        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, b"not ready\n".to_vec()),
                        _ => (StatusCode::NOT_FOUND, b"not found\n".to_vec()),
                    };
                    let resp = Response::builder()
                        .status(code)
                        .header("content-type", "text/plain; version=0.0.4")
                        .body(Full::new(Bytes::from(body)))
                        .expect("static response");
                    async move { Ok::<_, Infallible>(resp) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
            });
        }
    });
    Ok(bound)
}
