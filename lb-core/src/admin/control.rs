//! The control API (`admin.control_socket`): HTTP/1.1 + JSON on a unix
//! socket whose file mode (0600) is the authentication. Endpoints, as the
//! design's contract says: `GET/PUT /v1/state`, `GET /v1/status`,
//! `GET /healthz`, `GET /readyz`, and `POST`/`DELETE /v1/drain` (`lbd
//! drain`, `lbd undrain`).
//!
//! Over TCP (`admin.control_tcp`) the same API is served with TLS only, and
//! every request needs `Authorization: Bearer <token>` (401 otherwise, with
//! no detail); `admin.client_ca` adds mutual TLS.
//!
//! Limits: request bodies (16 MiB), and what [`super::http`] bounds
//! (pending and total connections, per-source connections, handshake, head
//! and exchange deadlines); applies are serialised by the server.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use lb_api::wire::{DrainAnswer, Status};
use lb_config::{DesiredState, FieldError};
use serde_json::json;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;

use super::http::{self, Body, Limits};
use super::tls::Token;
use crate::metrics::ApiMetrics;

/// What the control API needs of a running `lbd`: its readiness, its
/// dynamic state, its status, and a way to replace the state. Applies are
/// serialised by the implementation.
pub trait ControlApi: Send + Sync {
    /// Whether the initial state is applied and listeners bound.
    fn ready(&self) -> bool;
    /// The dynamic state in force.
    fn state(&self) -> DesiredState;
    /// Listeners and backends now.
    fn status(&self) -> Status;
    /// Validates, persists and applies `state` (`PUT /v1/state`).
    fn put_state(&self, state: DesiredState) -> Result<u64, PutError>;
    /// The controller was heard from (`GET /readyz`, `PUT /v1/state`): in
    /// L2 mode, how an owner knows it is not cut off.
    fn contact(&self) {}
    /// Starts a drain that does not exit (`POST /v1/drain`); returns once
    /// the VIPs are withdrawn. Blocking: call it off the reactor.
    fn drain(&self) -> Result<DrainAnswer, DrainError> {
        Err(DrainError::Unsupported)
    }
    /// Ends a drain (`DELETE /v1/drain`). Blocking, like [`ControlApi::drain`].
    fn undrain(&self) -> Result<DrainAnswer, DrainError> {
        Err(DrainError::Unsupported)
    }
}

/// Why a drain or undrain was refused.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// lbd is stopping: its drain goes on to the exit (409).
    #[error("lbd is stopping")]
    Stopping,
    /// This server does not drain on request (501).
    #[error("drain is not supported here")]
    Unsupported,
}

/// Why a `PUT /v1/state` was refused. Nothing changed.
#[derive(Debug)]
pub enum PutError {
    /// Stale or conflicting version (409).
    Conflict {
        /// The version now applied.
        current: u64,
    },
    /// Invalid content (422), every error with its path.
    Invalid(Vec<FieldError>),
    /// The state could not be written to disk (500); nothing was applied.
    Persist(std::io::Error),
}

/// The control API's handle on the server and on its metrics.
#[derive(Clone)]
pub struct Control {
    /// The server.
    pub api: Arc<dyn ControlApi>,
    /// What the API counts.
    pub metrics: ApiMetrics,
}

/// Largest accepted request body.
pub const MAX_BODY: usize = 16 << 20;

/// Binds the control socket at `path` (creating its directory, replacing a
/// stale socket file but never one that answers, mode 0600) and serves it
/// on the current runtime.
pub async fn serve_unix(path: &Path, group: Option<&str>, control: Control) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a process that is gone is replaced; one that
    // answers belongs to a running process and is left alone.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "{} is served by another running process (another lbd with the same admin.control_socket?)",
                path.display()
            ),
        ));
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
    http::spawn(
        http::Listener::Unix(listener),
        Limits::CONTROL,
        handler(control, None),
        "control",
    );
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

/// The accept queue of the TLS control port: the kernel's largest
/// (`net.core.somaxconn`, 4096 by default) instead of the 128 that
/// `TcpListener::bind` asks for. A thousand hostile clients connecting at
/// once fill 128 places while lbd works through them, and an authorised
/// client's connect then waits for its SYN to be sent again, a second
/// later.
const TLS_BACKLOG: i32 = 4096;

/// Serves the control API over TLS on `addr`; every request must carry
/// `Authorization: Bearer <token>`. Returns the bound address.
pub async fn serve_tls(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    token: Token,
    control: Control,
) -> std::io::Result<SocketAddr> {
    let listener = {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(TLS_BACKLOG)?;
        socket.set_nonblocking(true)?;
        TcpListener::from_std(socket.into())?
    };
    let local = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tracing::info!(addr = %local, "control API listening (TLS)");
    http::spawn(
        http::Listener::Tls(listener, acceptor),
        Limits::CONTROL,
        handler(control, Some(Arc::new(token))),
        "control-tls",
    );
    Ok(local)
}

