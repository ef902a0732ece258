//! The running `lbd`: worker threads, the control runtime (health probes,
//! drain timers, the admin endpoint), reloads and graceful shutdown.
//!
//! The API is blocking on purpose: `main`, signal handling and tests drive
//! it from plain threads, and all async work stays on runtimes it owns.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};

use lb_config::{Config, ConfigErrors, DesiredState, EngineChoice, FieldError, Listener, Protocol};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::engine::{self, epoll::Epoll, uring::IoUring, EngineKind};
use crate::forward::{run_worker, Shared};
use crate::metrics::Metrics;
use crate::plane::{Applied, ApplyError, Plane};
use crate::routing::{BindKey, Routing};

/// Overrides of the file's `[runtime]` (command line, tests).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Engine instead of `runtime.engine`.
    pub engine: Option<EngineChoice>,
    /// Worker count instead of `runtime.workers`.
    pub workers: Option<usize>,
}

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The requested engine is unavailable.
    #[error("engine: {0}")]
    Engine(String),
    /// A runtime or thread could not be created.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The initial configuration could not be applied.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The control API's TLS material or token is unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

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

/// State shared by the server, its admin endpoint and the metrics collector.
pub struct Inner {
    /// What workers read.
    pub shared: Arc<Shared>,
    /// The control side's view.
    pub plane: Mutex<Plane>,
    /// Engine in use.
    pub engine: EngineKind,
    /// Worker count.
    pub workers: usize,
    /// Whether `/readyz` answers 200.
    pub ready: AtomicBool,
    /// The metrics registry.
    pub metrics: Metrics,
    /// The two sources of listeners; its lock also serialises applies.
    sources: Mutex<Sources>,
    /// Where accepted dynamic states are persisted (None: control API off).
    state_dir: Option<PathBuf>,
}

/// Static listeners (the file) and dynamic ones (the control API).
struct Sources {
    file: Config,
    dynamic: DesiredState,
    dynamic_listeners: Vec<Listener>,
}

/// Why a `PUT /v1/state` was refused. Nothing changed.
#[derive(Debug)]
pub enum PutError {
    /// Stale or conflicting version (409).
    Conflict {
        /// The version now applied.
        current: u64,
    },
    /// Invalid content (422), every error with its path.
    Invalid(Vec<FieldError>),
    /// The state could not be written to disk (500); the apply was rolled back.
    Persist(std::io::Error),
}

impl Sources {
    /// Resolves a dynamic state against the file's defaults and checks it
    /// against the file's listeners.
    fn resolve_dynamic(&self, state: &DesiredState) -> Result<Vec<Listener>, Vec<FieldError>> {
        let listeners =
            lb_config::resolve_listeners(&state.listeners, &self.file.defaults, "listeners")?;
        let clash = collisions(&self.file.listeners, &listeners, true);
        if clash.is_empty() {
            Ok(listeners)
        } else {
            Err(clash)
        }
    }
}

/// Names and binds that a static and a dynamic listener share. Paths are
/// on the `side` being changed: `listeners[i]` for an API state,
/// `listener[i]` for a file.
fn collisions(file: &[Listener], dynamic: &[Listener], blame_dynamic: bool) -> Vec<FieldError> {
    let mut out = Vec::new();
    for (i, d) in dynamic.iter().enumerate() {
        for (j, f) in file.iter().enumerate() {
            let (path, other) = if blame_dynamic {
                (
                    format!("listeners[{i}]"),
                    format!(
                        "the static listener[{j}] ({:?}) of the configuration file",
                        f.name
                    ),
                )
            } else {
                (
                    format!("listener[{j}]"),
                    format!(
                        "the dynamic listeners[{i}] ({:?}) set through the control API",
                        d.name
                    ),
                )
            };
            if d.name == f.name {
                out.push(FieldError::new(
                    format!("{path}.name"),
                    format!("{:?} is already the name of {other}", d.name),
                ));
            }
            if d.bind == f.bind && d.protocol == f.protocol {
                out.push(FieldError::new(
                    format!("{path}.bind"),
                    format!("{} is already bound by {other}", d.bind),
                ));
            }
        }
    }
    out
}

