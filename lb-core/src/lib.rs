//! `lb-core`: the data plane of Weir's `lbd`.
//!
//! Pure decision code (selection, the health machine, PROXY headers) lives
//! in [`balance`], [`health::machine`] and [`proxy_protocol`] and never
//! touches sockets or clocks. The shell ([`server`], [`plane`], [`forward`],
//! [`engine`]) binds sockets, runs workers and applies configurations.
//! `unsafe` is allowed only at the system-call edge of the engines: the
//! io_uring engine (`engine::uring` and its driver, `engine::ring`), the
//! epoll engine's registration of its listening sockets (`engine::epoll`),
//! and the link-layer address of L2 mode's raw socket (`announce::packet`).

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
