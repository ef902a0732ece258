//! Which Services are Weir's, and what the controller does with each, as
//! pure code.
//!
//! Ownership is decided by the Service's type and class alone: a
//! LoadBalancer whose `spec.loadBalancerClass` is ours, or unset when the
//! controller is the default implementation. The finalizer
//! `service.kubernetes.io/load-balancer-cleanup` says nothing about who owns
//! a Service: every implementation uses that same name. A Service that is
//! not ours is never written to, unless it was ours and no other
//! implementation owns it now (it stopped being a LoadBalancer): then the
//! controller cleans up what it left on it, once.

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use serde_json::{json, Value};

use crate::translate;

/// The finalizer every load balancer implementation uses for cleanup.
pub const FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";
/// The condition Weir keeps on each of its Services (its presence also
/// marks a Service Weir has served).
pub const CONDITION: &str = "weir.dev/ForwardersProgrammed";

/// Which implementation a Service belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// A LoadBalancer of our class (or of none, when we are the default).
    Weir,
    /// A LoadBalancer of another class (or of none, when we are not the default).
    Other,
    /// Not a LoadBalancer: no implementation's.
    Nobody,
}

/// The owner of `svc` for a controller of `class` (`default_class`: also
/// the implementation of Services with no class).
pub fn owner(svc: &Service, class: &str, default_class: bool) -> Owner {
    let load_balancer = svc
        .spec
        .as_ref()
        .is_some_and(|s| s.type_.as_deref() == Some("LoadBalancer"));
    if !load_balancer {
        Owner::Nobody
    } else if translate::is_managed(svc, class, default_class) {
        Owner::Weir
    } else {
        Owner::Other
    }
}

/// What to do with a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Ours and not being deleted: allocate, translate, write status.
    Manage,
    /// Take it out of the forwarders and free its address (once every
    /// reachable forwarder has dropped it), then do what the flags say.
    Release {
        /// Remove what Weir wrote into its status (our condition, addresses).
        clear_status: bool,
        /// Remove the finalizer.
        remove_finalizer: bool,
        /// Events may be recorded on it (false once another implementation owns it).
        events: bool,
    },
    /// Not ours, and nothing of ours on it: never touched.
    Ignore,
}

/// Whether `svc` carries the finalizer.
pub fn has_finalizer(svc: &Service) -> bool {
    svc.finalizers().iter().any(|f| f == FINALIZER)
}

/// Whether Weir's condition is in `svc`'s status: Weir served it.
pub fn has_our_condition(svc: &Service) -> bool {
    svc.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == CONDITION)
}

/// The disposition of `svc`. `held`: the controller holds something for it
/// in memory (an address, listeners, a pending removal).
pub fn disposition(svc: &Service, class: &str, default_class: bool, held: bool) -> Disposition {
    let deleting = svc.metadata.deletion_timestamp.is_some();
    match owner(svc, class, default_class) {
        Owner::Weir if !deleting => Disposition::Manage,
        Owner::Weir => Disposition::Release {
            clear_status: false,
            remove_finalizer: has_finalizer(svc),
            events: true,
        },
        // Its new owner's now: drop what we hold, write nothing.
        Owner::Other if held => Disposition::Release {
            clear_status: false,
            remove_finalizer: false,
            events: false,
        },
        Owner::Other => Disposition::Ignore,
        // Ours until it stopped being a LoadBalancer (known from memory, or,
        // after a restart, from our condition): nobody else will clean up.
        Owner::Nobody if held || has_our_condition(svc) => Disposition::Release {
            clear_status: !deleting,
            remove_finalizer: has_finalizer(svc),
            events: true,
        },
        Owner::Nobody => Disposition::Ignore,
    }
}

