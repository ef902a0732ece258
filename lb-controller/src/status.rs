//! What a Service's status should say, and whether the stored one already
//! says it, as pure code.
//!
//! The comparison is with what the API server stores, normalised: a field
//! the server does not keep (`ipMode` on Kubernetes 1.28, and on 1.29 with
//! its default feature gates) is left out of the comparison, so a status
//! that only differs by it is not written again. Whether the server keeps
//! `ipMode` is learnt from its answers ([`IpModeSupport`]).
//!
//! The `weir.dev/ForwardersProgrammed` condition:
//!
//! - True (`AllForwardersCurrent`) once every forwarder has acknowledged a
//!   state that carries the Service's current listeners;
//! - True (`NoForwarders`) when none is configured;
//! - False (`ForwarderFailing`) when a forwarder that does not run them yet
//!   failed to take the state (unreachable, refused), naming it and why;
//! - False (`Pending`) while a new generation of the Service's spec is on
//!   its way to the forwarders.
//!
//! A change on its way to forwarders that are not failing leaves a True
//! condition as it is (as a Deployment stays Available during a rollout):
//! the condition changes when something happens to the Service's
//! forwarding, not at every state the controller builds. A new Service's
//! first status waits until its forwarding is decided ([`withheld`]): its
//! address appears once the forwarders run it (or with the reason they do
//! not), as a cloud's load balancer appears in status once provisioned, and
//! the Service costs one status write instead of two.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{LoadBalancerIngress, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use serde_json::{json, Value};

use crate::ownership::CONDITION;
use crate::translate::Skipped;

/// What one forwarder has acknowledged, as the condition needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwarderView {
    /// Its name.
    pub name: String,
    /// The highest version it confirmed running.
    pub acked: u64,
    /// Why its last attempt failed, if it did.
    pub error: Option<String>,
}

/// The fields of our condition the controller decides (the transition
/// time follows from them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Programmed {
    /// `True` or `False`.
    pub status: &'static str,
    /// Machine-readable reason.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// The Service generation it speaks of.
    pub observed_generation: Option<i64>,
}

/// The reason of a condition still on its way to the forwarders.
pub const PENDING: &str = "Pending";

/// Whether the status of `svc` waits: it has no address yet and its
/// forwarding is not decided.
pub fn withheld(svc: &Service, condition: &Programmed) -> bool {
    condition.reason == PENDING && ingress_of(svc).is_empty()
}

/// Our condition on `svc`, if any.
pub fn current_condition(svc: &Service) -> Option<&Condition> {
    svc.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CONDITION)
}

/// Whether the stored condition says what `p` says (the transition time
/// aside).
pub fn same(c: &Condition, p: &Programmed) -> bool {
    c.status == p.status
        && c.reason == p.reason
        && c.message == p.message
        && c.observed_generation == p.observed_generation
}

/// The condition of a Service whose annotations are invalid and that never
/// had a good configuration: nothing forwards it.
pub fn invalid(generation: Option<i64>, why: &str) -> Programmed {
    Programmed {
        status: "False",
        reason: "InvalidAnnotation".to_owned(),
        message: format!("{why}; nothing forwards this Service until it is fixed"),
        observed_generation: generation,
    }
}

/// The condition a Service should carry. `changed_at`: the first state
/// version that carries its current listeners (`None`: not built yet).
pub fn programmed(
    previous: Option<&Condition>,
    generation: Option<i64>,
    changed_at: Option<u64>,
    forwarders: &[ForwarderView],
) -> Programmed {
    let set = |status, reason: &str, message: String| Programmed {
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
    };
    if forwarders.is_empty() {
        return set(
            "True",
            "NoForwarders",
            "no forwarders are configured: the address is assigned, nothing is programmed".into(),
        );
    }
    let behind: Vec<&ForwarderView> = forwarders
        .iter()
        .filter(|f| changed_at.is_none_or(|v| f.acked < v))
        .collect();
    if behind.is_empty() {
        return set(
            "True",
            "AllForwardersCurrent",
            "every forwarder runs the Service's current configuration".into(),
        );
    }
    let failing: Vec<String> = behind
        .iter()
        .filter_map(|f| Some(format!("{}: {}", f.name, f.error.as_ref()?)))
        .collect();
    if !failing.is_empty() {
        return set("False", "ForwarderFailing", failing.join("; "));
    }
    match previous {
        // On its way, nothing failing: a True condition for this
        // generation stays as it is.
        Some(c) if c.status == "True" && c.observed_generation == generation => Programmed {
            status: "True",
            reason: c.reason.clone(),
            message: c.message.clone(),
            observed_generation: c.observed_generation,
        },
        _ => set(
            "False",
            PENDING,
            "waiting for every forwarder to run the Service's configuration".into(),
        ),
    }
}

/// What a True condition's message says after the programmed state: which
/// forwarder announces each VIP in L2 mode (`kubectl describe svc` shows
/// it).
const ANNOUNCED: &str = "; announced (ARP/NDP) by ";

