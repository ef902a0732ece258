//! The file as written ([`FileSpec`]) and its validation into a
//! [`Config`], collecting every error with its field path.

use std::net::SocketAddr;
use std::path::PathBuf;

use lb_config::{Duration, FieldError};
use serde::Deserialize;

use super::resolved::{
    ClusterHealth, Config, Forwarder, ForwarderTarget, L2Settings, LeaderElection,
};
use super::selector::parse_selector;
use crate::ipam::{AddrRange, Pool};

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
    #[serde(default)]
    l2: L2Spec,
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
    announce: Option<PoolAnnounce>,
}

/// How a pool's addresses reach the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum PoolAnnounce {
    /// As the forwarders' `[announce]` says (every forwarder binds every
    /// VIP; BGP or nothing).
    Bgp,
    /// One owner per VIP among the ready forwarders, answering ARP/NDP.
    L2,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct L2Spec {
    probe_interval: Option<Duration>,
    probe_failures: Option<u32>,
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
        let mut l2_pools = Vec::new();
        // Every range parsed so far: (pool, index in its list, range), so
        // an address in two ranges is reported.
        let mut seen: Vec<(usize, usize, AddrRange)> = Vec::new();
        let mut warnings = Vec::new();
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
                match AddrRange::parse(a) {
                    Ok(r) => {
                        // A warning, not an error: files with overlapping
                        // pools loaded before, and the allocator copes (an
                        // address is held once, counted in each pool).
                        if let Some(&(k, l, _)) = seen.iter().find(|(_, _, s)| s.overlaps(&r)) {
                            warnings.push(FieldError::new(
                                format!("pool[{i}].addresses[{j}]"),
                                format!(
                                    "{a:?} overlaps pool[{k}].addresses[{l}] ({:?}, pool {:?}): its addresses count in both pools, and one in an l2 pool is announced by L2 whichever pool it came from; MetalLB refuses overlapping pools",
                                    self.pools[k].addresses[l], self.pools[k].name
                                ),
                            ));
                        }
                        seen.push((i, j, r));
                        ranges.push(r);
                    }
                    Err(e) => err(format!("pool[{i}].addresses[{j}]"), e),
                }
            }
            let pool = Pool {
                name: p.name.clone(),
                ranges,
                auto_assign: p.auto_assign.unwrap_or(true),
                avoid_buggy_ips: p.avoid_buggy_ips.unwrap_or(false),
            };
            if p.announce == Some(PoolAnnounce::L2) {
                l2_pools.push(pool.clone());
            }
            pools.push(pool);
        }
        let probe_interval = std_duration(
            self.l2.probe_interval,
            std::time::Duration::from_millis(200),
        );
        let probe_failures = self.l2.probe_failures.unwrap_or(3);
        if probe_interval < std::time::Duration::from_millis(10)
            || probe_interval > std::time::Duration::from_secs(60)
        {
            err(
                "l2.probe_interval".into(),
                "must be between 10ms and 60s".into(),
            );
        }
        if !(1..=100).contains(&probe_failures) {
            err(
                "l2.probe_failures".into(),
                format!("{probe_failures} is not between 1 and 100"),
            );
        } else if probe_interval * probe_failures > std::time::Duration::from_secs(1800) {
            // The forwarders' lease is twice this, and lbd takes at most an hour.
            err(
                "l2.probe_failures".into(),
                "probe_interval × probe_failures must be at most 30 minutes".into(),
            );
        }

        let address_types = self
            .nodes
            .address_types
            .clone()
            .unwrap_or_else(|| vec!["InternalIP".into(), "ExternalIP".into()]);
        if address_types.is_empty() {
            err("nodes.address_types".into(), "must not be empty".into());
        } else if !address_types
            .iter()
            .any(|t| t == "InternalIP" || t == "ExternalIP")
        {
            // Names are skipped (the forwarders resolve nothing): with no IP
            // type, no node would ever be a backend.
            err(
                "nodes.address_types".into(),
                "lists no IP type: add \"InternalIP\" or \"ExternalIP\" (forwarders need node addresses; Hostname and DNS names are skipped)".into(),
            );
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
            if !l2_pools.is_empty() && !lb_config::l2::valid_forwarder_name(&f.name) {
                err(
                    format!("forwarder[{i}].name"),
                    "names an L2 owner: no spaces or control characters, at most 253 bytes".into(),
                );
            }
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
            l2: L2Settings {
                pools: l2_pools,
                probe_interval,
                probe_failures,
            },
            warnings,
        })
    }
}
