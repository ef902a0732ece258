//! `lb-core`: the data plane of Weir's `lbd`.
//!
//! Pure decision code (selection, the health machine, PROXY headers) lives
//! in [`balance`], [`health::machine`] and [`proxy_protocol`] and never
//! touches sockets or clocks. The shell ([`server`], [`plane`], [`forward`],
//! [`engine`]) binds sockets, runs workers and applies configurations.
//! `unsafe` is allowed only at the system-call edge of the engines: the
//! io_uring engine (`engine::uring` and its driver, `engine::ring`), the
//! epoll engine's registration of its listening sockets (`engine::epoll`),
//! the link-layer address of L2 mode's raw socket (`announce::packet`), and
//! the scheduling attributes of threads (`server::priority`).

pub mod admin;
pub mod announce;
pub mod balance;
pub mod engine;
pub mod health;
pub mod metrics;
pub mod notify;
pub mod plane;
pub mod proxy_protocol;
pub mod routing;
pub mod server;
pub mod stats;
pub mod tcp;
pub mod udp;
pub mod watchdog;
pub mod worker;

pub use server::{Options, Server, Status};

/// Locks `m`. A lock whose holder panicked is taken as it was left: one
/// failed request must not take the rest of the control plane down with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
