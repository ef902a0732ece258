//! A small client of the control API, over its unix socket or over HTTPS
//! with a bearer token: one request ([`send`]), and typed helpers for the
//! status ([`status`]), the state ([`state`]), a new state
//! ([`put_state`]) and drains ([`drain`]). Used by `lbd status`, `lbd apply`, `lb-controller` and
//! tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use lb_config::{DesiredState, FieldError};

use crate::wire;

/// Where the control API is.
#[derive(Clone, Debug)]
pub enum Target {
    /// `admin.control_socket`.
    Unix(PathBuf),
    /// `admin.control_tcp`: `https://host:port`, the CA that signed the
    /// server certificate, the token, and an optional client certificate.
    Https {
        /// `https://host:port`.
        url: String,
        /// The bearer token.
        token: String,
        /// TLS settings (trusted CA, client identity).
        tls: Arc<rustls::ClientConfig>,
    },
}

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API could not be reached.
    #[error("cannot connect to {target}: {error}")]
    Connect {
        /// The socket path or URL.
        target: String,
        /// The OS or TLS error.
        error: std::io::Error,
    },
    /// The URL is not `https://host:port`.
    #[error("bad URL {0:?}: expected https://host:port")]
    Url(String),
    /// The HTTP exchange failed.
    #[error("control API: {0}")]
    Http(String),
    /// The API answered with an error.
    #[error("lbd answered {code}: {message}")]
    Status {
        /// The HTTP status.
        code: StatusCode,
        /// The error it gave (or the body).
        message: String,
    },
    /// The answer was not what the endpoint returns.
    #[error("unexpected answer from {endpoint}: {message}")]
    Decode {
        /// The endpoint.
        endpoint: &'static str,
        /// What did not parse.
        message: String,
    },
}

async fn exchange<S>(
    stream: S,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = |e: hyper::Error| ClientError::Http(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
    Ok((status, bytes))
}

/// Sends one request and returns the status and body.
pub async fn send(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), ClientError> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    match target {
        Target::Unix(socket) => {
            let req = req
                .header("host", "lbd")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(|error| ClientError::Connect {
                    target: socket.display().to_string(),
                    error,
                })?;
            exchange(stream, req).await
        }
        Target::Https { url, token, tls } => {
            let uri: hyper::Uri = url.parse().map_err(|_| ClientError::Url(url.clone()))?;
            let (Some("https"), Some(host), Some(port)) =
                (uri.scheme_str(), uri.host(), uri.port_u16())
            else {
                return Err(ClientError::Url(url.clone()));
            };
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            req = req.header("host", format!("{}:{port}", uri.host().unwrap_or_default()));
            let req = req
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let connect_err = |error| ClientError::Connect {
                target: url.clone(),
                error,
            };
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(connect_err)?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| ClientError::Url(url.clone()))?;
            let tls = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(connect_err)?;
            exchange(tls, req).await
        }
    }
}

/// [`send`] to a unix socket.
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), ClientError> {
    send(&Target::Unix(socket.to_owned()), method, path, body).await
}

/// What a `PUT /v1/state` came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// 200: applied and persisted; the version now in force.
    Applied(u64),
    /// 409: the version in force, which a new state must exceed.
    Conflict(u64),
    /// 422: the problems, each with its field path; nothing changed.
    Rejected(Vec<FieldError>),
    /// Any other answer (413, 500, ...): nothing changed.
    Failed {
        /// The HTTP status.
        code: StatusCode,
        /// The error it gave (or the body).
        message: String,
    },
}

fn decode<T: serde::de::DeserializeOwned>(
    endpoint: &'static str,
    body: &[u8],
) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|e| ClientError::Decode {
        endpoint,
        message: e.to_string(),
    })
}

/// The message of an error answer: its `error` field, or the body.
fn message(body: &[u8]) -> String {
    serde_json::from_slice::<wire::ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim_end().to_owned())
}

async fn get<T: serde::de::DeserializeOwned>(
    target: &Target,
    endpoint: &'static str,
) -> Result<T, ClientError> {
    let (code, body) = send(target, Method::GET, endpoint, None).await?;
    if !code.is_success() {
        return Err(ClientError::Status {
            code,
            message: message(&body),
        });
    }
    decode(endpoint, &body)
}

/// `GET /v1/status`.
pub async fn status(target: &Target) -> Result<wire::Status, ClientError> {
    get(target, wire::STATUS).await
}

/// `GET /v1/state`: the dynamic state in force.
pub async fn state(target: &Target) -> Result<DesiredState, ClientError> {
    get(target, wire::STATE).await
}

/// `POST /v1/drain` (`drain = true`) or `DELETE /v1/drain`.
pub async fn drain(target: &Target, drain: bool) -> Result<wire::DrainAnswer, ClientError> {
    let method = if drain { Method::POST } else { Method::DELETE };
    let (code, body) = send(target, method, wire::DRAIN, None).await?;
    if !code.is_success() {
        return Err(ClientError::Status {
            code,
            message: message(&body),
        });
    }
    decode(wire::DRAIN, &body)
}

/// `PUT /v1/state` with `state`.
pub async fn put_state(target: &Target, state: &DesiredState) -> Result<PutOutcome, ClientError> {
    let body = serde_json::to_vec(state).map_err(|e| ClientError::Http(e.to_string()))?;
    let (code, reply) = send(target, Method::PUT, wire::STATE, Some(body)).await?;
    Ok(match code {
        StatusCode::OK => {
            PutOutcome::Applied(decode::<wire::Applied>(wire::STATE, &reply)?.version)
        }
        StatusCode::CONFLICT => {
            PutOutcome::Conflict(decode::<wire::Conflict>(wire::STATE, &reply)?.current_version)
        }
        StatusCode::UNPROCESSABLE_ENTITY => {
            PutOutcome::Rejected(decode::<wire::Rejected>(wire::STATE, &reply)?.errors)
        }
        code => PutOutcome::Failed {
            code,
            message: message(&reply),
        },
    })
}
