//! The metrics endpoint (`admin.metrics`): `GET /metrics`, `/healthz`,
//! `/readyz`. No secrets and no control here; the control API is separate.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};

use super::http::{self, Body, Limits};
use crate::metrics::Metrics;

/// What the endpoint reads: the metrics and the readiness flag.
#[derive(Clone)]
pub struct Endpoint {
    /// Encoded on every `GET /metrics`.
    pub metrics: Metrics,
    /// `/readyz` answers 200 while it is true.
    pub ready: Arc<AtomicBool>,
}

/// Binds `addr` and serves the endpoint on the current runtime. Returns
/// the bound address.
pub async fn serve(addr: SocketAddr, endpoint: Endpoint) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "admin endpoint: /metrics /healthz /readyz");
    let handler: http::Handler = Arc::new(move |req| {
        let response = route(&endpoint, &req);
        Box::pin(async move { response })
    });
    http::spawn(
        http::Listener::Tcp(listener),
        Limits::ENDPOINT,
        handler,
        "metrics",
    );
    Ok(local)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Body::new(body.into()))
        .expect("static response")
}

fn route<B>(endpoint: &Endpoint, req: &Request<B>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, endpoint.metrics.encode());
            r.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if endpoint.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    }
}
