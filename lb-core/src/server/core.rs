//! The state of a running `lbd` behind its surfaces: where listeners come
//! from, the plane that runs them, and the persisted dynamic state. Every
//! apply (the file at start, a reload, a `PUT /v1/state`, the persisted
//! state at start) goes through here, one at a time (the sources' lock).
//!
//! A dynamic state is validated, its new sockets are bound, it is
//! persisted, and only then published: a state that was not persisted is
//! never in force, and a failure at any step changes nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lb_api::wire::Status;
use lb_config::{Config, ConfigErrors, DesiredState, FieldError, Listener};

use super::persist;
use super::sources::{Admitted, Sources};
use crate::admin::control::{ControlApi, PutError};
use crate::engine::EngineKind;
use crate::lock;
use crate::metrics::Metrics;
use crate::plane::{Applied, ApplyError, Plane, Prepared};
use crate::routing::BindKey;
use crate::worker::Shared;

/// Why a reload was rejected. The running configuration is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file is invalid.
    #[error("invalid configuration:\n{0}")]
    Invalid(ConfigErrors),
    /// The configuration is valid but could not be applied.
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// How long a start waits for another socket to let go of a listener's
/// address (see [`Core::prepare_at_start`]) before it gives up.
const START_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A running `lbd`'s sources, plane and persisted state.
pub struct Core {
    plane: Arc<Mutex<Plane>>,
    sources: Mutex<Sources>,
    /// Where accepted dynamic states are persisted (`None`: no control API).
    state_dir: Option<PathBuf>,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    shared: Arc<Shared>,
    engine: EngineKind,
    workers: usize,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("engine", &self.engine)
            .field("workers", &self.workers)
            .finish()
    }
}

/// What a [`Core`] is made of.
pub struct Parts {
    /// The plane, shared with the metrics collector.
    pub plane: Arc<Mutex<Plane>>,
    /// The file in force.
    pub file: Config,
    /// See [`Core`].
    pub state_dir: Option<PathBuf>,
    /// The registry.
    pub metrics: Metrics,
    /// Readiness, shared with the metrics endpoint.
    pub ready: Arc<AtomicBool>,
    /// What workers share.
    pub shared: Arc<Shared>,
    /// Engine in use.
    pub engine: EngineKind,
    /// Worker count.
    pub workers: usize,
}

impl Core {
    /// A core with the file's sources and nothing applied yet.
    pub fn new(parts: Parts) -> Self {
        Self {
            plane: parts.plane,
            sources: Mutex::new(Sources::new(parts.file)),
            state_dir: parts.state_dir,
            metrics: parts.metrics,
            ready: parts.ready,
            shared: parts.shared,
            engine: parts.engine,
            workers: parts.workers,
        }
    }

    /// The plane, held weakly: what the systemd watchdog asks the workers
    /// through, without keeping a stopped server alive.
    pub fn plane_weak(&self) -> std::sync::Weak<Mutex<Plane>> {
        Arc::downgrade(&self.plane)
    }

