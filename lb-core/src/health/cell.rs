//! The health of one probed target, shared by every backend handle that
//! points at it: an atomic flag workers read, and the machine that active
//! checks and passive evidence (failed connects) feed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use lb_config::{HealthCheck, HealthKind};

use super::machine::{Health, HealthMachine};

/// Identity of a prober: what is probed and how.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProbeKey {
    /// The probed address (backend IP, backend or override port).
    pub target: SocketAddr,
    /// The check.
    pub check: HealthCheck,
}

/// The shared health of one probed target.
#[derive(Debug)]
pub struct HealthCell {
    /// What is probed.
    pub key: ProbeKey,
    up: AtomicBool,
    machine: Mutex<HealthMachine>,
    last_error: Mutex<Option<String>>,
    /// Successful active checks.
    pub checks_ok: AtomicU64,
    /// Failed active checks.
    pub checks_failed: AtomicU64,
    /// Failed connects seen by workers (passive evidence).
    pub passive_failures: AtomicU64,
    /// Checks that could not run for lack of resources on this host.
    pub checks_local: AtomicU64,
}

impl HealthCell {
    /// A new cell, up and unconfirmed (see [`machine`]).
    pub fn new(key: ProbeKey, now: Instant) -> Self {
        let machine = HealthMachine::new(key.check.rise, key.check.fall, now);
        Self {
            key,
            up: AtomicBool::new(true),
            machine: Mutex::new(machine),
            last_error: Mutex::new(None),
            checks_ok: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            passive_failures: AtomicU64::new(0),
            checks_local: AtomicU64::new(0),
        }
    }

    /// Whether the target takes new connections. Lock-free.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The last check error, if the last result was a failure.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Records an active check result.
    pub fn record(&self, result: Result<(), String>, now: Instant) {
        match &result {
            Ok(()) => self.checks_ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.checks_failed.fetch_add(1, Ordering::Relaxed),
        };
        self.observe(result, now, "check");
    }

    /// Counts a check that could not run here (no result recorded).
    pub fn count_local_failure(&self) {
        self.checks_local.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a failed connect from the data path. Ignored when the check
    /// kind is `none`: nothing active would ever bring the target back.
    pub fn passive_failure(&self, error: String, now: Instant) {
        self.passive_failures.fetch_add(1, Ordering::Relaxed);
        if self.key.check.kind != HealthKind::None {
            self.observe(Err(error), now, "connect");
        }
    }

    fn observe(&self, result: Result<(), String>, now: Instant, source: &str) {
        let Ok(mut m) = self.machine.lock() else {
            return;
        };
        let ok = result.is_ok();
        if let Ok(mut last) = self.last_error.lock() {
            *last = result.err();
        }
        if let Some(t) = m.observe(ok, now) {
            let up = t.to == Health::Up;
            self.up.store(up, Ordering::Relaxed);
            let target = self.key.target;
            let kind = self.key.check.kind;
            if up {
                tracing::info!(%target, ?kind, "backend up");
            } else {
                let error = self.last_error().unwrap_or_default();
                tracing::warn!(%target, ?kind, %source, %error, "backend down");
            }
        }
    }
}