/// The status patch that removes what Weir wrote (addresses and its
/// condition), keeping the other conditions; `None` when there is nothing
/// of ours left.
pub fn clear_status_patch(svc: &Service) -> Option<Value> {
    let status = svc.status.as_ref()?;
    let has_ingress = status
        .load_balancer
        .as_ref()
        .and_then(|lb| lb.ingress.as_ref())
        .is_some_and(|i| !i.is_empty());
    if !has_ingress && !has_our_condition(svc) {
        return None;
    }
    let others: Vec<Value> = status
        .conditions
        .iter()
        .flatten()
        .filter(|c| c.type_ != CONDITION)
        .filter_map(|c| serde_json::to_value(c).ok())
        .collect();
    Some(json!({"status": {"loadBalancer": {"ingress": null}, "conditions": others}}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(v: Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    fn lb(class: Option<&str>, finalizer: bool, ours_condition: bool, deleting: bool) -> Service {
        let mut v = json!({"metadata": {"name": "s", "namespace": "n"},
                           "spec": {"type": "LoadBalancer"}});
        if let Some(c) = class {
            v["spec"]["loadBalancerClass"] = json!(c);
        }
        if finalizer {
            v["metadata"]["finalizers"] = json!([FINALIZER]);
        }
        if deleting {
            v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        if ours_condition {
            v["status"] = json!({"conditions": [{"type": CONDITION, "status": "True", "reason": "R",
                                 "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        }
        svc(v)
    }

    const fn release(clear_status: bool, remove_finalizer: bool, events: bool) -> Disposition {
        Disposition::Release {
            clear_status,
            remove_finalizer,
            events,
        }
    }

    /// Every shape, for a controller of class `weir.dev/lb` that is (or is
    /// not) the default, holding (or not) something for the Service.
    #[test]
    fn disposition_follows_class_and_type_never_the_finalizer() {
        let ours = Some("weir.dev/lb");
        let theirs = Some("other.example/lb");
        let mut not_lb = lb(None, true, true, false);
        not_lb.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        let mut not_lb_unmarked = lb(None, true, false, false);
        not_lb_unmarked.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        let cases = [
            // (service, default_class, held, expected)
            (
                lb(ours, true, false, false),
                false,
                false,
                Disposition::Manage,
            ),
            (
                lb(None, false, false, false),
                true,
                false,
                Disposition::Manage,
            ),
            (
                lb(ours, true, false, true),
                false,
                true,
                release(false, true, true),
            ),
            (
                lb(ours, false, false, true),
                false,
                false,
                release(false, false, true),
            ),
            // Another implementation's, finalizer, status and all: never ours.
            (
                lb(theirs, true, false, false),
                true,
                false,
                Disposition::Ignore,
            ),
            (
                lb(theirs, true, false, true),
                true,
                false,
                Disposition::Ignore,
            ),
            (
                lb(theirs, true, true, false),
                true,
                false,
                Disposition::Ignore,
            ),
            (
                lb(None, true, false, false),
                false,
                false,
                Disposition::Ignore,
            ),
            (
                lb(None, true, false, true),
                false,
                false,
                Disposition::Ignore,
            ),
            // Was ours, another implementation's now: let go, write nothing.
            (
                lb(theirs, true, true, false),
                true,
                true,
                release(false, false, false),
            ),
            (
                lb(None, true, true, false),
                false,
                true,
                release(false, false, false),
            ),
            // Was ours, nobody's now: clean up what we left.
            (not_lb.clone(), true, true, release(true, true, true)),
            (not_lb, true, false, release(true, true, true)),
            (
                not_lb_unmarked.clone(),
                true,
                true,
                release(true, true, true),
            ),
            // Nobody's and never seen by us: the finalizer may be another's.
            (not_lb_unmarked, true, false, Disposition::Ignore),
        ];
        for (i, (s, default_class, held, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                disposition(&s, "weir.dev/lb", default_class, held),
                want,
                "case {i}"
            );
        }
    }

    #[test]
    fn clearing_status_keeps_other_conditions_and_stops_when_nothing_is_ours() {
        let mut v = json!({"metadata": {"name": "s"}, "status": {
            "loadBalancer": {},
            "conditions": [
                {"type": CONDITION, "status": "True", "reason": "R", "message": "",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "example.com/Other", "status": "True", "reason": "R", "message": "",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        let patch = clear_status_patch(&svc(v.clone())).unwrap();
        assert_eq!(patch["status"]["loadBalancer"]["ingress"], Value::Null);
        let kept = patch["status"]["conditions"].as_array().unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0]["type"], "example.com/Other");
        v["status"]["conditions"] = json!([]);
        assert_eq!(clear_status_patch(&svc(v)), None);
    }
}
