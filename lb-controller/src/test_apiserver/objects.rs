//! Objects as an administrator would create them.

use serde_json::{json, Value};

/// A Node with an InternalIP.
pub fn node(name: &str, ip: &str) -> Value {
    json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
           "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}})
}

/// A LoadBalancer Service with TCP ports `(port, nodePort)`; nodePort 0 = let the server pick.
pub fn lb_service(name: &str, ports: &[(u16, u16)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .enumerate()
        .map(|(i, (p, np))| {
            let mut v =
                json!({"name": format!("p{i}"), "port": p, "protocol": "TCP", "targetPort": 8080});
            if *np != 0 {
                v["nodePort"] = json!(np);
            }
            v
        })
        .collect();
    json!({"metadata": {"name": name}, "spec": {"type": "LoadBalancer", "ports": ports,
           "externalTrafficPolicy": "Cluster", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"}})
}
