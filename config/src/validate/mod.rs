//! Resolution of specs against defaults, and validation.
//!
//! Every check runs, so one pass reports every problem; each error names the
//! field path (`listener[2].backends[0].addr`). Line numbers are added by the
//! file parser, which knows where each path was written.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::model::*;
use crate::{shown, Duration, FieldError};

mod health;

use health::resolve_health;
pub use health::{unused_check_settings, unused_default_settings};

/// Most consecutive results `rise` and `fall` may ask for.
pub const MAX_STREAK: u32 = 100;
/// Default health check interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Default health check timeout.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default idle timeout for TCP connections.
pub const DEFAULT_TCP_IDLE: Duration = Duration::from_secs(600);
/// Default idle timeout for UDP flows.
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(30);
/// Default drain timeout.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
/// Largest accepted backend weight (keeps Maglev tables fair and cheap).
pub const MAX_WEIGHT: u32 = 10_000;
/// Most worker threads accepted.
pub const MAX_WORKERS: usize = 1024;
/// Default metrics address.
pub const DEFAULT_METRICS: &str = "127.0.0.1:9600";
/// Default control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/lbd/control.sock";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/lbd";

struct Errors<'a> {
    out: &'a mut Vec<FieldError>,
    prefix: String,
    /// A bad value a listener inherited is reported at `defaults.<field>`
    /// (in a file, where the operator wrote it), or at the listener (in a
    /// control-API state, whose writer cannot see the file's defaults and
    /// can only set the value on its listener).
    blame_defaults: bool,
}

impl Errors<'_> {
    fn push(&mut self, field: &str, message: impl Into<String>) {
        let path = if field.is_empty() {
            self.prefix.clone()
        } else if field.starts_with('[') || self.prefix.is_empty() {
            format!("{}{field}", self.prefix)
        } else {
            format!("{}.{field}", self.prefix)
        };
        self.out.push(FieldError::new(path, message));
    }

    /// Like [`Errors::push`], for a value the listener may have taken from
    /// `[defaults]` (`inherited`): in a file the problem is then reported
    /// where the value was written, `defaults.<field>`, once however many
    /// listeners took it (the repeats are dropped).
    fn push_value(&mut self, field: &str, inherited: bool, message: impl Into<String>) {
        if inherited && self.blame_defaults {
            self.out
                .push(FieldError::new(format!("defaults.{field}"), message));
        } else {
            self.push(field, message);
        }
    }
}

fn valid_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b))
}

/// Parses `IP:port` / `[IPv6]:port`, with a message an operator can act on.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().map_err(|_| {
        if text.parse::<std::net::IpAddr>().is_ok() {
            format!("{text:?} has no port: write IP:port, or [IPv6]:port")
        } else {
            format!("{text:?} is not an address: write IP:port, or [IPv6]:port (host names are not resolved)")
        }
    })
}

