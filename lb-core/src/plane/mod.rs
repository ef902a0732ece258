//! Applying a configuration to the running data plane. First the pure
//! [`diff`] from the listeners in force to the new ones; then the shell
//! follows the invariants: bind new sockets first, publish one snapshot,
//! then stop removed listeners and drain removed backends. A configuration
//! that cannot be applied (a bind fails) changes nothing. Listeners the
//! diff does not name keep their route (selector, handles, counters) as is.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use lb_config::{Listener, Protocol};
use tokio::sync::{mpsc, watch};

mod bind;
pub mod diff;
mod exclusive;
pub mod owners;
mod resume;
mod route;

pub use bind::{bind_tcp, bind_udp};
use diff::Diff;

use crate::health::HealthRegistry;
use crate::routing::{BackendHandle, BindKey, Routing};
use crate::stats::ListenerStats;
use crate::worker::{Shared, WorkerCmd};

/// Why a configuration was not applied. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A new listener's address could not be bound.
    #[error("listener {name:?}: cannot bind {addr}: {error}")]
    Bind {
        /// The listener.
        name: String,
        /// Its address.
        addr: SocketAddr,
        /// The OS error.
        error: std::io::Error,
    },
    /// Another process's socket already receives on a new listener's
    /// address (with `SO_REUSEPORT` it would share the connections).
    #[error("listener {name:?}: {addr} is already served by {holders}; lbd shares a port with no other process")]
    Shared {
        /// The listener.
        name: String,
        /// Its address.
        addr: SocketAddr,
        /// Who else holds it (pid and name where /proc tells).
        holders: String,
    },
}

impl ApplyError {
    /// The listener the error is about.
    pub fn listener(&self) -> &str {
        match self {
            Self::Bind { name, .. } | Self::Shared { name, .. } => name,
        }
    }
}

/// What an apply changed, for the log line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The generation now published.
    pub generation: u64,
    /// Listeners bound by this apply.
    pub added: usize,
    /// Listeners whose sockets were closed.
    pub removed: usize,
    /// Backends that started draining.
    pub draining: usize,
}

struct Bound {
    stop: watch::Sender<bool>,
    local: SocketAddr,
    /// The inodes of its sockets (one per worker): ours, when the kernel's
    /// socket table is checked for other holders.
    inodes: Vec<u64>,
}

type HandleKey = (BindKey, SocketAddr);

/// An apply half done: see [`Plane::prepare`].
pub struct Prepared {
    diff: Diff,
    fresh: Vec<(BindKey, Sockets, SocketAddr)>,
    listeners: Vec<Listener>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("diff", &self.diff)
            .field("bound", &self.fresh.len())
            .finish()
    }
}

/// Freshly bound sockets, one per worker.
enum Sockets {
    Tcp(Vec<std::net::TcpListener>),
    Udp(Vec<std::net::UdpSocket>),
}

impl Sockets {
    /// Their inodes (a socket whose inode cannot be read is left out).
    fn inodes(&self) -> Vec<u64> {
        match self {
            Self::Tcp(list) => list.iter().filter_map(|s| owners::inode(s).ok()).collect(),
            Self::Udp(list) => list.iter().filter_map(|s| owners::inode(s).ok()).collect(),
        }
    }
}

/// The control side's view of the data plane. Not on the data path: only
/// reloads and metrics scrapes take its lock.
pub struct Plane {
    shared: Arc<Shared>,
    workers: Vec<mpsc::UnboundedSender<WorkerCmd>>,
    rt: tokio::runtime::Handle,
    generation: u64,
    listeners: Vec<Listener>,
    sockets: HashMap<BindKey, Bound>,
    handles: HashMap<HandleKey, Arc<BackendHandle>>,
    draining: HashMap<HandleKey, Arc<BackendHandle>>,
    stats: HashMap<String, Arc<ListenerStats>>,
    health: HealthRegistry,
    /// Inodes of removed listeners' sockets, which the workers close a
    /// moment after the removal: still ours, not another process's, for
    /// [`RETIRED_FOR`] after it.
    retired: Vec<(u64, std::time::Instant)>,
}

/// How long a removed listener's sockets count as ours (see
/// `Plane::retired`).
const RETIRED_FOR: std::time::Duration = std::time::Duration::from_secs(10);

impl std::fmt::Debug for Plane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plane")
            .field("generation", &self.generation)
            .finish()
    }
}

