//! The worker: accept loops and the life of one proxied TCP connection,
//! written once for both engines.
//!
//! A connection reads the routing snapshot once, is checked against
//! `source_ranges` and the connection caps, picks a backend (retrying
//! failed connects on other backends), sends the PROXY header, then copies
//! both ways until both sides finish, an error, the idle timeout, or its
//! backend's drain deadline.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant as StdInstant;

use arc_swap::ArcSwap;
use lb_config::{HashKey, ProxyProtocol};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::balance::hash;
use crate::engine::{Conn, Engine};
use crate::proxy_protocol;
use crate::routing::{BackendHandle, BindKey, ConnectError, Route, Routing};
use crate::splice::{self, Pipe};
use crate::stats::Reject;

/// Bytes per copy buffer.
const BUF_SIZE: usize = 64 * 1024;
/// Idle buffers a worker keeps for reuse.
const POOL_MAX: usize = 256;
/// Connect attempts per client connection (each on a different backend).
pub const MAX_CONNECT_ATTEMPTS: usize = 3;

/// What every worker and the control side share.
#[derive(Debug)]
pub struct Shared {
    /// The routing snapshot.
    pub routing: ArcSwap<Routing>,
    /// Proxied connections open now, all listeners.
    pub active_total: AtomicU64,
    /// Per worker: bytes of forwarding buffers held by connections now
    /// (out of the pool): idle connections hold none.
    pub buffer_bytes: Box<[crate::stats::Padded]>,
    /// Per worker: splice pipes open now, leased or idle.
    pub pipes_open: Box<[crate::stats::Padded]>,
    /// Per worker: splice pipes kept idle for the next bulk transfer.
    pub pipes_idle: Box<[crate::stats::Padded]>,
    /// Per worker: TCP connections it serves now, including those handed
    /// to it and not yet started (see [`place`]).
    pub worker_conns: Box<[crate::stats::Padded]>,
    /// Per worker: connections it accepted and handed to another worker.
    pub handed_off: Box<[crate::stats::Padded]>,
    /// Per worker: where the other workers hand it connections.
    pub handoff: Box<[mpsc::UnboundedSender<Handoff>]>,
    /// Global cap on `active_total`.
    pub max_total: u64,
    /// Bulk transfers move through kernel pipes (`[runtime] splice`).
    pub splice: bool,
}

/// A command from the control side to a worker.
#[derive(Debug)]
pub enum WorkerCmd {
    /// Start accepting on this socket until `stop` becomes true.
    Listen {
        /// Which listener this socket serves.
        key: BindKey,
        /// Bound, listening, non-blocking.
        socket: std::net::TcpListener,
        /// Becomes true when the listener is removed or the process stops.
        stop: watch::Receiver<bool>,
    },
    /// Start serving UDP on this socket until `stop` becomes true.
    ListenUdp {
        /// Which listener this socket serves.
        key: BindKey,
        /// Bound, non-blocking.
        socket: std::net::UdpSocket,
        /// The bound address (replies come from it; PROXY v2 names it).
        local: SocketAddr,
        /// Becomes true when the listener is removed or the process stops.
        stop: watch::Receiver<bool>,
    },
    /// Answer at once: the worker's runtime still runs its tasks (the
    /// systemd watchdog, `crate::watchdog`).
    Ping(tokio::sync::oneshot::Sender<()>),
}

/// A connection one worker accepted for another to serve, already counted
/// in the other's `worker_conns`.
#[derive(Debug)]
pub struct Handoff {
    key: BindKey,
    stream: std::net::TcpStream,
    peer: SocketAddr,
}

/// Which worker serves a connection that worker `me` just accepted, given
/// each worker's connection count: `me`, unless the least loaded worker
/// serves clearly fewer ([`handoff_slack`]).
///
/// The kernel spreads accepts over the workers' `SO_REUSEPORT` sockets by
/// a hash of the addresses, which evens out over many connections but not
/// over a few long-lived ones: 16 connections often split 11 to 5. A
/// worker that is clearly ahead passes the new connection on, as HAProxy
/// does between its threads (docs/design/0001).
fn place(counts: &[crate::stats::Padded], me: usize) -> usize {
    let count = |i: usize| counts[i].0.load(Ordering::Relaxed);
    let mine = count(me);
    let (least, fewest) = (0..counts.len())
        .map(|i| (i, count(i)))
        .min_by_key(|&(_, n)| n)
        .unwrap_or((me, mine));
    if mine > fewest + handoff_slack(fewest) {
        least
    } else {
        me
    }
}

