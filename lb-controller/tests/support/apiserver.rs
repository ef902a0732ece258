//! An in-test Kubernetes API server: enough of the real one's behaviour for
//! the controller to run against it unchanged.
//!
//! - list (with `limit`/`continue` pages and `labelSelector`) and watch from a
//!   `resourceVersion`, replaying history after it; a watch can be closed by
//!   the test and resumes; a `resourceVersion` older than the compacted
//!   history gets `410 Gone`, as from etcd compaction;
//! - the `status` subresource: a write to `/status` changes only `.status`,
//!   a write to the object never changes `.status`;
//! - JSON merge patches, strategic merge patches (treated as merge patches,
//!   which is exact for the fields the controller sends) and server-side
//!   apply (merged, with `fieldManager` required);
//! - `409 Conflict` when a write names a stale `metadata.resourceVersion`;
//! - graceful deletion with finalizers (`deletionTimestamp`, removal once the
//!   last finalizer goes);
//! - NodePort and health-check NodePort allocation for LoadBalancer Services;
//! - who wrote what: the bearer token of every write is logged.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

/// A resource type the server knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    /// Plural resource name.
    pub plural: &'static str,
    /// `v1` or `group/version`.
    pub api_version: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Has a `status` subresource.
    pub status: bool,
}

pub const SERVICES: Kind = Kind {
    plural: "services",
    api_version: "v1",
    kind: "Service",
    namespaced: true,
    status: true,
};
pub const NODES: Kind = Kind {
    plural: "nodes",
    api_version: "v1",
    kind: "Node",
    namespaced: false,
    status: true,
};
pub const SLICES: Kind = Kind {
    plural: "endpointslices",
    api_version: "discovery.k8s.io/v1",
    kind: "EndpointSlice",
    namespaced: true,
    status: false,
};
pub const EVENTS: Kind = Kind {
    plural: "events",
    api_version: "events.k8s.io/v1",
    kind: "Event",
    namespaced: true,
    status: false,
};
pub const CORE_EVENTS: Kind = Kind {
    plural: "events",
    api_version: "v1",
    kind: "Event",
    namespaced: true,
    status: false,
};
pub const LEASES: Kind = Kind {
    plural: "leases",
    api_version: "coordination.k8s.io/v1",
    kind: "Lease",
    namespaced: true,
    status: false,
};
pub const NAMESPACES: Kind = Kind {
    plural: "namespaces",
    api_version: "v1",
    kind: "Namespace",
    namespaced: false,
    status: true,
};
const KINDS: [Kind; 7] = [
    SERVICES,
    NODES,
    SLICES,
    EVENTS,
    CORE_EVENTS,
    LEASES,
    NAMESPACES,
];

type ObjKey = (&'static str, &'static str, String, String);

fn key_of(kind: Kind, ns: &str, name: &str) -> ObjKey {
    (
        kind.api_version,
        kind.plural,
        ns.to_owned(),
        name.to_owned(),
    )
}

/// One change, as a watch sees it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    namespace: String,
    kind_of_change: &'static str,
    object: Value,
}

/// A write that reached storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// The bearer token that made it (empty if none).
    pub user: String,
    /// `create`, `update`, `patch`, `delete`.
    pub verb: String,
    /// Plural resource (with `/status` for the subresource).
    pub resource: String,
    /// Namespace/name.
    pub object: String,
}

/// One RBAC rule (from a ClusterRole, or a Role in `namespace`).
#[derive(Clone, Debug, Default)]
pub struct Rule {
    /// API groups (`""` = core).
    pub groups: Vec<String>,
    /// Resources, `name/subresource` for subresources.
    pub resources: Vec<String>,
    /// Verbs.
    pub verbs: Vec<String>,
    /// `resourceNames`; empty = any.
    pub names: Vec<String>,
    /// `Some` for a Role's rules.
    pub namespace: Option<String>,
}

