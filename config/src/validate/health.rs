//! A listener's health check: its settings resolved against `[defaults]`,
//! and checked.

use super::{Errors, DEFAULT_CHECK_TIMEOUT, DEFAULT_INTERVAL, MAX_STREAK};
use crate::model::{
    Defaults, HealthCheck, HealthKind, HealthSpec, ListenerSpec, Protocol, ProxyProtocol,
};
use crate::FieldError;

/// Resolves the check of a listener (`spec`: its own `health` table)
/// against `defaults.health`. A bad value the listener took from
/// `[defaults]` is reported there.
pub(super) fn resolve_health(
    spec: Option<&HealthSpec>,
    defaults: Option<&HealthSpec>,
    protocol: Protocol,
    proxy_protocol: ProxyProtocol,
    e: &mut Errors<'_>,
) -> HealthCheck {
    let empty = HealthSpec::default();
    let s = spec.unwrap_or(&empty);
    let d = defaults.unwrap_or(&empty);
    // Whether a setting came from `[defaults]`, not the listener.
    let inherited = |own: bool, def: bool| !own && def;
    let kind = effective_kind(s.kind.or(d.kind), protocol);
    let interval = s.interval.or(d.interval);
    let timeout = s.timeout.or(d.timeout);
    let mut check = HealthCheck {
        kind,
        port: s.port.or(d.port),
        path: s
            .path
            .clone()
            .or_else(|| d.path.clone())
            .unwrap_or_else(|| "/".into()),
        interval: interval.unwrap_or(DEFAULT_INTERVAL),
        // Unset, the timeout is the default or the interval if shorter; set,
        // it must fit in the interval (checked below).
        timeout: timeout
            .unwrap_or_else(|| DEFAULT_CHECK_TIMEOUT.min(interval.unwrap_or(DEFAULT_INTERVAL))),
        rise: s.rise.or(d.rise).unwrap_or(2),
        fall: s.fall.or(d.fall).unwrap_or(3),
        send_proxy: ProxyProtocol::Off,
    };
    // A check of the backend's own port meets what every proxied
    // connection meets there: the PROXY header, if the listener sends one.
    check.send_proxy = match s.send_proxy.or(d.send_proxy) {
        Some(false) => ProxyProtocol::Off,
        Some(true) if proxy_protocol == ProxyProtocol::Off => {
            e.push(
                "health.send_proxy",
                "the listener sends no PROXY header (proxy_protocol = \"off\"); set proxy_protocol, or leave send_proxy out",
            );
            ProxyProtocol::Off
        }
        Some(true) => proxy_protocol,
        None if check.port.is_none() && kind != HealthKind::None => proxy_protocol,
        None => ProxyProtocol::Off,
    };
    if check.send_proxy != ProxyProtocol::Off && protocol == Protocol::Udp && check.port.is_none() {
        // The backend's own port is UDP; a check there cannot carry a
        // stream header. (Unreachable today: such a check is refused below.)
        check.send_proxy = ProxyProtocol::Off;
    }
    if check.port == Some(0) {
        let from = inherited(s.port.is_some(), d.port.is_some());
        e.push_value("health.port", from, "must be between 1 and 65535");
    }
    let path_from = inherited(s.path.is_some(), d.path.is_some());
    if !check.path.starts_with('/') {
        e.push_value(
            "health.path",
            path_from,
            format!("{:?} must start with '/'", check.path),
        );
    } else if check.path.len() > 1024 || check.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        e.push_value(
            "health.path",
            path_from,
            "must be at most 1024 characters with no spaces or control characters",
        );
    }
    if check.interval.is_zero() {
        let from = inherited(s.interval.is_some(), d.interval.is_some());
        e.push_value("health.interval", from, "must be greater than zero");
    }
    // A timeout nobody wrote follows the interval: only the interval's
    // error is reported then.
    if timeout.is_some() && check.timeout.is_zero() {
        let from = inherited(s.timeout.is_some(), d.timeout.is_some());
        e.push_value("health.timeout", from, "must be greater than zero");
    }
    if !(1..=MAX_STREAK).contains(&check.rise) {
        let from = inherited(s.rise.is_some(), d.rise.is_some());
        e.push_value("health.rise", from, format!("must be 1 to {MAX_STREAK}"));
    }
    if !(1..=MAX_STREAK).contains(&check.fall) {
        let from = inherited(s.fall.is_some(), d.fall.is_some());
        e.push_value("health.fall", from, format!("must be 1 to {MAX_STREAK}"));
    }
    if check.timeout > check.interval {
        // Blamed on `[defaults]` only when both values came from there.
        let from = inherited(s.timeout.is_some(), d.timeout.is_some()) && (s.interval.is_none());
        e.push_value(
            "health.timeout",
            from,
            format!(
                "{} is longer than health.interval ({}): a check would still run when the next one starts",
                check.timeout, check.interval
            ),
        );
    }
    if kind == HealthKind::Tcp && protocol == Protocol::Udp && check.port.is_none() {
        e.push(
            "health.port",
            "a tcp check of a udp listener needs a port (the backend's port is UDP)",
        );
    }
    check
}