/// How many more connections than the least loaded worker a worker keeps
/// before it hands new ones over: 1, plus a sixteenth of the load, so many
/// short connections (each hand-off costs a wake-up of the other worker)
/// move only when the spread is wider than their churn.
fn handoff_slack(fewest: u64) -> u64 {
    1 + fewest / 16
}

pub(crate) struct Worker {
    pub(crate) id: usize,
    pub(crate) shared: Arc<Shared>,
    rng: Cell<u64>,
    buffers: RefCell<Vec<Vec<u8>>>,
    /// Idle pipes for the next bulk transfer (counted in
    /// `shared.pipes_idle`; every pipe open in `shared.pipes_open`).
    pipes: RefCell<Vec<Pipe>>,
}

impl Worker {
    pub(crate) fn random(&self) -> u64 {
        let x = self.rng.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.rng.set(x);
        hash::fmix64(x)
    }

    fn take_buffer(&self) -> Vec<u8> {
        let buf = self
            .buffers
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BUF_SIZE));
        buf
    }

    fn give_buffer(&self, mut buf: Vec<u8>) {
        let mut pool = self.buffers.borrow_mut();
        if buf.capacity() >= BUF_SIZE && pool.len() < POOL_MAX {
            buf.clear();
            pool.push(buf);
        }
    }

    /// A pipe for a bulk transfer, if splicing is on and one is free or
    /// can be opened within the worker's share.
    fn lease_pipe(&self) -> Option<PipeLease<'_>> {
        if !self.shared.splice {
            return None;
        }
        let open = &self.shared.pipes_open[self.id].0;
        let pipe = match self.pipes.borrow_mut().pop() {
            Some(pipe) => {
                self.shared.pipes_idle[self.id]
                    .0
                    .fetch_sub(1, Ordering::Relaxed);
                pipe
            }
            None if open.load(Ordering::Relaxed) >= splice::PIPES_PER_WORKER => return None,
            None => match Pipe::new() {
                Ok(pipe) => {
                    open.fetch_add(1, Ordering::Relaxed);
                    pipe
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot open a pipe; copying instead");
                    return None;
                }
            },
        };
        // What the pipe may pin counts as held, as a buffer would.
        let held = BytesHeld::new(&self.shared.buffer_bytes[self.id].0, pipe.capacity());
        Some(PipeLease {
            worker: self,
            pipe: Some(pipe),
            empty: true,
            _held: held,
        })
    }
}

/// A pipe leased by one direction of a connection. Given back to the
/// worker's pool only empty: one dropped with bytes in it (the connection
/// ended mid-transfer) is closed, bytes and all.
struct PipeLease<'a> {
    worker: &'a Worker,
    pipe: Option<Pipe>,
    empty: bool,
    _held: BytesHeld<'a>,
}

impl PipeLease<'_> {
    fn pipe(&self) -> &Pipe {
        self.pipe.as_ref().expect("present until dropped")
    }
}