impl Inner {
    /// Whether the initial state is applied and listeners bound.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The dynamic state as last accepted.
    pub fn dynamic_state(&self) -> DesiredState {
        self.lock_sources().dynamic.clone()
    }

    /// A snapshot of listeners and backends.
    pub fn status(&self) -> Status {
        let version = self.lock_sources().dynamic.version;
        let mut st = status(self);
        st.dynamic_version = version;
        st
    }

    fn lock_sources(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply_listeners(
        &self,
        file: &[Listener],
        dynamic: &[Listener],
    ) -> Result<Applied, ApplyError> {
        let all: Vec<Listener> = file.iter().chain(dynamic).cloned().collect();
        let mut plane = self.plane.lock().unwrap_or_else(|p| p.into_inner());
        let applied = plane.apply(&all)?;
        self.metrics.generation.set(applied.generation as i64);
        Ok(applied)
    }

    /// Records an applied dynamic state; returns its version.
    fn commit_dynamic(
        &self,
        src: &mut Sources,
        state: DesiredState,
        listeners: Vec<Listener>,
    ) -> u64 {
        self.metrics.dynamic_version.set(state.version as i64);
        src.dynamic = state;
        src.dynamic_listeners = listeners;
        src.dynamic.version
    }

    /// Validates, applies and persists a dynamic state (`PUT /v1/state`).
    pub fn put_state(&self, state: DesiredState) -> Result<u64, PutError> {
        let mut src = self.lock_sources();
        let current = src.dynamic.version;
        if state.version < current || (state.version == current && state != src.dynamic) {
            return Err(PutError::Conflict { current });
        }
        if state.version == current {
            return Ok(current); // the same state again: nothing to do
        }
        let listeners = src.resolve_dynamic(&state).map_err(PutError::Invalid)?;
        self.apply_listeners(&src.file.listeners, &listeners)
            .map_err(|e| {
                let ApplyError::Bind { name, .. } = &e;
                let i = listeners.iter().position(|l| &l.name == name).unwrap_or(0);
                PutError::Invalid(vec![FieldError::new(
                    format!("listeners[{i}].bind"),
                    e.to_string(),
                )])
            })?;
        if let Some(dir) = &self.state_dir {
            if let Err(e) = crate::persist::save(dir, &state) {
                tracing::error!(error = %e, dir = %dir.display(), "cannot persist the dynamic state; rolling back");
                let _ = self.apply_listeners(&src.file.listeners, &src.dynamic_listeners);
                return Err(PutError::Persist(e));
            }
        }
        tracing::info!(
            version = state.version,
            listeners = listeners.len(),
            "dynamic state applied"
        );
        Ok(self.commit_dynamic(&mut src, state, listeners))
    }

    /// Loads the persisted dynamic state at start; anything unusable is
    /// moved aside and `lbd` starts with its static listeners.
    fn load_persisted(&self) {
        let Some(dir) = &self.state_dir else { return };
        let state = match crate::persist::load(dir) {
            crate::persist::Loaded::Missing => return,
            crate::persist::Loaded::MovedAside { to, reason } => {
                tracing::error!(file = %to.display(), %reason, "persisted state unusable, moved aside; serving static listeners only");
                return;
            }
            crate::persist::Loaded::Found(s) => s,
        };
        let mut src = self.lock_sources();
        let resolved = src.resolve_dynamic(&state);
        let listeners = match resolved {
            Ok(l) => l,
            Err(errors) => {
                let reason = errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                if let crate::persist::Loaded::MovedAside { to, .. } =
                    crate::persist::move_aside(dir, reason.clone())
                {
                    tracing::error!(file = %to.display(), %reason, "persisted state invalid, moved aside");
                }
                return;
            }
        };
        match self.apply_listeners(&src.file.listeners, &listeners) {
            Ok(_) => {
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
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("engine", &self.engine)
            .field("workers", &self.workers)
            .finish()
    }
}

/// A running `lbd`.
#[derive(Debug)]
pub struct Server {
    inner: Arc<Inner>,
    rt: Option<tokio::runtime::Runtime>,
    threads: Vec<std::thread::JoinHandle<()>>,
    admin: Option<SocketAddr>,
    control_tcp: Option<SocketAddr>,
}

/// Raises the open-files soft limit to the hard limit; returns the soft limit now in force.
fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if let (Some(cur), max) = (lim.current, lim.maximum) {
        let target = max.unwrap_or(1 << 20).min(1 << 20);
        if target > cur
            && setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(target),
                    maximum: max,
                },
            )
            .is_ok()
        {
            return target;
        }
        return cur;
    }
    1 << 20
}

