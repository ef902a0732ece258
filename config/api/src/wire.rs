//! The JSON bodies of the control API, as both sides read and write them.

use std::net::{IpAddr, SocketAddr};

use lb_config::{FieldError, Protocol};
use serde::{Deserialize, Serialize};

/// The state endpoint: `GET` returns the dynamic state, `PUT` replaces it.
pub const STATE: &str = "/v1/state";
/// The status endpoint.
pub const STATUS: &str = "/v1/status";
/// The drain endpoint: `POST` drains (withdraw, grace, close listeners,
/// drain connections) without exiting, `DELETE` undrains.
pub const DRAIN: &str = "/v1/drain";

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
    /// Where a drain (`lbd drain`, or a stop) is; absent while serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainPhase>,
    /// VIP announcement; absent with `announce.mode = "off"` (and from
    /// an lbd older than announcements).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<AnnounceStatus>,
}

/// The steps of a drain, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainPhase {
    /// VIPs withdrawn; still accepting for `announce.withdraw_grace`.
    Grace,
    /// Listeners closed; connections finishing, up to `drain_timeout`.
    Connections,
    /// Nothing left; stays so until `lbd undrain` (or exits, on a stop).
    Drained,
}

impl DrainPhase {
    /// The name as the wire spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Grace => "grace",
            Self::Connections => "connections",
            Self::Drained => "drained",
        }
    }
}

/// How VIPs are announced, and each VIP's announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceStatus {
    /// `announce.mode`.
    pub mode: String,
    /// `announce.interface`.
    pub interface: String,
    /// What the interface is (`dummy`, `bridge`, or what was found).
    #[serde(default)]
    pub kind: String,
    /// Every VIP of every listener, in address order.
    pub vips: Vec<VipStatus>,
}

/// One VIP's announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStatus {
    /// The address.
    pub vip: IpAddr,
    /// Whether its host route is on the interface now.
    pub announced: bool,
    /// Why not (`not_ready`, `draining`, `no_backend_up`; in L2 mode
    /// `not_owner`, `no_owner`, `yielded`) or what failed;
    /// absent while announced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Milliseconds since the decision for this VIP last changed.
    #[serde(default)]
    pub for_ms: u64,
    /// L2 mode: the forwarder the owner map names for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// L2 mode: that owner's epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// `POST` and `DELETE /v1/drain` answered 200.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainAnswer {
    /// Whether lbd is draining now.
    pub draining: bool,
    /// VIPs withdrawn by this drain (0 with announcements off).
    #[serde(default)]
    pub withdrawn: usize,
    /// Milliseconds until listeners close (`announce.withdraw_grace`).
    #[serde(default)]
    pub grace_ms: u64,
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
