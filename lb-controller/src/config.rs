//! The `lb-controller` TOML file: its spec (as written) and the resolved,
//! validated configuration. Errors carry field paths and lines, like `lbd`'s.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use lb_config::{ConfigErrors, Duration, FieldError};
use serde::Deserialize;

use crate::ipam::Pool;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    #[serde(default)]
    kubernetes: KubernetesSpec,
    #[serde(default)]
    leader_election: LeaderSpec,
    #[serde(default, rename = "pool")]
    pools: Vec<PoolSpec>,
    #[serde(default)]
    nodes: NodesSpec,
    #[serde(default)]
    health: HealthSpec,
    #[serde(default, rename = "forwarder")]
    forwarders: Vec<ForwarderSpec>,
    #[serde(default)]
    publish: PublishSpec,
    #[serde(default)]
    admin: AdminSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KubernetesSpec {
    kubeconfig: Option<PathBuf>,
    load_balancer_class: Option<String>,
    default_class: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaderSpec {
    enabled: Option<bool>,
    namespace: Option<String>,
    lease_name: Option<String>,
    lease_duration: Option<Duration>,
    renew_interval: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolSpec {
    name: String,
    addresses: Vec<String>,
    auto_assign: Option<bool>,
    avoid_buggy_ips: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodesSpec {
    address_types: Option<Vec<String>>,
    selector: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthSpec {
    cluster: Option<ClusterHealth>,
    kube_proxy_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwarderSpec {
    name: String,
    url: String,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishSpec {
    debounce: Option<Duration>,
    backoff_max: Option<Duration>,
    timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminSpec {
    metrics: Option<String>,
}

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
}

/// One term of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value` (or `key==value`).
    Equals(String, String),
    /// `key!=value`.
    NotEquals(String, String),
    /// `key`.
    Exists(String),
    /// `!key`.
    NotExists(String),
}

impl Requirement {
    /// Whether `labels` satisfy this term.
    pub fn matches(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        match self {
            Self::Equals(k, v) => labels.get(k) == Some(v),
            Self::NotEquals(k, v) => labels.get(k) != Some(v),
            Self::Exists(k) => labels.contains_key(k),
            Self::NotExists(k) => !labels.contains_key(k),
        }
    }
}

/// Parses an equality-based label selector (`a=b,c!=d,e,!f`).
pub fn parse_selector(text: &str) -> Result<Vec<Requirement>, String> {
    let valid = |k: &str| {
        !k.is_empty()
            && k.len() <= 317
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    let mut out = Vec::new();
    for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let req = if let Some((k, v)) = term.split_once("!=") {
            Requirement::NotEquals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            Requirement::Equals(k.trim().into(), v.trim().into())
        } else if let Some(k) = term.strip_prefix('!') {
            Requirement::NotExists(k.trim().into())
        } else {
            Requirement::Exists(term.into())
        };
        let (Requirement::Equals(k, _)
        | Requirement::NotEquals(k, _)
        | Requirement::Exists(k)
        | Requirement::NotExists(k)) = &req;
        if !valid(k) {
            return Err(format!("bad label key {k:?} in {term:?}"));
        }
        out.push(req);
    }
    if out.is_empty() {
        return Err("empty selector".into());
    }
    Ok(out)
}

const ADDRESS_TYPES: [&str; 5] = [
    "InternalIP",
    "ExternalIP",
    "Hostname",
    "InternalDNS",
    "ExternalDNS",
];

fn std_duration(d: Option<Duration>, default: std::time::Duration) -> std::time::Duration {
    d.map_or(default, Duration::get)
}

const fn secs(n: u64) -> std::time::Duration {
    std::time::Duration::from_secs(n)
}

impl FileSpec {
    /// Validates the spec, collecting every error.
    pub fn resolve(&self) -> Result<Config, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut err = |path: String, message: String| errors.push(FieldError::new(path, message));

        let class = self
            .kubernetes
            .load_balancer_class
            .clone()
            .unwrap_or_else(|| "weir.dev/lb".into());
        if class.is_empty() || class.len() > 253 || !class.contains('/') {
            err(
                "kubernetes.load_balancer_class".into(),
                "must be a domain-prefixed name like \"weir.dev/lb\"".into(),
            );
        }

        let le = &self.leader_election;
        let leader_election = LeaderElection {
            enabled: le.enabled.unwrap_or(true),
            namespace: le.namespace.clone().unwrap_or_else(|| "weir-system".into()),
            lease_name: le
                .lease_name
                .clone()
                .unwrap_or_else(|| "lb-controller".into()),
            lease_duration: std_duration(le.lease_duration, secs(15)),
            renew_interval: std_duration(le.renew_interval, secs(2)),
        };
        if leader_election.lease_duration < std::time::Duration::from_secs(1) {
            err(
                "leader_election.lease_duration".into(),
                "must be at least 1s".into(),
            );
        }
        if leader_election.renew_interval.is_zero()
            || leader_election.renew_interval * 2 > leader_election.lease_duration
        {
            err(
                "leader_election.renew_interval".into(),
                "must be above zero and at most half of lease_duration".into(),
            );
        }

        let mut pools = Vec::new();
        for (i, p) in self.pools.iter().enumerate() {
            if p.name.is_empty() || pools.iter().any(|q: &Pool| q.name == p.name) {
                err(
                    format!("pool[{i}].name"),
                    "must be unique and non-empty".into(),
                );
            }
            if p.addresses.is_empty() {
                err(
                    format!("pool[{i}].addresses"),
                    "needs at least one CIDR or range".into(),
                );
            }
            let mut ranges = Vec::new();
            for (j, a) in p.addresses.iter().enumerate() {
                match crate::ipam::AddrRange::parse(a) {
                    Ok(r) => ranges.push(r),
                    Err(e) => err(format!("pool[{i}].addresses[{j}]"), e),
                }
            }
            pools.push(Pool {
                name: p.name.clone(),
                ranges,
                auto_assign: p.auto_assign.unwrap_or(true),
                avoid_buggy_ips: p.avoid_buggy_ips.unwrap_or(false),
            });
        }

        let address_types = self
            .nodes
            .address_types
            .clone()
            .unwrap_or_else(|| vec!["InternalIP".into(), "ExternalIP".into()]);
        if address_types.is_empty() {
            err("nodes.address_types".into(), "must not be empty".into());
        }
        for (i, t) in address_types.iter().enumerate() {
            if !ADDRESS_TYPES.contains(&t.as_str()) {
                err(
                    format!("nodes.address_types[{i}]"),
                    format!("unknown address type {t:?}; expected one of {ADDRESS_TYPES:?}"),
                );
            }
        }
        let node_selector = match &self.nodes.selector {
            Some(s) => parse_selector(s).unwrap_or_else(|e| {
                err("nodes.selector".into(), e);
                Vec::new()
            }),
            None => Vec::new(),
        };

        let mut forwarders: Vec<Forwarder> = Vec::new();
        for (i, f) in self.forwarders.iter().enumerate() {
            if f.name.is_empty() || forwarders.iter().any(|g| g.name == f.name) {
                err(
                    format!("forwarder[{i}].name"),
                    "must be unique and non-empty".into(),
                );
            }
            let target = if let Some(path) = f.url.strip_prefix("unix://") {
                if !path.starts_with('/') {
                    err(
                        format!("forwarder[{i}].url"),
                        "unix:// needs an absolute path (unix:///run/lbd/control.sock)".into(),
                    );
                }
                for (set, key) in [
                    (f.token_file.is_some(), "token_file"),
                    (f.ca_file.is_some(), "ca_file"),
                    (f.cert_file.is_some(), "cert_file"),
                    (f.key_file.is_some(), "key_file"),
                ] {
                    if set {
                        err(
                            format!("forwarder[{i}].{key}"),
                            "only for https:// forwarders (a unix socket is authorised by its file mode)".into(),
                        );
                    }
                }
                ForwarderTarget::Unix(PathBuf::from(path))
            } else if f.url.starts_with("https://") {
                let uri: Result<hyper::Uri, _> = f.url.parse();
                if !uri
                    .as_ref()
                    .is_ok_and(|u| u.host().is_some() && u.port_u16().is_some())
                {
                    err(
                        format!("forwarder[{i}].url"),
                        "expected https://host:port".into(),
                    );
                }
                let mut need = |v: &Option<PathBuf>, key: &str| {
                    v.clone().unwrap_or_else(|| {
                        err(
                            format!("forwarder[{i}].{key}"),
                            "required for https:// forwarders".into(),
                        );
                        PathBuf::new()
                    })
                };
                let token_file = need(&f.token_file, "token_file");
                let ca_file = need(&f.ca_file, "ca_file");
                let identity = match (&f.cert_file, &f.key_file) {
                    (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                    (None, None) => None,
                    (Some(_), None) => {
                        err(
                            format!("forwarder[{i}].key_file"),
                            "cert_file needs key_file".into(),
                        );
                        None
                    }
                    (None, Some(_)) => {
                        err(
                            format!("forwarder[{i}].cert_file"),
                            "key_file needs cert_file".into(),
                        );
                        None
                    }
                };
                ForwarderTarget::Https {
                    url: f.url.clone(),
                    token_file,
                    ca_file,
                    identity,
                }
            } else {
                err(
                    format!("forwarder[{i}].url"),
                    "expected https://host:port or unix:///path/to/control.sock".into(),
                );
                ForwarderTarget::Unix(PathBuf::new())
            };
            forwarders.push(Forwarder {
                name: f.name.clone(),
                target,
            });
        }

        let metrics = match self.admin.metrics.as_deref() {
            None => Some(SocketAddr::from(([127, 0, 0, 1], 9601))),
            Some("" | "off") => None,
            Some(text) => match text.parse() {
                Ok(a) => Some(a),
                Err(_) => {
                    err(
                        "admin.metrics".into(),
                        format!("{text:?} is not ip:port (or \"off\")"),
                    );
                    None
                }
            },
        };
        let debounce = std_duration(self.publish.debounce, std::time::Duration::from_millis(200));
        let backoff_max = std_duration(self.publish.backoff_max, secs(30));
        let publish_timeout = std_duration(self.publish.timeout, secs(10));
        if backoff_max.is_zero() {
            err("publish.backoff_max".into(), "must be above zero".into());
        }
        if publish_timeout.is_zero() {
            err("publish.timeout".into(), "must be above zero".into());
        }

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Config {
            kubeconfig: self.kubernetes.kubeconfig.clone(),
            load_balancer_class: class,
            default_class: self.kubernetes.default_class.unwrap_or(false),
            leader_election,
            pools,
            address_types,
            node_selector,
            node_selector_text: self.nodes.selector.clone(),
            cluster_health: self.health.cluster.unwrap_or(ClusterHealth::KubeProxy),
            kube_proxy_port: self.health.kube_proxy_port.unwrap_or(10256),
            forwarders,
            debounce,
            backoff_max,
            publish_timeout,
            metrics,
        })
    }
}

/// Parses and validates the text of a controller configuration file.
pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
    lb_config::parse_toml(text, FileSpec::resolve)
}

/// Reads and validates a controller configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    parse(&lb_config::read_file(path)?)
}