/// The request handler: the token check (over TCP) before anything else,
/// then the routes.
fn handler(control: Control, token: Option<Arc<Token>>) -> http::Handler {
    Arc::new(move |req: Request<Incoming>| {
        let (control, token) = (control.clone(), token.clone());
        Box::pin(async move {
            if let Some(t) = &token {
                let presented = req
                    .headers()
                    .get(hyper::header::AUTHORIZATION)
                    .map(|v| v.as_bytes());
                if !t.accepts(presented) {
                    control
                        .metrics
                        .requests
                        .with_label_values(&["unauthorized", "401"])
                        .inc();
                    let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized");
                    r.headers_mut().insert(
                        hyper::header::WWW_AUTHENTICATE,
                        hyper::header::HeaderValue::from_static("Bearer"),
                    );
                    return r;
                }
            }
            handle(&control, req).await
        })
    })
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut text = serde_json::to_vec_pretty(&body).unwrap_or_default();
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::new(Bytes::from(text)))
        .expect("static response")
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    reply(status, json!({ "error": message.into() }))
}

async fn handle(control: &Control, req: Request<Incoming>) -> Response<Body> {
    let endpoint = match req.uri().path() {
        "/v1/state" => "/v1/state",
        "/v1/status" => "/v1/status",
        "/v1/drain" => "/v1/drain",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        _ => "other",
    };
    let response = route(control, req).await;
    control
        .metrics
        .requests
        .with_label_values(&[endpoint, response.status().as_str()])
        .inc();
    response
}

async fn route(control: &Control, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    if matches!(
        (&method, req.uri().path()),
        (&Method::GET, "/readyz") | (&Method::PUT, "/v1/state")
    ) {
        control.api.contact();
    }
    match (method, req.uri().path()) {
        (Method::GET, "/healthz") => reply(StatusCode::OK, json!({ "status": "ok" })),
        (Method::GET, "/readyz") if control.api.ready() => {
            reply(StatusCode::OK, json!({ "status": "ready" }))
        }
        (Method::GET, "/readyz") => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "not ready" }),
        ),
        (Method::GET, "/v1/state") => reply(
            StatusCode::OK,
            serde_json::to_value(control.api.state()).unwrap_or_default(),
        ),
        (Method::GET, "/v1/status") => reply(
            StatusCode::OK,
            serde_json::to_value(control.api.status()).unwrap_or_default(),
        ),
        (Method::PUT, "/v1/state") => put_state(control, req).await,
        (Method::POST, "/v1/drain") => drain(control, true).await,
        (Method::DELETE, "/v1/drain") => drain(control, false).await,
        (_, "/healthz" | "/readyz" | "/v1/state" | "/v1/status" | "/v1/drain") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        (_, path) => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

/// Bytes of request bodies held at once, all connections together: three
/// bodies of the largest size. A body takes its share as its bytes arrive,
/// so a client that trickles holds little, and many slow ones cannot keep
/// a prompt one out.
const BODY_BUDGET: usize = 3 * MAX_BODY;
/// How long a request body may take to arrive, from the request head.
const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

static BODY_BYTES: Semaphore = Semaphore::const_new(BODY_BUDGET);

/// A request body, read under [`MAX_BODY`], [`BODY_DEADLINE`] and the
/// shared [`BODY_BUDGET`] (its permits are held until the body is dropped).
async fn read_body(
    req: Request<Incoming>,
) -> Result<(Bytes, tokio::sync::SemaphorePermit<'static>), Response<Body>> {
    let mut body = req.into_body();
    let deadline = tokio::time::Instant::now() + BODY_DEADLINE;
    let mut held = BODY_BYTES
        .try_acquire_many(0)
        .map_err(|_| error(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?;
    let mut bytes = Vec::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the request body did not arrive within {BODY_DEADLINE:?}"),
                ))
            }
            Ok(None) => return Ok((Bytes::from(bytes), held)),
            Ok(Some(Err(e))) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}"),
                ))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if bytes.len() + data.len() > MAX_BODY {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than {MAX_BODY} bytes"),
            ));
        }
        let more = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let permit = tokio::time::timeout_at(deadline, BODY_BYTES.acquire_many(more)).await;
        match permit {
            Ok(Ok(p)) => held.merge(p),
            Ok(Err(_)) => return Err(error(StatusCode::SERVICE_UNAVAILABLE, "shutting down")),
            Err(_) => {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many request bodies in progress; try again",
                ))
            }
        }
        bytes.extend_from_slice(&data);
    }
}

/// `POST /v1/drain` (`start`) or `DELETE /v1/drain`.
async fn drain(control: &Control, start: bool) -> Response<Body> {
    let api = control.api.clone();
    // Withdrawing waits for the interface: keep it off the reactor.
    let result =
        tokio::task::spawn_blocking(move || if start { api.drain() } else { api.undrain() }).await;
    match result {
        Ok(Ok(answer)) => reply(
            StatusCode::OK,
            serde_json::to_value(answer).unwrap_or_default(),
        ),
        Ok(Err(e @ DrainError::Stopping)) => error(StatusCode::CONFLICT, e.to_string()),
        Ok(Err(e @ DrainError::Unsupported)) => error(StatusCode::NOT_IMPLEMENTED, e.to_string()),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("drain failed: {e}"),
        ),
    }
}

async fn put_state(control: &Control, req: Request<Incoming>) -> Response<Body> {
    let (body, _held) = match read_body(req).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    let state: DesiredState = match lb_config::parse_json(&body) {
        Ok(s) => s,
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({ "error": format!("malformed state: {e}"), "path": e.path }),
            )
        }
    };
    let started = Instant::now();
    let api = control.api.clone();
    // Applying binds sockets and writes the state file: keep it off the reactor.
    let result = tokio::task::spawn_blocking(move || api.put_state(state)).await;
    control
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
    control.metrics.applies.with_label_values(&[label]).inc();
    response
}
