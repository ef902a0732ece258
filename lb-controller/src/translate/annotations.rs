//! The Service's annotations and the fields the allocator reads: what a
//! Service asks of the allocator ([`request`]) and how its listeners are
//! tuned (`Tuning`), each bad value an [`Invalid`] naming the annotation
//! or field.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use lb_config::{Balance, Duration, HealthKind, ProxyProtocol};
use serde::de::DeserializeOwned;

use crate::ipam::{Family, FamilyPolicy, Proto, Request};

/// Annotation prefix.
pub const PREFIX: &str = "weir.dev/";
/// Requested addresses (comma-separated).
pub const ANN_IPS: &str = "weir.dev/load-balancer-ips";
/// Pool to allocate from.
pub const ANN_POOL: &str = "weir.dev/pool";
/// Sharing key.
pub const ANN_SHARED: &str = "weir.dev/allow-shared-ip";
/// The listener-tuning annotations this module reads.
const TUNING: [&str; 12] = [
    "proxy-protocol",
    "balance",
    "idle-timeout",
    "connect-timeout",
    "max-connections",
    "health-check-kind",
    "health-check-path",
    "health-check-port",
    "health-check-interval",
    "health-check-timeout",
    "health-check-rise",
    "health-check-fall",
];

/// A problem with one annotation or field of the Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// The annotation key or field path.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn annotation<'a>(svc: &'a Service, key: &str) -> Option<&'a str> {
    svc.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(|s| s.trim())
}

pub(super) fn proto_of(p: &ServicePort) -> &str {
    p.protocol.as_deref().unwrap_or("TCP")
}

/// The allocator request of a Service; errors name the annotation or field.
pub fn request(svc: &Service) -> Result<Request, Invalid> {
    let spec = svc.spec.clone().unwrap_or_default();
    let bad = |field: &str, message: String| Invalid {
        field: field.into(),
        message,
    };
    let families: Vec<Family> = spec
        .ip_families
        .unwrap_or_default()
        .iter()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        })
        .collect();
    let first = families.first().copied().unwrap_or(Family::V4);
    let policy = match spec.ip_family_policy.as_deref() {
        Some("RequireDualStack") => FamilyPolicy::RequireDual(first),
        Some("PreferDualStack") => FamilyPolicy::PreferDual(first),
        _ => FamilyPolicy::Single(first),
    };
    let mut addresses = Vec::new();
    if let Some(list) = annotation(svc, ANN_IPS) {
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            addresses.push(
                part.parse::<IpAddr>()
                    .map_err(|_| bad(ANN_IPS, format!("{part:?} is not an IP address")))?,
            );
        }
        if addresses.is_empty() || addresses.len() > 2 {
            return Err(bad(
                ANN_IPS,
                "expected one or two addresses (one per family)".into(),
            ));
        }
    } else if let Some(ip) = spec.load_balancer_ip.as_deref().filter(|s| !s.is_empty()) {
        addresses.push(ip.parse().map_err(|_| {
            bad(
                "spec.loadBalancerIP",
                format!("{ip:?} is not an IP address"),
            )
        })?);
    }
    let pool = annotation(svc, ANN_POOL)
        .filter(|p| !p.is_empty())
        .map(str::to_owned);
    let sharing_key = annotation(svc, ANN_SHARED)
        .filter(|p| !p.is_empty())
        .map(str::to_owned);
    let mut ports = Vec::new();
    for p in spec.ports.unwrap_or_default() {
        let proto = match proto_of(&p) {
            "UDP" => Proto::Udp,
            "SCTP" => Proto::Sctp,
            _ => Proto::Tcp,
        };
        let port = u16::try_from(p.port)
            .map_err(|_| bad("spec.ports", format!("port {} out of range", p.port)))?;
        ports.push((port, proto));
    }
    Ok(Request {
        policy,
        addresses,
        pool,
        sharing_key,
        ports,
    })
}

fn parse_enum<T: DeserializeOwned>(value: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(value.replace('-', "_"))).ok()
}

/// The tuning annotations, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Tuning {
    pub(super) proxy_protocol: Option<ProxyProtocol>,
    pub(super) balance: Option<Balance>,
    pub(super) idle_timeout: Option<Duration>,
    pub(super) connect_timeout: Option<Duration>,
    pub(super) max_connections: Option<u32>,
    pub(super) health_kind: Option<HealthKind>,
    pub(super) health_path: Option<String>,
    pub(super) health_port: Option<u16>,
    pub(super) health_interval: Option<Duration>,
    pub(super) health_timeout: Option<Duration>,
    pub(super) health_rise: Option<u32>,
    pub(super) health_fall: Option<u32>,
}

