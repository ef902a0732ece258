//! A restart right after a `kill -9`: the persisted dynamic state is
//! served again even when its listener's port is still held for a moment.
//!
//! Found by `lb-bench chaos`: lbd on io_uring killed with SIGKILL and
//! started again at once. The killed lbd's listening sockets lived on
//! until the kernel had torn down its io_uring instances (some
//! milliseconds), the new lbd found them in the socket table, refused the
//! persisted state as "already served by uid 0", and served none of it
//! until someone sent the state again. Here a short-lived child process
//! holds the port the same way (`SO_REUSEPORT`, same user).

mod common;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use common::*;
use hyper::{Method, StatusCode};
use lb_config::EngineChoice;
use serde_json::{json, Value};

fn call(socket: &Path, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = body.map(|b| serde_json::to_vec(&b).unwrap());
    let (code, bytes) = rt
        .block_on(lb_api::client::request(socket, method, path, body))
        .expect("control API answers");
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// A listening socket on `addr` with `SO_REUSEPORT`, passed to a `sleep`
/// that holds it for `secs` seconds; this process keeps no copy.
fn held_by_a_child(addr: SocketAddr, secs: &str) -> std::process::Child {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(16).unwrap();
    // Inherited by the child (std closes only close-on-exec descriptors).
    rustix::io::fcntl_setfd(s.as_fd(), rustix::io::FdFlags::empty()).unwrap();
    let child = std::process::Command::new("sleep")
        .arg(secs)
        .spawn()
        .unwrap();
    drop(s);
    child
}

#[test]
fn persisted_state_is_served_once_a_predecessors_socket_is_gone() {
    let dir = std::env::temp_dir().join(format!("weir-restart-race-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let socket = dir.join("control.sock");
    let toml = format!(
        "[admin]\nmetrics = \"off\"\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\n",
        socket.display(),
        dir.join("state").display()
    );
    let backend = TestBackend::start("127.0.0.2", Behavior::Echo);
    let bind: SocketAddr = free_addr("127.0.0.47");
    let state = json!({ "version": 3, "listeners": [{
        "name": "svc", "bind": bind.to_string(),
        "backends": [{ "addr": backend.addr.to_string() }], "health": { "kind": "none" },
    }]});
    let first = start_lbd(&toml, EngineChoice::Epoll);
    let (code, body) = call(&socket, Method::PUT, "/v1/state", Some(state));
    assert_eq!(code, StatusCode::OK, "{body}");
    drop(first);

    // The predecessor's socket, still there for half a second.
    let mut holder = held_by_a_child(bind, "0.5");
    let second = start_lbd(&toml, EngineChoice::Epoll);
    let (code, body) = call(&socket, Method::GET, "/v1/state", None);
    let _ = holder.wait();
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        body["version"], 3,
        "the persisted state is in force: {body}"
    );
    eventually(Duration::from_secs(10), "the listener serves", || {
        roundtrip(bind).is_ok_and(|name| name == backend.name)
    });
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}