    /// The plane, locked (status, metrics, shutdown).
    pub fn plane(&self) -> MutexGuard<'_, Plane> {
        lock(&self.plane)
    }

    /// What workers share.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Marks the server ready or not (`/readyz`).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    fn prepare(&self, all: &[Listener]) -> Result<Prepared, ApplyError> {
        self.plane().prepare(all)
    }

    /// [`Core::prepare`] at start, when a listener's address may still be
    /// held by the `lbd` this one replaces: a predecessor killed with
    /// SIGKILL lets go of its listening sockets only once the kernel has
    /// torn down its io_uring instances, some milliseconds after it is
    /// gone (`lb-bench chaos` restarted lbd within 10 ms and found them).
    /// Retries while another socket holds an address, for [`START_WAIT`].
    fn prepare_at_start(&self, all: &[Listener]) -> Result<Prepared, ApplyError> {
        let deadline = std::time::Instant::now() + START_WAIT;
        loop {
            match self.prepare(all) {
                Err(ApplyError::Shared { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                result => return result,
            }
        }
    }

    fn commit(&self, prepared: Prepared) -> Applied {
        let applied = self.plane().commit(prepared);
        self.metrics.generation.set(applied.generation as i64);
        applied
    }

    /// Applies the file's listeners (at start).
    pub fn apply_file(&self) -> Result<Applied, ApplyError> {
        let src = lock(&self.sources);
        let prepared = self.prepare_at_start(&src.all(&[]))?;
        Ok(self.commit(prepared))
    }

    /// Applies a new configuration file (a reload). On error the running
    /// configuration stays, and the rejection is logged and counted.
    pub fn reload(&self, config: &Config) -> Result<Applied, ReloadError> {
        let mut src = lock(&self.sources);
        let result = match src.check_file(config) {
            Err(clash) => Err(ReloadError::Invalid(ConfigErrors(clash))),
            Ok(()) => {
                let all: Vec<Listener> = config
                    .listeners
                    .iter()
                    .chain(&src.dynamic_listeners)
                    .cloned()
                    .collect();
                self.prepare(&all).map_err(ReloadError::Apply)
            }
        };
        let prepared = match result {
            Ok(p) => p,
            Err(e) => return Err(self.rejected(e)),
        };
        let applied = self.commit(prepared);
        if config.runtime != src.file.runtime
            || config.admin != src.file.admin
            || config.announce != src.file.announce
        {
            tracing::warn!(
                "[runtime], [admin] or [announce] changed: those take effect at the next restart"
            );
        }
        src.file = config.clone();
        self.metrics.reloads.with_label_values(&["applied"]).inc();
        tracing::info!(
            generation = applied.generation,
            added = applied.added,
            removed = applied.removed,
            draining = applied.draining,
            "reload applied"
        );
        Ok(applied)
    }

    /// Counts and logs a rejected reload.
    pub fn rejected(&self, e: ReloadError) -> ReloadError {
        self.metrics.reloads.with_label_values(&["rejected"]).inc();
        tracing::error!(error = %e, "reload rejected; the running configuration stays");
        e
    }

    /// Records `state` (already applied) as the dynamic state in force.
    fn commit_dynamic(&self, src: &mut Sources, state: DesiredState, listeners: Vec<Listener>) {
        self.metrics.dynamic_version.set(state.version as i64);
        src.dynamic = state;
        src.dynamic_listeners = listeners;
    }

    /// Loads the persisted dynamic state at start; anything unusable is
    /// moved aside and `lbd` starts with its static listeners.
    pub fn load_persisted(&self) {
        let Some(dir) = &self.state_dir else { return };
        let state = match persist::load(dir) {
            persist::Loaded::Missing => return,
            persist::Loaded::MovedAside { to, reason } => {
                tracing::error!(file = %to.display(), %reason, "persisted state unusable, moved aside; serving static listeners only");
                return;
            }
            persist::Loaded::Found(s) => s,
        };
        let mut src = lock(&self.sources);
        let listeners = match src.resolve_dynamic(&state) {
            Ok(l) => l,
            Err(errors) => {
                let reason = errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                if let persist::Loaded::MovedAside { to, .. } =
                    persist::move_aside(dir, reason.clone())
                {
                    tracing::error!(file = %to.display(), %reason, "persisted state invalid, moved aside");
                }
                return;
            }
        };
        match self.prepare_at_start(&src.all(&listeners)) {
            Ok(prepared) => {
                self.commit(prepared);
                tracing::info!(
                    version = state.version,
                    listeners = listeners.len(),
                    "persisted dynamic state applied"
                );
                self.commit_dynamic(&mut src, state, listeners);
            }
            Err(e) => {
                tracing::error!(error = %e, "persisted dynamic state not applied; serving static listeners only")
            }
        }
    }

    /// The L2 owner map of the dynamic state in force.
    pub fn l2(&self) -> Option<lb_config::L2State> {
        lock(&self.sources).dynamic.l2.clone()
    }

    /// The address listener `name` is bound to.
    pub fn bound_addr(&self, name: &str) -> Option<SocketAddr> {
        let plane = self.plane();
        let l = plane.listeners().iter().find(|l| l.name == name)?;
        plane.bound_addr(&BindKey::of(l))
    }
}

/// A bind failure of a new dynamic listener, as the 422 names it.
fn bind_error(listeners: &[Listener], e: &ApplyError) -> PutError {
    let name = e.listener();
    let i = listeners.iter().position(|l| l.name == name).unwrap_or(0);
    PutError::Invalid(vec![FieldError::new(
        format!("listeners[{i}].bind"),
        e.to_string(),
    )])
}

impl ControlApi for Core {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn state(&self) -> DesiredState {
        lock(&self.sources).dynamic.clone()
    }

    fn status(&self) -> Status {
        let version = lock(&self.sources).dynamic.version;
        let routing = self.shared.routing.load();
        super::status::status(&self.plane(), &routing, self.engine, self.workers, version)
    }

    fn put_state(&self, state: DesiredState) -> Result<u64, PutError> {
        let mut src = lock(&self.sources);
        let listeners = match src.admit(&state)? {
            Admitted::Same(version) => return Ok(version),
            Admitted::New(listeners) => listeners,
        };
        let prepared = self
            .prepare(&src.all(&listeners))
            .map_err(|e| bind_error(&listeners, &e))?;
        if let Some(dir) = &self.state_dir {
            if let Err(e) = persist::save(dir, &state) {
                // Dropping `prepared` closes its sockets: nothing changed.
                tracing::error!(error = %e, dir = %dir.display(), "cannot persist the dynamic state; not applied");
                return Err(PutError::Persist(e));
            }
        }
        self.commit(prepared);
        tracing::info!(
            version = state.version,
            listeners = listeners.len(),
            "dynamic state applied"
        );
        let version = state.version;
        self.commit_dynamic(&mut src, state, listeners);
        Ok(version)
    }
}
