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
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_config::{HashKey, ProxyProtocol};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::balance::hash;
use crate::engine::{gso, Datagram, Engine};
use crate::flow::FlowTable;
use crate::forward::{Shared, Worker};
use crate::proxy_protocol;
use crate::routing::{BackendHandle, BindKey, ConnectError, Route};
use crate::stats::{ListenerStats, UdpDrop, WorkerCounters};

/// Largest datagram forwarded (the IPv4 UDP payload limit).
pub const MAX_DATAGRAM: usize = 65_507;
/// Receive buffer: larger than any non-jumbo datagram, so nothing is cut
/// silently; anything above `MAX_DATAGRAM` is counted and dropped.
const RECV_BUF: usize = 65_536;
/// Datagrams taken from a listener socket per wake-up, at most.
const BATCH: usize = 32;
/// A receiver's buffer: a batch appends datagrams while a whole
/// [`RECV_BUF`] is spare. Pages are touched only as datagrams fill them.
const BATCH_BUF: usize = 2 * RECV_BUF;
/// While drains find nothing, one receive in this many still tries one.
const PROBE_EVERY: u32 = 8;

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
    let mut items = Vec::with_capacity(BATCH);
    let mut drainer = Drainer::default();
    loop {
        if *stop.borrow() {
            return;
        }
        buf.clear();
        items.clear();
        tokio::select! {
            biased;
            changed = stop.changed() => if changed.is_err() {
                return;
            },
            (received, b) = l.socket.recv_from(std::mem::take(&mut buf)) => {
                buf = b;
                match received {
                    Ok((len, client)) => {
                        items.push(Item {
                            start: 0,
                            len,
                            from: client,
                        });
                        if drainer.due() {
                            if let Some(e) = drainer.drain(&*l.socket, &mut buf, &mut items) {
                                tracing::debug!(bind = %l.key.addr, error = %e, "udp receive failed");
                            }
                        }
                        if items.len() == 1 {
                            buf = on_datagram(&l, client, len, buf).await;
                        } else {
                            on_batch(&l, &buf, &items).await;
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

/// One received datagram: `buf[start..start + len]`, from `from`.
#[derive(Clone, Copy, Debug)]
struct Item {
    start: usize,
    len: usize,
    from: SocketAddr,
}

/// When to drain a socket after a receive: while the last drain found
/// datagrams waiting, and on every [`PROBE_EVERY`]th receive otherwise (a
/// drain that finds nothing costs a syscall).
#[derive(Debug, Default)]
struct Drainer {
    draining: bool,
    receives: u32,
}

impl Drainer {
    /// Counts a receive; whether to drain after it.
    fn due(&mut self) -> bool {
        self.receives = self.receives.wrapping_add(1);
        self.draining || self.receives.is_multiple_of(PROBE_EVERY)
    }

    /// Appends the datagrams waiting on `socket` to `buf` and `items`,
    /// without waiting. Stops while less than a whole [`RECV_BUF`] is
    /// spare, so no datagram is ever cut. Returns the error that ended the
    /// drain, unless it was `WouldBlock`.
    fn drain(
        &mut self,
        socket: &impl Datagram,
        buf: &mut Vec<u8>,
        items: &mut Vec<Item>,
    ) -> Option<io::Error> {
        let before = items.len();
        let mut failed = None;
        while items.len() < BATCH && buf.capacity() - buf.len() >= RECV_BUF {
            let start = buf.len();
            match socket.try_recv_from(buf) {
                Ok((len, from)) => items.push(Item { start, len, from }),
                Err(e) => {
                    failed = (e.kind() != io::ErrorKind::WouldBlock).then_some(e);
                    break;
                }
            }
        }
        self.draining = items.len() > before;
        failed
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
            let (datagrams, bytes) = send_runs(l, &*upstream, None, buf, &mine).await;
            stats.count_to_backend(datagrams, bytes);
        }
    }
}

/// Sends one flow's datagrams (`mine`, in order) on `socket`, to `to` or
/// the socket's peer, in runs: consecutive datagrams of one size, the last
/// possibly shorter, leave in one segmented send. A socket or path that
/// cannot segment gets them one by one, and the listener stops trying
/// segmentation. Returns the datagrams and bytes sent.
async fn send_runs<E: Engine>(
    l: &Listener<E>,
    socket: &E::Udp,
    to: Option<SocketAddr>,
    buf: &[u8],
    mine: &[Item],
) -> (usize, usize) {
    let slice = |it: &Item| IoSlice::new(&buf[it.start..it.start + it.len]);
    let mut parts = Vec::with_capacity(mine.len().min(gso::MAX_SEGMENTS));
    let (mut datagrams, mut bytes) = (0, 0);
    let mut k = 0;
    while k < mine.len() {
        let end = run_end(mine, k, l.gso.get());
        let run = &mine[k..end];
        k = end;
        let segment = (run.len() > 1).then(|| run[0].len as u16);
        parts.clear();
        parts.extend(run.iter().map(slice));
        match socket.send_parts(&parts, segment, to).await {
            Ok(n) => {
                datagrams += run.len();
                bytes += n;
            }
            Err(e) if segment.is_some() && gso::unsupported(&e) => {
                tracing::debug!(bind = %l.key.addr, error = %e, "udp segmentation unavailable; sending datagrams one by one");
                l.gso.set(false);
                for item in run {
                    match socket.send_parts(&[slice(item)], None, to).await {
                        Ok(n) => {
                            datagrams += 1;
                            bytes += n;
                        }
                        Err(e) => tracing::debug!(error = %e, "udp send failed"),
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "udp send failed"),
        }
    }
    (datagrams, bytes)
}

/// Where the run that starts at `mine[k]` ends (exclusive): datagrams of
/// `mine[k]`'s size, then at most one shorter one, within the segmentation
/// limits. A run of one when `segment` is off or the size is 0.
fn run_end(mine: &[Item], k: usize, segment: bool) -> usize {
    let size = mine[k].len;
    let mut end = k + 1;
    if !segment || size == 0 {
        return end;
    }
    let mut bytes = size;
    while end < mine.len()
        && end - k < gso::MAX_SEGMENTS
        && mine[end].len <= size
        && bytes + mine[end].len <= gso::MAX_BYTES
    {
        bytes += mine[end].len;
        end += 1;
        if mine[end - 1].len < size {
            break;
        }
    }
    end
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
                backend.count_connect_error(ConnectError::Other);
                tracing::debug!(backend = %backend.addr, error = %e, "udp upstream socket failed");
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
    let mut items = Vec::new();
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
                    && relay_batch(
                        &l,
                        &upstream,
                        client,
                        &buf,
                        &mut drainer,
                        &mut items,
                        stats,
                        &refused,
                    )
                    .await
                {
                    continue;
                }
                let (sent, b) = l.socket.send_to(buf, client).await;
                buf = b;
                if sent.is_ok() {
                    stats.datagrams_to_client.fetch_add(1, Ordering::Relaxed);
                    stats.bytes_to_client.fetch_add(n as u64, Ordering::Relaxed);
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
#[allow(clippy::too_many_arguments)]
async fn relay_batch<E: Engine>(
    l: &Listener<E>,
    upstream: &E::Udp,
    client: SocketAddr,
    first: &[u8],
    drainer: &mut Drainer,
    items: &mut Vec<Item>,
    stats: &WorkerCounters,
    refused: impl Fn(&io::Error),
) -> bool {
    let Some(mut scratch) = Scratch::lease(&l.scratch) else {
        return false;
    };
    let scratch = &mut scratch.buf;
    scratch.extend_from_slice(first);
    items.clear();
    items.push(Item {
        start: 0,
        len: first.len(),
        from: client,
    });
    match drainer.drain(upstream, scratch, items) {
        Some(e) if e.kind() == io::ErrorKind::ConnectionRefused => refused(&e),
        Some(e) => tracing::debug!(%client, error = %e, "udp receive from backend failed"),
        None => {}
    }
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
    let (datagrams, bytes) = send_runs(l, &l.socket, Some(client), scratch, items).await;
    stats
        .datagrams_to_client
        .fetch_add(datagrams as u64, Ordering::Relaxed);
    stats
        .bytes_to_client
        .fetch_add(bytes as u64, Ordering::Relaxed);
    true
}

/// The listener's scratch buffer, leased; given back when dropped, also
/// when the task holding it is aborted.
struct Scratch<'a> {
    slot: &'a Cell<Option<Vec<u8>>>,
    buf: Vec<u8>,
}

impl<'a> Scratch<'a> {
    /// The buffer, empty, with room for a batch; `None` while leased.
    fn lease(slot: &'a Cell<Option<Vec<u8>>>) -> Option<Self> {
        let mut buf = slot.take()?;
        if buf.capacity() < BATCH_BUF {
            buf = Vec::with_capacity(BATCH_BUF);
        }
        buf.clear();
        Some(Self { slot, buf })
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        self.slot.set(Some(std::mem::take(&mut self.buf)));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The lengths of the runs `run_end` cuts datagrams of `lens` into.
    fn runs(lens: &[usize], segment: bool) -> Vec<usize> {
        let client = SocketAddr::from(([127, 0, 0, 1], 9));
        let mine: Vec<Item> = lens
            .iter()
            .map(|&len| Item {
                start: 0,
                len,
                from: client,
            })
            .collect();
        let (mut k, mut out) = (0, Vec::new());
        while k < mine.len() {
            let end = run_end(&mine, k, segment);
            out.push(end - k);
            k = end;
        }
        out
    }

    #[test]
    fn runs_are_one_size_then_at_most_one_shorter() {
        assert_eq!(runs(&[200, 200, 200, 37, 200, 200], true), [4, 2]);
        assert_eq!(runs(&[200, 1200, 1200, 200], true), [1, 3]);
        assert_eq!(runs(&[37, 37, 200], true), [2, 1]);
        // Empty datagrams cannot be segments.
        assert_eq!(runs(&[0, 0, 5], true), [1, 1, 1]);
        assert_eq!(runs(&[200, 200, 37], false), [1, 1, 1]);
    }

    #[test]
    fn runs_stay_within_the_segmentation_limits() {
        assert_eq!(runs(&[100; 70], true), [gso::MAX_SEGMENTS, 6]);
        let per_run = gso::MAX_BYTES / 1_200;
        assert_eq!(runs(&[1_200; 60], true), [per_run, 60 - per_run]);
        assert_eq!(runs(&[MAX_DATAGRAM; 2], true), [1, 1]);
    }
}
