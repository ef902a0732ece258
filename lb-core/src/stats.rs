//! Per-listener counters, one cache line per worker so the data path never
//! shares a written line between threads; the metrics endpoint sums them at
//! scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// A global or per-listener connection cap was reached.
    Limit,
    /// The client is outside `source_ranges`.
    SourceRange,
    /// No backend could take it (none usable, or every attempt failed).
    NoBackend,
    /// This host ran out of something (descriptors, buffers, local ports)
    /// while connecting to a backend.
    LocalError,
}

impl Reject {
    /// All reasons, in label order.
    pub const ALL: [Reject; 4] = [
        Self::Limit,
        Self::SourceRange,
        Self::NoBackend,
        Self::LocalError,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Limit => "limit",
            Self::SourceRange => "source_range",
            Self::NoBackend => "no_backend",
            Self::LocalError => "local_error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a UDP datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpDrop {
    /// It would have opened a flow beyond `max_connections` (or the global cap).
    FlowLimit,
    /// No backend could take a new flow.
    NoBackend,
    /// Larger than 65,507 bytes (possible over IPv6): never forwarded in part.
    Truncated,
    /// The client is outside `source_ranges`.
    SourceRange,
    /// This host ran out of something (descriptors, buffers, local ports)
    /// while opening the flow's socket.
    LocalError,
}

impl UdpDrop {
    /// All reasons, in label order.
    pub const ALL: [UdpDrop; 5] = [
        Self::FlowLimit,
        Self::NoBackend,
        Self::Truncated,
        Self::SourceRange,
        Self::LocalError,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::FlowLimit => "flow_limit",
            Self::NoBackend => "no_backend",
            Self::Truncated => "truncated",
            Self::SourceRange => "source_range",
            Self::LocalError => "local_error",
        }
    }
}

/// One counter on its own cache line (written by one worker, summed by
/// the metrics endpoint).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Padded(pub AtomicU64);

/// Sums per-worker counters.
pub fn sum(counters: &[Padded]) -> u64 {
    counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
}

/// Counters one worker writes.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerCounters {
    /// Connections accepted (before any refusal).
    pub accepted: AtomicU64,
    /// Refusals by reason (`Reject` order).
    pub rejected: [AtomicU64; 4],
    /// Bytes read from clients and written to backends.
    pub bytes_to_backend: AtomicU64,
    /// Bytes read from backends and written to clients.
    pub bytes_to_client: AtomicU64,
    /// UDP datagrams forwarded to backends.
    pub datagrams_to_backend: AtomicU64,
    /// UDP datagrams relayed back to clients.
    pub datagrams_to_client: AtomicU64,
    /// UDP flows opened.
    pub flows_created: AtomicU64,
    /// UDP flows closed (idle, drained, or re-picked).
    pub flows_expired: AtomicU64,
    /// UDP drops by reason (`UdpDrop` order).
    pub udp_drops: [AtomicU64; 5],
}

impl WorkerCounters {
    /// Counts a dropped datagram.
    pub fn drop_datagram(&self, why: UdpDrop) {
        self.udp_drops[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `datagrams` UDP datagrams of `bytes` in all forwarded to a
    /// backend.
    pub fn count_to_backend(&self, datagrams: usize, bytes: usize) {
        self.datagrams_to_backend
            .fetch_add(datagrams as u64, Ordering::Relaxed);
        self.bytes_to_backend
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts `datagrams` UDP datagrams of `bytes` in all relayed to a
    /// client.
    pub fn count_to_client(&self, datagrams: usize, bytes: usize) {
        self.datagrams_to_client
            .fetch_add(datagrams as u64, Ordering::Relaxed);
        self.bytes_to_client
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts a refusal.
    pub fn reject(&self, why: Reject) {
        self.rejected[why.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// A listener's counters across workers, plus its active connection count.
#[derive(Debug)]
pub struct ListenerStats {
    workers: Box<[WorkerCounters]>,
    /// Connections open now (shared: checked against `max_connections`).
    pub active: AtomicU64,
}

/// Summed counters, for the metrics endpoint and `status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// See [`WorkerCounters::accepted`].
    pub accepted: u64,
    /// See [`WorkerCounters::rejected`].
    pub rejected: [u64; 4],
    /// See [`WorkerCounters::bytes_to_backend`].
    pub bytes_to_backend: u64,
    /// See [`WorkerCounters::bytes_to_client`].
    pub bytes_to_client: u64,
    /// See [`WorkerCounters::datagrams_to_backend`].
    pub datagrams_to_backend: u64,
    /// See [`WorkerCounters::datagrams_to_client`].
    pub datagrams_to_client: u64,
    /// See [`WorkerCounters::flows_created`].
    pub flows_created: u64,
    /// See [`WorkerCounters::flows_expired`].
    pub flows_expired: u64,
    /// See [`WorkerCounters::udp_drops`].
    pub udp_drops: [u64; 5],
}

impl ListenerStats {
    /// Counters for `workers` workers.
    pub fn new(workers: usize) -> Self {
        Self {
            workers: (0..workers.max(1))
                .map(|_| WorkerCounters::default())
                .collect(),
            active: AtomicU64::new(0),
        }
    }

    /// The counters worker `id` writes.
    pub fn worker(&self, id: usize) -> &WorkerCounters {
        &self.workers[id % self.workers.len()]
    }

    /// Sums every worker's counters.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for w in self.workers.iter() {
            t.accepted += w.accepted.load(Ordering::Relaxed);
            for (i, r) in w.rejected.iter().enumerate() {
                t.rejected[i] += r.load(Ordering::Relaxed);
            }
            t.bytes_to_backend += w.bytes_to_backend.load(Ordering::Relaxed);
            t.bytes_to_client += w.bytes_to_client.load(Ordering::Relaxed);
            t.datagrams_to_backend += w.datagrams_to_backend.load(Ordering::Relaxed);
            t.datagrams_to_client += w.datagrams_to_client.load(Ordering::Relaxed);
            t.flows_created += w.flows_created.load(Ordering::Relaxed);
            t.flows_expired += w.flows_expired.load(Ordering::Relaxed);
            for (i, d) in w.udp_drops.iter().enumerate() {
                t.udp_drops[i] += d.load(Ordering::Relaxed);
            }
        }
        t
    }
}

/// Counts one more in a counter until dropped (a connection slot).
pub struct Held<'a>(&'a AtomicU64);

impl<'a> Held<'a> {
    /// Takes a slot in `counter`; returns the guard and the count before.
    pub fn take(counter: &'a AtomicU64) -> (Self, u64) {
        let before = counter.fetch_add(1, Ordering::Relaxed);
        (Self(counter), before)
    }

    /// Holds a slot already counted in `counter` (by whoever placed it).
    pub fn counted(counter: &'a AtomicU64) -> Self {
        Self(counter)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