/// A worker's way to say that its runtime runs.
struct Started(std::sync::mpsc::Sender<std::io::Result<()>>);

impl Started {
    fn running(self) {
        let _ = self.0.send(Ok(()));
    }
}

/// Starts one thread `lbd-worker-{id}` per input, running
/// `body(id, input, started)`, and returns them once every one has called
/// `started.running()` from inside its runtime. A body that returns an
/// error before that, or panics, fails the start (the threads already
/// running stop when their command channels close).
fn spawn_workers<I, F>(
    inputs: Vec<I>,
    body: F,
) -> Result<Vec<std::thread::JoinHandle<()>>, StartError>
where
    I: Send + 'static,
    F: Fn(usize, I, Started) -> std::io::Result<()> + Send + Sync + 'static,
{
    let body = Arc::new(body);
    let mut threads = Vec::with_capacity(inputs.len());
    let mut reports = Vec::with_capacity(inputs.len());
    for (id, input) in inputs.into_iter().enumerate() {
        // One channel per worker: a worker that panics drops its senders,
        // which its receiver sees, whatever the others do.
        let (tx, rx) = std::sync::mpsc::channel();
        reports.push(rx);
        let body = body.clone();
        let thread = std::thread::Builder::new()
            .name(format!("lbd-worker-{id}"))
            .spawn(move || {
                if let Err(e) = body(id, input, Started(tx.clone())) {
                    tracing::error!(worker = id, error = %e, "worker runtime failed");
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(|source| StartError::Io {
                what: "worker thread",
                source,
            })?;
        threads.push(thread);
    }
    for report in reports {
        let source = match report.recv() {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(_) => std::io::Error::other("a worker stopped before its runtime ran"),
        };
        return Err(StartError::Io {
            what: "worker runtime",
            source,
        });
    }
    Ok(threads)
}

impl Server {
    /// Starts workers, applies `config`, and serves the admin endpoint.
    pub fn start(config: &Config, options: &Options) -> Result<Self, StartError> {
        // TLS material and the token are read before anything binds, so a
        // bad file fails the start cleanly.
        let control_tcp = match (
            &config.admin.control_tcp,
            &config.admin.tls_cert,
            &config.admin.tls_key,
            &config.admin.token_file,
        ) {
            (Some(addr), Some(cert), Some(key), Some(token)) => {
                let tls = crate::tls::server_config(
                    Path::new(cert),
                    Path::new(key),
                    config.admin.client_ca.as_deref().map(Path::new),
                )?;
                Some((*addr, tls, crate::tls::Token::load(Path::new(token))?))
            }
            _ => None,
        };
        let choice = options.engine.unwrap_or(config.runtime.engine);
        let chosen = engine::choose(choice).map_err(StartError::Engine)?;
        let engine = chosen.kind;
        if let Some(why) = &chosen.fallback {
            tracing::warn!(reason = %why, "io_uring unsuitable here, using epoll");
        }
        match (&chosen.note, chosen.slow) {
            (Some(note), true) => {
                tracing::warn!(reason = %note, "engine = \"io_uring\" as configured, but replies will be late; \"auto\" would use epoll")
            }
            (Some(note), false) => tracing::info!(engine = engine.name(), "{note}"),
            (None, _) => {}
        }
        let workers = match options.workers.unwrap_or(config.runtime.workers) {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        };
        let nofile = raise_nofile();
        // Splice pipes (two descriptors each) are kept out of the connections' share.
        let pipe_fds = if config.runtime.splice {
            2 * crate::splice::PIPES_PER_WORKER * workers as u64
        } else {
            0
        };
        let max_total = match config.runtime.max_connections {
            // Each proxied connection holds two descriptors; keep some for everything else.
            0 => nofile.saturating_sub(256 + pipe_fds) / 2,
            n => n,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lbd-control")
            .enable_all()
            .build()
            .map_err(|source| StartError::Io {
                what: "control runtime",
                source,
            })?;
        let (handoff, handoffs): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let shared = Arc::new(Shared {
            routing: ArcSwap::from_pointee(Routing::default()),
            active_total: AtomicU64::new(0),
            buffer_bytes: (0..workers).map(|_| Default::default()).collect(),
            pipes_open: (0..workers).map(|_| Default::default()).collect(),
            pipes_idle: (0..workers).map(|_| Default::default()).collect(),
            worker_conns: (0..workers).map(|_| Default::default()).collect(),
            handed_off: (0..workers).map(|_| Default::default()).collect(),
            handoff: handoff.into(),
            max_total: max_total.max(1),
            splice: config.runtime.splice,
        });

        let mut senders = Vec::with_capacity(workers);
        let mut receivers = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            receivers.push(rx);
        }
        let inputs = receivers.into_iter().zip(handoffs).collect();
        let threads = spawn_workers(inputs, {
            let shared = shared.clone();
            move |id, (rx, handoffs), started: Started| {
                let shared = shared.clone();
                let started = move || started.running();
                match engine {
                    EngineKind::IoUring => run_worker::<IoUring>(id, shared, rx, handoffs, started),
                    EngineKind::Epoll => run_worker::<Epoll>(id, shared, rx, handoffs, started),
                }
            }
        })?;

        let plane = Plane::new(shared.clone(), senders, rt.handle().clone());
        let inner = Arc::new(Inner {
            shared,
            plane: Mutex::new(plane),
            engine,
            workers,
            ready: AtomicBool::new(false),
            metrics: Metrics::new(),
            sources: Mutex::new(Sources {
                file: config.clone(),
                dynamic: DesiredState::default(),
                dynamic_listeners: Vec::new(),
            }),
            state_dir: (config.admin.control_socket.is_some()
                || config.admin.control_tcp.is_some())
            .then(|| PathBuf::from(&config.admin.state_dir)),
        });
        inner.metrics.attach(Arc::downgrade(&inner));
        let mut server = Self {
            inner,
            rt: Some(rt),
            threads,
            admin: None,
            control_tcp: None,
        };
        let applied = server.inner.apply_listeners(&config.listeners, &[])?;
        server.inner.load_persisted();
        if let Some((addr, tls, token)) = control_tcp {
            let rt = server.rt.as_ref().expect("runtime lives until drop");
            let bound = rt
                .block_on(crate::control::serve_tls(
                    addr,
                    tls,
                    token,
                    server.inner.clone(),
                ))
                .map_err(|source| StartError::Io {
                    what: "admin.control_tcp bind",
                    source,
                })?;
            server.control_tcp = Some(bound);
        }
        if let Some(path) = &config.admin.control_socket {
            let rt = server.rt.as_ref().expect("runtime lives until drop");
            let _guard = rt.enter();
            rt.block_on(crate::control::serve_unix(
                Path::new(path),
                config.admin.control_socket_group.as_deref(),
                server.inner.clone(),
            ))
            .map_err(|source| StartError::Io {
                what: "admin.control_socket bind",
                source,
            })?;
        }
        if let Some(addr) = config.admin.metrics {
            let rt = server.rt.as_ref().expect("runtime lives until drop");
            let bound = rt
                .block_on(crate::admin::serve(addr, server.inner.clone()))
                .map_err(|source| StartError::Io {
                    what: "admin.metrics bind",
                    source,
                })?;
            server.admin = Some(bound);
        }
        server.inner.ready.store(true, Ordering::Relaxed);
        tracing::info!(
            engine = engine.name(),
            workers,
            max_connections = max_total,
            listeners = config.listeners.len(),
            generation = applied.generation,
            "lbd started"
        );
        Ok(server)
    }

    /// Applies a new configuration file (a reload). On error the running
    /// configuration stays, and the rejection is logged and counted.
    pub fn reload(&self, config: &Config) -> Result<Applied, ReloadError> {
        let mut src = self.inner.lock_sources();
        let clash = collisions(&config.listeners, &src.dynamic_listeners, false);
        if !clash.is_empty() {
            drop(src);
            return Err(self.rejected(ReloadError::Invalid(ConfigErrors(clash))));
        }
        match self
            .inner
            .apply_listeners(&config.listeners, &src.dynamic_listeners)
        {
            Ok(a) => {
                if config.runtime != src.file.runtime || config.admin != src.file.admin {
                    tracing::warn!(
                        "[runtime] or [admin] changed: those take effect at the next restart"
                    );
                }
                src.file = config.clone();
                self.inner
                    .metrics
                    .reloads
                    .with_label_values(&["applied"])
                    .inc();
                tracing::info!(
                    generation = a.generation,
                    added = a.added,
                    removed = a.removed,
                    draining = a.draining,
                    "reload applied"
                );
                Ok(a)
            }
            Err(e) => {
                drop(src);
                Err(self.rejected(ReloadError::Apply(e)))
            }
        }
    }

    /// Applies a dynamic state, as `PUT /v1/state` does.
    pub fn put_state(&self, state: DesiredState) -> Result<u64, PutError> {
        self.inner.put_state(state)
    }

    /// Re-reads `path` and applies it (SIGHUP).
    pub fn reload_file(&self, path: &std::path::Path) -> Result<Applied, ReloadError> {
        match lb_config::load_config(path) {
            Ok(config) => self.reload(&config),
            Err(errors) => Err(self.rejected(ReloadError::Invalid(errors))),
        }
    }

    fn rejected(&self, e: ReloadError) -> ReloadError {
        self.inner
            .metrics
            .reloads
            .with_label_values(&["rejected"])
            .inc();
        tracing::error!(error = %e, "reload rejected; the running configuration stays");
        e
    }

    /// The engine in use.
    pub fn engine(&self) -> EngineKind {
        self.inner.engine
    }

    /// Where the admin endpoint listens.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// Where the TLS control API listens.
    pub fn control_tcp_addr(&self) -> Option<SocketAddr> {
        self.control_tcp
    }

    /// The address listener `name` is bound to.
    pub fn bound_addr(&self, name: &str) -> Option<SocketAddr> {
        let plane = self.inner.plane.lock().ok()?;
        let l = plane.listeners().iter().find(|l| l.name == name)?;
        plane.bound_addr(&BindKey::of(l))
    }

    /// The metrics text, as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        self.inner.metrics.encode()
    }

    /// A snapshot of listeners and backends.
    pub fn status(&self) -> Status {
        self.inner.status()
    }

    /// What the systemd watchdog asks: do the workers still answer?
    pub fn liveness(&self) -> crate::watchdog::Liveness {
        crate::watchdog::Liveness::new(Arc::downgrade(&self.inner))
    }

    /// A handle to the control runtime (signals, timers).
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.rt
            .as_ref()
            .expect("runtime lives until drop")
            .handle()
            .clone()
    }

    /// Graceful stop: close listening sockets, let connections finish for
    /// up to `grace` (default: the longest `drain_timeout`), close the rest.
    pub fn shutdown(mut self, grace: Option<Duration>) {
        self.inner.ready.store(false, Ordering::Relaxed);
        let grace = {
            let mut plane = self.inner.plane.lock().unwrap_or_else(|p| p.into_inner());
            plane.stop_accepting();
            grace.unwrap_or_else(|| plane.max_drain())
        };
        let deadline = std::time::Instant::now() + grace;
        let active = || self.inner.shared.active_total.load(Ordering::Relaxed);
        if active() > 0 {
            tracing::info!(connections = active(), grace = ?grace, "draining before exit");
        }
        while active() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop_now();
    }

    fn stop_now(&mut self) {
        {
            let mut plane = self.inner.plane.lock().unwrap_or_else(|p| p.into_inner());
            plane.close_all();
            plane.disconnect_workers();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.rt.is_some() {
            self.stop_now();
        }
    }
}

/// A backend as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendStatus {
    /// Address.
    pub addr: SocketAddr,
    /// Configured weight.
    pub weight: u32,
    /// Whether it takes new connections.
    pub healthy: bool,
    /// Last check error, if the last result failed.
    pub last_error: Option<String>,
    /// Connections open now.
    pub active: u64,
    /// Removed, finishing its connections.
    pub draining: bool,
}

/// A listener as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// Name.
    pub name: String,
    /// Bound address.
    pub bind: SocketAddr,
    /// tcp or udp.
    pub protocol: Protocol,
    /// Connections open now.
    pub active: u64,
    /// Connections accepted so far.
    pub accepted: u64,
    /// Backends, including draining ones.
    pub backends: Vec<BackendStatus>,
}

