//! `lb-core`: the data plane of Weir's `lbd`.
//!
//! Pure decision code (selection, the health machine, PROXY headers) lives
//! in [`balance`], [`health::machine`] and [`proxy_protocol`] and never
//! touches sockets or clocks. The shell ([`server`], [`plane`], [`forward`],
//! [`engine`]) binds sockets, runs workers and applies configurations.
//! `unsafe` is allowed only at the system-call edge of the engines: the
//! io_uring engine (`engine::uring` and its driver, `engine::ring`), the
//! segmented UDP send both engines share (`engine::gso`), and the epoll
//! engine's registration of its listening sockets (`engine::epoll`).

pub mod admin;
pub mod balance;
pub mod client;
pub mod control;
pub mod demo;
pub mod engine;
pub mod flow;
pub mod forward;
pub mod health;
pub mod manual;
pub mod metrics;
pub mod notify;
pub mod persist;
pub mod plane;
pub mod proxy_protocol;
pub mod routing;
pub mod server;
pub mod splice;
pub mod stats;
pub mod tls;
pub mod udp;
pub mod watchdog;

pub use server::{Options, Server, Status};
