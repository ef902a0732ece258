//! The running `lbd`: worker threads, the control runtime (health probes,
//! drain timers, announcement, signals), the admin runtime (the control
//! API and the metrics endpoint), reloads and graceful shutdown.
//!
//! - [`core`]: the sources of listeners, the plane and the persisted state,
//!   behind every apply;
//! - [`sources`]: what a new file or state means (pure);
//! - [`persist`]: the dynamic state on disk;
//! - [`status`]: the status snapshot;
//! - [`lifecycle`]: readiness, drains (`lbd drain`, stops) and VIP
//!   announcement, behind the control API;
//! - [`workers`]: starting the worker threads;
//! - [`priority`]: the control and admin threads give way to the workers.
//!
//! The API is blocking on purpose: `main`, signal handling and tests drive
//! it from plain threads, and all async work stays on runtimes it owns.

mod core;
mod lifecycle;
pub mod limits;
pub mod persist;
mod priority;
mod sources;
mod status;
mod workers;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lb_config::{Config, DesiredState, EngineChoice};
use tokio::sync::mpsc;

pub use self::core::ReloadError;
use self::core::{Core, Parts};
use self::lifecycle::Lifecycle;
use crate::admin::control::{Control, ControlApi, DrainError, PutError};
use crate::admin::endpoint::Endpoint;
use crate::announce::{Announcer, LinkError};
use crate::engine::{self, epoll::Epoll, uring::IoUring, EngineKind};
use crate::metrics::{DataPlaneView, Metrics};
use crate::plane::{Applied, ApplyError, Plane};
use crate::worker::{run_worker, Shared};
pub use lb_api::wire::{BackendStatus, ListenerStatus, Status};
pub use workers::WorkerError;
use workers::{spawn_workers, Started};

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
    #[error("{what}: {error}")]
    Io {
        /// What failed.
        what: &'static str,
        /// The OS error.
        error: std::io::Error,
    },
    /// The worker threads did not start.
    #[error(transparent)]
    Workers(#[from] WorkerError),
    /// The open-files limit leaves no room to serve.
    #[error("runtime.max_connections: {0}")]
    Limits(String),
    /// The initial configuration could not be applied.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The control API's TLS material or token is unusable.
    #[error(transparent)]
    Tls(#[from] lb_api::tls::TlsError),
    /// The announce interface cannot be used.
    #[error(transparent)]
    Announce(#[from] LinkError),
}

/// A running `lbd`.
#[derive(Debug)]
pub struct Server {
    core: Arc<Core>,
    lifecycle: Arc<Lifecycle>,
    metrics: Metrics,
    engine: EngineKind,
    rt: Option<tokio::runtime::Runtime>,
    admin_rt: Option<tokio::runtime::Runtime>,
    threads: Vec<std::thread::JoinHandle<()>>,
    admin: Option<SocketAddr>,
    control_tcp: Option<SocketAddr>,
    /// Held while running: one lbd per state directory.
    _state_lock: Option<persist::StateLock>,
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
                let tls = crate::admin::tls::server_config(
                    Path::new(cert),
                    Path::new(key),
                    config.admin.client_ca.as_deref().map(Path::new),
                )?;
                Some((
                    *addr,
                    tls,
                    crate::admin::tls::Token::load(Path::new(token))?,
                ))
            }
            _ => None,
        };
        let state_dir = (config.admin.control_socket.is_some()
            || config.admin.control_tcp.is_some())
        .then(|| PathBuf::from(&config.admin.state_dir));
        let state_lock = match &state_dir {
            Some(dir) => Some(
                persist::StateLock::take(dir).map_err(|error| StartError::Io {
                    what: "admin.state_dir",
                    error,
                })?,
            ),
            None => None,
        };
        // The announce interface is checked (and cleared of what a crash
        // left) before anything binds, so an unusable one fails the start.
        let link = match config.announce.mode {
            lb_config::AnnounceMode::Bgp => {
                Some((crate::announce::open_interface(&config.announce)?, None))
            }
            lb_config::AnnounceMode::L2 => {
                let (link, lan) = crate::announce::open_lan(&config.announce)?;
                Some((link, Some(lan)))
            }
            lb_config::AnnounceMode::Off => None,
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
        let nofile = limits::raise_nofile();
        // Splice pipes (two descriptors each) are kept out of the connections' share.
        let pipe_fds = if config.runtime.splice {
            2 * crate::engine::splice::PIPES_PER_WORKER * workers as u64
        } else {
            0
        };
        let cap = limits::connection_cap(config.runtime.max_connections, nofile, pipe_fds)
            .map_err(StartError::Limits)?;
        if let Some(warning) = &cap.warning {
            tracing::warn!("{warning}");
        }
        let max_total = cap.max;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lbd-control")
            .on_thread_start(priority::lower_control_thread)
            .enable_all()
            .build()
            .map_err(|error| StartError::Io {
                what: "control runtime",
                error,
            })?;
        let metrics = Metrics::new();
        let admin_threads = priority::AdminThreads::new(metrics.admin_raises.clone());
        let admin_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lbd-admin")
            .on_thread_start({
                let threads = admin_threads.clone();
                move || threads.on_start()
            })
            .on_thread_stop({
                let threads = admin_threads.clone();
                move || threads.on_stop()
            })
            .enable_all()
            .build()
            .map_err(|error| StartError::Io {
                what: "admin runtime",
                error,
            })?;
        admin_threads.watch(admin_rt.handle());
        let (handoff, handoffs): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let shared = Arc::new(Shared::new(handoff, max_total, config.runtime.splice));

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

        let plane = Arc::new(Mutex::new(Plane::new(
            shared.clone(),
            senders,
            rt.handle().clone(),
        )));
        metrics.attach(DataPlaneView {
            shared: shared.clone(),
            plane: plane.clone(),
            engine,
            workers,
        });
        let ready = Arc::new(AtomicBool::new(false));
        let core = Arc::new(Core::new(Parts {
            plane,
            file: config.clone(),
            state_dir,
            metrics: metrics.clone(),
            ready: ready.clone(),
            shared: shared.clone(),
            engine,
            workers,
        }));
        let announcer = link.map(|(link, lan)| {
            let _guard = rt.enter();
            Announcer::start(
                &config.announce,
                link,
                lan,
                shared,
                ready.clone(),
                &metrics.registry,
            )
        });
        let lifecycle = Arc::new(Lifecycle::new(core.clone(), announcer, rt.handle().clone()));
        let mut server = Self {
            core: core.clone(),
            lifecycle: lifecycle.clone(),
            metrics: metrics.clone(),
            engine,
            rt: Some(rt),
            admin_rt: Some(admin_rt),
            threads,
            admin: None,
            control_tcp: None,
            _state_lock: state_lock,
        };
        let applied = core.apply_file()?;
        core.load_persisted();
        let control = Control {
            api: lifecycle.clone(),
            metrics: metrics.api.clone(),
        };
        // The control API and the metrics endpoint serve on the admin runtime.
        let rt = server.admin_rt.as_ref().expect("runtime lives until drop");
        let _guard = rt.enter();
        if let Some((addr, tls, token)) = control_tcp {
            let bound = rt
                .block_on(crate::admin::control::serve_tls(
                    addr,
                    tls,
                    token,
                    control.clone(),
                ))
                .map_err(|error| StartError::Io {
                    what: "admin.control_tcp bind",
                    error,
                })?;
            server.control_tcp = Some(bound);
        }
        if let Some(path) = &config.admin.control_socket {
            rt.block_on(crate::admin::control::serve_unix(
                Path::new(path),
                config.admin.control_socket_group.as_deref(),
                control,
            ))
            .map_err(|error| StartError::Io {
                what: "admin.control_socket bind",
                error,
            })?;
        }
        if let Some(addr) = config.admin.metrics {
            let bound = rt
                .block_on(crate::admin::endpoint::serve(
                    addr,
                    Endpoint { metrics, ready },
                ))
                .map_err(|error| StartError::Io {
                    what: "admin.metrics bind",
                    error,
                })?;
            server.admin = Some(bound);
        }
        lifecycle.set_ready();
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
        self.lifecycle.reload(config)
    }

    /// Applies a dynamic state, as `PUT /v1/state` does.
    pub fn put_state(&self, state: DesiredState) -> Result<u64, PutError> {
        self.lifecycle.put_state(state)
    }

    /// Drains without exiting, as `lbd drain` does (blocking: call it
    /// from a plain thread).
    pub fn drain(&self) -> Result<lb_api::wire::DrainAnswer, DrainError> {
        self.lifecycle.drain()
    }

    /// Ends a drain, as `lbd undrain` does.
    pub fn undrain(&self) -> Result<lb_api::wire::DrainAnswer, DrainError> {
        self.lifecycle.undrain()
    }

    /// Re-reads `path` and applies it (SIGHUP).
    pub fn reload_file(&self, path: &std::path::Path) -> Result<Applied, ReloadError> {
        match lb_config::load_config_warned(path) {
            Ok((config, warnings)) => {
                for w in &warnings {
                    tracing::warn!(file = %path.display(), "{w}");
                }
                self.reload(&config)
            }
            Err(errors) => Err(self.core.rejected(ReloadError::Invalid(errors))),
        }
    }

    /// The engine in use.
    pub fn engine(&self) -> EngineKind {
        self.engine
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
        self.core.bound_addr(name)
    }

    /// The metrics text, as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    /// A snapshot of listeners and backends.
    pub fn status(&self) -> Status {
        self.lifecycle.status()
    }

    /// What the systemd watchdog asks: do the workers still answer?
    pub fn liveness(&self) -> crate::watchdog::Liveness {
        crate::watchdog::Liveness::new(self.core.plane_weak())
    }

    /// A handle to the control runtime (signals, timers).
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.rt
            .as_ref()
            .expect("runtime lives until drop")
            .handle()
            .clone()
    }

    /// Graceful stop: withdraw every VIP and keep accepting for
    /// `announce.withdraw_grace` (when some VIP was announced), close
    /// listening sockets, let connections finish for up to `grace`
    /// (default: the longest `drain_timeout`), close the rest.
    pub fn shutdown(mut self, grace: Option<Duration>) {
        self.lifecycle.stop(grace);
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.lifecycle.release();
        {
            let mut plane = self.core.plane();
            plane.close_all();
            plane.disconnect_workers();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(rt) = self.admin_rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
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
