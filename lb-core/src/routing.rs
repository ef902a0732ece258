//! The routing snapshot: what a worker reads (once) when a connection
//! starts. One `ArcSwap<Routing>` holds it; a reload builds a new one and
//! swaps it in a single store. State that must outlive snapshots (health,
//! active counts, draining, counters) lives in handles that the next
//! snapshot reuses by key.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use lb_config::{Listener, Protocol};
use tokio::sync::watch;

use crate::balance::{Pool, Selector};
use crate::health::HealthCell;
use crate::stats::ListenerStats;

/// A listening socket's identity: its protocol and configured address.
/// Listeners are keyed by this, not by name, so a rename keeps its socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BindKey {
    /// tcp or udp.
    pub protocol: Protocol,
    /// The configured address (port 0 = an ephemeral port chosen at bind).
    pub addr: SocketAddr,
}

impl BindKey {
    /// The key of a listener.
    pub fn of(l: &Listener) -> Self {
        Self {
            protocol: l.protocol,
            addr: l.bind,
        }
    }
}

/// Why a backend connect attempt failed (metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectError {
    /// The backend answered with a reset.
    Refused,
    /// No answer within `connect_timeout`.
    Timeout,
    /// This host ran out of something (descriptors, buffers, memory, local
    /// ports): says nothing about the backend, so it is no health evidence.
    Local,
    /// Anything else (unreachable network, ...).
    Other,
}

impl ConnectError {
    /// All reasons, in label order.
    pub const ALL: [ConnectError; 4] = [Self::Refused, Self::Timeout, Self::Local, Self::Other];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Local => "local",
            Self::Other => "other",
        }
    }

    /// The reason of a failed connect (or socket creation).
    pub fn of(e: &std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => Self::Refused,
            Some(
                libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EADDRNOTAVAIL
                | libc::EADDRINUSE,
            ) => Self::Local,
            _ => Self::Other,
        }
    }
}

/// One backend of one listener. Reused across snapshots by (bind, address).
pub struct BackendHandle {
    /// Where connections go.
    pub addr: SocketAddr,
    /// Shared health of the probed target (replaced when the check changes).
    pub health: ArcSwap<HealthCell>,
    /// Connections currently proxied to this backend.
    pub active: AtomicU64,
    /// Connections ever proxied to this backend.
    pub total: AtomicU64,
    /// Failed connect attempts by reason (index = `ConnectError::ALL` order).
    pub connect_errors: [AtomicU64; 4],
    draining: AtomicBool,
    /// Bumped by every `start_drain`, so a stale drain timer does nothing.
    drain_epoch: AtomicU64,
    /// Becomes `true` when connections must close (drain deadline or shutdown).
    close: watch::Sender<bool>,
}

impl std::fmt::Debug for BackendHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendHandle")
            .field("addr", &self.addr)
            .field("active", &self.active.load(Ordering::Relaxed))
            .field("draining", &self.is_draining())
            .finish()
    }
}

impl BackendHandle {
    /// A fresh handle.
    pub fn new(addr: SocketAddr, health: Arc<HealthCell>) -> Self {
        Self {
            addr,
            health: ArcSwap::new(health),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connect_errors: Default::default(),
            draining: AtomicBool::new(false),
            drain_epoch: AtomicU64::new(0),
            close: watch::channel(false).0,
        }
    }

