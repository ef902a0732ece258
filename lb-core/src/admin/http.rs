//! One small HTTP/1.1 server for `lbd`'s surfaces (the metrics endpoint and
//! the control API, over TCP, TLS or a unix socket). It owns what a client
//! can make `lbd` hold:
//!
//! - one request per connection (no keep-alive): a connection is *pending*
//!   until its request head has arrived (after the TLS handshake, on TLS),
//!   then *serving* until its response is written;
//! - pending connections are bounded, and when a new one would exceed the
//!   bound the oldest pending one of the client (address on TCP, process
//!   on a unix socket) with the most pending is dropped: idle or trickling
//!   clients cannot keep a prompt client out, however many they open (from
//!   fewer addresses or processes than the bound, not even during its TLS
//!   handshake or between its connect and its write; the accept loop lets each
//!   new connection read before the next accept, so a burst of newer
//!   connections cannot push out a prompt one unread);
//! - connections in total, and per client address (TCP), are bounded: one
//!   over either bound is closed at once;
//! - the handshake, the request head and the whole exchange have deadlines;
//! - an accept error (out of descriptors, ...) backs off instead of
//!   spinning.
//!
//! It knows nothing of routes: a handler turns a request into a response.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use crate::lock;

/// A response body.
pub type Body = Full<Bytes>;

/// What serves requests: a request in, a response out.
pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// Where a surface listens.
pub enum Listener {
    /// Plain TCP (the metrics endpoint).
    Tcp(tokio::net::TcpListener),
    /// TLS over TCP (the control API on `admin.control_tcp`).
    Tls(tokio::net::TcpListener, tokio_rustls::TlsAcceptor),
    /// A unix socket (the control API on `admin.control_socket`).
    Unix(tokio::net::UnixListener),
}

/// What a surface lets its clients hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections still in their handshake or request head; beyond, the
    /// oldest of them is dropped.
    pub pending: usize,
    /// Connections in all; beyond, a new one is closed at once.
    pub total: usize,
    /// Connections from one client address (TCP only).
    pub per_source: usize,
    /// Deadline of the TLS handshake.
    pub handshake: Duration,
    /// Deadline of the request head, from the end of the handshake.
    pub head: Duration,
    /// Deadline of the whole exchange (reading the body, handling it and
    /// writing the response), from the request head.
    pub exchange: Duration,
}

impl Limits {
    /// The metrics endpoint: scrapers, probes, people with curl.
    pub const ENDPOINT: Limits = Limits {
        pending: 64,
        total: 256,
        per_source: 32,
        handshake: Duration::from_secs(2),
        head: Duration::from_secs(2),
        exchange: Duration::from_secs(30),
    };
    /// The control API: the controller, `lbd status`, `lbd apply`.
    pub const CONTROL: Limits = Limits {
        pending: 64,
        total: 512,
        per_source: 32,
        handshake: Duration::from_secs(3),
        head: Duration::from_secs(3),
        exchange: Duration::from_secs(60),
    };
}

/// Serves `listener` on the current runtime until the runtime stops.
pub fn spawn(listener: Listener, limits: Limits, handler: Handler, name: &'static str) {
    let server = Arc::new(Server {
        limits,
        handler,
        name,
        pending: Mutex::new(Pending::default()),
        total: AtomicUsize::new(0),
        sources: Mutex::new(HashMap::new()),
    });
    tokio::spawn(server.run(listener));
}

struct Server {
    limits: Limits,
    handler: Handler,
    name: &'static str,
    pending: Mutex<Pending>,
    total: AtomicUsize,
    sources: Mutex<HashMap<IpAddr, usize>>,
}

/// Who a pending connection is from, when one must be dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Client {
    /// A TCP client's address.
    Addr(IpAddr),
    /// A unix-socket client's process (`SO_PEERCRED`), if the kernel told.
    Process(Option<i32>),
}

/// Pending connections, oldest first, each with its client and the signal
/// that drops it, and how many each client has pending.
#[derive(Default)]
struct Pending {
    next: u64,
    waiting: BTreeMap<u64, (Client, Arc<Notify>)>,
    per_source: HashMap<Client, usize>,
}

impl Pending {
    /// Adds a connection from `source`; its id.
    fn add(&mut self, source: Client, evicted: Arc<Notify>) -> u64 {
        let id = self.next;
        self.next += 1;
        self.waiting.insert(id, (source, evicted));
        *self.per_source.entry(source).or_default() += 1;
        id
    }

    /// Removes connection `id` (served or dropped); its drop signal.
    fn remove(&mut self, id: u64) -> Option<Arc<Notify>> {
        let (source, evicted) = self.waiting.remove(&id)?;
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
        Some(evicted)
    }

    /// The connection to drop when there are too many: the oldest of the
    /// client with the most pending. Idle clients that take many slots
    /// from a few addresses (or processes) then lose their own
    /// connections, not the one a prompt client opened from elsewhere
    /// while it does its handshake or its write; with every client even,
    /// the oldest.
    fn victim(&self) -> Option<u64> {
        let most = self.per_source.values().copied().max()?;
        self.waiting
            .iter()
            .find(|(_, (source, _))| self.per_source.get(source) == Some(&most))
            .map(|(id, _)| *id)
    }
}

