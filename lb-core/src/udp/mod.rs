//! UDP forwarding on one worker, written once for both engines.
//!
//! Each worker owns one `SO_REUSEPORT` socket per UDP listener; the kernel
//! keeps a client address on one worker. A flow (keyed by client address)
//! picks a backend with the listener's algorithm, owns a socket connected
//! to it, and relays replies to the client from the listener's socket, so
//! they come from the listener's address and port. Flows end when idle
//! (`idle_timeout`), when their backend's drain ends, or when their backend
//! is down at the next datagram (then the datagram opens a new flow).

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lb_config::ProxyProtocol;
use tokio::sync::watch;

mod batch;
pub mod flow;
mod listener;
mod upstream;

use batch::{send_runs, Drainer, Item, BATCH, BATCH_BUF};
pub use listener::MAX_DATAGRAM;
use listener::{current_route, Listener};
use upstream::flow_for;

use crate::engine::{Datagram, Engine};
use crate::proxy_protocol;
use crate::routing::BindKey;
use crate::stats::UdpDrop;
use crate::worker::context::Worker;

/// Serves one UDP listener socket until `stop`.
pub(crate) async fn serve<E: Engine>(
    worker: Rc<Worker>,
    key: BindKey,
    socket: E::Udp,
    local: SocketAddr,
    mut stop: watch::Receiver<bool>,
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
    receive(l.clone(), &mut stop).await;
    expiry.abort();
    let flows: Vec<_> = l
        .flows
        .borrow_mut()
        .expire(Instant::now(), Duration::ZERO, |_| true);
    drop(flows);
    l.socket.close();
    // Held until here: the control side counts a listener closed once
    // every worker has dropped its stop signal.
    drop(stop);
}

/// Receives datagrams until `stop`, one receive at a time, so a client's
/// datagrams leave in the order they came.
///
/// After a receive, a socket that had more waiting is drained without
/// waiting (up to [`BATCH`] datagrams), and the batch goes out with one
/// send per run of a client's equal-sized datagrams ([`on_batch`]).
async fn receive<E: Engine>(l: Rc<Listener<E>>, stop: &mut watch::Receiver<bool>) {
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
