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

pub(super) fn tuning(svc: &Service) -> Result<Tuning, Vec<Invalid>> {
    let mut t = Tuning::default();
    let mut errors = Vec::new();
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    for (key, value) in &annotations {
        let Some(short) = key.strip_prefix(PREFIX) else {
            continue;
        };
        let value = value.trim();
        let mut fail = |what: &str| {
            errors.push(Invalid {
                field: key.clone(),
                message: format!("{value:?} is not {what}"),
            })
        };
        let duration = |v: &str| v.parse::<Duration>().ok().filter(|d| !d.is_zero());
        let count = |v: &str| v.parse::<u32>().ok().filter(|n| *n >= 1 && *n <= 100);
        match short {
            "proxy-protocol" => match parse_enum(value) {
                Some(v) => t.proxy_protocol = Some(v),
                None => fail("one of off, v1, v2"),
            },
            "balance" => match parse_enum(value) {
                Some(v) => t.balance = Some(v),
                None => fail("one of maglev, round_robin, least_conn, random_two"),
            },
            "idle-timeout" => match duration(value) {
                Some(v) => t.idle_timeout = Some(v),
                None => fail("a duration such as \"10m\""),
            },
            "connect-timeout" => match duration(value) {
                Some(v) => t.connect_timeout = Some(v),
                None => fail("a duration such as \"3s\""),
            },
            "max-connections" => match value.parse::<u32>() {
                Ok(v) => t.max_connections = Some(v),
                Err(_) => fail("a whole number (0 = no cap)"),
            },
            "health-check-kind" => match parse_enum(value) {
                Some(v) => t.health_kind = Some(v),
                None => fail("one of tcp, http, none"),
            },
            "health-check-path" => {
                if value.starts_with('/')
                    && !value.chars().any(|c| c.is_ascii_control() || c == ' ')
                {
                    t.health_path = Some(value.to_owned());
                } else {
                    fail("an absolute HTTP path such as \"/healthz\"");
                }
            }
            "health-check-port" => match value.parse::<u16>() {
                Ok(v) if v > 0 => t.health_port = Some(v),
                _ => fail("a port number 1-65535"),
            },
            "health-check-interval" => match duration(value) {
                Some(v) => t.health_interval = Some(v),
                None => fail("a duration such as \"2s\""),
            },
            "health-check-timeout" => match duration(value) {
                Some(v) => t.health_timeout = Some(v),
                None => fail("a duration such as \"1s\""),
            },
            "health-check-rise" => match count(value) {
                Some(v) => t.health_rise = Some(v),
                None => fail("a count from 1 to 100"),
            },
            "health-check-fall" => match count(value) {
                Some(v) => t.health_fall = Some(v),
                None => fail("a count from 1 to 100"),
            },
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(t)
    } else {
        Err(errors)
    }
}

/// `weir.dev/` annotations this version does not know (likely typos): the
/// controller warns about them; they change nothing.
pub fn unknown_annotations(svc: &Service) -> Vec<String> {
    let known = ["load-balancer-ips", "pool", "allow-shared-ip"];
    svc.metadata
        .annotations
        .iter()
        .flatten()
        .filter_map(|(k, _)| k.strip_prefix(PREFIX).map(|s| (k, s)))
        .filter(|(_, s)| !known.contains(s) && !TUNING.contains(s))
        .map(|(k, _)| k.clone())
        .collect()
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