impl Rule {
    fn allows(
        &self,
        group: &str,
        resource: &str,
        verb: &str,
        ns: &str,
        name: Option<&str>,
    ) -> bool {
        let any = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        any(&self.groups, group)
            && any(&self.resources, resource)
            && any(&self.verbs, verb)
            && (self.names.is_empty() || name.is_some_and(|n| self.names.iter().any(|x| x == n)))
            && self.namespace.as_ref().is_none_or(|n| n == ns)
    }
}

#[derive(Default)]
struct Store {
    rbac: BTreeMap<String, Vec<Rule>>,
    denied: Vec<String>,
    rv: u64,
    objects: BTreeMap<ObjKey, Value>,
    history: Vec<Change>,
    compacted: u64,
    writes: Vec<Write>,
    uid: u64,
    node_ports: u16,
}

/// Errors in the shape of a `Status`.
#[derive(Debug)]
pub struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

fn api_err(code: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        code,
        reason,
        message: message.into(),
    }
}

impl ApiError {
    fn body(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code.as_u16()})
    }
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    close: watch::Sender<u64>,
}

/// The server; dropped = stopped.
pub struct ApiServer {
    /// Its address (`http://` + this).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    rfc3339(secs)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn labels_match(obj: &Value, selector: &str) -> bool {
    let labels = obj["metadata"]["labels"].as_object();
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                get(k.trim()) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                get(k.trim()) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                get(k.trim()).is_none()
            } else {
                get(term).is_some()
            }
        })
}

fn rv_of(obj: &Value) -> Option<&str> {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .filter(|s| !s.is_empty())
}

impl Shared {
    fn record(&self, store: &mut Store, kind: Kind, ns: &str, what: &'static str, obj: &Value) {
        let change = Change {
            rv: store.rv,
            kind,
            namespace: ns.to_owned(),
            kind_of_change: what,
            object: obj.clone(),
        };
        store.history.push(change.clone());
        let _ = self.changes.send(change);
    }

    fn bump(store: &mut Store, obj: &mut Value) {
        store.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(store.rv.to_string());
    }