impl Drop for PipeLease<'_> {
    fn drop(&mut self) {
        let Some(pipe) = self.pipe.take() else {
            return;
        };
        let (worker, id) = (self.worker, self.worker.id);
        let mut pool = worker.pipes.borrow_mut();
        if self.empty && pool.len() < splice::POOL_MAX {
            pool.push(pipe);
            worker.shared.pipes_idle[id]
                .0
                .fetch_add(1, Ordering::Relaxed);
        } else {
            drop(pipe);
            worker.shared.pipes_open[id]
                .0
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Runs worker `id` on this thread until the command channel closes.
/// `started` is called once the worker's runtime runs; an error before
/// that is returned.
pub fn run_worker<E: Engine>(
    id: usize,
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<WorkerCmd>,
    mut handoffs: mpsc::UnboundedReceiver<Handoff>,
    started: impl FnOnce(),
) -> io::Result<()> {
    E::run(async move {
        started();
        let seed = hash::fmix64(
            id as u64 ^ StdInstant::now().elapsed().as_nanos() as u64 ^ std::process::id() as u64,
        );
        let worker = Rc::new(Worker {
            id,
            shared,
            rng: Cell::new(seed),
            buffers: RefCell::new(Vec::new()),
            pipes: RefCell::new(Vec::new()),
        });
        loop {
            let cmd = tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => cmd,
                    None => return, // the control side is gone: stop
                },
                Some(handoff) = handoffs.recv() => {
                    adopt::<E>(&worker, handoff);
                    continue;
                }
            };
            match cmd {
                WorkerCmd::Listen { key, socket, stop } => match E::listener(socket) {
                    Ok(listener) => {
                        tokio::task::spawn_local(accept_loop::<E>(
                            worker.clone(),
                            key,
                            listener,
                            stop,
                        ));
                    }
                    Err(e) => {
                        tracing::error!(bind = %key.addr, error = %e, worker = id, "cannot use listener socket")
                    }
                },
                WorkerCmd::ListenUdp {
                    key,
                    socket,
                    local,
                    stop,
                } => match <E::Udp as crate::engine::Datagram>::from_std(socket) {
                    Ok(socket) => {
                        tokio::task::spawn_local(crate::udp::serve::<E>(
                            worker.clone(),
                            key,
                            socket,
                            local,
                            stop,
                        ));
                    }
                    Err(e) => {
                        tracing::error!(bind = %key.addr, error = %e, worker = id, "cannot use udp socket")
                    }
                },
                WorkerCmd::Ping(reply) => {
                    let _ = reply.send(());
                }
            }
        }
    })
}

async fn accept_loop<E: Engine>(
    worker: Rc<Worker>,
    key: BindKey,
    listener: E::Listener,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            E::close_listener(&listener);
            return;
        }
        tokio::select! {
            biased;
            changed = stop.changed() => if changed.is_err() {
                E::close_listener(&listener);
                return; // the control side is gone
            },
            accepted = E::accept(&listener) => match accepted {
                Ok((stream, peer)) => dispatch::<E>(&worker, key, stream, peer),
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: back off briefly instead of spinning.
                    tracing::debug!(bind = %key.addr, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
        }
    }
}

