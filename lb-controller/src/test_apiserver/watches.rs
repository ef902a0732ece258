//! Watch streams: history after a `resourceVersion` (410 Gone when it was
//! compacted away) or every current object, then live changes until the
//! timeout, a close by the test, or a lagging receiver.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use super::error::api_err;
use super::json::labels_match;
use super::kinds::Kind;
use super::store::{Change, Shared};

/// A watch of `kind` (in `ns`, or everywhere) with the request's query.
pub(super) fn watch_response(
    shared: &Arc<Shared>,
    kind: Kind,
    ns: Option<String>,
    q: &BTreeMap<String, String>,
) -> Response<BoxBody<Bytes, Infallible>> {
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
