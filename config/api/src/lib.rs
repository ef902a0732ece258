//! `lb-api`: the control API of `lbd` as its clients see it.
//!
//! - [`wire`]: what `GET /v1/status` returns and what `PUT /v1/state`
//!   answers (the state itself is [`lb_config::DesiredState`]);
//! - [`client`]: one request over the unix control socket, or over HTTPS
//!   with a bearer token, and typed helpers for status and state;
//! - [`tls`]: PEM loading and the TLS client configuration;
//! - [`docs`]: man pages and shell completions from a program's clap
//!   definition, for both programs' `completions` and `man` subcommands.
//!
//! `lbd`'s command line and `lb-controller` use it; it holds no server
//! code and no data plane.

#![forbid(unsafe_code)]

pub mod client;
pub mod docs;
pub mod tls;
pub mod wire;

pub use lb_config::DesiredState;
