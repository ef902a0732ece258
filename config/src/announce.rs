//! `[announce]`: how `lbd` makes the network deliver its VIPs' packets to
//! this host. The model (as written and resolved) and its validation.
//!
//! `mode = "bgp"`: `lbd` keeps a host route for each VIP on `interface`
//! while the VIP should attract traffic, and a routing daemon (BIRD)
//! exports them. `mode = "l2"`: `lbd` adds the VIPs the controller makes
//! it the owner of to `interface`, the LAN one, where the kernel answers
//! ARP/NDP for them (`l2` of the dynamic state names the owners).

use serde::{Deserialize, Serialize};

use crate::{Duration, FieldError};

/// How VIPs are announced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnnounceMode {
    /// Nothing is announced; the operator routes VIPs to this host.
    #[default]
    Off,
    /// Host routes on a dedicated interface, exported by a BGP daemon.
    Bgp,
    /// The VIPs this host owns on the LAN interface, answered by ARP/NDP.
    L2,
}

impl AnnounceMode {
    /// The name as the file spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Bgp => "bgp",
            Self::L2 => "l2",
        }
    }
}

/// When a VIP is announced (besides lbd being ready and not draining).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnnounceWhen {
    /// While at least one backend of a listener on the VIP is up.
    #[default]
    Healthy,
    /// Whatever the backends' health.
    Always,
}

/// `[announce]` as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnounceSpec {
    /// Default `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<AnnounceMode>,
    /// Default `weir0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_interface: Option<bool>,
    /// Default `healthy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<AnnounceWhen>,
    /// Default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withdraw_grace: Option<Duration>,
}

/// Validated `[announce]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// The mode.
    pub mode: AnnounceMode,
    /// The interface VIPs are placed on: a dedicated one (bgp), the LAN
    /// one (l2).
    pub interface: String,
    /// Create `interface` at start when it does not exist (bgp only).
    pub create_interface: bool,
    /// When a VIP is announced (bgp only: in l2 the owner answers whatever
    /// the backends' health, since no other host would).
    pub when: AnnounceWhen,
    /// How long `lbd` keeps accepting after withdrawing every VIP, on stop
    /// and on `lbd drain`, before it closes its listeners.
    pub withdraw_grace: Duration,
}

/// Default `announce.interface`.
pub const DEFAULT_INTERFACE: &str = "weir0";
/// Default `announce.withdraw_grace`: longer than a router's convergence.
pub const DEFAULT_WITHDRAW_GRACE: Duration = Duration::from_secs(5);
/// Longest `announce.withdraw_grace` accepted.
pub const MAX_WITHDRAW_GRACE: Duration = Duration::from_secs(600);

impl Default for Announce {
    fn default() -> Self {
        Self {
            mode: AnnounceMode::Off,
            interface: DEFAULT_INTERFACE.to_owned(),
            create_interface: true,
            when: AnnounceWhen::Healthy,
            withdraw_grace: DEFAULT_WITHDRAW_GRACE,
        }
    }
}

/// Whether `name` can name a Linux network interface: 1 to 15 bytes, no
/// `/`, `:` or white space, not `.` or `..`.
pub fn valid_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// Resolves `[announce]`, pushing every problem with its path.
pub fn resolve_announce(spec: &AnnounceSpec, errors: &mut Vec<FieldError>) -> Announce {
    let d = Announce::default();
    let mut out = Announce {
        mode: spec.mode.unwrap_or(d.mode),
        interface: spec.interface.clone().unwrap_or(d.interface),
        create_interface: spec.create_interface.unwrap_or(d.create_interface),
        when: spec.when.unwrap_or(d.when),
        withdraw_grace: spec.withdraw_grace.unwrap_or(d.withdraw_grace),
    };
    if out.mode == AnnounceMode::L2 {
        l2_rules(spec, &mut out, errors);
    }
    if !valid_interface_name(&out.interface) {
        errors.push(FieldError::new(
            "announce.interface",
            format!(
                "{} is not an interface name (1 to 15 characters, no '/', ':' or spaces)",
                crate::shown(&out.interface)
            ),
        ));
    } else if out.interface == "lo" {
        errors.push(FieldError::new(
            "announce.interface",
            "\"lo\" is the loopback interface; use a dedicated one such as \"weir0\" (bgp) or the LAN interface (l2)",
        ));
    }
    if out.withdraw_grace > MAX_WITHDRAW_GRACE {
        errors.push(FieldError::new(
            "announce.withdraw_grace",
            format!(
                "{} is above the maximum of {MAX_WITHDRAW_GRACE}",
                out.withdraw_grace
            ),
        ));
    }
    out
}

/// What `mode = "l2"` asks of the other keys: the LAN interface named
/// (no default could be right), never created, and no `when` (the owner
/// answers whatever the backends' health: no other host would).
fn l2_rules(spec: &AnnounceSpec, out: &mut Announce, errors: &mut Vec<FieldError>) {
    if spec.interface.is_none() {
        errors.push(FieldError::new(
            "announce.interface",
            "l2 mode needs the LAN interface the VIPs are added to (such as \"eth0\"); there is no default",
        ));
    }
    if spec.create_interface == Some(true) {
        errors.push(FieldError::new(
            "announce.create_interface",
            "l2 mode adds VIPs to an existing LAN interface and never creates one; remove this key",
        ));
    }
    if spec.when.is_some() {
        errors.push(FieldError::new(
            "announce.when",
            "applies to bgp only: in l2 mode the owner of a VIP answers for it whatever its backends' health, since no other host would; remove this key",
        ));
    }
    out.create_interface = false;
    out.when = AnnounceWhen::Always;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        for ok in ["weir0", "eth0.100", "a", "abcdefghijklmno"] {
            assert!(valid_interface_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "a:1", "abcdefghijklmnop"] {
            assert!(!valid_interface_name(bad), "{bad}");
        }
    }

    #[test]
    fn l2_names_its_interface_and_takes_no_bgp_keys() {
        let resolve = |spec: AnnounceSpec| {
            let mut errors = Vec::new();
            let out = resolve_announce(&spec, &mut errors);
            let paths: Vec<String> = errors.into_iter().map(|e| e.path).collect();
            (out, paths)
        };
        let l2 = |interface: Option<&str>| AnnounceSpec {
            mode: Some(AnnounceMode::L2),
            interface: interface.map(str::to_owned),
            ..AnnounceSpec::default()
        };
        let (out, paths) = resolve(l2(Some("eth0")));
        assert_eq!(paths, Vec::<String>::new());
        assert_eq!(out.interface, "eth0");
        assert!(!out.create_interface, "a LAN interface is never created");
        let (_, paths) = resolve(l2(None));
        assert_eq!(paths, ["announce.interface"]);
        let (_, paths) = resolve(AnnounceSpec {
            create_interface: Some(true),
            when: Some(AnnounceWhen::Healthy),
            ..l2(Some("eth0"))
        });
        assert_eq!(paths, ["announce.create_interface", "announce.when"]);
    }
}