    /// Create: fills in server-owned metadata (and NodePorts for Services).
    fn create(&self, kind: Kind, ns: &str, mut obj: Value, user: &str) -> Result<Value, ApiError> {
        let mut store = self.store.lock().unwrap();
        let name = obj["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                api_err(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name: Required value",
                )
            })?;
        let key = key_of(kind, ns, &name);
        if store.objects.contains_key(&key) {
            return Err(api_err(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", kind.plural),
            ));
        }
        if rv_of(&obj).is_some() {
            return Err(api_err(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.resourceVersion: must not be set on create",
            ));
        }
        obj["apiVersion"] = json!(kind.api_version);
        obj["kind"] = json!(kind.kind);
        if kind.namespaced {
            obj["metadata"]["namespace"] = json!(ns);
        }
        store.uid += 1;
        obj["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", store.uid));
        obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
        obj["metadata"]["generation"] = json!(1);
        if kind == SERVICES {
            if let Some(o) = obj.as_object_mut() {
                o.remove("status");
            }
            allocate_node_ports(&mut store, &mut obj);
            obj["status"] = json!({"loadBalancer": {}});
        }
        Self::bump(&mut store, &mut obj);
        store.objects.insert(key, obj.clone());
        store.writes.push(Write {
            user: user.into(),
            verb: "create".into(),
            resource: kind.plural.into(),
            object: format!("{ns}/{name}"),
        });
        self.record(&mut store, kind, ns, "ADDED", &obj);
        Ok(obj)
    }

    /// Update by a function of the current object; the function returns the
    /// new object (for the subresource only its status is kept).
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        status: bool,
        user: &str,
        verb: &str,
        change: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let mut store = self.store.lock().unwrap();
        let key = key_of(kind, ns, name);
        let current = store.objects.get(&key).cloned().ok_or_else(|| {
            api_err(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural),
            )
        })?;
        let proposed = change(&current)?;
        if let Some(rv) = rv_of(&proposed) {
            if Some(rv) != rv_of(&current) {
                return Err(api_err(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        kind.plural
                    ),
                ));
            }
        }
        let mut next = current.clone();
        if status {
            next["status"] = proposed["status"].clone();
        } else {
            // Spec and metadata from the request; server-owned fields stay.
            next = proposed;
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "generation",
                "namespace",
                "name",
            ] {
                match current["metadata"].get(f) {
                    Some(v) => next["metadata"][f] = v.clone(),
                    None => {
                        if let Some(m) = next["metadata"].as_object_mut() {
                            m.remove(f);
                        }
                    }
                }
            }
            next["apiVersion"] = current["apiVersion"].clone();
            next["kind"] = current["kind"].clone();
            if kind.status {
                next["status"] = current["status"].clone();
            }
            if kind == SERVICES {
                allocate_node_ports(&mut store, &mut next);
            }
            if next.get("spec") != current.get("spec") {
                let g = current["metadata"]["generation"].as_i64().unwrap_or(1);
                next["metadata"]["generation"] = json!(g + 1);
            }
        }
        if kind == SERVICES && status {
            validate_service_status(&next)?;
        }
        next["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        let resource = if status {
            format!("{}/status", kind.plural)
        } else {
            kind.plural.to_owned()
        };
        store.writes.push(Write {
            user: user.into(),
            verb: verb.into(),
            resource,
            object: format!("{ns}/{name}"),
        });
        if next == current {
            return Ok(current); // a no-op write does not bump the version
        }
        Self::bump(&mut store, &mut next);
        let finalizers_empty = next["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
        if next["metadata"]["deletionTimestamp"].is_string() && finalizers_empty {
            store.objects.remove(&key);
            self.record(&mut store, kind, ns, "DELETED", &next);
        } else {
            store.objects.insert(key, next.clone());
            self.record(&mut store, kind, ns, "MODIFIED", &next);
        }
        Ok(next)
    }

    fn delete(&self, kind: Kind, ns: &str, name: &str, user: &str) -> Result<Value, ApiError> {
        let mut store = self.store.lock().unwrap();
        let key = key_of(kind, ns, name);
        let mut obj = store.objects.get(&key).cloned().ok_or_else(|| {
            api_err(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural),
            )
        })?;
        store.writes.push(Write {
            user: user.into(),
            verb: "delete".into(),
            resource: kind.plural.into(),
            object: format!("{ns}/{name}"),
        });
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if !obj["metadata"]["deletionTimestamp"].is_string() {
                obj["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
                Self::bump(&mut store, &mut obj);
                store.objects.insert(key, obj.clone());
                self.record(&mut store, kind, ns, "MODIFIED", &obj);
            }
        } else {
            store.objects.remove(&key);
            Self::bump(&mut store, &mut obj);
            self.record(&mut store, kind, ns, "DELETED", &obj);
        }
        Ok(obj)
    }

    fn list(&self, kind: Kind, ns: Option<&str>, selector: Option<&str>) -> (u64, Vec<Value>) {
        let store = self.store.lock().unwrap();
        let items = store
            .objects
            .iter()
            .filter(|((v, p, n, _), _)| {
                *v == kind.api_version && *p == kind.plural && ns.is_none_or(|ns| ns == n)
            })
            .map(|(_, o)| o.clone())
            .filter(|o| selector.is_none_or(|s| labels_match(o, s)))
            .collect();
        (store.rv, items)
    }
}