/// `p` with the L2 owner of each VIP (`announced`) in its message when it
/// is True; a message that named owners before names the current ones.
pub fn with_announcers(mut p: Programmed, announced: &[(IpAddr, String)]) -> Programmed {
    if let Some(at) = p.message.find(ANNOUNCED) {
        p.message.truncate(at);
    }
    if p.status == "True" && !announced.is_empty() {
        let list: Vec<String> = announced
            .iter()
            .map(|(ip, owner)| format!("{owner} ({ip})"))
            .collect();
        p.message.push_str(ANNOUNCED);
        p.message.push_str(&list.join(", "));
    }
    p
}

/// Whether the API server keeps `status.loadBalancer.ingress[].ipMode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IpModeSupport {
    /// Not known yet: compare with it (a write will tell).
    #[default]
    Unknown,
    /// Kept (Kubernetes 1.30 and later).
    Kept,
    /// Dropped (1.28; 1.29 with default feature gates): leave it out of
    /// comparisons.
    Dropped,
}

impl IpModeSupport {
    /// What a status answer says: we always send `ipMode`, so an answer
    /// with addresses tells whether the server kept it.
    pub fn learn(self, answer: &Service) -> Self {
        let ingress = ingress_of(answer);
        match ingress.iter().find(|i| i.ip.is_some()) {
            Some(i) if i.ip_mode.is_some() => Self::Kept,
            Some(_) => Self::Dropped,
            None => self,
        }
    }

    /// What the stored statuses of the controller's own Services say
    /// (`ours`: written by Weir, which always sends `ipMode`): any address
    /// with it means the server keeps it; addresses only without it mean it
    /// drops it.
    pub fn from_stored<'a>(ours: impl IntoIterator<Item = &'a Service>) -> Self {
        let mut seen = Self::Unknown;
        for svc in ours {
            if current_condition(svc).is_none() {
                continue;
            }
            match seen.learn(svc) {
                Self::Kept => return Self::Kept,
                other => seen = other,
            }
        }
        seen
    }
}

/// The addresses in `status.loadBalancer.ingress`.
pub fn addresses(svc: &Service) -> Vec<IpAddr> {
    ingress_of(svc)
        .iter()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

fn ingress_of(svc: &Service) -> &[LoadBalancerIngress] {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default()
}

/// `status.loadBalancer.ingress` for `ips`: every Service port, with the
/// error of the ports that got no listener.
pub fn ingress(svc: &Service, ips: &[IpAddr], skipped: &[Skipped]) -> Vec<Value> {
    let errors: BTreeMap<(i32, &str), String> = skipped
        .iter()
        .map(|s| {
            (
                (s.port, s.protocol.as_str()),
                format!("weir.dev/{}", s.reason),
            )
        })
        .collect();
    let ports: Vec<Value> = svc
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            let mut v = json!({"port": p.port, "protocol": proto});
            if let Some(e) = errors.get(&(p.port, proto)) {
                v["error"] = json!(e);
            }
            v
        })
        .collect();
    ips.iter()
        .map(|ip| json!({"ip": ip.to_string(), "ipMode": "Proxy", "ports": ports}))
        .collect()
}

/// The stored ingress, normalised for comparison with [`ingress`]'s.
fn normalised(ingress: &[Value], ip_mode: IpModeSupport) -> Vec<Value> {
    ingress
        .iter()
        .map(|i| {
            let mut i = i.clone();
            if let Some(o) = i.as_object_mut() {
                if ip_mode == IpModeSupport::Dropped {
                    o.remove("ipMode");
                }
                // An empty port list and none are the same to the server.
                if o.get("ports")
                    .is_some_and(|p| p.as_array().is_some_and(Vec::is_empty))
                {
                    o.remove("ports");
                }
            }
            i
        })
        .collect()
}