/// The check a listener gets: the kind it or `[defaults]` set, else tcp
/// for TCP listeners and none for UDP ones.
fn effective_kind(set: Option<HealthKind>, protocol: Protocol) -> HealthKind {
    set.unwrap_or(match protocol {
        Protocol::Tcp => HealthKind::Tcp,
        Protocol::Udp => HealthKind::None,
    })
}

/// The check kind listener `l` gets, with `defaults`.
fn kind_of(l: &ListenerSpec, defaults: &Defaults) -> HealthKind {
    let protocol = l.protocol.or(defaults.protocol).unwrap_or(Protocol::Tcp);
    let own = l.health.as_ref().and_then(|h| h.kind);
    effective_kind(
        own.or(defaults.health.as_ref().and_then(|d| d.kind)),
        protocol,
    )
}

fn kind_name(kind: HealthKind) -> &'static str {
    match kind {
        HealthKind::Tcp => "tcp",
        HealthKind::Http => "http",
        HealthKind::None => "none",
    }
}

/// Check settings that take no effect, as warnings (not errors: a file or
/// state that an earlier version accepted must keep loading). Today: a
/// `path` on a check that is not `kind = "http"`, which an operator used
/// to HAProxy's `option httpchk` may expect to make the check HTTP; it
/// does not. Each listener's own path is judged by its check's kind; the
/// path in `[defaults]` is the file's business ([`unused_default_settings`]),
/// so a control-API state earns no warning about the file.
pub fn unused_check_settings(
    listeners: &[ListenerSpec],
    defaults: &Defaults,
    key: &str,
) -> Vec<FieldError> {
    let message = |kind: HealthKind| {
        format!(
            "has no effect: only http checks use a path, and health.kind is \"{}\" here; set health.kind = \"http\" for an HTTP check",
            kind_name(kind)
        )
    };
    let mut out = Vec::new();
    for (i, l) in listeners.iter().enumerate() {
        if l.health.as_ref().is_some_and(|h| h.path.is_some()) {
            let kind = kind_of(l, defaults);
            if kind != HealthKind::Http {
                out.push(FieldError::new(
                    format!("{key}[{i}].health.path"),
                    message(kind),
                ));
            }
        }
    }
    out
}

/// The file's own warnings about `[defaults.health]`: its `path` with a
/// `kind` there that is not http, which no listener uses.
pub fn unused_default_settings(listeners: &[ListenerSpec], defaults: &Defaults) -> Vec<FieldError> {
    let Some(d) = defaults.health.as_ref().filter(|d| d.path.is_some()) else {
        return Vec::new();
    };
    let Some(kind) = d.kind.filter(|k| *k != HealthKind::Http) else {
        return Vec::new();
    };
    let used = listeners.iter().any(|l| {
        l.health.as_ref().is_none_or(|h| h.path.is_none())
            && kind_of(l, defaults) == HealthKind::Http
    });
    if used {
        return Vec::new();
    }
    vec![FieldError::new(
        "defaults.health.path",
        format!(
            "has no effect: only http checks use a path, health.kind here is \"{}\", and no listener with an http check inherits it",
            kind_name(kind)
        ),
    )]
}
