//! A UDP listener socket on one worker and the flows it keeps: what the
//! receive path ([`super`]) and the flow path ([`super::upstream`]) both
//! read, and the counts a flow holds until it ends.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::task::JoinHandle;

use super::flow::FlowTable;
use crate::engine::{Datagram, Engine};
use crate::routing::{BackendHandle, BindKey, Route};
use crate::stats::ListenerStats;
use crate::worker::context::Worker;
use crate::worker::shared::Shared;

/// Largest datagram forwarded (the IPv4 UDP payload limit).
pub const MAX_DATAGRAM: usize = 65_507;

/// Counts held by a flow, released when it ends.
pub(super) struct Slots {
    pub(super) shared: Arc<Shared>,
    pub(super) listener: Arc<ListenerStats>,
    pub(super) backend: Arc<BackendHandle>,
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.shared.active_total.fetch_sub(1, Ordering::Relaxed);
        self.listener.active.fetch_sub(1, Ordering::Relaxed);
        self.backend.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One client's flow: its socket connected to the backend, the task that
/// relays the backend's replies, and the counts it holds.
pub(super) struct Flow<U: Datagram> {
    pub(super) upstream: Rc<U>,
    pub(super) replies: JoinHandle<()>,
    pub(super) slots: Slots,
}

impl<U: Datagram> Drop for Flow<U> {
    fn drop(&mut self) {
        self.replies.abort();
        self.upstream.close();
    }
}

pub(super) type Flows<U> = Rc<RefCell<FlowTable<Flow<U>>>>;

/// One UDP listener socket on one worker, and its flows.
pub(super) struct Listener<E: Engine> {
    pub(super) worker: Rc<Worker>,
    pub(super) key: BindKey,
    pub(super) local: SocketAddr,
    pub(super) socket: Rc<E::Udp>,
    pub(super) flows: Flows<E::Udp>,
    /// Where a flow's reply task drains its socket, leased to one task at
    /// a time (one that finds it leased relays datagram by datagram);
    /// grown on first use.
    pub(super) scratch: Cell<Option<Vec<u8>>>,
    /// Runs of datagrams leave in one segmented send (off once the kernel
    /// or a path refused one).
    pub(super) gso: Cell<bool>,
}

/// The listener's route in the current snapshot (none once removed).
pub(super) fn current_route(l: &Listener<impl Engine>) -> Option<Arc<Route>> {
    l.worker.shared.routing.load().routes.get(&l.key).cloned()
}
