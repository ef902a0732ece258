//! The life of one proxied TCP connection: admission (source ranges and
//! caps), the backend (picked, connected, retried), the PROXY header, then
//! the copy both ways until both ends finish, an error, the idle timeout,
//! or the backend's drain deadline.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use lb_config::{HashKey, ProxyProtocol};
use tokio::time::Instant;

use super::copy::pump;
use super::MAX_CONNECT_ATTEMPTS;
use crate::balance::hash;
use crate::engine::{Conn, Engine};
use crate::proxy_protocol;
use crate::routing::{BackendHandle, BindKey, ConnectError, Route};
use crate::stats::{Held, Reject};
use crate::worker::context::Worker;

/// Serves one connection, counted in this worker's `worker_conns` by
/// the accept loop.
pub(super) async fn serve<E: Engine>(
    worker: Rc<Worker>,
    key: BindKey,
    client: E::Conn,
    peer: SocketAddr,
) {
    let _slot = Held::counted(&worker.shared.worker_conns[worker.id].0);
    let Some(route) = worker.shared.routing.load().routes.get(&key).cloned() else {
        return; // the listener was removed between accept and now
    };
    let stats = route.stats.worker(worker.id);
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    if !route.allows(peer.ip()) {
        stats.reject(Reject::SourceRange);
        return;
    }
    let (_global, before) = Held::take(&worker.shared.active_total);
    if before >= worker.shared.max_total {
        stats.reject(Reject::Limit);
        return;
    }
    let (_listener_slot, before) = Held::take(&route.stats.active);
    let cap = u64::from(route.listener.max_connections);
    if cap > 0 && before >= cap {
        stats.reject(Reject::Limit);
        return;
    }
    // A listener bound to one address and port was reached there; only a
    // wildcard or ephemeral bind needs the kernel to say where (saves a
    // syscall per connection otherwise).
    let local = if key.addr.ip().is_unspecified() || key.addr.port() == 0 {
        client.local_addr().unwrap_or(key.addr)
    } else {
        key.addr
    };
    let (backend, upstream) = match connect_backend::<E>(&worker, &route, peer, local).await {
        Ok(connected) => connected,
        Err(why) => {
            stats.reject(why);
            return;
        }
    };
    let (_backend_slot, _) = Held::take(&backend.active);
    backend.total.fetch_add(1, Ordering::Relaxed);
    let header = match route.listener.proxy_protocol {
        ProxyProtocol::Off => None,
        ProxyProtocol::V1 => Some(proxy_protocol::v1(peer, local)),
        ProxyProtocol::V2 => Some(proxy_protocol::v2(
            peer,
            local,
            proxy_protocol::Transport::Stream,
        )),
    };
    if let Some(h) = header {
        if upstream.write_all(h).await.0.is_err() {
            return;
        }
    }
    let mut close = backend.close_signal();
    let idle = route.listener.idle_timeout.get();
    let activity = Cell::new(Instant::now());
    let one_way_done = Cell::new(false);
    let copy = async {
        tokio::try_join!(
            pump(
                &worker,
                &client,
                &upstream,
                &stats.bytes_to_backend,
                &activity,
                &one_way_done,
            ),
            pump(
                &worker,
                &upstream,
                &client,
                &stats.bytes_to_client,
                &activity,
                &one_way_done,
            ),
        )
    };
    let idle_watch = async {
        loop {
            let deadline = activity.get() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    let finished = tokio::select! {
        result = copy => match result {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(listener = %route.listener.name, %peer, error = %e, "connection ended with an error");
                false
            }
        },
        () = idle_watch => {
            tracing::debug!(listener = %route.listener.name, %peer, "idle timeout");
            false
        }
        _ = close.wait_for(|c| *c) => {
            tracing::debug!(listener = %route.listener.name, %peer, backend = %backend.addr, "closed by drain deadline");
            false
        }
    };
    // Both ways ended with EOF: nothing is in flight or unread, and closing
    // the sockets (on drop) sends what FIN is left. Cut short, shut both
    // sockets down so the peers hear of it now and any read still in
    // flight completes.
    if !finished {
        client.shutdown_both();
        upstream.shutdown_both();
    }
}

/// Picks and connects a backend, retrying other backends on failure; a
/// failure of this host's own resources ends the attempts at once.
async fn connect_backend<E: Engine>(
    worker: &Worker,
    route: &Route,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<(Arc<BackendHandle>, E::Conn), Reject> {
    let key = match route.listener.hash_key {
        HashKey::FiveTuple => hash::five_tuple_key(peer, local, 6),
        HashKey::ClientIp => hash::client_ip_key(peer.ip()),
    };
    let timeout = route.listener.connect_timeout.get();
    let mut tried: Vec<usize> = Vec::with_capacity(MAX_CONNECT_ATTEMPTS);
    for _ in 0..MAX_CONNECT_ATTEMPTS {
        let i = route
            .pick(key, worker.random(), &tried)
            .ok_or(Reject::NoBackend)?;
        let backend = &route.backends[i];
        let result = tokio::time::timeout(timeout, E::Conn::connect(backend.addr)).await;
        let (reason, message) = match result {
            Ok(Ok(conn)) => return Ok((backend.clone(), conn)),
            Ok(Err(e)) => (ConnectError::of(&e), format!("connect: {e}")),
            Err(_) => (
                ConnectError::Timeout,
                format!("connect timed out after {}", route.listener.connect_timeout),
            ),
        };
        backend.count_connect_error(reason);
        if reason == ConnectError::Local {
            // This host is out of descriptors, buffers or ports: no
            // evidence against the backend, and another would fail alike.
            tracing::debug!(backend = %backend.addr, %message, "connect failed here, not at the backend");
            return Err(Reject::LocalError);
        }
        backend
            .health
            .load()
            .passive_failure(message, StdInstant::now());
        tried.push(i);
    }
    Err(Reject::NoBackend)
}