/// Parses a CIDR, refusing host bits (a likely typo) and bare addresses.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let net: IpNet = text.parse().map_err(|_| {
        format!("{text:?} is not a CIDR (write e.g. \"203.0.113.0/24\" or \"2001:db8::/48\")")
    })?;
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set; did you mean \"{}\"?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Resolves one listener against `defaults`, pushing every problem found.
/// `prefix` is the listener's path, e.g. `listener[2]`.
pub fn resolve_listener(
    spec: &ListenerSpec,
    defaults: &Defaults,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Listener {
    resolve_listener_in(spec, defaults, prefix, errors, false)
}

/// [`resolve_listener`], reporting a bad inherited value at `defaults.` when
/// `blame_defaults` (in a file).
fn resolve_listener_in(
    spec: &ListenerSpec,
    defaults: &Defaults,
    prefix: &str,
    errors: &mut Vec<FieldError>,
    blame_defaults: bool,
) -> Listener {
    let mut e = Errors {
        out: errors,
        prefix: prefix.to_owned(),
        blame_defaults,
    };
    if !valid_name(&spec.name) {
        e.push(
            "name",
            format!(
                "{} must be 1 to 253 characters of A-Z a-z 0-9 . _ : / -",
                shown(&spec.name)
            ),
        );
    }
    let bind = parse_socket_addr(&spec.bind).unwrap_or_else(|m| {
        e.push("bind", m);
        SocketAddr::from(([0, 0, 0, 0], 0))
    });
    let protocol = spec.protocol.or(defaults.protocol).unwrap_or(Protocol::Tcp);
    if protocol == Protocol::Udp
        && bind.ip().is_unspecified()
        && spec.bind.parse::<SocketAddr>().is_ok()
    {
        e.push(
            "bind",
            format!("{} is a wildcard; a udp listener must bind a specific address, because replies are sent from it", spec.bind),
        );
    }
    let balance = spec.balance.or(defaults.balance).unwrap_or(Balance::Maglev);
    let hash_key = spec
        .hash_key
        .or(defaults.hash_key)
        .unwrap_or(HashKey::FiveTuple);
    if hash_key == HashKey::ClientIp && balance != Balance::Maglev {
        e.push("hash_key", "client_ip only applies to balance = \"maglev\"");
    }
    let proxy_protocol = spec
        .proxy_protocol
        .or(defaults.proxy_protocol)
        .unwrap_or(ProxyProtocol::Off);
    if proxy_protocol == ProxyProtocol::V1 && protocol == Protocol::Udp {
        e.push(
            "proxy_protocol",
            "v1 is TCP only; use \"v2\" for a udp listener",
        );
    }
    let ranges = spec
        .source_ranges
        .as_ref()
        .or(defaults.source_ranges.as_ref());
    let ranges_inherited = spec.source_ranges.is_none() && defaults.source_ranges.is_some();
    let mut source_ranges = Vec::new();
    for (i, text) in ranges.into_iter().flatten().enumerate() {
        match parse_cidr(text) {
            Ok(net) => source_ranges.push(net),
            Err(m) => e.push_value(&format!("source_ranges[{i}]"), ranges_inherited, m),
        }
    }
    let mut timeout = |field: &str, own: Option<Duration>, def: Option<Duration>, builtin| {
        let value = own.or(def).unwrap_or(builtin);
        if value.is_zero() {
            let inherited = own.is_none() && def.is_some();
            e.push_value(field, inherited, "must be greater than zero");
        }
        value
    };
    let connect_timeout = timeout(
        "connect_timeout",
        spec.connect_timeout,
        defaults.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
    );
    let idle_timeout = match protocol {
        Protocol::Tcp => timeout(
            "idle_timeout",
            spec.idle_timeout,
            defaults.idle_timeout,
            DEFAULT_TCP_IDLE,
        ),
        Protocol::Udp => timeout("idle_timeout", spec.idle_timeout, None, DEFAULT_UDP_IDLE),
    };
    let drain_timeout = timeout(
        "drain_timeout",
        spec.drain_timeout,
        defaults.drain_timeout,
        DEFAULT_DRAIN,
    );
    let mut backends: Vec<Backend> = Vec::with_capacity(spec.backends.len());
    let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
    for (i, b) in spec.backends.iter().enumerate() {
        let weight = b.weight.unwrap_or(1);
        if weight > MAX_WEIGHT {
            e.push(
                &format!("backends[{i}].weight"),
                format!("{weight} is above the maximum of {MAX_WEIGHT}"),
            );
        }
        match parse_socket_addr(&b.addr) {
            Ok(addr) if addr.port() == 0 => e.push(
                &format!("backends[{i}].addr"),
                "port 0 is not a backend port",
            ),
            Ok(addr) if addr.ip().is_unspecified() || addr.ip().is_multicast() => e.push(
                &format!("backends[{i}].addr"),
                format!("{} is not a unicast address", addr.ip()),
            ),
            Ok(addr) => {
                if let Some(first) = seen.insert(addr, i) {
                    e.push(
                        &format!("backends[{i}].addr"),
                        format!("{addr} is already backends[{first}]"),
                    );
                }
                backends.push(Backend { addr, weight });
            }
            Err(m) => e.push(&format!("backends[{i}].addr"), m),
        }
    }
    if !spec.backends.is_empty() && spec.backends.iter().all(|b| b.weight == Some(0)) {
        e.push(
            "backends",
            "every backend has weight 0; at least one must be above 0",
        );
    }
    let health = resolve_health(
        spec.health.as_ref(),
        defaults.health.as_ref(),
        protocol,
        proxy_protocol,
        &mut e,
    );
    Listener {
        name: spec.name.clone(),
        bind,
        protocol,
        balance,
        hash_key,
        proxy_protocol,
        source_ranges,
        max_connections: spec
            .max_connections
            .or(defaults.max_connections)
            .unwrap_or(0),
        on_all_unhealthy: spec
            .on_all_unhealthy
            .or(defaults.on_all_unhealthy)
            .unwrap_or(OnAllUnhealthy::FailOpen),
        connect_timeout,
        idle_timeout,
        drain_timeout,
        backends,
        health,
    }
}

/// Resolves and validates a list of listeners. `key` names the list in
/// paths: `listener` in files, `listeners` in control API states.
pub fn resolve_listeners(
    specs: &[ListenerSpec],
    defaults: &Defaults,
    key: &str,
) -> Result<Vec<Listener>, Vec<FieldError>> {
    resolve_listeners_in(specs, defaults, key, false)
}

/// [`resolve_listeners`]; `blame_defaults` as in [`resolve_listener_in`].
fn resolve_listeners_in(
    specs: &[ListenerSpec],
    defaults: &Defaults,
    key: &str,
    blame_defaults: bool,
) -> Result<Vec<Listener>, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut binds: HashMap<(Protocol, SocketAddr), usize> = HashMap::new();
    let mut out = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let prefix = format!("{key}[{i}]");
        let listener = resolve_listener_in(spec, defaults, &prefix, &mut errors, blame_defaults);
        if let Some(first) = names.insert(&spec.name, i) {
            errors.push(FieldError::new(
                format!("{prefix}.name"),
                format!("{:?} is already the name of {key}[{first}]", spec.name),
            ));
        }
        if listener.bind.port() != 0 || spec.bind.parse::<SocketAddr>().is_ok() {
            if let Some(first) = binds.insert((listener.protocol, listener.bind), i) {
                errors.push(FieldError::new(
                    format!("{prefix}.bind"),
                    format!(
                        "{} ({:?}) is already bound by {key}[{first}]",
                        listener.bind, listener.protocol
                    ),
                ));
            }
        }
        out.push(listener);
    }
    // A bad value in `[defaults]` is reported once, not per listener.
    let mut seen = std::collections::HashSet::new();
    errors.retain(|e| seen.insert((e.path.clone(), e.message.clone())));
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn optional_addr(
    text: Option<&String>,
    default: Option<&str>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<SocketAddr> {
    let text = text.map(String::as_str).or(default)?;
    if text == "off" {
        return None;
    }
    parse_socket_addr(text)
        .map_err(|m| errors.push(FieldError::new(field, m)))
        .ok()
}

/// Whether a socket bound to `theirs` receives some of what a socket bound
/// to `ours` (same protocol) would: same port, and the same address or a
/// wildcard on either side (an IPv6 wildcard covers IPv4 too).
pub fn binds_overlap(ours: SocketAddr, theirs: SocketAddr) -> bool {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (ours, theirs) = (canon(ours), canon(theirs));
    if ours.port() != theirs.port() {
        return false;
    }
    let wildcard_for =
        |w: IpAddr, other: IpAddr| w.is_unspecified() && (w.is_ipv6() || other.is_ipv4());
    ours.ip() == theirs.ip()
        || wildcard_for(ours.ip(), theirs.ip())
        || wildcard_for(theirs.ip(), ours.ip())
}

/// Whether TCP sockets bound to `a` and `b` would want the same port
/// (port 0 takes a free one and meets nothing).
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0 && binds_overlap(a, b)
}

