//! How much of each fault a chaos run injects and the load it holds
//! meanwhile: the command line's figures in one value that every scenario
//! reads. Nothing here acts.

use std::time::Duration;

/// Counts and sizes of one run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// `PUT /v1/state` requests in the applies scenario.
    pub applies: usize,
    /// Reloads (SIGHUP) in the reload scenario.
    pub sighups: usize,
    /// Slow and idle clients on each control surface (unix socket, TLS).
    pub control_clients: usize,
    /// How long the control flood lasts.
    pub control_seconds: u64,
    /// Flow cap of the flooded UDP listener.
    pub flow_cap: u32,
    /// How long the UDP flood lasts.
    pub udp_seconds: u64,
    /// `kill -9` and restarts of lbd in the restart scenario.
    pub kills: usize,
    /// The open-files limit lbd gets in the fd exhaustion scenario.
    pub nofile: u64,
    /// New connections per second the steady load asks for.
    pub rate: f64,
    /// Connections the steady load keeps in flight at most.
    pub concurrency: usize,
    /// lbd's workers.
    pub workers: usize,
    /// Load held before a fault and after recovery (steady phases).
    pub settle: Duration,
}

/// How long a client waits for a whole answer before it counts a failure.
/// Generous against CPU contention on a small shared machine, short enough
/// that a request lost to a frozen backend is counted within the run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

impl Plan {
    /// The steady load on `target`.
    pub fn steady(&self, target: std::net::SocketAddr) -> super::traffic::Spec {
        super::traffic::Spec {
            target,
            concurrency: self.concurrency,
            rate: self.rate,
            timeout: REQUEST_TIMEOUT,
        }
    }
}

/// One scenario on one engine: the plan, the engine, where its files go,
/// and the lbd binary.
pub struct Case<'a> {
    pub plan: &'a Plan,
    pub engine: &'a str,
    pub dir: std::path::PathBuf,
    pub bin: &'a str,
}

impl Case<'_> {
    /// A new lbd for this case, its files in `dir/name`; not started.
    pub fn lbd(&self, name: &str) -> anyhow::Result<super::rig::Lbd> {
        super::rig::Lbd::new(
            self.bin,
            self.engine,
            self.plan.workers,
            &self.dir.join(name),
        )
    }

    /// A row for this engine.
    pub fn row(&self, scenario: String) -> super::report::Row {
        super::report::Row {
            engine: self.engine.to_owned(),
            scenario,
            load: String::new(),
            faults: String::new(),
            failures: String::new(),
            lost: String::new(),
            ejection: "–".into(),
            expected: String::new(),
            verdict: super::report::Verdict::NotRun,
            figures: serde_json::Value::Null,
        }
    }
}
