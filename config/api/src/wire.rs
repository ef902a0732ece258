//! The JSON bodies of the control API, as both sides read and write them.

use std::net::SocketAddr;

use lb_config::{FieldError, Protocol};
use serde::{Deserialize, Serialize};

/// The state endpoint: `GET` returns the dynamic state, `PUT` replaces it.
pub const STATE: &str = "/v1/state";
/// The status endpoint.
pub const STATUS: &str = "/v1/status";

/// A backend as `GET /v1/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// Address.
    pub addr: SocketAddr,
    /// Configured weight (0 while draining).
    pub weight: u32,
    /// Whether it takes new connections.
    pub healthy: bool,
    /// Last check error, if the last result failed.
    pub last_error: Option<String>,
    /// Connections open now.
    pub active: u64,
    /// Removed, finishing its connections.
    pub draining: bool,
}

/// A listener as `GET /v1/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// Name.
    pub name: String,
    /// Bound address.
    pub bind: SocketAddr,
    /// tcp or udp.
    pub protocol: Protocol,
    /// Connections (tcp) or flows (udp) open now.
    pub active: u64,
    /// Connections accepted so far.
    pub accepted: u64,
    /// Backends, including draining ones.
    pub backends: Vec<BackendStatus>,
}

/// What `lbd` is doing: `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Engine in use.
    pub engine: String,
    /// Worker count.
    pub workers: usize,
    /// Generation of the applied configuration.
    pub generation: u64,
    /// Version of the dynamic state (control API); 0 before any.
    pub dynamic_version: u64,
    /// Listeners in configuration order.
    pub listeners: Vec<ListenerStatus>,
}

/// `PUT /v1/state` answered 200: the version now in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The version applied and persisted.
    pub version: u64,
}

/// `PUT /v1/state` answered 409: the version in force, which a new state
/// must exceed (or equal, with the same content).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    /// The version in force.
    pub current_version: u64,
}

/// `PUT /v1/state` answered 422: every problem, each with its field path.
/// Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// The problems.
    pub errors: Vec<FieldError>,
}

/// Any other error answer: one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}
