//! What every worker and the control side share: the routing snapshot
//! and the counters the control side reads (metrics, placement, caps).

use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use super::handoff::Handoff;
use crate::routing::Routing;
use crate::stats::{sum, Padded};

/// What every worker and the control side share.
#[derive(Debug)]
pub struct Shared {
    /// The routing snapshot.
    pub routing: ArcSwap<Routing>,
    /// Proxied connections open now, all listeners.
    pub active_total: AtomicU64,
    /// Per worker: bytes of forwarding buffers held by connections now
    /// (out of the pool): idle connections hold none.
    pub buffer_bytes: Box<[Padded]>,
    /// Per worker: splice pipes open now, leased or idle.
    pub pipes_open: Box<[Padded]>,
    /// Per worker: splice pipes kept idle for the next bulk transfer.
    pub pipes_idle: Box<[Padded]>,
    /// Per worker: TCP connections it serves now, including those handed
    /// to it and not yet started (see [`super::handoff::place`]).
    pub worker_conns: Box<[Padded]>,
    /// Per worker: connections it accepted and handed to another worker.
    pub handed_off: Box<[Padded]>,
    /// Per worker: where the other workers hand it connections.
    pub handoff: Box<[mpsc::UnboundedSender<Handoff>]>,
    /// Global cap on `active_total`.
    pub max_total: u64,
    /// Bulk transfers move through kernel pipes (`[runtime] splice`).
    pub splice: bool,
}

impl Shared {
    /// Whether any connection or UDP flow is open, a TCP connection
    /// counted from its accept (while handed to another worker, too).
    pub fn any_open(&self) -> bool {
        self.active_total.load(Ordering::Relaxed) > 0 || sum(&self.worker_conns) > 0
    }

    /// State for one worker per `handoff` sender (where that worker takes
    /// connections others hand it), with an empty routing snapshot.
    pub fn new(handoff: Vec<mpsc::UnboundedSender<Handoff>>, max_total: u64, splice: bool) -> Self {
        let per_worker = || (0..handoff.len()).map(|_| Padded::default()).collect();
        Self {
            routing: ArcSwap::from_pointee(Routing::default()),
            active_total: AtomicU64::new(0),
            buffer_bytes: per_worker(),
            pipes_open: per_worker(),
            pipes_idle: per_worker(),
            worker_conns: per_worker(),
            handed_off: per_worker(),
            handoff: handoff.into(),
            max_total: max_total.max(1),
            splice,
        }
    }
}
