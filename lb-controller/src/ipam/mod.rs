//! IP address management for LoadBalancer Services, as pure code: pools of
//! CIDRs and ranges (IPv4 and IPv6), requested addresses, pool selection,
//! dual-stack, and sharing an address between Services whose sharing keys
//! match and whose (port, protocol) sets do not overlap.
//!
//! Guarantees: an address is held by two Services only when both carry the
//! same sharing key and their ports are disjoint; an assignment that still
//! satisfies a Service's request is returned unchanged (a restart, or a
//! reseed from status, never moves an address); a refusal changes nothing.
//! Service status is the source of truth: [`Allocator::seed`] records what a
//! Service already holds, even outside today's pools (kept, with a warning).

mod allocator;
mod pool;
mod request;

pub use allocator::{Allocator, Holding, Refusal};
pub use pool::{AddrRange, Family, Pool};
pub use request::{FamilyPolicy, Proto, Request, ServiceKey};