/// Serves a connection this worker accepted, or hands it to the worker
/// [`place`] picks.
fn dispatch<E: Engine>(
    worker: &Rc<Worker>,
    key: BindKey,
    stream: std::net::TcpStream,
    peer: SocketAddr,
) {
    let shared = &worker.shared;
    let to = place(&shared.worker_conns, worker.id);
    // Counted now, so the next accept anywhere sees it.
    shared.worker_conns[to].0.fetch_add(1, Ordering::Relaxed);
    if to == worker.id {
        adopt::<E>(worker, Handoff { key, stream, peer });
    } else if shared.handoff[to]
        .send(Handoff { key, stream, peer })
        .is_ok()
    {
        shared.handed_off[worker.id]
            .0
            .fetch_add(1, Ordering::Relaxed);
    } else {
        // That worker is gone (shutting down): the connection closes.
        shared.worker_conns[to].0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves a connection counted for this worker, accepted here or handed
/// over.
fn adopt<E: Engine>(worker: &Rc<Worker>, handoff: Handoff) {
    let Handoff { key, stream, peer } = handoff;
    match E::Conn::from_std(stream) {
        Ok(conn) => {
            tokio::task::spawn_local(serve::<E>(worker.clone(), key, conn, peer));
        }
        Err(e) => {
            worker.shared.worker_conns[worker.id]
                .0
                .fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(bind = %key.addr, error = %e, "cannot serve an accepted connection");
        }
    }
}

/// Decrements a counter when dropped.
struct Held<'a>(&'a AtomicU64);

impl<'a> Held<'a> {
    fn take(counter: &'a AtomicU64) -> (Self, u64) {
        let before = counter.fetch_add(1, Ordering::Relaxed);
        (Self(counter), before)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a buffer's bytes as held until dropped (also when the connection
/// is cancelled mid-read and the buffer goes with it).
struct BytesHeld<'a>(&'a AtomicU64, u64);

impl<'a> BytesHeld<'a> {
    fn new(counter: &'a AtomicU64, bytes: usize) -> Self {
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
        Self(counter, bytes as u64)
    }
}

impl Drop for BytesHeld<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// Serves one connection, counted in this worker's `worker_conns` by
/// [`dispatch`].
async fn serve<E: Engine>(worker: Rc<Worker>, key: BindKey, client: E::Conn, peer: SocketAddr) {
    let _slot = Held(&worker.shared.worker_conns[worker.id].0);
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
    let Some((backend, upstream)) = connect_backend::<E>(&worker, &route, peer, local).await else {
        stats.reject(Reject::NoBackend);
        return;
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

/// Picks and connects a backend, retrying other backends on failure.
async fn connect_backend<E: Engine>(
    worker: &Worker,
    route: &Route,
    peer: SocketAddr,
    local: SocketAddr,
) -> Option<(Arc<BackendHandle>, E::Conn)> {
    let key = match route.listener.hash_key {
        HashKey::FiveTuple => hash::five_tuple_key(peer, local, 6),
        HashKey::ClientIp => hash::client_ip_key(peer.ip()),
    };
    let timeout = route.listener.connect_timeout.get();
    let mut tried: Vec<usize> = Vec::with_capacity(MAX_CONNECT_ATTEMPTS);
    for _ in 0..MAX_CONNECT_ATTEMPTS {
        let i = route.pick(key, worker.random(), &tried)?;
        let backend = &route.backends[i];
        let result = tokio::time::timeout(timeout, E::Conn::connect(backend.addr)).await;
        let (reason, message) = match result {
            Ok(Ok(conn)) => return Some((backend.clone(), conn)),
            Ok(Err(e)) => {
                let reason = if e.kind() == io::ErrorKind::ConnectionRefused {
                    ConnectError::Refused
                } else {
                    ConnectError::Other
                };
                (reason, format!("connect: {e}"))
            }
            Err(_) => (
                ConnectError::Timeout,
                format!("connect timed out after {}", route.listener.connect_timeout),
            ),
        };
        backend.count_connect_error(reason);
        backend
            .health
            .load()
            .passive_failure(message, StdInstant::now());
        tried.push(i);
    }
    None
}

/// Copies `from` → `to` until EOF (then half-closes `to`) or an error.
/// `one_way_done` is shared by the two directions of a connection.
async fn pump<C: Conn>(
    worker: &Worker,
    from: &C,
    to: &C,
    bytes: &AtomicU64,
    activity: &Cell<Instant>,
    one_way_done: &Cell<bool>,
) -> io::Result<()> {
    let mut can_splice = true;
    // Whether `from` is known readable (a wait that ran during the last
    // write ended).
    let mut readable = false;
    loop {
        // Wait without a buffer: idle connections hold none.
        if !readable {
            from.ready().await?;
        }
        readable = false;
        let buf = worker.take_buffer();
        let capacity = buf.capacity();
        let held = BytesHeld::new(&worker.shared.buffer_bytes[worker.id].0, capacity);
        let (read, buf) = from.read(buf).await;
        let n = match read {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Not readable after all: wait without holding the buffer.
                worker.give_buffer(buf);
                continue;
            }
            Err(e) => {
                worker.give_buffer(buf);
                return Err(e);
            }
        };
        if n == 0 {
            worker.give_buffer(buf);
            return end_of_stream(to, one_way_done);
        }
        activity.set(Instant::now());
        // A short read is a message, not a bulk transfer: where the engine
        // gains by it, start waiting for the next one before writing this
        // one (docs/design/0007). The wait holds no buffer.
        let next = if n < capacity {
            from.ready_while_writing()
        } else {
            None
        };
        let mut next = std::pin::pin!(next);
        // One poll queues the wait (and may already find it done).
        let mut early = Poll::Pending;
        if let Some(wait) = next.as_mut().as_pin_mut() {
            early = futures::poll!(wait);
        }
        let (written, buf) = to.write_all(buf).await;
        worker.give_buffer(buf);
        drop(held);
        written?;
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        activity.set(Instant::now());
        if let Some(wait) = next.as_mut().as_pin_mut() {
            match early {
                Poll::Ready(r) => r?,
                Poll::Pending => wait.await?,
            }
            readable = true;
            continue;
        }
        if n < capacity || !can_splice {
            continue;
        }
        // The read filled the buffer: a bulk transfer. While data keeps
        // waiting, move it through a pipe instead of copying it.
        let Some(mut pipe) = worker.lease_pipe() else {
            continue;
        };
        // Boxed: its state lives only while splicing, so the future that
        // every connection holds (idle ones too) stays as small as before.
        match Box::pin(splice_while_waiting(&mut pipe, from, to, bytes, activity)).await {
            Ok(Spliced::Drained) => {}
            Ok(Spliced::Eof) => return end_of_stream(to, one_way_done),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && pipe.empty => {
                // This socket cannot splice (nothing was moved): copy.
                tracing::debug!(error = %e, "splice refused; copying instead");
                can_splice = false;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How a spell of splicing ended.
enum Spliced {
    /// Nothing waits any more; the pipe is empty.
    Drained,
    /// `from` reached end of stream; the pipe is empty.
    Eof,
}

/// Moves what waits on `from` to `to` through `pipe` until nothing waits.
async fn splice_while_waiting<C: Conn>(
    pipe: &mut PipeLease<'_>,
    from: &C,
    to: &C,
    bytes: &AtomicU64,
    activity: &Cell<Instant>,
) -> io::Result<Spliced> {
    loop {
        let n = match from.splice_in(pipe.pipe(), pipe.pipe().capacity()) {
            Ok(0) => return Ok(Spliced::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Spliced::Drained),
            Err(e) => return Err(e),
        };
        pipe.empty = false;
        activity.set(Instant::now());
        let mut left = n;
        while left > 0 {
            match to.splice_out(pipe.pipe(), left) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                Err(e) => return Err(e),
            }
        }
        pipe.empty = true;
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        activity.set(Instant::now());
        // Such a loop never has to wait: let the worker's other tasks run
        // whenever this task's budget is spent.
        tokio::task::coop::consume_budget().await;
    }
}

/// `from` finished sending: passes the FIN on, or ends the connection if
/// the other way ended first.
fn end_of_stream<C: Conn>(to: &C, one_way_done: &Cell<bool>) -> io::Result<()> {
    if one_way_done.replace(true) {
        // The other way ended first: the connection is over, and
        // closing `to` sends its FIN without a shutdown call.
        return Ok(());
    }
    // Keep the other way open. ENOTCONN means the other side is already
    // gone; nothing to tell.
    match to.shutdown_write() {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Padded;

    fn counts(ns: &[u64]) -> Vec<Padded> {
        ns.iter().map(|&n| Padded(AtomicU64::new(n))).collect()
    }

    #[test]
    fn a_worker_keeps_connections_while_the_spread_is_small() {
        assert_eq!(place(&counts(&[0]), 0), 0, "one worker");
        assert_eq!(place(&counts(&[0, 0]), 1), 1);
        assert_eq!(
            place(&counts(&[1, 0]), 0),
            0,
            "one ahead is within the slack"
        );
        assert_eq!(place(&counts(&[39, 36, 38]), 0), 0, "39 <= 36 + 1 + 36/16");
    }

    #[test]
    fn a_worker_clearly_ahead_hands_over_to_the_least_loaded() {
        assert_eq!(place(&counts(&[2, 0]), 0), 1);
        assert_eq!(place(&counts(&[7, 5, 3, 4]), 0), 2);
        assert_eq!(place(&counts(&[40, 36, 35]), 0), 2, "40 > 35 + 1 + 35/16");
        // Only the accepting worker's own lead matters.
        assert_eq!(place(&counts(&[9, 3, 8]), 2), 1);
        assert_eq!(place(&counts(&[9, 3, 4]), 2), 2);
    }

    #[test]
    fn placing_one_by_one_keeps_workers_within_the_slack() {
        // Every connection accepted by worker 0 (the worst a hash can do).
        let c = counts(&[0, 0, 0, 0]);
        for _ in 0..40 {
            let to = place(&c, 0);
            c[to].0.fetch_add(1, Ordering::Relaxed);
        }
        let n: Vec<u64> = c.iter().map(|p| p.0.load(Ordering::Relaxed)).collect();
        let (max, min) = (*n.iter().max().unwrap(), *n.iter().min().unwrap());
        assert!(max - min <= 2, "{n:?}");
        assert_eq!(n.iter().sum::<u64>(), 40);
    }
}
