//! The listeners the chaos scenarios give lbd, written once as the control
//! API's JSON and turned into the configuration file's TOML where a
//! scenario reloads a file instead: one description, two encodings.

use std::net::SocketAddr;

use serde_json::{json, Value};

/// The health check every TCP listener here uses: HTTP (a frozen backend
/// still completes TCP handshakes from its kernel, so only a check that
/// waits for an answer sees it), every second, 500 ms to answer, up after
/// 2 successes, down after 3 failures.
pub fn http_check() -> Value {
    json!({ "kind": "http", "path": "/healthz", "interval": "1s", "timeout": "500ms", "rise": 2, "fall": 3 })
}

/// A TCP listener on `bind` over `backends` (address, weight), with
/// [`http_check`] and a 1 s connect timeout.
pub fn tcp_listener(name: &str, bind: SocketAddr, backends: &[(SocketAddr, u32)]) -> Value {
    let backends: Vec<Value> = backends
        .iter()
        .map(|(a, w)| json!({ "addr": a.to_string(), "weight": w }))
        .collect();
    json!({
        "name": name,
        "bind": bind.to_string(),
        "connect_timeout": "1s",
        "backends": backends,
        "health": http_check(),
    })
}

/// A dynamic state: `version` and `listeners`.
pub fn state(version: u64, listeners: Vec<Value>) -> Value {
    json!({ "version": version, "listeners": listeners })
}

/// `[[listener]]` tables for a configuration file, from the JSON of
/// [`tcp_listener`] (flat keys, `backends` as inline tables, `health` as
/// a sub-table).
pub fn toml_listeners(listeners: &[Value]) -> String {
    let mut out = String::new();
    for l in listeners {
        out.push_str("\n[[listener]]\n");
        let Some(fields) = l.as_object() else {
            continue;
        };
        for (k, v) in fields {
            match k.as_str() {
                "health" => {}
                "backends" => {
                    let items: Vec<String> = v
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|b| format!("{{ addr = {}, weight = {} }}", b["addr"], b["weight"]))
                        .collect();
                    out.push_str(&format!("backends = [{}]\n", items.join(", ")));
                }
                _ => out.push_str(&format!("{k} = {v}\n")),
            }
        }
        if let Some(health) = l["health"].as_object() {
            out.push_str("[listener.health]\n");
            for (k, v) in health {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// JSON strings and numbers are valid TOML values as printed.
    #[test]
    fn a_listener_becomes_a_toml_table() {
        let b: SocketAddr = "127.0.0.2:8080".parse().unwrap();
        let l = tcp_listener("web", "127.0.0.1:80".parse().unwrap(), &[(b, 2)]);
        let text = toml_listeners(&[l]);
        assert!(text.contains("[[listener]]\n"), "{text}");
        assert!(text.contains("name = \"web\"\n"), "{text}");
        assert!(
            text.contains("backends = [{ addr = \"127.0.0.2:8080\", weight = 2 }]\n"),
            "{text}"
        );
        let (top, health) = text.split_once("[listener.health]\n").unwrap();
        assert!(!top.contains("fall"), "{text}");
        assert!(health.contains("fall = 3\n"), "{text}");
        assert!(health.contains("interval = \"1s\"\n"), "{text}");
    }
}