fn allocate_node_ports(store: &mut Store, svc: &mut Value) {
    let spec = &mut svc["spec"];
    let lb = spec["type"] == "LoadBalancer";
    let wants =
        lb && spec["allocateLoadBalancerNodePorts"] != json!(false) || spec["type"] == "NodePort";
    let mut next = || {
        store.node_ports = store.node_ports.wrapping_add(1);
        30000 + i64::from(store.node_ports % 2768)
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

fn validate_service_status(svc: &Value) -> Result<(), ApiError> {
    let invalid = |m: String| api_err(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", m);
    let ingress = svc["status"]["loadBalancer"]["ingress"].as_array();
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

/// Parsed request path.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ((*v).to_owned(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some((*n).to_owned()), None),
        [p, n, s] => (*p, Some((*n).to_owned()), Some(*s)),
        _ => return None,
    };
    let kind = *KINDS
        .iter()
        .find(|k| k.api_version == api_version && k.plural == plural)?;
    if kind.namespaced != namespace.is_some() && name.is_some() {
        return None;
    }
    let status = match sub {
        None => false,
        Some("status") if kind.status => true,
        Some(_) => return None,
    };
    Some(Target {
        kind,
        namespace,
        name,
        status,
    })
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

fn query(uri: &hyper::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    match route(shared, req).await {
        Ok(r) => r,
        Err(e) => json_response(e.code, &e.body()),
    }
}

async fn route(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let user = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let q = query(req.uri());
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let target = parse_path(req.uri().path()).ok_or_else(|| {
        api_err(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "the server could not find the requested resource ({})",
                req.uri().path()
            ),
        )
    })?;
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| api_err(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()))?
        .to_bytes();
    let parse_body = || -> Result<Value, ApiError> {
        serde_json::from_slice(&body).map_err(|e| {
            api_err(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("invalid JSON body: {e}"),
            )
        })
    };
    let kind = target.kind;
    let ns = target.namespace.clone().unwrap_or_default();
    {
        let mut store = shared.store.lock().unwrap();
        if let Some(rules) = store.rbac.get(&user) {
            let verb = match (&method, &target.name) {
                (&Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                    "watch"
                }
                (&Method::GET, None) => "list",
                (&Method::GET, Some(_)) => "get",
                (&Method::POST, _) => "create",
                (&Method::PUT, _) => "update",
                (&Method::PATCH, _) => "patch",
                (&Method::DELETE, _) => "delete",
                _ => "unknown",
            };
            let group = kind.api_version.rsplit_once('/').map_or("", |(g, _)| g);
            let resource = if target.status {
                format!("{}/status", kind.plural)
            } else {
                kind.plural.to_owned()
            };
            if !rules
                .iter()
                .any(|r| r.allows(group, &resource, verb, &ns, target.name.as_deref()))
            {
                let message = format!(
                    "{resource} \"{}\" is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{group}\" in the namespace \"{ns}\"",
                    target.name.clone().unwrap_or_default()
                );
                store.denied.push(message.clone());
                return Err(api_err(StatusCode::FORBIDDEN, "Forbidden", message));
            }
        }
    }
    match (method, target.name.clone()) {
        (Method::GET, None) => {
            if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
                return Ok(watch_response(&shared, &target, &q));
            }
            let (rv, mut items) = shared.list(
                kind,
                target.namespace.as_deref(),
                q.get("labelSelector").map(String::as_str),
            );
            let start = q
                .get("continue")
                .and_then(|c| c.parse::<usize>().ok())
                .unwrap_or(0);
            let limit = q
                .get("limit")
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|l| *l > 0)
                .unwrap_or(usize::MAX);
            let total = items.len();
            items = items.into_iter().skip(start).take(limit).collect();
            let mut meta = json!({"resourceVersion": rv.to_string()});
            if start.saturating_add(limit) < total {
                meta["continue"] = json!((start + limit).to_string());
                meta["remainingItemCount"] = json!(total - start - limit);
            }
            Ok(json_response(
                StatusCode::OK,
                &json!({"kind": format!("{}List", kind.kind), "apiVersion": kind.api_version,
                        "metadata": meta, "items": items}),
            ))
        }
        (Method::GET, Some(name)) => {
            let store = shared.store.lock().unwrap();
            let obj = store.objects.get(&key_of(kind, &ns, &name)).cloned();
            obj.map(|o| json_response(StatusCode::OK, &o))
                .ok_or_else(|| {
                    api_err(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!("{} \"{name}\" not found", kind.plural),
                    )
                })
        }
        (Method::POST, None) => {
            let obj = parse_body()?;
            shared
                .create(kind, &ns, obj, &user)
                .map(|o| json_response(StatusCode::CREATED, &o))
        }
        (Method::PUT, Some(name)) => {
            let obj = parse_body()?;
            if obj["metadata"]["name"].as_str() != Some(name.as_str()) {
                return Err(api_err(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the name of the object does not match the name on the URL",
                ));
            }
            shared
                .update(kind, &ns, &name, target.status, &user, "update", |_| {
                    Ok(obj)
                })
                .map(|o| json_response(StatusCode::OK, &o))
        }
        (Method::PATCH, Some(name)) => {
            let patch = parse_body()?;
            let apply = content_type.starts_with("application/apply-patch");
            if !apply
                && !content_type.starts_with("application/merge-patch+json")
                && !content_type.starts_with("application/strategic-merge-patch+json")
            {
                return Err(api_err(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    format!("the body of the request was in an unknown format: {content_type}"),
                ));
            }
            if apply && q.get("fieldManager").is_none_or(|m| m.is_empty()) {
                return Err(api_err(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "PATCH with apply requires fieldManager",
                ));
            }
            let exists = shared
                .store
                .lock()
                .unwrap()
                .objects
                .contains_key(&key_of(kind, &ns, &name));
            if apply && !exists && !target.status {
                return shared
                    .create(kind, &ns, patch, &user)
                    .map(|o| json_response(StatusCode::CREATED, &o));
            }
            shared
                .update(kind, &ns, &name, target.status, &user, "patch", |current| {
                    let mut next = current.clone();
                    // A resourceVersion in the patch is a precondition, checked by update().
                    merge_patch(&mut next, &patch);
                    if rv_of(&patch).is_none() {
                        next["metadata"]["resourceVersion"] =
                            current["metadata"]["resourceVersion"].clone();
                    }
                    Ok(next)
                })
                .map(|o| json_response(StatusCode::OK, &o))
        }
        (Method::DELETE, Some(name)) => shared
            .delete(kind, &ns, &name, &user)
            .map(|o| json_response(StatusCode::OK, &o)),
        _ => Err(api_err(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "method not allowed",
        )),
    }
}

