//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoint.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
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

/// Connections the metrics endpoint serves at once; one more is closed at
/// once, so idle or slow clients cannot make it hold more.
pub const MAX_CONNECTIONS: usize = 128;
/// How long a client has to send its request head.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long accepting pauses after an error (out of descriptors, ...),
/// instead of spinning.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Serves `/metrics`, `/healthz` (alive) and `/readyz` (caches synced and
/// leading, or standing by) on `addr`; returns the bound address. At most
/// [`MAX_CONNECTIONS`] at once, each with a deadline for its request head
/// and for the whole exchange.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let open = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed; pausing");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::AcqRel);
                continue; // dropping the stream closes it
            }
            let open = open.clone();
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
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
                open.fetch_sub(1, Ordering::AcqRel);
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn get(addr: SocketAddr, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).await.ok()?;
        let mut text = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            s.read_to_string(&mut text),
        )
        .await
        .ok()?
        .ok()?;
        Some(text)
    }

    /// Idle clients take at most MAX_CONNECTIONS; the next one is closed at
    /// once, and once they leave, scrapes are served again.
    #[tokio::test]
    async fn idle_clients_cannot_make_the_endpoint_hold_more_connections() {
        let ready = Arc::new(AtomicBool::new(true));
        let addr = serve("127.0.0.1:0".parse().unwrap(), Metrics::new(), ready)
            .await
            .unwrap();
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // The server counts a connection when it accepts it: wait until
        // it has taken all of them (a scrape is then refused too).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut extra = loop {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut b = [0u8; 1];
            let read = tokio::time::timeout(std::time::Duration::from_millis(500), s.read(&mut b));
            if let Ok(Ok(0)) = read.await {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "a connection beyond the bound was not closed"
            );
        };
        let mut b = [0u8; 1];
        assert_eq!(extra.read(&mut b).await.unwrap(), 0);
        drop(idle);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if get(addr, "/healthz")
                .await
                .is_some_and(|t| t.starts_with("HTTP/1.1 200"))
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no scrape served after the idle clients left"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