/// The status patch that makes `svc` say `ingress` and `condition` (with
/// `now` as the transition time if its status flips), or `None` when the
/// stored status already says it. Other conditions are sent back
/// unchanged (a merge patch replaces the whole list).
pub fn patch(
    svc: &Service,
    ingress: &[Value],
    condition: &Programmed,
    ip_mode: IpModeSupport,
    now: &Value,
) -> Option<Value> {
    let stored: Vec<Value> = ingress_of(svc)
        .iter()
        .filter_map(|i| serde_json::to_value(i).ok())
        .collect();
    let previous = current_condition(svc);
    let unchanged = normalised(&stored, ip_mode) == normalised(ingress, ip_mode)
        && previous.is_some_and(|c| same(c, condition));
    if unchanged {
        return None;
    }
    let transition = match previous {
        Some(c) if c.status == condition.status => {
            serde_json::to_value(&c.last_transition_time).unwrap_or_default()
        }
        _ => now.clone(),
    };
    let mut conditions: Vec<Value> = svc
        .status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .filter(|c| c.type_ != CONDITION)
        .filter_map(|c| serde_json::to_value(c).ok())
        .collect();
    conditions.push(json!({
        "type": CONDITION, "status": condition.status, "reason": condition.reason,
        "message": condition.message, "observedGeneration": condition.observed_generation,
        "lastTransitionTime": transition,
    }));
    Some(json!({"status": {"loadBalancer": {"ingress": ingress}, "conditions": conditions}}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, acked: u64, error: Option<&str>) -> ForwarderView {
        ForwarderView {
            name: name.into(),
            acked,
            error: error.map(str::to_owned),
        }
    }

    fn condition(status: &str, reason: &str, generation: i64) -> Condition {
        serde_json::from_value(
            json!({"type": CONDITION, "status": status, "reason": reason,
            "message": "m", "observedGeneration": generation,
            "lastTransitionTime": "2026-01-01T00:00:00Z"}),
        )
        .unwrap()
    }

    fn service(status: Value) -> Service {
        serde_json::from_value(json!({"metadata": {"name": "web", "generation": 1},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]},
            "status": status}))
        .unwrap()
    }

    #[test]
    fn the_condition_follows_the_forwarders_and_not_every_state_built() {
        let two = |a, b| vec![view("a", a, None), view("b", b, None)];
        let t = programmed(None, Some(1), Some(5), &two(5, 6));
        assert_eq!(
            (t.status, t.reason.as_str()),
            ("True", "AllForwardersCurrent")
        );
        // A new Service on its way: Pending; the message names no version,
        // so it does not change as versions go by.
        let p = programmed(None, Some(1), None, &two(4, 4));
        assert_eq!((p.status, p.reason.as_str()), ("False", "Pending"));
        assert_eq!(p, programmed(None, Some(1), Some(7), &two(5, 6)));
        // A change on its way to healthy forwarders keeps True as it was.
        let was = condition("True", "AllForwardersCurrent", 1);
        let kept = programmed(Some(&was), Some(1), Some(9), &two(8, 8));
        assert_eq!((kept.status, kept.message.as_str()), ("True", "m"));
        assert!(same(&was, &kept));
        // ... unless the Service's generation changed: that waits for the
        // forwarders.
        let newer = programmed(Some(&was), Some(2), Some(9), &two(8, 8));
        assert_eq!((newer.status, newer.reason.as_str()), ("False", "Pending"));
        // A failing forwarder that is behind turns it False, naming it.
        let failing = vec![view("a", 9, Some("down")), view("b", 8, Some("refused"))];
        let f = programmed(Some(&was), Some(1), Some(9), &failing);
        assert_eq!((f.status, f.reason.as_str()), ("False", "ForwarderFailing"));
        assert_eq!(f.message, "b: refused");
        let n = programmed(None, Some(1), None, &[]);
        assert_eq!((n.status, n.reason.as_str()), ("True", "NoForwarders"));
    }

    #[test]
    fn a_status_differing_only_by_a_dropped_ip_mode_is_not_written_again() {
        let ips: Vec<IpAddr> = vec!["192.0.2.1".parse().unwrap()];
        let stored_without = service(json!({"loadBalancer": {"ingress": [
            {"ip": "192.0.2.1", "ports": [{"port": 80, "protocol": "TCP"}]}]},
            "conditions": [{"type": CONDITION, "status": "True", "reason": "AllForwardersCurrent",
                "message": "every forwarder runs the Service's current configuration",
                "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}));
        let want = ingress(&stored_without, &ips, &[]);
        let cond = programmed(
            current_condition(&stored_without),
            Some(1),
            Some(1),
            &[view("a", 1, None)],
        );
        let now = json!("2026-02-02T00:00:00Z");
        // Unknown or kept: ipMode is missing, so the status is written...
        for support in [IpModeSupport::Unknown, IpModeSupport::Kept] {
            let body = patch(&stored_without, &want, &cond, support, &now).unwrap();
            assert_eq!(
                body["status"]["loadBalancer"]["ingress"][0]["ipMode"],
                "Proxy"
            );
            // ... keeping the transition time of an unchanged condition status.
            assert_eq!(
                body["status"]["conditions"][0]["lastTransitionTime"],
                "2026-01-01T00:00:00Z"
            );
        }
        // ... and once the server is known to drop it, it is not.
        assert_eq!(
            patch(&stored_without, &want, &cond, IpModeSupport::Dropped, &now),
            None
        );
        // The answer to a write teaches which it is.
        assert_eq!(
            IpModeSupport::Unknown.learn(&stored_without),
            IpModeSupport::Dropped
        );
        let stored_with = service(json!({"loadBalancer": {"ingress": [
            {"ip": "192.0.2.1", "ipMode": "Proxy", "ports": [{"port": 80, "protocol": "TCP"}]}]}}));
        assert_eq!(
            IpModeSupport::Dropped.learn(&stored_with),
            IpModeSupport::Kept
        );
        // From the stored statuses: only Services Weir wrote count.
        assert_eq!(
            IpModeSupport::from_stored([&stored_without]),
            IpModeSupport::Dropped
        );
        assert_eq!(
            IpModeSupport::from_stored([&stored_with]),
            IpModeSupport::Unknown
        );
    }
}