impl Plane {
    /// An empty plane driving `workers`; probers and timers run on `rt`.
    pub fn new(
        shared: Arc<Shared>,
        workers: Vec<mpsc::UnboundedSender<WorkerCmd>>,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Self {
            shared,
            workers,
            rt,
            generation: 0,
            listeners: Vec::new(),
            sockets: HashMap::new(),
            handles: HashMap::new(),
            draining: HashMap::new(),
            stats: HashMap::new(),
            health: HealthRegistry::default(),
            retired: Vec::new(),
        }
    }

    /// The listeners now applied.
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// The address a listener is actually bound to (differs from the
    /// configured one when that has port 0).
    pub fn bound_addr(&self, key: &BindKey) -> Option<SocketAddr> {
        self.sockets.get(key).map(|b| b.local)
    }

    /// Backends draining now (removed, with connections still open), with
    /// the bind key of the listener they left. One whose connections have
    /// all ended, or whose drain deadline closed them, is not draining.
    pub fn draining(&self) -> impl Iterator<Item = (&BindKey, &Arc<BackendHandle>)> {
        self.draining
            .iter()
            .filter(|(_, h)| {
                h.is_draining() && !h.is_closed() && h.active.load(Ordering::Relaxed) > 0
            })
            .map(|((k, _), h)| (k, h))
    }

    /// The health registry (for metrics).
    pub fn health(&self) -> &HealthRegistry {
        &self.health
    }

    /// Applies `listeners` (static and dynamic together). On error nothing changed.
    pub fn apply(&mut self, listeners: &[Listener]) -> Result<Applied, ApplyError> {
        let prepared = self.prepare(listeners)?;
        Ok(self.commit(prepared))
    }

