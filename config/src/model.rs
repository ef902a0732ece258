//! The listener model: what an operator writes (`*Spec`, every field
//! optional where a default exists) and what the data plane runs (the
//! resolved types, every field present and validated).
//!
//! The same spec types are the TOML file's `[[listener]]` tables and the
//! control API's JSON `listeners` entries, so both speak one schema.

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::Duration;

/// `tcp` or `udp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Stream forwarding, connection by connection.
    Tcp,
    /// Datagram forwarding, flow by flow.
    Udp,
}

/// How a backend is chosen for a new connection or flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Consistent hashing (Maglev); every edge host picks the same backend for a key.
    Maglev,
    /// Weighted round robin.
    RoundRobin,
    /// Fewest active connections (weighted).
    LeastConn,
    /// Power of two random choices on active connections.
    RandomTwo,
}

/// What Maglev hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    /// Source and destination address and port, and the protocol.
    FiveTuple,
    /// The client IP only: session affinity.
    ClientIp,
}

/// PROXY protocol header sent to the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocol {
    /// No header.
    #[default]
    Off,
    /// Human-readable header (TCP only).
    V1,
    /// Binary header (TCP and UDP).
    V2,
}

/// What to do when no backend is healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAllUnhealthy {
    /// Use every non-draining backend as if healthy (cloud load balancer behaviour).
    FailOpen,
    /// Refuse the connection.
    FailClosed,
}

/// How backends are probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthKind {
    /// A TCP connect that completes within the timeout.
    Tcp,
    /// An HTTP GET answered with a 2xx or 3xx status within the timeout.
    Http,
    /// No active checks: backends are always considered healthy.
    None,
}

/// The I/O engine of the workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineChoice {
    /// Probe io_uring at start; fall back to epoll and log why.
    Auto,
    /// io_uring, or fail to start.
    #[serde(rename = "io_uring")]
    IoUring,
    /// epoll (tokio), available everywhere.
    Epoll,
}

/// A backend as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// `IP:port` or `[IPv6]:port`.
    pub addr: String,
    /// Relative weight; default 1; 0 keeps the backend configured but unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// A health check as written; unset fields come from `[defaults.health]`,
/// then from the built-in defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// Default `tcp` for TCP listeners, `none` for UDP listeners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<HealthKind>,
    /// Probe this port on the backend's IP instead of the backend's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP path; default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Time between checks; default 2s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Time a check may take; default 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Consecutive successes to become healthy; default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    /// Consecutive failures to become unhealthy; default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
    /// Send a PROXY protocol header before each check. Default: on when
    /// the check probes the backend's own port and the listener sends
    /// PROXY protocol (the backend then expects it on every connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_proxy: Option<bool>,
}

/// Listener fields that `[defaults]` may set for every listener.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Default `tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Default `maglev`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
    /// Default `five_tuple`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<HashKey>,
    /// Default `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Default empty (everyone may connect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ranges: Option<Vec<String>>,
    /// Default 0 (no per-listener cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Default `fail_open`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_all_unhealthy: Option<OnAllUnhealthy>,
    /// Default 3s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// Default 10m; applies to TCP listeners (UDP flows default to 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    /// Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<Duration>,
    /// Field by field defaults for `[listener.health]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
}

/// A listener as written in the file or sent to the control API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    /// Unique name, `[A-Za-z0-9._:/-]{1,253}`.
    pub name: String,
    /// `IP:port` or `[IPv6]:port`.
    pub bind: String,
    /// See [`Defaults::protocol`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// See [`Defaults::balance`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
    /// See [`Defaults::hash_key`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<HashKey>,
    /// See [`Defaults::proxy_protocol`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// See [`Defaults::source_ranges`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ranges: Option<Vec<String>>,
    /// See [`Defaults::max_connections`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// See [`Defaults::on_all_unhealthy`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_all_unhealthy: Option<OnAllUnhealthy>,
    /// See [`Defaults::connect_timeout`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// See [`Defaults::idle_timeout`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    /// See [`Defaults::drain_timeout`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<Duration>,
    /// The backends; may be empty (every connection is then refused and counted).
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    /// Health check; fields fall back to `[defaults.health]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
}

/// A validated backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Backend {
    /// Where connections go.
    pub addr: SocketAddr,
    /// Relative weight (0 = configured but receives nothing new).
    pub weight: u32,
}

/// A validated health check.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthCheck {
    /// Probe kind.
    pub kind: HealthKind,
    /// Port override.
    pub port: Option<u16>,
    /// HTTP path (starts with `/`).
    pub path: String,
    /// Time between checks.
    pub interval: Duration,
    /// Time a check may take.
    pub timeout: Duration,
    /// Consecutive successes to become healthy (≥ 1).
    pub rise: u32,
    /// Consecutive failures to become unhealthy (≥ 1).
    pub fall: u32,
    /// The PROXY header each check sends first (`Off`: none): v1
    /// `PROXY UNKNOWN`, or a v2 `LOCAL` header, as the protocol says for
    /// connections a proxy makes on its own behalf.
    #[serde(default)]
    pub send_proxy: ProxyProtocol,
}

impl ListenerSpec {
    /// A listener with only its name and address set (the rest defaulted).
    pub fn new(name: impl Into<String>, bind: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            bind: bind.into(),
            protocol: None,
            balance: None,
            hash_key: None,
            proxy_protocol: None,
            source_ranges: None,
            max_connections: None,
            on_all_unhealthy: None,
            connect_timeout: None,
            idle_timeout: None,
            drain_timeout: None,
            backends: Vec::new(),
            health: None,
        }
    }
}

