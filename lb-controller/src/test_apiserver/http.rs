//! The HTTP surface: paths, queries, verbs, RBAC checks and watch streams.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::error::{api_err, ApiError};
use super::json::{merge_patch, rv_of};
use super::kinds::{key_of, Kind, KINDS, SERVICES};
use super::service;
use super::store::{Shared, Update};
use super::watches::watch_response;

/// Parsed request path.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

impl Target {
    fn update<'a>(&self, ns: &'a str, name: &'a str, user: &'a str, verb: &'a str) -> Update<'a> {
        Update {
            kind: self.kind,
            ns,
            name,
            status: self.status,
            user,
            verb,
        }
    }
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

/// The fields of a status write the release does not know: refused under
/// `fieldValidation=Strict`, otherwise dropped with one warning each.
fn unknown_fields(
    shared: &Shared,
    target: &Target,
    body: &Value,
    q: &BTreeMap<String, String>,
) -> Result<Vec<String>, ApiError> {
    if target.kind != SERVICES || !target.status {
        return Ok(Vec::new());
    }
    let unknown = service::unknown_status_fields(shared.release, body);
    if !unknown.is_empty() && q.get("fieldValidation").is_some_and(|v| v == "Strict") {
        let list: Vec<String> = unknown
            .iter()
            .map(|f| format!(".{f}: field not declared in schema"))
            .collect();
        return Err(api_err(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            list.join(", "),
        ));
    }
    Ok(unknown)
}

fn with_warnings(mut response: Response<Body>, unknown: &[String]) -> Response<Body> {
    for field in unknown {
        let text = format!("299 - \"unknown field \\\"{field}\\\"\"");
        if let Ok(value) = hyper::header::HeaderValue::from_str(&text) {
            response.headers_mut().append("warning", value);
        }
    }
    response
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

pub(super) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
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
    if method != Method::GET {
        // The storage's commit, which a real server waits for on every
        // write (etcd's consensus and fsync); the store is not held meanwhile.
        let latency = shared.write_latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }
    match (method, target.name.clone()) {
        (Method::GET, None) => {
            if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
                return Ok(watch_response(&shared, kind, target.namespace.clone(), &q));
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
            let warnings = unknown_fields(&shared, &target, &obj, &q)?;
            shared
                .update(&target.update(&ns, &name, &user, "update"), |_| Ok(obj))
                .map(|o| with_warnings(json_response(StatusCode::OK, &o), &warnings))
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
            let warnings = unknown_fields(&shared, &target, &patch, &q)?;
            shared
                .update(&target.update(&ns, &name, &user, "patch"), |current| {
                    let mut next = current.clone();
                    // A resourceVersion in the patch is a precondition, checked by update().
                    merge_patch(&mut next, &patch);
                    if rv_of(&patch).is_none() {
                        next["metadata"]["resourceVersion"] =
                            current["metadata"]["resourceVersion"].clone();
                    }
                    Ok(next)
                })
                .map(|o| with_warnings(json_response(StatusCode::OK, &o), &warnings))
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
