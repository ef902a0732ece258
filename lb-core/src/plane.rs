//! Applying a configuration to the running data plane, following the
//! invariants: bind new sockets first, publish one snapshot, then stop
//! removed listeners and drain removed backends. A configuration that
//! cannot be applied (a bind fails, an unsupported listener) changes nothing.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use lb_config::{Listener, Protocol};
use socket2::{Domain, Socket, Type};
use tokio::sync::{mpsc, watch};

use crate::balance::Selector;
use crate::forward::{Shared, WorkerCmd};
use crate::health::HealthRegistry;
use crate::routing::{BackendHandle, BindKey, Route, Routing};
use crate::stats::ListenerStats;

/// Why a configuration was not applied. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A new listener's address could not be bound.
    #[error("listener {name:?}: cannot bind {addr}: {source}")]
    Bind {
        /// The listener.
        name: String,
        /// Its address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
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
}

type HandleKey = (BindKey, SocketAddr);

/// Freshly bound sockets, one per worker.
enum Sockets {
    Tcp(Vec<std::net::TcpListener>),
    Udp(Vec<std::net::UdpSocket>),
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
}

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

    /// Backends draining now, with the bind key of the listener they left.
    pub fn draining(&self) -> impl Iterator<Item = (&BindKey, &Arc<BackendHandle>)> {
        self.draining.iter().map(|((k, _), h)| (k, h))
    }

    /// The health registry (for metrics).
    pub fn health(&self) -> &HealthRegistry {
        &self.health
    }

    /// Applies `listeners` (static and dynamic together). On error nothing changed.
    pub fn apply(&mut self, listeners: &[Listener]) -> Result<Applied, ApplyError> {
        // 1. Bind every new socket; any failure undoes the others.
        let wanted: Vec<BindKey> = listeners.iter().map(BindKey::of).collect();
        let mut fresh: Vec<(BindKey, Sockets, SocketAddr)> = Vec::new();
        for l in listeners {
            let key = BindKey::of(l);
            if self.sockets.contains_key(&key) {
                continue;
            }
            let bound = match l.protocol {
                Protocol::Tcp => {
                    bind_tcp(l.bind, self.workers.len()).map(|(s, a)| (Sockets::Tcp(s), a))
                }
                Protocol::Udp => {
                    bind_udp(l.bind, self.workers.len()).map(|(s, a)| (Sockets::Udp(s), a))
                }
            };
            let (sockets, local) = bound.map_err(|source| ApplyError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
            })?;
            fresh.push((key, sockets, local));
        }

        // 2. Build the new snapshot, reusing handles, counters and selectors.
        let previous = self.shared.routing.load_full();
        let mut handles: HashMap<HandleKey, Arc<BackendHandle>> = HashMap::new();
        let mut stats: HashMap<String, Arc<ListenerStats>> = HashMap::new();
        let mut routes = HashMap::new();
        let mut probes = HashSet::new();
        for l in listeners {
            let key = BindKey::of(l);
            let backends: Vec<Arc<BackendHandle>> = l
                .backends
                .iter()
                .map(|b| {
                    let hk = (key, b.addr);
                    let cell = self.health.cell(b.addr, &l.health, &self.rt);
                    probes.insert(cell.key.clone());
                    let reuse = self
                        .handles
                        .get(&hk)
                        .cloned()
                        .or_else(|| self.draining.get(&hk).filter(|h| h.revive()).cloned());
                    let handle = match reuse {
                        Some(h) => {
                            if !Arc::ptr_eq(&h.health.load(), &cell) {
                                h.health.store(cell);
                            }
                            h
                        }
                        None => Arc::new(BackendHandle::new(b.addr, cell)),
                    };
                    handles.insert(hk, handle.clone());
                    handle
                })
                .collect();
            let workers = self.workers.len();
            let st = self
                .stats
                .get(&l.name)
                .cloned()
                .unwrap_or_else(|| Arc::new(ListenerStats::new(workers)));
            stats.insert(l.name.clone(), st.clone());
            // A selector depends only on the algorithm and the backend list:
            // reuse it when neither changed (a controller re-sends every
            // listener on each change; a Maglev table costs ~0.5 ms).
            let selector = previous
                .routes
                .get(&key)
                .filter(|r| r.listener.balance == l.balance && r.listener.backends == l.backends)
                .map(|r| r.selector.clone())
                .unwrap_or_else(|| Arc::new(Selector::new(l.balance, &l.backends)));
            let route = Route {
                listener: l.clone(),
                selector,
                backends,
                stats: st,
            };
            routes.insert(key, Arc::new(route));
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
            let (stop, stop_rx) = watch::channel(false);
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
            self.sockets.insert(key, Bound { stop, local });
        }

        // 5. Close removed listeners' sockets.
        let before = self.sockets.len();
        self.sockets.retain(|key, bound| {
            let keep = wanted.contains(key);
            if !keep {
                bound.stop.send_replace(true);
                tracing::info!(bind = %bound.local, "listener closed");
            }
            keep
        });
        let removed = before - self.sockets.len();

        // 6. Drain backends that left (including every backend of a removed listener).
        let drain_of: HashMap<BindKey, lb_config::Duration> = self
            .listeners
            .iter()
            .map(|l| (BindKey::of(l), l.drain_timeout))
            .collect();
        let mut draining = 0;
        for (hk, handle) in self.handles.drain() {
            if handles.get(&hk).is_some_and(|h| Arc::ptr_eq(h, &handle)) {
                continue;
            }
            draining += 1;
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
        self.draining
            .retain(|hk, h| !handles.contains_key(hk) && !h.is_closed() && h.is_draining());
        self.handles = handles;
        self.stats = stats;
        self.health.retain(&probes);
        self.listeners = listeners.to_vec();
        Ok(Applied {
            generation: self.generation,
            added,
            removed,
            draining,
        })
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

/// Binds one `SO_REUSEPORT` socket per worker on `addr`, with
/// `IP_FREEBIND` so a VIP not yet on the host still binds. With port 0, the
/// first socket's port is reused by the others. `Type::STREAM` sockets are
/// put in listening state, with `TCP_NODELAY` for the sockets they accept.
fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
    kind: Type,
) -> io::Result<(Vec<Socket>, SocketAddr)> {
    let mut out = Vec::with_capacity(count);
    let mut actual = addr;
    for _ in 0..count.max(1) {
        let s = Socket::new(Domain::for_address(addr), kind, None)?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        if addr.is_ipv4() {
            s.set_freebind_v4(true)?;
        } else {
            s.set_freebind_v6(true)?;
        }
        s.set_nonblocking(true)?;
        if kind == Type::DGRAM {
            // Room for bursts: a worker busy for a moment should not drop.
            let _ = s.set_recv_buffer_size(4 << 20);
        }
        s.bind(&actual.into())?;
        if kind == Type::STREAM {
            // Accepted sockets inherit TCP_NODELAY from the listener, so no
            // connection needs its own setsockopt (test `accepted_sockets_inherit_nodelay`).
            s.set_tcp_nodelay(true)?;
            s.listen(4096)?;
        }
        if actual.port() == 0 {
            actual = s
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("not an IP socket"))?;
        }
        out.push(s);
    }
    Ok((out, actual))
}