fn watch_response(
    shared: &Arc<Shared>,
    target: &Target,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let kind = target.kind;
    let ns = target.namespace.clone();
    let selector = q.get("labelSelector").cloned();
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let from = q.get("resourceVersion").cloned().unwrap_or_default();
    let wanted = move |c: &Change| {
        c.kind == kind
            && ns.as_ref().is_none_or(|n| *n == c.namespace)
            && selector.as_ref().is_none_or(|s| labels_match(&c.object, s))
    };
    let line = |t: &str, o: &Value| {
        let mut s = json!({"type": t, "object": o}).to_string();
        s.push('\n');
        Bytes::from(s)
    };
    let mut initial: Vec<Bytes> = Vec::new();
    let receiver;
    {
        let store = shared.store.lock().unwrap();
        receiver = shared.changes.subscribe();
        match from.parse::<u64>() {
            Ok(rv) if rv > 0 => {
                if rv < store.compacted {
                    let gone = api_err(
                        StatusCode::GONE,
                        "Expired",
                        format!("too old resource version: {rv} ({})", store.compacted),
                    );
                    initial.push(line("ERROR", &gone.body()));
                    let body =
                        futures::stream::iter(initial.into_iter().map(|b| Ok(Frame::data(b))));
                    return Response::builder()
                        .header("content-type", "application/json")
                        .body(BodyExt::boxed(StreamBody::new(body)))
                        .expect("response");
                }
                for c in store.history.iter().filter(|c| c.rv > rv && wanted(c)) {
                    initial.push(line(c.kind_of_change, &c.object));
                }
            }
            _ => {
                // "Any" version: a synthetic ADDED for every current object.
                for ((v, p, n, _), o) in &store.objects {
                    let c = Change {
                        rv: 0,
                        kind,
                        namespace: n.clone(),
                        kind_of_change: "ADDED",
                        object: o.clone(),
                    };
                    if *v == kind.api_version && *p == kind.plural && wanted(&c) {
                        initial.push(line("ADDED", o));
                    }
                }
            }
        }
    }
    let last_rv = from.parse::<u64>().unwrap_or(0);
    let mut close = shared.close.subscribe();
    close.mark_unchanged();
    let live = futures::stream::unfold(
        (
            receiver,
            close,
            last_rv,
            tokio::time::Instant::now() + std::time::Duration::from_secs(timeout),
        ),
        move |(mut rx, mut close, last, deadline)| {
            let wanted = wanted.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = close.changed() => return None,
                        _ = tokio::time::sleep_until(deadline) => return None,
                        got = rx.recv() => match got {
                            Ok(c) if c.rv > last && wanted(&c) => {
                                let mut s = json!({"type": c.kind_of_change, "object": c.object}).to_string();
                                s.push('\n');
                                return Some((Bytes::from(s), (rx, close, c.rv, deadline)));
                            }
                            Ok(_) => continue,
                            // Lagged or closed: end the watch; the client resumes.
                            Err(_) => return None,
                        },
                    }
                }
            }
        },
    );
    let body = futures::stream::iter(initial)
        .chain(live)
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    Response::builder()
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(body)))
        .expect("response")
}

