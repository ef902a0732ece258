//! The control API (`admin.control_socket`): HTTP/1.1 + JSON on a unix
//! socket whose file mode (0600) is the authentication. Endpoints, as the
//! design's contract says: `GET/PUT /v1/state`, `GET /v1/status`,
//! `GET /healthz`, `GET /readyz`.
//!
//! Over TCP (`admin.control_tcp`) the same API is served with TLS only, and
//! every request needs `Authorization: Bearer <token>` (401 otherwise, with
//! no detail); `admin.client_ca` adds mutual TLS.
//!
//! Limits: request bodies (16 MiB), header, handshake and whole-connection
//! timeouts, and a bounded number of concurrent connections; applies are
//! serialised by the server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use lb_config::DesiredState;
use serde_json::json;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::server::{Inner, PutError};
use crate::tls::Token;

/// Largest accepted request body.
pub const MAX_BODY: usize = 16 << 20;
/// Concurrent control connections served; more wait in the backlog.
const MAX_CONNECTIONS: usize = 32;

/// Binds the control socket at `path` (creating its directory, replacing a
/// stale socket file, mode 0600) and serves it on the current runtime.
pub async fn serve_unix(
    path: &Path,
    group: Option<&str>,
    inner: Arc<Inner>,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    let mode = match group {
        Some(g) => {
            std::os::unix::fs::chown(path, None, Some(group_id(g)?))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    tracing::info!(socket = %path.display(), "control API listening");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(stream, inner.clone(), None, permit));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok(())
}

/// A group's id: a number, or a name looked up through the system's group
/// database (NSS: `/etc/group`, LDAP, sssd, ...).
fn group_id(group: &str) -> std::io::Result<u32> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("admin.control_socket_group: no group named {group:?}"),
        )),
        Err(e) => Err(std::io::Error::other(format!(
            "admin.control_socket_group: cannot look up group {group:?}: {e}"
        ))),
    }
}

/// Serves the control API over TLS on `addr`; every request must carry
/// `Authorization: Bearer <token>`. Returns the bound address.
pub async fn serve_tls(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    token: Token,
    inner: Arc<Inner>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let token = Arc::new(token);
    tracing::info!(addr = %local, "control API listening (TLS)");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, inner, token) = (acceptor.clone(), inner.clone(), token.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => serve_connection(tls, inner, Some(token), permit).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "control TLS handshake failed"),
                    Err(_) => tracing::debug!("control TLS handshake timed out"),
                }
            });
        }
    });
    Ok(local)
}

/// Serves one connection: header and whole-connection timeouts, a body
/// limit, and (over TCP) the token check before anything else.
async fn serve_connection<S>(
    stream: S,
    inner: Arc<Inner>,
    token: Option<Arc<Token>>,
    permit: OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let inner = inner.clone();
        let token = token.clone();
        async move {
            if let Some(t) = &token {
                if !t.accepts(
                    req.headers()
                        .get(hyper::header::AUTHORIZATION)
                        .map(|v| v.as_bytes()),
                ) {
                    inner
                        .metrics
                        .api_requests
                        .with_label_values(&["unauthorized", "401"])
                        .inc();
                    let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized");
                    r.headers_mut().insert(
                        hyper::header::WWW_AUTHENTICATE,
                        hyper::header::HeaderValue::from_static("Bearer"),
                    );
                    return Ok::<_, Infallible>(r);
                }
            }
            Ok::<_, Infallible>(handle(&inner, req).await)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
    drop(permit);
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec_pretty(&body).unwrap_or_default();
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("static response")
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    reply(status, json!({ "error": message.into() }))
}

async fn handle(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let endpoint = match req.uri().path() {
        "/v1/state" => "/v1/state",
        "/v1/status" => "/v1/status",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        _ => "other",
    };
    let response = route(inner, req).await;
    inner
        .metrics
        .api_requests
        .with_label_values(&[endpoint, response.status().as_str()])
        .inc();
    response
}

async fn route(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    match (method, req.uri().path()) {
        (Method::GET, "/healthz") => reply(StatusCode::OK, json!({ "status": "ok" })),
        (Method::GET, "/readyz") if inner.is_ready() => {
            reply(StatusCode::OK, json!({ "status": "ready" }))
        }
        (Method::GET, "/readyz") => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "not ready" }),
        ),
        (Method::GET, "/v1/state") => reply(
            StatusCode::OK,
            serde_json::to_value(inner.dynamic_state()).unwrap_or_default(),
        ),
        (Method::GET, "/v1/status") => reply(
            StatusCode::OK,
            serde_json::to_value(inner.status()).unwrap_or_default(),
        ),
        (Method::PUT, "/v1/state") => put_state(inner, req).await,
        (_, "/healthz" | "/readyz" | "/v1/state" | "/v1/status") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        (_, path) => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

/// Bodies being read at once: with `MAX_BODY` this bounds the memory that
/// concurrent PUTs can make us hold (applies are serialised anyway).
static BODY_SLOTS: Semaphore = Semaphore::const_new(2);

async fn put_state(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Ok(_slot) = BODY_SLOTS.acquire().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than {MAX_BODY} bytes"),
            );
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        }
    };
    let state: DesiredState = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("malformed state: {e}")),
    };
    let started = Instant::now();
    let inner2 = inner.clone();
    // Applying binds sockets and writes the state file: keep it off the reactor.
    let result = tokio::task::spawn_blocking(move || inner2.put_state(state)).await;
    inner
        .metrics
        .apply_seconds
        .observe(started.elapsed().as_secs_f64());
    let (label, response) = match result {
        Ok(Ok(version)) => (
            "applied",
            reply(StatusCode::OK, json!({ "version": version })),
        ),
        Ok(Err(PutError::Conflict { current })) => (
            "conflict",
            reply(StatusCode::CONFLICT, json!({ "current_version": current })),
        ),
        Ok(Err(PutError::Invalid(errors))) => (
            "invalid",
            reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({ "errors": errors }),
            ),
        ),
        Ok(Err(PutError::Persist(e))) => (
            "error",
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("state not persisted, nothing changed: {e}"),
            ),
        ),
        Err(e) => (
            "error",
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("apply failed: {e}"),
            ),
        ),
    };
    inner.metrics.applies.with_label_values(&[label]).inc();
    response
}