impl HealthCheck {
    /// The address probed for a backend at `addr`.
    pub fn target(&self, addr: SocketAddr) -> SocketAddr {
        SocketAddr::new(addr.ip(), self.port.unwrap_or(addr.port()))
    }
}

/// A validated listener: every field resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    /// Unique name.
    pub name: String,
    /// Address bound on every worker.
    pub bind: SocketAddr,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// Selection algorithm.
    pub balance: Balance,
    /// Maglev key.
    pub hash_key: HashKey,
    /// PROXY protocol header towards backends.
    pub proxy_protocol: ProxyProtocol,
    /// Allowed client networks (empty = all).
    pub source_ranges: Vec<IpNet>,
    /// Per-listener cap on connections (TCP) or flows (UDP); 0 = none.
    pub max_connections: u32,
    /// Behaviour with no healthy backend.
    pub on_all_unhealthy: OnAllUnhealthy,
    /// Time allowed for one connect attempt to a backend.
    pub connect_timeout: Duration,
    /// A connection or flow with no traffic either way for this long is closed.
    pub idle_timeout: Duration,
    /// How long connections to a removed backend may continue.
    pub drain_timeout: Duration,
    /// The backends.
    pub backends: Vec<Backend>,
    /// The health check.
    pub health: HealthCheck,
}

/// `[runtime]` as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSpec {
    /// Worker threads; 0 (default) = one per CPU.
    #[serde(default)]
    pub workers: usize,
    /// Default `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineChoice>,
    /// Global connection cap; 0 (default) = derived from RLIMIT_NOFILE.
    #[serde(default)]
    pub max_connections: u64,
    /// Move bulk TCP transfers through a kernel pipe (`splice`) instead of
    /// copying them through user space; default on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub splice: Option<bool>,
}

/// `[admin]` as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSpec {
    /// Metrics and probes address; default `127.0.0.1:9600`; `"off"` disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// Control API unix socket; default `/run/lbd/control.sock`; `"off"` disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<String>,
    /// Group owning the control socket (mode 0660 then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket_group: Option<String>,
    /// Control API over TLS; needs `tls_cert`, `tls_key`, `token_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_tcp: Option<String>,
    /// PEM certificate chain for `control_tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<String>,
    /// PEM private key for `control_tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<String>,
    /// PEM CA bundle: when set, clients of `control_tcp` must present a certificate it signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<String>,
    /// File holding the bearer token for `control_tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// Where the last accepted dynamic state is kept; default `/var/lib/lbd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<String>,
}

/// The whole `lbd` file as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// `[runtime]`.
    #[serde(default)]
    pub runtime: RuntimeSpec,
    /// `[admin]`.
    #[serde(default)]
    pub admin: AdminSpec,
    /// `[announce]`.
    #[serde(default)]
    pub announce: crate::AnnounceSpec,
    /// `[defaults]`.
    #[serde(default)]
    pub defaults: Defaults,
    /// `[[listener]]`.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerSpec>,
}

/// Validated `[runtime]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    /// 0 = one per CPU (resolved by the data plane).
    pub workers: usize,
    /// Engine choice.
    pub engine: EngineChoice,
    /// 0 = derived from RLIMIT_NOFILE.
    pub max_connections: u64,
    /// Bulk TCP transfers move through kernel pipes.
    pub splice: bool,
}

/// Validated `[admin]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admin {
    /// Metrics and probes address, or none.
    pub metrics: Option<SocketAddr>,
    /// Control API unix socket, or none.
    pub control_socket: Option<String>,
    /// Group owning the control socket.
    pub control_socket_group: Option<String>,
    /// Control API over TLS.
    pub control_tcp: Option<SocketAddr>,
    /// PEM certificate chain.
    pub tls_cert: Option<String>,
    /// PEM private key.
    pub tls_key: Option<String>,
    /// PEM CA bundle for client certificates.
    pub client_ca: Option<String>,
    /// Bearer token file.
    pub token_file: Option<String>,
    /// State directory.
    pub state_dir: String,
}

/// A validated `lbd` configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// `[runtime]`.
    pub runtime: Runtime,
    /// `[admin]`.
    pub admin: Admin,
    /// `[announce]`.
    #[serde(default)]
    pub announce: crate::Announce,
    /// `[defaults]`, kept to resolve listeners that arrive through the control API.
    pub defaults: Defaults,
    /// The static listeners, in file order.
    pub listeners: Vec<Listener>,
}

/// The largest state version: 2^53 - 1, the largest integer every JSON
/// reader (JavaScript's numbers among them) holds exactly.
pub const MAX_VERSION: u64 = (1 << 53) - 1;

/// The dynamic state exchanged over the control API.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    /// Monotonic version chosen by the writer (at most [`MAX_VERSION`]).
    pub version: u64,
    /// Listeners, same schema as the file's `[[listener]]` (a TOML state
    /// may spell the key `listener`, as the file does).
    #[serde(default, alias = "listener")]
    pub listeners: Vec<ListenerSpec>,
    /// L2 ownership: which forwarder answers ARP/NDP for each VIP, and
    /// the receiver's own name. Absent: no VIP has an owner (every state
    /// before L2 mode stays valid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2: Option<crate::l2::L2State>,
}
