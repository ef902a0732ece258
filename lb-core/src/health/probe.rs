//! One active check (a TCP connect, or an HTTP `GET` whose status must be
//! 2xx or 3xx) bounded by the check's timeout, and the loop that runs it
//! every interval for a cell.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use lb_config::{HealthCheck, HealthKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::cell::HealthCell;
use crate::routing::ConnectError;

/// Checks `cell`'s target every interval, for as long as it runs.
pub async fn run_prober(cell: Arc<HealthCell>) {
    let check = cell.key.check.clone();
    let mut ticker = tokio::time::interval(check.interval.get());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match probe(&check, cell.key.target).await {
            Ok(()) => cell.record(Ok(()), Instant::now()),
            Err(Failed::Backend(error)) => cell.record(Err(error), Instant::now()),
            // This host is out of descriptors or buffers: no result at all
            // (neither a success nor evidence against the backend).
            Err(Failed::Here(error)) => {
                cell.count_local_failure();
                tracing::debug!(target = %cell.key.target, %error, "health check not run: no resources here");
            }
        }
    }
}

/// Why a check failed: the backend's answer (or its silence), or this
/// host's own resources (descriptors, buffers, local ports).
#[derive(Debug, PartialEq, Eq)]
pub enum Failed {
    /// Evidence against the backend.
    Backend(String),
    /// No evidence: the check could not run here.
    Here(String),
}

/// Runs one check against `target`, bounded by the check's timeout.
pub async fn probe(check: &HealthCheck, target: SocketAddr) -> Result<(), Failed> {
    let deadline = tokio::time::Instant::now() + check.timeout.get();
    let timed_out = || Failed::Backend(format!("timed out after {}", check.timeout));
    let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) if ConnectError::of(&e) == ConnectError::Local => {
            return Err(Failed::Here(format!("connect: {e}")))
        }
        Ok(Err(e)) => return Err(Failed::Backend(format!("connect: {e}"))),
        Err(_) => return Err(timed_out()),
    };
    match tokio::time::timeout_at(deadline, exchange(check, target, stream)).await {
        Ok(result) => result.map_err(Failed::Backend),
        Err(_) => Err(timed_out()),
    }
}

/// What a check does once connected: the PROXY header if configured, and
/// for HTTP the request and its status line.
async fn exchange(
    check: &HealthCheck,
    target: SocketAddr,
    mut stream: TcpStream,
) -> Result<(), String> {
    if let Some(header) = crate::proxy_protocol::local(check.send_proxy) {
        stream
            .write_all(&header)
            .await
            .map_err(|e| format!("write PROXY header: {e}"))?;
    }
    if check.kind != HealthKind::Http {
        return Ok(());
    }
    let request = format!(
            "GET {} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: weir-lbd-health\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            check.path
        );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    match parse_status(&head) {
        Some(code) if (200..400).contains(&code) => Ok(()),
        Some(code) => Err(format!("HTTP status {code}")),
        None => Err("no HTTP status line in the reply".to_owned()),
    }
}

/// The status code of an HTTP/1.x status line.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_ascii_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(parse_status(b"HTTP/1.1 302\r\n"), Some(302));
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b"HTTP/1.1 2000 OK\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }
}