impl ApiServer {
    /// Starts on 127.0.0.1 (port chosen by the kernel).
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (changes, _) = broadcast::channel(200_000);
        let (close, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 100,
                ..Store::default()
            }),
            changes,
            close,
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(handle(s, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, shared, task }
    }

    /// Writes a kubeconfig for this server, authenticating with `token`.
    pub fn kubeconfig(&self, dir: &Path, token: &str) -> PathBuf {
        let path = dir.join(format!("kubeconfig-{token}"));
        let cfg = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": format!("http://{}", self.addr)}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "u"}}],
        });
        std::fs::write(&path, cfg.to_string()).expect("write kubeconfig");
        path
    }

    /// Creates an object as an administrator would.
    pub fn create(&self, kind: Kind, ns: &str, obj: Value) -> Value {
        self.shared.create(kind, ns, obj, "admin").expect("create")
    }

    /// Applies a merge patch as an administrator would.
    pub fn patch(&self, kind: Kind, ns: &str, name: &str, patch: Value) -> Value {
        self.shared
            .update(kind, ns, name, false, "admin", "patch", |cur| {
                let mut next = cur.clone();
                merge_patch(&mut next, &patch);
                Ok(next)
            })
            .expect("patch")
    }

    /// Deletes (gracefully, if finalizers are set).
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) {
        self.shared.delete(kind, ns, name, "admin").expect("delete");
    }

    /// The stored object, if any.
    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let store = self.shared.store.lock().unwrap();
        store.objects.get(&key_of(kind, ns, name)).cloned()
    }

    /// Every stored object of a kind.
    pub fn list(&self, kind: Kind) -> Vec<Value> {
        self.shared.list(kind, None, None).1
    }

    /// Ends every open watch (clients must resume from their last version).
    pub fn close_watches(&self) {
        self.shared.close.send_modify(|g| *g += 1);
    }

    /// Forgets history up to now: older watch versions get 410 Gone.
    pub fn compact(&self) {
        let mut store = self.shared.store.lock().unwrap();
        store.compacted = store.rv;
        store.history.clear();
    }

    /// From now on, requests with `token` are allowed only what `rules` allow.
    pub fn enforce_rbac(&self, token: &str, rules: Vec<Rule>) {
        self.shared
            .store
            .lock()
            .unwrap()
            .rbac
            .insert(token.to_owned(), rules);
    }

    /// Requests refused by RBAC so far.
    pub fn denied(&self) -> Vec<String> {
        self.shared.store.lock().unwrap().denied.clone()
    }

    /// Every write so far.
    pub fn writes(&self) -> Vec<Write> {
        self.shared.store.lock().unwrap().writes.clone()
    }
}
