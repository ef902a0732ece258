//! UDP forwarding on one worker, written once for both engines.
//!
//! Each worker owns one `SO_REUSEPORT` socket per UDP listener; the kernel
//! keeps a client address on one worker. A flow (keyed by client address)
//! picks a backend with the listener's algorithm, owns a socket connected
//! to it, and relays replies to the client from the listener's socket, so
//! they come from the listener's address and port. Flows end when idle
//! (`idle_timeout`), when their backend's drain ends, or when their backend
//! is down at the next datagram (then the datagram opens a new flow).

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_config::{HashKey, ProxyProtocol};
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod batch;
pub mod flow;

use batch::{send_runs, Drainer, Item, Scratch, BATCH, BATCH_BUF, RECV_BUF};

use crate::balance::hash;
use crate::engine::{Datagram, Engine};
use crate::proxy_protocol;
use crate::routing::{BackendHandle, BindKey, ConnectError, Route};
use crate::stats::{ListenerStats, UdpDrop, WorkerCounters};
use crate::worker::context::Worker;
use crate::worker::shared::Shared;
use flow::FlowTable;

/// Largest datagram forwarded (the IPv4 UDP payload limit).
pub const MAX_DATAGRAM: usize = 65_507;
/// Counts held by a flow, released when it ends.
struct Slots {
    shared: Arc<Shared>,
    listener: Arc<ListenerStats>,
    backend: Arc<BackendHandle>,
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.shared.active_total.fetch_sub(1, Ordering::Relaxed);
        self.listener.active.fetch_sub(1, Ordering::Relaxed);
        self.backend.active.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Flow<U: Datagram> {
    upstream: Rc<U>,
    replies: JoinHandle<()>,
    slots: Slots,
}

impl<U: Datagram> Drop for Flow<U> {
    fn drop(&mut self) {
        self.replies.abort();
        self.upstream.close();
    }
}

type Flows<U> = Rc<RefCell<FlowTable<Flow<U>>>>;

struct Listener<E: Engine> {
    worker: Rc<Worker>,
    key: BindKey,
    local: SocketAddr,
    socket: Rc<E::Udp>,
    flows: Flows<E::Udp>,
    /// Where a flow's reply task drains its socket, leased to one task at
    /// a time (one that finds it leased relays datagram by datagram);
    /// grown on first use.
    scratch: Cell<Option<Vec<u8>>>,
    /// Runs of datagrams leave in one segmented send (off once the kernel
    /// or a path refused one).
    gso: Cell<bool>,
}

/// Serves one UDP listener socket until `stop`.
pub(crate) async fn serve<E: Engine>(
    worker: Rc<Worker>,
    key: BindKey,
    socket: E::Udp,
    local: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    let l = Rc::new(Listener::<E> {
        worker,
        key,
        local,
        socket: Rc::new(socket),
        flows: Rc::default(),
        scratch: Cell::new(Some(Vec::new())),
        gso: Cell::new(true),
    });
    let expiry = tokio::task::spawn_local(expire_loop(l.clone()));
    receive(l.clone(), stop).await;
    expiry.abort();
    let flows: Vec<_> = l
        .flows
        .borrow_mut()
        .expire(Instant::now(), Duration::ZERO, |_| true);
    drop(flows);
    l.socket.close();
}

/// Receives datagrams until `stop`, one receive at a time, so a client's
/// datagrams leave in the order they came.
///
/// After a receive, a socket that had more waiting is drained without
/// waiting (up to [`BATCH`] datagrams), and the batch goes out with one
/// send per run of a client's equal-sized datagrams ([`on_batch`]).
async fn receive<E: Engine>(l: Rc<Listener<E>>, mut stop: watch::Receiver<bool>) {
    let mut buf = Vec::with_capacity(BATCH_BUF);
    let mut drainer = Drainer::default();
    loop {
        if *stop.borrow() {
            return;
        }
        buf.clear();
        tokio::select! {
            biased;
            changed = stop.changed() => if changed.is_err() {
                return;
            },
            (received, b) = l.socket.recv_from(std::mem::take(&mut buf)) => {
                buf = b;
                match received {
                    Ok((len, client)) => {
                        drainer.start(len, client);
                        if drainer.due() {
                            if let Some(e) = drainer.drain(&*l.socket, &mut buf) {
                                tracing::debug!(bind = %l.key.addr, error = %e, "udp receive failed");
                            }
                        }
                        if drainer.items.len() == 1 {
                            buf = on_datagram(&l, client, len, buf).await;
                        } else {
                            on_batch(&l, &buf, &drainer.items).await;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(bind = %l.key.addr, error = %e, "udp receive failed");
                        buf = Vec::with_capacity(BATCH_BUF);
                    }
                }
            }
        }
    }
}

fn current_route(l: &Listener<impl Engine>) -> Option<Arc<Route>> {
    l.worker.shared.routing.load().routes.get(&l.key).cloned()
}

/// The upstream socket of `client`'s flow: the existing one, or a new flow
/// when there is none or its backend is down or drained.
fn flow_for<E: Engine>(
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

/// Handles one datagram from `client`; returns the buffer for reuse.
async fn on_datagram<E: Engine>(
    l: &Rc<Listener<E>>,
    client: SocketAddr,
    n: usize,
    buf: Vec<u8>,
) -> Vec<u8> {
    let Some(route) = current_route(l) else {
        return buf;
    };
    let stats = route.stats.worker(l.worker.id);
    if n > MAX_DATAGRAM {
        stats.drop_datagram(UdpDrop::Truncated);
        return buf;
    }
    if !route.allows(client.ip()) {
        stats.drop_datagram(UdpDrop::SourceRange);
        return buf;
    }
    let upstream = match flow_for(l, &route, client, Instant::now()) {
        Ok(u) => u,
        Err(why) => {
            stats.drop_datagram(why);
            return buf;
        }
    };
    let (sent, buf) = match route.listener.proxy_protocol {
        ProxyProtocol::V2 => {
            let (r, _) = upstream.send(framed_v2(l, client, &buf)).await;
            (r, buf)
        }
        _ => upstream.send(buf).await,
    };
    match sent {
        Ok(_) => stats.count_to_backend(1, n),
        Err(e) => tracing::debug!(%client, error = %e, "udp send to backend failed"),
    }
    buf
}

/// `payload` behind a PROXY v2 header naming `client` and the listener.
fn framed_v2(l: &Listener<impl Engine>, client: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut framed = proxy_protocol::v2(client, l.local, proxy_protocol::Transport::Datagram);
    framed.extend_from_slice(payload);
    framed
}

/// Forwards a batch (`items` in `buf`): each client's datagrams in the
/// order they came, clients in the order their first datagram came. The
/// route, the source check and the flow are looked up once per client.
async fn on_batch<E: Engine>(l: &Rc<Listener<E>>, buf: &[u8], items: &[Item]) {
    let Some(route) = current_route(l) else {
        return;
    };
    let stats = route.stats.worker(l.worker.id);
    let now = Instant::now();
    let mut done = [false; BATCH];
    let mut mine = Vec::with_capacity(items.len());
    for (i, first) in items.iter().enumerate() {
        if done[i] {
            continue;
        }
        mine.clear();
        for (j, item) in items.iter().enumerate().skip(i) {
            if item.from != first.from {
                continue;
            }
            done[j] = true;
            if item.len > MAX_DATAGRAM {
                stats.drop_datagram(UdpDrop::Truncated);
            } else {
                mine.push(*item);
            }
        }
        if mine.is_empty() {
            continue;
        }
        let flow = if route.allows(first.from.ip()) {
            flow_for(l, &route, first.from, now)
        } else {
            Err(UdpDrop::SourceRange)
        };
        let upstream = match flow {
            Ok(u) => u,
            Err(why) => {
                for _ in &mine {
                    stats.drop_datagram(why);
                }
                continue;
            }
        };
        if route.listener.proxy_protocol == ProxyProtocol::V2 {
            for item in &mine {
                let payload = &buf[item.start..item.start + item.len];
                match upstream.send(framed_v2(l, first.from, payload)).await.0 {
                    Ok(_) => stats.count_to_backend(1, item.len),
                    Err(e) => {
                        tracing::debug!(client = %first.from, error = %e, "udp send to backend failed")
                    }
                }
            }
        } else {
            let (datagrams, bytes) = send_runs(&*upstream, None, buf, &mine, &l.gso).await;
            stats.count_to_backend(datagrams, bytes);
        }
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

/// Closes idle and drained flows, a few times per idle timeout.
async fn expire_loop<E: Engine>(l: Rc<Listener<E>>) {
    loop {
        let idle = current_route(&l)
            .map(|r| r.listener.idle_timeout.get())
            .unwrap_or(Duration::from_secs(30));
        let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        tokio::time::sleep(tick).await;
        let gone = l
            .flows
            .borrow_mut()
            .expire(Instant::now(), idle, |f| f.slots.backend.is_closed());
        if !gone.is_empty() {
            if let Some(route) = current_route(&l) {
                route
                    .stats
                    .worker(l.worker.id)
                    .flows_expired
                    .fetch_add(gone.len() as u64, Ordering::Relaxed);
            }
        }
        drop(gone);
    }
}
