//! The probers: one per distinct (target, check), started when a backend
//! first needs it and stopped when no listener does.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use lb_config::{HealthCheck, HealthKind};
use tokio::task::AbortHandle;

use super::cell::{HealthCell, ProbeKey};
use super::probe::run_prober;

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