/// One listening TCP socket per worker, each with `SO_REUSEPORT` and
/// `IP_FREEBIND` (a VIP not yet on the host still binds).
pub fn bind_tcp(
    addr: SocketAddr,
    count: usize,
) -> io::Result<(Vec<std::net::TcpListener>, SocketAddr)> {
    let (sockets, actual) = bind_reuseport(addr, count, Type::STREAM)?;
    Ok((sockets.into_iter().map(Into::into).collect(), actual))
}

/// One UDP socket per worker, each with `SO_REUSEPORT` and `IP_FREEBIND`.
pub fn bind_udp(
    addr: SocketAddr,
    count: usize,
) -> io::Result<(Vec<std::net::UdpSocket>, SocketAddr)> {
    let (sockets, actual) = bind_reuseport(addr, count, Type::DGRAM)?;
    Ok((sockets.into_iter().map(Into::into).collect(), actual))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forwarder relies on this instead of setting `TCP_NODELAY` on each
    /// accepted connection.
    #[test]
    fn accepted_sockets_inherit_nodelay() {
        let (listeners, addr) = bind_tcp("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let listener = &listeners[0];
        listener.set_nonblocking(false).unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
        assert!(
            !client.nodelay().unwrap(),
            "the check itself tells the two apart"
        );
    }
}
