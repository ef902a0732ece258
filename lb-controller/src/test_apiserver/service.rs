//! What the real API server does to Services beyond storing them: NodePort
//! allocation, the fields it wipes when `type` changes (the status load
//! balancer among them), `loadBalancerClass` validation, status validation,
//! and the fate of `status.loadBalancer.ingress[].ipMode`, which depends on
//! the release.

use hyper::StatusCode;
use serde_json::{json, Value};

use super::error::{api_err, ApiError};
use super::kinds::Release;

fn invalid(message: String) -> ApiError {
    api_err(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
}

fn is_lb(svc: &Value) -> bool {
    svc["spec"]["type"] == "LoadBalancer"
}

/// `loadBalancerClass` only on LoadBalancer Services, and immutable while
/// the Service stays one (unset → set is a change too).
fn validate_class(old: Option<&Value>, new: &Value) -> Result<(), ApiError> {
    let class = &new["spec"]["loadBalancerClass"];
    if let Some(old) = old {
        if is_lb(old) && is_lb(new) && old["spec"]["loadBalancerClass"] != *class {
            return Err(invalid(format!(
                "Service \"{}\" is invalid: spec.loadBalancerClass: Invalid value: {class}: may not change once set",
                new["metadata"]["name"].as_str().unwrap_or_default()
            )));
        }
    }
    if !is_lb(new) && !class.is_null() {
        return Err(invalid(format!(
            "Service \"{}\" is invalid: spec.loadBalancerClass: Forbidden: may only be used when `type` is 'LoadBalancer'",
            new["metadata"]["name"].as_str().unwrap_or_default()
        )));
    }
    Ok(())
}

fn allocate_node_ports(counter: &mut u16, svc: &mut Value) {
    let spec = &mut svc["spec"];
    let lb = spec["type"] == "LoadBalancer";
    let wants =
        lb && spec["allocateLoadBalancerNodePorts"] != json!(false) || spec["type"] == "NodePort";
    let mut next = || {
        *counter = counter.wrapping_add(1);
        30000 + i64::from(*counter % 2768)
    };
    if wants {
        if let Some(ports) = spec["ports"].as_array_mut() {
            for p in ports {
                if p.get("nodePort").is_none_or(Value::is_null) {
                    p["nodePort"] = json!(next());
                }
            }
        }
    }
    if lb && spec["externalTrafficPolicy"] == "Local" && spec["healthCheckNodePort"].is_null() {
        spec["healthCheckNodePort"] = json!(next());
    }
}

/// A new Service: no status of its own, NodePorts allocated.
pub(super) fn prepare_create(counter: &mut u16, svc: &mut Value) -> Result<(), ApiError> {
    validate_class(None, svc)?;
    if let Some(o) = svc.as_object_mut() {
        o.remove("status");
    }
    allocate_node_ports(counter, svc);
    svc["status"] = json!({"loadBalancer": {}});
    Ok(())
}

/// An update of the object (not `/status`): when `type` leaves
/// LoadBalancer the server wipes what only a load balancer uses, if the
/// writer did not change it too: `loadBalancerClass`,
/// `allocateLoadBalancerNodePorts`, `healthCheckNodePort`, NodePorts (for
/// ClusterIP), `externalTrafficPolicy` (no longer externally reachable),
/// and `status.loadBalancer`.
pub(super) fn prepare_update(
    counter: &mut u16,
    current: &Value,
    next: &mut Value,
) -> Result<(), ApiError> {
    let was_lb = is_lb(current);
    let (old, new) = (&current["spec"], &mut next["spec"]);
    if was_lb && new["type"] != "LoadBalancer" {
        for field in [
            "loadBalancerClass",
            "allocateLoadBalancerNodePorts",
            "healthCheckNodePort",
        ] {
            if new[field] == old[field] {
                if let Some(spec) = new.as_object_mut() {
                    spec.remove(field);
                }
            }
        }
        let node_ports = |spec: &Value| -> Vec<Value> {
            spec["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| p["nodePort"].clone())
                .collect()
        };
        if new["type"] != "NodePort" && node_ports(new) == node_ports(old) {
            for p in new["ports"].as_array_mut().into_iter().flatten() {
                if let Some(p) = p.as_object_mut() {
                    p.remove("nodePort");
                }
            }
        }
        let external = new["type"] == "NodePort"
            || new["externalIPs"]
                .as_array()
                .is_some_and(|ips| !ips.is_empty());
        if !external && new["externalTrafficPolicy"] == old["externalTrafficPolicy"] {
            if let Some(spec) = new.as_object_mut() {
                spec.remove("externalTrafficPolicy");
            }
        }
        next["status"]["loadBalancer"] = json!({});
    }
    validate_class(Some(current), next)?;
    allocate_node_ports(counter, next);
    Ok(())
}

/// Paths of the fields in a Service status write that `release` does not
/// know: `ipMode` before 1.29 (1.29's feature gate drops it instead,
/// silently).
pub(super) fn unknown_status_fields(release: Release, body: &Value) -> Vec<String> {
    if release != Release::V1_28 {
        return Vec::new();
    }
    body["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, ing)| ing.get("ipMode").is_some())
        .map(|(i, _)| format!("status.loadBalancer.ingress[{i}].ipMode"))
        .collect()
}

fn ip_mode_in_use(svc: &Value) -> bool {
    svc["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|ing| ing.get("ipMode").is_some())
}

/// A write to `/status`: what `release` keeps of it, then validation.
pub(super) fn prepare_status_update(
    release: Release,
    current: &Value,
    next: &mut Value,
) -> Result<(), ApiError> {
    let drop_ip_mode = match release {
        Release::V1_28 => true,
        // The LoadBalancerIPMode gate is off by default in 1.29: the field
        // is dropped unless the stored status already uses it.
        Release::V1_29 => !ip_mode_in_use(current),
        Release::V1_30 => false,
    };
    if drop_ip_mode {
        for ing in next["status"]["loadBalancer"]["ingress"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            if let Some(ing) = ing.as_object_mut() {
                ing.remove("ipMode");
            }
        }
    }
    let ingress = next["status"]["loadBalancer"]["ingress"].as_array();
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        let ip = ing["ip"].as_str().unwrap_or_default();
        if ing.get("ip").is_some() && ip.parse::<std::net::IpAddr>().is_err() {
            return Err(invalid(format!(
                "status.loadBalancer.ingress[{i}].ip: Invalid value: {ip:?}: must be a valid IP address"
            )));
        }
        if let Some(mode) = ing.get("ipMode").and_then(Value::as_str) {
            if mode != "VIP" && mode != "Proxy" {
                return Err(invalid(format!(
                    "status.loadBalancer.ingress[{i}].ipMode: Unsupported value: {mode:?}"
                )));
            }
            if ip.is_empty() {
                return Err(invalid(format!(
                    "status.loadBalancer.ingress[{i}].ipMode: Forbidden: may not be specified when `ip` is not set"
                )));
            }
        }
    }
    Ok(())
}
