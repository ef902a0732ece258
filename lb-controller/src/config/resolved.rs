//! The resolved, validated configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::selector::Requirement;
use crate::ipam::Pool;

/// How ETP=Cluster Services are health-checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterHealth {
    /// HTTP `GET /healthz` on kube-proxy's health port of each node.
    KubeProxy,
    /// A TCP connect to the NodePort.
    Tcp,
}

/// Where a forwarder's control API is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwarderTarget {
    /// `unix:///run/lbd/control.sock`.
    Unix(PathBuf),
    /// `https://host:port` with a token, the CA, and an optional client identity.
    Https {
        /// The URL.
        url: String,
        /// The bearer token file.
        token_file: PathBuf,
        /// The CA that signed the forwarder's certificate.
        ca_file: PathBuf,
        /// Client certificate and key (mTLS), if the forwarder asks for one.
        identity: Option<(PathBuf, PathBuf)>,
    },
}

/// One `lbd` to program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forwarder {
    /// Unique name (used in metrics and Events).
    pub name: String,
    /// Its control API.
    pub target: ForwarderTarget,
}

/// Leader election settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderElection {
    /// `false` only for a single replica (tests, the edge-host systemd unit).
    pub enabled: bool,
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// How long a lease is valid without renewal: a standby takes over no
    /// sooner than this, and at most this plus half a second (its poll
    /// interval), after the leader's last renewal.
    pub lease_duration: std::time::Duration,
    /// How often the leader renews (a standby reads the Lease every
    /// 500 ms, or this if shorter).
    pub renew_interval: std::time::Duration,
}

/// The resolved configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Kubeconfig file; `None` = in-cluster (or `KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    /// `spec.loadBalancerClass` we own.
    pub load_balancer_class: String,
    /// Also manage LoadBalancer Services with no class.
    pub default_class: bool,
    /// Leader election.
    pub leader_election: LeaderElection,
    /// Address pools.
    pub pools: Vec<Pool>,
    /// Node address types, in preference order.
    pub address_types: Vec<String>,
    /// Label selector nodes must match to be backends (`key=value`, `key!=value`, `key`, `!key`, comma-separated).
    pub node_selector: Vec<Requirement>,
    /// The text of the selector (for the API server's list calls).
    pub node_selector_text: Option<String>,
    /// ETP=Cluster health checking.
    pub cluster_health: ClusterHealth,
    /// kube-proxy's health port.
    pub kube_proxy_port: u16,
    /// Forwarders to program.
    pub forwarders: Vec<Forwarder>,
    /// Wait this long after a change before publishing (changes coalesce).
    pub debounce: std::time::Duration,
    /// Longest wait between publish retries.
    pub backoff_max: std::time::Duration,
    /// Timeout of one request to a forwarder.
    pub publish_timeout: std::time::Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` listen; `None` = off.
    pub metrics: Option<SocketAddr>,
    /// What takes no effect or may surprise, each with its path (and, read
    /// from a file, its line): printed by `check-config`, logged at start.
    pub warnings: Vec<lb_config::FieldError>,
    /// L2 announcement: which pools' VIPs get one owner each, and how the
    /// forwarders' liveness is probed.
    pub l2: L2Settings,
}

/// `[[pool]] announce = "l2"` and `[l2]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L2Settings {
    /// The pools whose VIPs get an owner (none: no `l2` in the state).
    pub pools: Vec<Pool>,
    /// How often the leader probes each forwarder's readiness (200 ms).
    pub probe_interval: std::time::Duration,
    /// Probes missed in a row before a forwarder's VIPs move (3).
    pub probe_failures: u32,
}

impl L2Settings {
    /// Whether `ip` lies in a pool announced in L2 mode.
    pub fn covers(&self, ip: std::net::IpAddr) -> bool {
        self.pools.iter().any(|p| p.contains(ip))
    }

    /// Whether any pool is announced in L2 mode.
    pub fn enabled(&self) -> bool {
        !self.pools.is_empty()
    }

    /// How long a forwarder may go without a probe before it counts itself
    /// cut off from the controller: twice the time the controller takes to
    /// declare a silent forwarder failed, and at least one second.
    pub fn lease(&self) -> std::time::Duration {
        (self.probe_interval * self.probe_failures * 2).max(std::time::Duration::from_secs(1))
    }
}