/// A connection's hold on the server's counts, released on drop.
struct Slot {
    server: Arc<Server>,
    source: Option<IpAddr>,
    pending: Option<u64>,
}

impl Slot {
    /// No longer pending: its request head arrived.
    fn served(&mut self) {
        if let Some(id) = self.pending.take() {
            lock(&self.server.pending).remove(id);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.served();
        self.server.total.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.source {
            let mut sources = lock(&self.server.sources);
            if let Some(n) = sources.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    sources.remove(&ip);
                }
            }
        }
    }
}

/// How long accepting pauses after an error (out of descriptors, ...).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl Server {
    async fn run(self: Arc<Self>, listener: Listener) {
        loop {
            let accepted = match &listener {
                Listener::Tcp(l) | Listener::Tls(l, _) => l.accept().await.map(|(s, peer)| {
                    let ip = peer.ip().to_canonical();
                    (Stream::Tcp(s), Some(ip), Client::Addr(ip))
                }),
                Listener::Unix(l) => l.accept().await.map(|(s, _)| {
                    let pid = s.peer_cred().ok().and_then(|c| c.pid());
                    (Stream::Unix(s), None, Client::Process(pid))
                }),
            };
            let (stream, source, client) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(surface = self.name, error = %e, "accept failed; pausing");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Some((slot, evicted)) = self.admit(source, client) else {
                continue; // over a bound: dropping the stream closes it
            };
            let tls = match &listener {
                Listener::Tls(_, acceptor) => Some(acceptor.clone()),
                _ => None,
            };
            tokio::spawn(self.clone().connection(stream, tls, slot, evicted));
            // Let the new connection read what its client already sent, and
            // dropped ones release their slots, before the next accept:
            // otherwise a burst of accepts (up to tokio's budget of 128 per
            // poll) admits more than `pending` newer connections first, and
            // a prompt client is dropped as the oldest without being read.
            tokio::task::yield_now().await;
        }
    }

    /// Takes a slot for a new connection from `source`, dropping the
    /// oldest pending connection if there are too many; `None` when the
    /// total or the source's count is at its bound.
    fn admit(
        self: &Arc<Self>,
        source: Option<IpAddr>,
        client: Client,
    ) -> Option<(Slot, Arc<Notify>)> {
        if self.total.fetch_add(1, Ordering::Relaxed) >= self.limits.total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(surface = self.name, "connection refused: too many");
            return None;
        }
        if let Some(ip) = source {
            let mut sources = lock(&self.sources);
            let n = sources.entry(ip).or_default();
            if *n >= self.limits.per_source {
                drop(sources);
                self.total.fetch_sub(1, Ordering::Relaxed);
                tracing::debug!(surface = self.name, %ip, "connection refused: too many from this address");
                return None;
            }
            *n += 1;
        }
        let evicted = Arc::new(Notify::new());
        let id = {
            let mut pending = lock(&self.pending);
            let id = pending.add(client, evicted.clone());
            while pending.waiting.len() > self.limits.pending {
                let Some(victim) = pending.victim() else {
                    break;
                };
                if let Some(dropped) = pending.remove(victim) {
                    dropped.notify_one();
                }
            }
            id
        };
        let slot = Slot {
            server: self.clone(),
            source,
            pending: Some(id),
        };
        Some((slot, evicted))
    }

    async fn connection(
        self: Arc<Self>,
        stream: Stream,
        tls: Option<tokio_rustls::TlsAcceptor>,
        slot: Slot,
        evicted: Arc<Notify>,
    ) {
        let limits = self.limits;
        let serve = async move {
            match (stream, tls) {
                (Stream::Tcp(s), Some(acceptor)) => {
                    match tokio::time::timeout(limits.handshake, acceptor.accept(s)).await {
                        Ok(Ok(s)) => self.exchange(s, slot).await,
                        Ok(Err(e)) => {
                            tracing::debug!(surface = self.name, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(surface = self.name, "TLS handshake timed out"),
                    }
                }
                (Stream::Tcp(s), None) => self.exchange(s, slot).await,
                (Stream::Unix(s), _) => self.exchange(s, slot).await,
            }
        };
        tokio::select! {
            () = serve => {}
            () = evicted.notified() => {}
        }
    }

    /// One request and its response on `stream`.
    async fn exchange<S>(self: Arc<Self>, stream: S, slot: Slot)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let slot = Arc::new(Mutex::new(slot));
        let handler = self.handler.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            lock(&slot).served();
            let response = handler(req);
            async move { Ok::<_, Infallible>(response.await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.head)
            .keep_alive(false)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(stream), service);
        let whole = self.limits.head + self.limits.exchange;
        if tokio::time::timeout(whole, conn).await.is_err() {
            tracing::debug!(surface = self.name, "exchange timed out");
        }
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}
