//! A client's flow to a backend: finding or opening it (caps, selection,
//! a socket connected to the backend), and relaying the backend's replies
//! to the client from the listener's socket.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use lb_config::HashKey;

use super::batch::{send_runs, Drainer, Scratch, RECV_BUF};
use super::listener::{Flow, Listener, Slots, MAX_DATAGRAM};
use crate::balance::hash;
use crate::engine::{Datagram, Engine};
use crate::routing::{BackendHandle, ConnectError, Route};
use crate::stats::{ListenerStats, UdpDrop, WorkerCounters};

/// The upstream socket of `client`'s flow: the existing one, or a new flow
/// when there is none or its backend is down or drained.
pub(super) fn flow_for<E: Engine>(
    l: &Rc<Listener<E>>,
    route: &Arc<Route>,
    client: SocketAddr,
    now: Instant,
) -> Result<Rc<E::Udp>, UdpDrop> {
    let existing = {
        let mut flows = l.flows.borrow_mut();
        match flows.touch(client, now) {
            Some(f) if usable(&f.slots.backend, route) => Some(f.upstream.clone()),
            Some(_) => {
                // Backend down or drained: this datagram opens a new flow.
                drop(flows.remove(client));
                route
                    .stats
                    .worker(l.worker.id)
                    .flows_expired
                    .fetch_add(1, Ordering::Relaxed);
                None
            }
            None => None,
        }
    };
    match existing {
        Some(u) => Ok(u),
        None => open_flow(l, route, client, now),
    }
}

/// Whether a flow may keep its backend: not closed by a drain deadline, and
/// healthy unless no backend of the listener is (then staying beats churn).
fn usable(backend: &BackendHandle, route: &Route) -> bool {
    if backend.is_closed() {
        return false;
    }
    backend.health.load().is_up() || !route.any_healthy()
}

/// Takes one slot of `counter` unless that would exceed `cap` (0 = no cap).
fn take_slot(counter: &AtomicU64, cap: u64) -> bool {
    let before = counter.fetch_add(1, Ordering::Relaxed);
    if cap > 0 && before >= cap {
        counter.fetch_sub(1, Ordering::Relaxed);
        return false;
    }
    true
}

fn open_flow<E: Engine>(
    l: &Rc<Listener<E>>,
    route: &Arc<Route>,
    client: SocketAddr,
    now: Instant,
) -> Result<Rc<E::Udp>, UdpDrop> {
    let shared = &l.worker.shared;
    if !take_slot(&shared.active_total, shared.max_total) {
        return Err(UdpDrop::FlowLimit);
    }
    if !take_slot(
        &route.stats.active,
        u64::from(route.listener.max_connections),
    ) {
        shared.active_total.fetch_sub(1, Ordering::Relaxed);
        return Err(UdpDrop::FlowLimit);
    }
    let release = || {
        shared.active_total.fetch_sub(1, Ordering::Relaxed);
        route.stats.active.fetch_sub(1, Ordering::Relaxed);
    };
    let key = match route.listener.hash_key {
        HashKey::FiveTuple => hash::five_tuple_key(client, l.local, 17),
        HashKey::ClientIp => hash::client_ip_key(client.ip()),
    };
    let mut tried = Vec::new();
    let (backend, upstream) = loop {
        let Some(i) = route.pick(key, l.worker.random(), &tried) else {
            release();
            return Err(UdpDrop::NoBackend);
        };
        let backend = route.backends[i].clone();
        match connect_upstream::<E>(backend.addr) {
            Ok(u) => break (backend, Rc::new(u)),
            Err(e) => {
                let reason = ConnectError::of(&e);
                backend.count_connect_error(reason);
                tracing::debug!(backend = %backend.addr, error = %e, "udp upstream socket failed");
                if reason == ConnectError::Local {
                    // Out of descriptors or buffers here: any backend
                    // would fail alike.
                    release();
                    return Err(UdpDrop::LocalError);
                }
                tried.push(i);
            }
        }
    };
    backend.active.fetch_add(1, Ordering::Relaxed);
    backend.total.fetch_add(1, Ordering::Relaxed);
    let slots = Slots {
        shared: shared.clone(),
        listener: route.stats.clone(),
        backend: backend.clone(),
    };
    let replies = tokio::task::spawn_local(relay_replies(
        l.clone(),
        upstream.clone(),
        client,
        backend,
        route.stats.clone(),
    ));
    route
        .stats
        .worker(l.worker.id)
        .flows_created
        .fetch_add(1, Ordering::Relaxed);
    let replaced = l.flows.borrow_mut().insert(
        client,
        Flow {
            upstream: upstream.clone(),
            replies,
            slots,
        },
        now,
    );
    drop(replaced);
    Ok(upstream)
}