/// What `lbd` is doing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Engine in use.
    pub engine: String,
    /// Worker count.
    pub workers: usize,
    /// Generation of the applied configuration.
    pub generation: u64,
    /// Version of the dynamic state (control API); 0 before any.
    pub dynamic_version: u64,
    /// Listeners in configuration order.
    pub listeners: Vec<ListenerStatus>,
}

fn status(inner: &Inner) -> Status {
    let routing = inner.shared.routing.load();
    let plane = inner.plane.lock().unwrap_or_else(|p| p.into_inner());
    let listeners = plane
        .listeners()
        .iter()
        .filter_map(|l| {
            let key = BindKey::of(l);
            let route = routing.routes.get(&key)?;
            let mut backends: Vec<BackendStatus> = route
                .backends
                .iter()
                .zip(&l.backends)
                .map(|(h, b)| {
                    let cell = h.health.load();
                    BackendStatus {
                        addr: h.addr,
                        weight: b.weight,
                        healthy: cell.is_up(),
                        last_error: cell.last_error(),
                        active: h.active.load(Ordering::Relaxed),
                        draining: false,
                    }
                })
                .collect();
            backends.extend(plane.draining().filter(|(k, _)| **k == key).map(|(_, h)| {
                BackendStatus {
                    addr: h.addr,
                    weight: 0,
                    healthy: h.health.load().is_up(),
                    last_error: h.health.load().last_error(),
                    active: h.active.load(Ordering::Relaxed),
                    draining: true,
                }
            }));
            Some(ListenerStatus {
                name: l.name.clone(),
                bind: plane.bound_addr(&key).unwrap_or(l.bind),
                protocol: l.protocol,
                active: route.stats.active.load(Ordering::Relaxed),
                accepted: route.stats.totals().accepted,
                backends,
            })
        })
        .collect();
    Status {
        engine: inner.engine.name().to_owned(),
        workers: inner.workers,
        generation: routing.generation,
        dynamic_version: 0,
        listeners,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker whose runtime fails to start fails the whole start, even
    /// when the others run; one that runs is waited for.
    #[test]
    fn a_worker_that_never_runs_fails_the_start() {
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let stop_rx = Mutex::new(stop_rx);
        let started = spawn_workers(vec![0, 1, 2], move |_, n, started: Started| {
            if n == 1 {
                return Err(std::io::Error::other("no runtime for worker 1"));
            }
            started.running();
            let _ = stop_rx
                .lock()
                .map(|rx| rx.recv_timeout(Duration::from_secs(5)));
            Ok(())
        });
        let err = started.expect_err("worker 1 never ran").to_string();
        assert!(err.contains("no runtime for worker 1"), "{err}");
        drop(stop_tx);
    }

    /// A worker that panics before its runtime runs fails the start
    /// instead of hanging it.
    #[test]
    fn a_worker_that_panics_fails_the_start() {
        let started = spawn_workers(vec![(), ()], |id, (), started: Started| {
            if id == 0 {
                panic!("worker 0 could not build its runtime");
            }
            started.running();
            Ok(())
        });
        let err = started.expect_err("worker 0 never ran").to_string();
        assert!(err.contains("stopped before its runtime ran"), "{err}");
    }

    /// Every worker running: the start goes on with all of them.
    #[test]
    fn running_workers_start() {
        let threads = spawn_workers(vec![(); 3], |_, (), started: Started| {
            started.running();
            Ok(())
        })
        .unwrap();
        assert_eq!(threads.len(), 3);
        threads.into_iter().for_each(|t| t.join().unwrap());
    }
}
