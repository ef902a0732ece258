//! The shell around the pure core: Services in, addresses, status, Events
//! and forwarder state out. Level-triggered (kube-runtime's `Controller`):
//! every reconcile recomputes what the Service should have from the caches.
//!
//! One file per part, each given the handles it needs and nothing else:
//! [`run`] wires them; `start` is the order of business at start (wait for
//! the caches, seed, learn what the forwarders run); `reconcile` handles one
//! Service; `feedback` the publishers' reports and the sweep of vanished
//! Services; `state` the ledger behind its lock and the builder; `writer`
//! the writes to Services; `events` the Events; `forwarders` what the
//! forwarders have acknowledged; `probes` the forwarders' readiness, which
//! decides L2 ownership.

mod events;
mod feedback;
mod forwarders;
mod probes;
mod reconcile;
mod run;
mod start;
mod state;
mod writer;

pub use events::MANAGER;
pub use run::run;