    /// Whether the backend was removed and only finishes what it has.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the backend draining (no new connections); returns the epoch
    /// to pass to [`Self::close_if_drained`] when the drain deadline comes.
    pub fn start_drain(&self) -> u64 {
        self.draining.store(true, Ordering::Relaxed);
        self.drain_epoch.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Closes every connection if the drain that returned `epoch` is still on.
    pub fn close_if_drained(&self, epoch: u64) {
        if self.is_draining() && self.drain_epoch.load(Ordering::Relaxed) == epoch {
            self.close_all();
        }
    }

    /// Takes the backend back into service (re-added before its drain ended).
    pub fn revive(&self) -> bool {
        if *self.close.borrow() {
            return false;
        }
        self.draining.store(false, Ordering::Relaxed);
        true
    }

    /// Tells every connection on this backend to close now.
    pub fn close_all(&self) {
        self.close.send_replace(true);
    }

    /// Whether `close_all` has been called.
    pub fn is_closed(&self) -> bool {
        *self.close.borrow()
    }

    /// A receiver that sees `true` when connections must close.
    pub fn close_signal(&self) -> watch::Receiver<bool> {
        self.close.subscribe()
    }

    /// Counts a failed connect attempt.
    pub fn count_connect_error(&self, e: ConnectError) {
        let i = ConnectError::ALL.iter().position(|&x| x == e).unwrap_or(3);
        self.connect_errors[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// One listener's routing: its config, selector and backend handles.
#[derive(Debug)]
pub struct Route {
    /// The resolved listener.
    pub listener: Listener,
    /// Built once per snapshot from `listener.backends`.
    pub selector: Arc<Selector>,
    /// Handles in the same order as `listener.backends`.
    pub backends: Vec<Arc<BackendHandle>>,
    /// Counters, reused across snapshots by listener name.
    pub stats: Arc<ListenerStats>,
}

impl Route {
    /// Whether `client` may connect (empty `source_ranges` = everyone).
    pub fn allows(&self, client: IpAddr) -> bool {
        let ranges = &self.listener.source_ranges;
        if ranges.is_empty() {
            return true;
        }
        let ip = client.to_canonical();
        ranges.iter().any(|net| net.contains(&ip))
    }

    /// Whether any backend that takes new connections is healthy. One
    /// with weight 0 takes none, so it does not count: a healthy weight-0
    /// backend must not keep a `fail_open` listener from failing open.
    pub fn any_healthy(&self) -> bool {
        self.backends
            .iter()
            .zip(&self.listener.backends)
            .any(|(b, spec)| spec.weight > 0 && !b.is_draining() && b.health.load().is_up())
    }

    /// Picks a backend not in `tried`: healthy ones first; when none is
    /// healthy and the listener fails open, any non-draining one.
    pub fn pick(&self, key: u64, random: u64, tried: &[usize]) -> Option<usize> {
        let strict = View {
            route: self,
            tried,
            fail_open: false,
        };
        self.selector.pick(&strict, key, random).or_else(|| {
            let any_healthy = self.any_healthy();
            if any_healthy
                || self.listener.on_all_unhealthy == lb_config::OnAllUnhealthy::FailClosed
            {
                None
            } else {
                let open = View {
                    route: self,
                    tried,
                    fail_open: true,
                };
                self.selector.pick(&open, key, random)
            }
        })
    }
}

struct View<'a> {
    route: &'a Route,
    tried: &'a [usize],
    fail_open: bool,
}

impl Pool for View<'_> {
    fn usable(&self, i: usize) -> bool {
        let b = &self.route.backends[i];
        !self.tried.contains(&i) && !b.is_draining() && (self.fail_open || b.health.load().is_up())
    }

    fn active(&self, i: usize) -> u64 {
        self.route.backends[i].active.load(Ordering::Relaxed)
    }
}

/// Everything workers route by. Immutable once published.
#[derive(Debug, Default)]
pub struct Routing {
    /// Monotonic count of applied configurations.
    pub generation: u64,
    /// Listeners by socket identity.
    pub routes: HashMap<BindKey, Arc<Route>>,
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::health::ProbeKey;

    /// A route over `weights`, every backend's health as in `up`.
    fn route(text: &str, up: &[bool]) -> Route {
        let listener = lb_config::parse_config(text).unwrap().listeners.remove(0);
        let now = Instant::now();
        let backends = listener
            .backends
            .iter()
            .zip(up)
            .map(|(b, &up)| {
                let key = ProbeKey {
                    target: b.addr,
                    check: listener.health.clone(),
                };
                let cell = Arc::new(HealthCell::new(key, now));
                if !up {
                    cell.passive_failure("refused".into(), now);
                }
                assert_eq!(cell.is_up(), up);
                Arc::new(BackendHandle::new(b.addr, cell))
            })
            .collect();
        Route {
            selector: Arc::new(Selector::new(listener.balance, &listener.backends)),
            stats: Arc::new(ListenerStats::new(1)),
            backends,
            listener,
        }
    }

    const LISTENER: &str = r#"
        [[listener]]
        name = "web"
        bind = "127.0.0.1:80"
        balance = "round_robin"
        health = { kind = "tcp", rise = 1, fall = 1 }
        backends = [{ addr = "127.0.0.2:80", weight = 0 }, { addr = "127.0.0.3:80" }]
    "#;

    /// A weight-0 backend takes no new connections, so its health does not
    /// stop a fail-open listener from using the others when they are down.
    #[test]
    fn a_healthy_weight_zero_backend_does_not_hold_fail_open_shut() {
        let r = route(LISTENER, &[true, false]);
        assert!(!r.any_healthy());
        assert_eq!(r.pick(7, 7, &[]), Some(1), "fails open to the weighted one");
        let closed = LISTENER.replace(
            "balance = \"round_robin\"",
            "balance = \"round_robin\"\n        on_all_unhealthy = \"fail_closed\"",
        );
        assert_eq!(route(&closed, &[true, false]).pick(7, 7, &[]), None);
        // With the weighted backend up, it is picked, and weight 0 never is.
        let r = route(LISTENER, &[true, true]);
        assert!(r.any_healthy());
        assert_eq!(r.pick(7, 7, &[]), Some(1));
    }
}
