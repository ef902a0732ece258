//! Prometheus metrics. Data-path counters live in per-worker and per-handle
//! atomics; a collector ([`scrape`]) reads and sums them at scrape time, so
//! the data path never takes a lock or touches a metric family. The
//! control side's own metrics (reloads, API requests) are registered here.

mod scrape;

pub use scrape::DataPlaneView;

use prometheus::core::Collector;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Registered metrics of one server. Cloning shares them.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Configuration reloads by result (`applied`, `rejected`).
    pub reloads: IntCounterVec,
    /// Generation of the applied configuration.
    pub generation: IntGauge,
    /// Version of the dynamic state in force.
    pub dynamic_version: IntGauge,
    /// What the control API counts.
    pub api: ApiMetrics,
    /// Times the control API's threads were raised from idle priority
    /// because the host left them no CPU (`server::priority`).
    pub admin_raises: IntCounter,
}

/// The control API's metrics.
#[derive(Clone)]
pub struct ApiMetrics {
    /// Control API requests by endpoint and status code.
    pub requests: IntCounterVec,
    /// `PUT /v1/state` outcomes (`applied`, `conflict`, `invalid`, `error`).
    pub applies: IntCounterVec,
    /// Time to validate, apply and persist a dynamic state.
    pub apply_seconds: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Creates the registry with the control side's metrics; the data
    /// plane's are added by [`Metrics::attach`].
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
        let admin_raises = IntCounter::new(
            "weir_admin_priority_raises_total",
            "Times the control API and metrics threads were raised from idle priority because the host left them no CPU for 250 ms (each raise lasts 10 s).",
        )
        .expect("static metric");
        let collectors: [Box<dyn Collector>; 7] = [
            Box::new(reloads.clone()),
            Box::new(generation.clone()),
            Box::new(api_requests.clone()),
            Box::new(applies.clone()),
            Box::new(apply_seconds.clone()),
            Box::new(dynamic_version.clone()),
            Box::new(admin_raises.clone()),
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
            dynamic_version,
            api: ApiMetrics {
                requests: api_requests,
                applies,
                apply_seconds,
            },
            admin_raises,
        }
    }

    /// Registers the scrape-time collector over the data plane.
    pub fn attach(&self, view: DataPlaneView) {
        let _ = self.registry.register(Box::new(view));
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