/// Stores `parsed` in `slot`; without a value, returns `what` the
/// annotation's value should have been.
fn set<T>(slot: &mut Option<T>, parsed: Option<T>, what: &'static str) -> Option<&'static str> {
    match parsed {
        Some(v) => {
            *slot = Some(v);
            None
        }
        None => Some(what),
    }
}

pub(super) fn tuning(svc: &Service) -> Result<Tuning, Vec<Invalid>> {
    let mut tuning = Tuning::default();
    let mut errors = Vec::new();
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    for (key, value) in &annotations {
        let Some(short) = key.strip_prefix(PREFIX) else {
            continue;
        };
        let value = value.trim();
        let duration = |v: &str| v.parse::<Duration>().ok().filter(|d| !d.is_zero());
        let count = |v: &str| v.parse::<u32>().ok().filter(|n| *n >= 1 && *n <= 100);
        let path = |v: &str| {
            Some(v.to_owned()).filter(|p| {
                p.starts_with('/') && !p.chars().any(|c| c.is_ascii_control() || c == ' ')
            })
        };
        let t = &mut tuning;
        let failed = match short {
            "proxy-protocol" => set(
                &mut t.proxy_protocol,
                parse_enum(value),
                "one of off, v1, v2",
            ),
            "balance" => set(
                &mut t.balance,
                parse_enum(value),
                "one of maglev, round_robin, least_conn, random_two",
            ),
            "idle-timeout" => set(
                &mut t.idle_timeout,
                duration(value),
                "a duration such as \"10m\"",
            ),
            "connect-timeout" => set(
                &mut t.connect_timeout,
                duration(value),
                "a duration such as \"3s\"",
            ),
            "max-connections" => set(
                &mut t.max_connections,
                value.parse().ok(),
                "a whole number (0 = no cap)",
            ),
            "health-check-kind" => set(
                &mut t.health_kind,
                parse_enum(value),
                "one of tcp, http, none",
            ),
            "health-check-path" => set(
                &mut t.health_path,
                path(value),
                "an absolute HTTP path such as \"/healthz\"",
            ),
            "health-check-port" => set(
                &mut t.health_port,
                value.parse().ok().filter(|p| *p > 0),
                "a port number 1-65535",
            ),
            "health-check-interval" => set(
                &mut t.health_interval,
                duration(value),
                "a duration such as \"2s\"",
            ),
            "health-check-timeout" => set(
                &mut t.health_timeout,
                duration(value),
                "a duration such as \"1s\"",
            ),
            "health-check-rise" => set(&mut t.health_rise, count(value), "a count from 1 to 100"),
            "health-check-fall" => set(&mut t.health_fall, count(value), "a count from 1 to 100"),
            _ => None,
        };
        if let Some(what) = failed {
            errors.push(Invalid {
                field: key.clone(),
                message: format!("{value:?} is not {what}"),
            });
        }
    }
    if errors.is_empty() {
        Ok(tuning)
    } else {
        Err(errors)
    }
}

/// MetalLB's request annotations and what Weir reads instead, for
/// Services brought over from it.
const METALLB: [(&str, &str); 3] = [
    ("loadBalancerIPs", "weir.dev/load-balancer-ips"),
    ("address-pool", "weir.dev/pool"),
    ("allow-shared-ip", "weir.dev/allow-shared-ip"),
];

/// What the controller warns about annotations it does not read: a
/// `weir.dev/` key this version does not know (likely a typo), and a
/// MetalLB request annotation (`metallb.universe.tf/`, `metallb.io/`),
/// which Weir ignores. They change nothing.
pub fn unread_annotations(svc: &Service) -> Vec<String> {
    let known = ["load-balancer-ips", "pool", "allow-shared-ip"];
    let mut out = Vec::new();
    for k in svc.metadata.annotations.iter().flatten().map(|(k, _)| k) {
        if let Some(s) = k.strip_prefix(PREFIX) {
            if !known.contains(&s) && !TUNING.contains(&s) {
                out.push(format!("{k} is not a Weir annotation (typo?); ignored"));
            }
            continue;
        }
        let metallb = k
            .strip_prefix("metallb.universe.tf/")
            .or_else(|| k.strip_prefix("metallb.io/"));
        if let Some((_, ours)) = metallb.and_then(|s| METALLB.iter().find(|(m, _)| *m == s)) {
            out.push(format!(
                "{k} is MetalLB's annotation, which Weir does not read; use {ours}"
            ));
        }
    }
    out
}

/// Maps a listener field path back to the annotation that sets it.
pub(super) fn annotation_for(path: &str) -> String {
    let field = path.rsplit('.').next().unwrap_or(path);
    let short = match field {
        "proxy_protocol" => "proxy-protocol",
        "idle_timeout" => "idle-timeout",
        "connect_timeout" => "connect-timeout",
        "port" if path.contains("health") => "health-check-port",
        "path" => "health-check-path",
        "interval" => "health-check-interval",
        "timeout" => "health-check-timeout",
        "kind" => "health-check-kind",
        _ => return path.to_owned(),
    };
    format!("{PREFIX}{short}")
}