    /// The first half of an apply: the diff from the listeners in force,
    /// and the sockets of the new ones, bound (any failure undoes the
    /// others, and nothing changed). Nothing is published: dropping the
    /// result closes the sockets. The caller keeps the plane from changing
    /// until it commits.
    pub fn prepare(&self, listeners: &[Listener]) -> Result<Prepared, ApplyError> {
        let diff = diff::diff(&self.listeners, listeners);
        let mut fresh: Vec<(BindKey, Sockets, SocketAddr)> = Vec::with_capacity(diff.added.len());
        for l in &diff.added {
            let workers = self.workers.len();
            let bound = match l.protocol {
                Protocol::Tcp => bind_tcp(l.bind, workers).map(|(s, a)| (Sockets::Tcp(s), a)),
                Protocol::Udp => bind_udp(l.bind, workers).map(|(s, a)| (Sockets::Udp(s), a)),
            };
            let (sockets, local) = bound.map_err(|error| ApplyError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                error,
            })?;
            fresh.push((BindKey::of(l), sockets, local));
        }
        self.check_owners(&diff, &fresh)?;
        Ok(Prepared {
            diff,
            fresh,
            listeners: listeners.to_vec(),
        })
    }

    /// The second half: publishes the prepared listeners, hands their new
    /// sockets to the workers, closes removed listeners and starts drains.
    /// It cannot fail.
    pub fn commit(&mut self, prepared: Prepared) -> Applied {
        let Prepared {
            diff: d,
            fresh,
            listeners,
        } = prepared;
        let listeners = &listeners[..];
        // 2. The new snapshot: listeners the diff does not name keep their
        // route; the others get one, reusing handles, counters and
        // selectors where the diff allows.
        let previous = self.shared.routing.load_full();
        let rebuilt: HashMap<BindKey, (&Listener, bool)> = d
            .changed
            .iter()
            .map(|c| (BindKey::of(&c.listener), (&c.listener, c.reselect)))
            .chain(d.added.iter().map(|l| (BindKey::of(l), (l, true))))
            .collect();
        let mut routes = HashMap::with_capacity(listeners.len());
        let mut probes = HashSet::new();
        let mut stats: HashMap<String, Arc<ListenerStats>> = HashMap::new();
        for l in listeners {
            let key = BindKey::of(l);
            let kept = previous
                .routes
                .get(&key)
                .filter(|_| !rebuilt.contains_key(&key));
            let route = match kept {
                Some(route) => route.clone(),
                None => {
                    let reselect = rebuilt.get(&key).is_none_or(|&(_, r)| r);
                    Arc::new(self.route(l, &previous, reselect))
                }
            };
            probes.extend(route.backends.iter().map(|b| b.health.load().key.clone()));
            stats.insert(l.name.clone(), route.stats.clone());
            routes.insert(key, route);
        }

        // 3. Publish: one store.
        self.generation += 1;
        self.shared.routing.store(Arc::new(Routing {
            generation: self.generation,
            routes,
        }));

        // 4. Hand new sockets to the workers.
        let added = fresh.len();
        for (key, sockets, local) in fresh {
            self.listen(key, sockets, local);
        }

        // 5. Close removed listeners' sockets.
        let now = std::time::Instant::now();
        self.retired
            .retain(|&(_, at)| now.duration_since(at) < RETIRED_FOR);
        for l in &d.removed {
            if let Some(bound) = self.sockets.remove(&BindKey::of(l)) {
                bound.stop.send_replace(true);
                self.retired.extend(bound.inodes.iter().map(|&i| (i, now)));
                tracing::info!(bind = %bound.local, "listener closed");
            }
        }

        // 6. Drain backends that left (including every backend of a removed
        // listener), each for its old listener's drain timeout.
        let draining = self.drain(&d);
        self.draining
            .retain(|_, h| !h.is_closed() && h.is_draining());
        self.stats = stats;
        self.health.retain(&probes);
        self.listeners = listeners.to_vec();
        Applied {
            generation: self.generation,
            added,
            removed: d.removed.len(),
            draining,
        }
    }

    /// Gives a new listener's sockets to the workers (one each).
    fn listen(&mut self, key: BindKey, sockets: Sockets, local: SocketAddr) {
        let (stop, stop_rx) = watch::channel(false);
        let inodes = sockets.inodes();
        match sockets {
            Sockets::Tcp(list) => {
                for (socket, worker) in list.into_iter().zip(&self.workers) {
                    let _ = worker.send(WorkerCmd::Listen {
                        key,
                        socket,
                        stop: stop_rx.clone(),
                    });
                }
            }
            Sockets::Udp(list) => {
                for (socket, worker) in list.into_iter().zip(&self.workers) {
                    let _ = worker.send(WorkerCmd::ListenUdp {
                        key,
                        socket,
                        local,
                        stop: stop_rx.clone(),
                    });
                }
            }
        }
        tracing::info!(bind = %local, "listening");
        self.sockets.insert(
            key,
            Bound {
                stop,
                local,
                inodes,
            },
        );
    }

    /// Starts the drains the diff calls for, each ending at its old
    /// listener's `drain_timeout`; returns how many started.
    fn drain(&mut self, d: &Diff) -> usize {
        let drain_of: HashMap<BindKey, lb_config::Duration> = self
            .listeners
            .iter()
            .map(|l| (BindKey::of(l), l.drain_timeout))
            .collect();
        let mut started = 0;
        for hk in d.draining() {
            let Some(handle) = self.handles.remove(&hk) else {
                continue;
            };
            started += 1;
            let epoch = handle.start_drain();
            let timeout = drain_of
                .get(&hk.0)
                .copied()
                .unwrap_or(lb_config::Duration::from_secs(30));
            let timer = handle.clone();
            self.rt.spawn(async move {
                tokio::time::sleep(timeout.get()).await;
                timer.close_if_drained(epoch);
            });
            self.draining.insert(hk, handle);
        }
        started
    }

    /// Asks every worker to answer; each receiver completes when its worker
    /// has (or fails when the worker is gone).
    pub fn ping_workers(&self) -> Vec<tokio::sync::oneshot::Receiver<()>> {
        self.workers
            .iter()
            .map(|worker| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let _ = worker.send(WorkerCmd::Ping(tx));
                rx
            })
            .collect()
    }

    /// Drops the worker channels so worker threads finish (shutdown, last step).
    pub fn disconnect_workers(&mut self) {
        self.workers.clear();
    }

    /// Stops every accept loop (shutdown, step 1).
    pub fn stop_accepting(&mut self) {
        for bound in self.sockets.values() {
            bound.stop.send_replace(true);
        }
    }

    /// Whether every listener told to stop has closed its sockets: each
    /// worker's loop holds its stop signal until its socket is closed, and
    /// a signal still queued for a worker counts as held.
    pub fn stopped_listeners_closed(&self) -> bool {
        self.sockets
            .values()
            .filter(|bound| *bound.stop.borrow())
            .all(|bound| bound.stop.receiver_count() == 0)
    }

    /// Closes every connection now (shutdown, last step).
    pub fn close_all(&mut self) {
        for h in self.handles.values().chain(self.draining.values()) {
            h.close_all();
        }
    }

    /// The longest drain timeout of any listener (the shutdown grace).
    pub fn max_drain(&self) -> std::time::Duration {
        self.listeners
            .iter()
            .map(|l| l.drain_timeout.get())
            .max()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