/// The metrics endpoint and the TCP control API need ports that no TCP
/// listener binds (and not each other's); otherwise `lbd run` would fail
/// on the second bind, which `check-config` should say first.
fn check_admin_ports(
    metrics: Option<SocketAddr>,
    control_tcp: Option<SocketAddr>,
    listeners: &[Listener],
    errors: &mut Vec<FieldError>,
) {
    for (field, addr) in [
        ("admin.metrics", metrics),
        ("admin.control_tcp", control_tcp),
    ] {
        let Some(addr) = addr else { continue };
        for (i, l) in listeners.iter().enumerate() {
            if l.protocol == Protocol::Tcp && same_port(addr, l.bind) {
                errors.push(FieldError::new(
                    field,
                    format!(
                        "{addr} takes the port of listener[{i}] ({:?}, bind {}); give it a port of its own",
                        l.name, l.bind
                    ),
                ));
            }
        }
    }
    if let (Some(m), Some(c)) = (metrics, control_tcp) {
        if same_port(m, c) {
            errors.push(FieldError::new(
                "admin.control_tcp",
                format!("{c} takes the port of admin.metrics ({m})"),
            ));
        }
    }
}

/// Resolves and validates a whole file.
pub fn resolve_file(spec: &FileSpec) -> Result<Config, Vec<FieldError>> {
    let mut errors = Vec::new();
    let rt = &spec.runtime;
    if rt.workers > MAX_WORKERS {
        errors.push(FieldError::new(
            "runtime.workers",
            format!("{} is above the maximum of {MAX_WORKERS}", rt.workers),
        ));
    }
    let a = &spec.admin;
    let metrics = optional_addr(
        a.metrics.as_ref(),
        Some(DEFAULT_METRICS),
        "admin.metrics",
        &mut errors,
    );
    let control_tcp = optional_addr(
        a.control_tcp.as_ref(),
        None,
        "admin.control_tcp",
        &mut errors,
    );
    if control_tcp.is_some() {
        for (field, value) in [
            ("tls_cert", &a.tls_cert),
            ("tls_key", &a.tls_key),
            ("token_file", &a.token_file),
        ] {
            if value.is_none() {
                errors.push(FieldError::new(
                    format!("admin.{field}"),
                    "is required with admin.control_tcp (the TCP control API is TLS with a bearer token, never plain)",
                ));
            }
        }
    }
    if let Some(dir) = a.state_dir.as_deref() {
        if !dir.starts_with('/') {
            errors.push(FieldError::new(
                "admin.state_dir",
                format!("{} must be an absolute path", shown(dir)),
            ));
        }
    }
    let control_socket = match a.control_socket.as_deref() {
        Some("off") => None,
        Some(path) if !path.starts_with('/') => {
            errors.push(FieldError::new(
                "admin.control_socket",
                format!("{path:?} must be an absolute path"),
            ));
            None
        }
        other => Some(other.unwrap_or(DEFAULT_CONTROL_SOCKET).to_owned()),
    };
    let announce = crate::announce::resolve_announce(&spec.announce, &mut errors);
    let listeners = match resolve_listeners_in(&spec.listeners, &spec.defaults, "listener", true) {
        Ok(l) => l,
        Err(mut e) => {
            errors.append(&mut e);
            Vec::new()
        }
    };
    // Defaults are validated on their own too, so a bad default is reported
    // even in a file with no listeners yet.
    if spec.listeners.is_empty() {
        let probe = ListenerSpec::new("defaults", "0.0.0.0:1");
        resolve_listener_in(&probe, &spec.defaults, "defaults", &mut errors, true);
    }
    check_admin_ports(metrics, control_tcp, &listeners, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Config {
        runtime: Runtime {
            workers: rt.workers,
            engine: rt.engine.unwrap_or(EngineChoice::Auto),
            max_connections: rt.max_connections,
            splice: rt.splice.unwrap_or(true),
        },
        admin: Admin {
            metrics,
            control_socket,
            control_socket_group: a.control_socket_group.clone(),
            control_tcp,
            tls_cert: a.tls_cert.clone(),
            tls_key: a.tls_key.clone(),
            client_ca: a.client_ca.clone(),
            token_file: a.token_file.clone(),
            state_dir: a
                .state_dir
                .clone()
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        },
        announce,
        defaults: spec.defaults.clone(),
        listeners,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn same_port_and_address_or_a_wildcard_overlap() {
        assert!(binds_overlap(a("127.0.0.1:80"), a("127.0.0.1:80")));
        assert!(!binds_overlap(a("127.0.0.1:80"), a("127.0.0.1:81")));
        assert!(!binds_overlap(a("127.0.0.1:80"), a("127.0.0.2:80")));
        assert!(binds_overlap(a("127.0.0.1:80"), a("0.0.0.0:80")));
        assert!(binds_overlap(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(
            binds_overlap(a("127.0.0.1:80"), a("[::]:80")),
            "a dual-stack wildcard"
        );
        assert!(binds_overlap(a("[::]:80"), a("127.0.0.1:80")));
        assert!(
            !binds_overlap(a("0.0.0.0:80"), a("[::1]:80")),
            "v4 wildcard, v6 address"
        );
        assert!(
            binds_overlap(a("127.0.0.1:80"), a("[::ffff:127.0.0.1]:80")),
            "mapped"
        );
        assert!(binds_overlap(a("[::1]:80"), a("[::1]:80")));
    }
}