/// A socket connected to `backend` (so only its replies arrive), from an
/// ephemeral port of the matching family.
fn connect_upstream<E: Engine>(backend: SocketAddr) -> io::Result<E::Udp> {
    let any = match backend.ip() {
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let s = std::net::UdpSocket::bind(any)?;
    s.connect(backend)?;
    E::Udp::from_std(s)
}

/// Relays the backend's datagrams to `client` from the listener's socket.
/// `stats` is the listener's (kept across reloads), so no per-datagram
/// snapshot lookup is needed. A backend that sends faster than one
/// datagram per wake-up gets the same batching as clients do
/// ([`relay_batch`]).
async fn relay_replies<E: Engine>(
    l: Rc<Listener<E>>,
    upstream: Rc<E::Udp>,
    client: SocketAddr,
    backend: Arc<BackendHandle>,
    stats: Arc<ListenerStats>,
) {
    let stats = stats.worker(l.worker.id);
    let mut buf = Vec::with_capacity(RECV_BUF);
    let mut drainer = Drainer::default();
    let refused = |e: &io::Error| {
        // ICMP port unreachable from the backend: passive health evidence.
        backend.count_connect_error(ConnectError::Refused);
        backend
            .health
            .load()
            .passive_failure(format!("udp: {e}"), Instant::now());
    };
    loop {
        buf.clear();
        let (received, b) = upstream.recv(buf).await;
        buf = b;
        match received {
            Ok(n) if n <= MAX_DATAGRAM => {
                l.flows.borrow_mut().touch(client, Instant::now());
                if drainer.due()
                    && relay_batch(&l, &upstream, client, &buf, &mut drainer, stats, &refused).await
                {
                    continue;
                }
                let (sent, b) = l.socket.send_to(buf, client).await;
                buf = b;
                if sent.is_ok() {
                    stats.count_to_client(1, n);
                }
            }
            Ok(_) => stats.drop_datagram(UdpDrop::Truncated),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => refused(&e),
            Err(_) => return,
        }
    }
}

/// After a reply (`first`) from the backend, drains what else waits on the
/// flow's socket into the listener's scratch buffer and relays it all in
/// runs. Whether it did (else the caller relays `first` alone: nothing
/// else waited, or another flow holds the scratch buffer).
async fn relay_batch<E: Engine>(
    l: &Listener<E>,
    upstream: &E::Udp,
    client: SocketAddr,
    first: &[u8],
    drainer: &mut Drainer,
    stats: &WorkerCounters,
    refused: impl Fn(&io::Error),
) -> bool {
    let Some(mut scratch) = Scratch::lease(&l.scratch) else {
        return false;
    };
    let scratch = &mut scratch.buf;
    scratch.extend_from_slice(first);
    drainer.start(first.len(), client);
    match drainer.drain(upstream, scratch) {
        Some(e) if e.kind() == io::ErrorKind::ConnectionRefused => refused(&e),
        Some(e) => tracing::debug!(%client, error = %e, "udp receive from backend failed"),
        None => {}
    }
    let items = &mut drainer.items;
    if items.len() == 1 {
        return false;
    }
    items.retain(|it| {
        let fits = it.len <= MAX_DATAGRAM;
        if !fits {
            stats.drop_datagram(UdpDrop::Truncated);
        }
        fits
    });
    let (datagrams, bytes) = send_runs(&*l.socket, Some(client), scratch, items, &l.gso).await;
    stats.count_to_client(datagrams, bytes);
    true
}
