//! Health: the pure [`machine`], the probes, and the registry that runs one
//! prober per distinct (target address, check) however many listeners share
//! it. Workers only read an atomic flag; failed connects feed the same
//! machine as passive evidence.

pub mod machine;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lb_config::{HealthCheck, HealthKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

use machine::{Health, HealthMachine};

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

/// The set of probers, keyed by [`ProbeKey`].
#[derive(Debug, Default)]
pub struct HealthRegistry {
    cells: HashMap<ProbeKey, (Arc<HealthCell>, Option<AbortHandle>)>,
}

impl HealthRegistry {
    /// The cell for `backend` under `check`, starting its prober on `rt` if new.
    pub fn cell(
        &mut self,
        backend: SocketAddr,
        check: &HealthCheck,
        rt: &tokio::runtime::Handle,
    ) -> Arc<HealthCell> {
        let key = ProbeKey {
            target: check.target(backend),
            check: check.clone(),
        };
        if let Some((cell, _)) = self.cells.get(&key) {
            return cell.clone();
        }
        let cell = Arc::new(HealthCell::new(key.clone(), Instant::now()));
        let task = (check.kind != HealthKind::None)
            .then(|| rt.spawn(run_prober(cell.clone())).abort_handle());
        self.cells.insert(key, (cell.clone(), task));
        cell
    }

    /// Stops the probers whose key is not in `keep`.
    pub fn retain(&mut self, keep: &HashSet<ProbeKey>) {
        self.cells.retain(|key, (_, task)| {
            let kept = keep.contains(key);
            if !kept {
                if let Some(t) = task {
                    t.abort();
                }
            }
            kept
        });
    }

    /// Every cell (for metrics).
    pub fn cells(&self) -> Vec<Arc<HealthCell>> {
        self.cells.values().map(|(c, _)| c.clone()).collect()
    }
}

impl Drop for HealthRegistry {
    fn drop(&mut self) {
        self.retain(&HashSet::new());
    }
}

async fn run_prober(cell: Arc<HealthCell>) {
    let check = cell.key.check.clone();
    let mut ticker = tokio::time::interval(check.interval.get());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = probe(&check, cell.key.target).await;
        cell.record(result, Instant::now());
    }
}

/// Runs one check against `target`, bounded by the check's timeout.
pub async fn probe(check: &HealthCheck, target: SocketAddr) -> Result<(), String> {
    let work = async {
        let mut stream = TcpStream::connect(target)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if check.kind != HealthKind::Http {
            return Ok(());
        }
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: weir-lbd-health\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            check.path
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        match parse_status(&head) {
            Some(code) if (200..400).contains(&code) => Ok(()),
            Some(code) => Err(format!("HTTP status {code}")),
            None => Err("no HTTP status line in the reply".to_owned()),
        }
    };
    match tokio::time::timeout(check.timeout.get(), work).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {}", check.timeout)),
    }
}

/// The status code of an HTTP/1.x status line.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_ascii_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(parse_status(b"HTTP/1.1 302\r\n"), Some(302));
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b"HTTP/1.1 2000 OK\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }
}
