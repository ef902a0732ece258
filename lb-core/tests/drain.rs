//! `lbd drain` and `lbd undrain` without announcements (no root needed):
//! a drain makes lbd not ready, closes its listeners (no grace: no VIP was
//! announced), lets an established connection finish, and stays drained;
//! an undrain accepts again on the same port. Through the control API.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use hyper::{Method, StatusCode};
use lb_config::EngineChoice;

fn call(socket: &Path, method: Method, path: &str) -> (StatusCode, serde_json::Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (code, body) = rt
        .block_on(lb_api::client::request(socket, method, path, None))
        .expect("control API");
    (code, serde_json::from_slice(&body).unwrap_or_default())
}

/// An lbd with one listener ("web", to `backend`) and its control socket
/// in `dir`.
fn lbd_in(dir: &Path, backend: SocketAddr, engine: EngineChoice) -> lb_core::Server {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let toml = format!(
        "[admin]\nmetrics = \"off\"\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\n\n{}",
        dir.join("control.sock").display(),
        dir.display(),
        listener_toml(
            "web",
            "127.0.0.30:0",
            "drain_timeout = \"30s\"",
            &[backend],
            "kind = \"none\""
        )
    );
    start_lbd(&toml, engine)
}

fn drain_and_undrain(engine: EngineChoice) {
    let backend = TestBackend::start("127.0.0.2", Behavior::Echo);
    let dir = std::env::temp_dir().join(format!("weir-drain-{engine:?}-{}", std::process::id()));
    let server = lbd_in(&dir, backend.addr, engine);
    let socket = dir.join("control.sock");
    let addr: SocketAddr = server.bound_addr("web").unwrap();
    assert_eq!(call(&socket, Method::GET, "/readyz").0, StatusCode::OK);
    let mut open = connect_from(None, addr).unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(open.try_clone().unwrap()),
        &mut line,
    )
    .unwrap();

    let (code, answer) = call(&socket, Method::POST, "/v1/drain");
    assert_eq!(code, StatusCode::OK, "{answer}");
    assert_eq!(answer["draining"], true);
    assert_eq!(answer["withdrawn"], 0, "announcements are off");
    assert_eq!(
        call(&socket, Method::GET, "/readyz").0,
        StatusCode::SERVICE_UNAVAILABLE,
        "a draining lbd is not ready"
    );
    eventually(Duration::from_secs(5), "listeners closed", || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
    });
    assert_eq!(
        server.status().drain,
        Some(lb_api::wire::DrainPhase::Connections),
        "the established connection keeps the drain in its connections phase"
    );
    // The established connection still works.
    std::io::Write::write_all(&mut open, b"ping").unwrap();
    let mut echo = [0u8; 4];
    std::io::Read::read_exact(&mut open, &mut echo).unwrap();
    assert_eq!(&echo, b"ping");
    drop(open);
    eventually(Duration::from_secs(5), "drained", || {
        server.status().drain == Some(lb_api::wire::DrainPhase::Drained)
    });
    assert_eq!(
        call(&socket, Method::POST, "/v1/drain").0,
        StatusCode::OK,
        "draining again is no error"
    );

    let (code, answer) = call(&socket, Method::DELETE, "/v1/drain");
    assert_eq!(code, StatusCode::OK, "{answer}");
    assert_eq!(answer["draining"], false);
    assert_eq!(call(&socket, Method::GET, "/readyz").0, StatusCode::OK);
    assert_eq!(server.status().drain, None);
    assert_eq!(
        server.bound_addr("web"),
        Some(addr),
        "the same address and port"
    );
    assert_eq!(roundtrip(addr).unwrap(), backend.name, "accepting again");
    server.shutdown(Some(Duration::from_secs(1)));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Drains and undrains of an idle lbd, one after another. With nothing
/// announced and no connection open, the drain's background half (close
/// the listeners, count down to none) can finish before the call that
/// started it returns; whatever the order, every drain must end drained
/// and every undrain must serve again.
fn drain_undrain_cycles(engine: EngineChoice) {
    let backend = TestBackend::start("127.0.0.2", Behavior::Echo);
    let dir = std::env::temp_dir().join(format!(
        "weir-drain-cycles-{engine:?}-{}",
        std::process::id()
    ));
    let server = lbd_in(&dir, backend.addr, engine);
    let socket = dir.join("control.sock");
    let addr: SocketAddr = server.bound_addr("web").unwrap();
    for cycle in 0..40 {
        assert_eq!(call(&socket, Method::POST, "/v1/drain").0, StatusCode::OK);
        eventually(
            Duration::from_secs(5),
            &format!("drained, cycle {cycle}"),
            || server.status().drain == Some(lb_api::wire::DrainPhase::Drained),
        );
        assert!(
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
            "cycle {cycle}: drained but accepting"
        );
        assert_eq!(call(&socket, Method::DELETE, "/v1/drain").0, StatusCode::OK);
        assert_eq!(server.status().drain, None, "cycle {cycle}");
        assert_eq!(
            roundtrip(addr).ok().as_deref(),
            Some(backend.name.as_str()),
            "cycle {cycle}: undrained but not serving"
        );
    }
    server.shutdown(Some(Duration::from_secs(1)));
    let _ = std::fs::remove_dir_all(&dir);
}

both_engines!(drain_and_undrain, drain_undrain_cycles);
