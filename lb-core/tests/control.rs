//! The control API over its unix socket: every error class, persistence
//! across restarts, static and dynamic listeners together, and the `lbd
//! status` / `lbd apply` commands against a running lbd.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hyper::{Method, StatusCode};
use lb_config::EngineChoice;
use serde_json::{json, Value};

trait Pipe: Sized {
    fn pipe(self, f: impl FnOnce(Self) -> Self) -> Self {
        f(self)
    }
}

impl Pipe for Value {}

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("weir-control-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
    fn socket(&self) -> PathBuf {
        self.0.join("run/control.sock")
    }
    fn state(&self) -> PathBuf {
        self.0.join("state")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn admin(dir: &Dir) -> String {
    format!(
        "[admin]\nmetrics = \"off\"\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\n",
        dir.socket().display(),
        dir.state().display()
    )
}

fn call(socket: &Path, method: Method, path: &str, body: Option<Vec<u8>>) -> (StatusCode, Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (code, bytes) = rt
        .block_on(lb_api::client::request(socket, method, path, body))
        .expect("control API answers");
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn put(socket: &Path, state: &Value) -> (StatusCode, Value) {
    call(
        socket,
        Method::PUT,
        "/v1/state",
        Some(serde_json::to_vec(state).unwrap()),
    )
}

fn listener(name: &str, bind: &str, backend: SocketAddr) -> Value {
    json!({ "name": name, "bind": bind, "backends": [{ "addr": backend.to_string() }], "health": { "kind": "none" } })
}

#[test]
fn error_classes_and_unchanged_state() {
    let dir = Dir::new("errors");
    let b = TestBackend::start("127.0.0.2", Behavior::Echo);
    let lbd = start_lbd(&admin(&dir), EngineChoice::Epoll);
    let sock = dir.socket();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");

    let good = json!({ "version": 5, "listeners": [listener("svc-a", "127.0.0.30:0", b.addr)] });
    let (code, body) = put(&sock, &good);
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 5);
    let before = call(&sock, Method::GET, "/v1/state", None).1;
    assert_eq!(before["version"], 5);

    // Malformed bodies: 400.
    for raw in [&b"{"[..], b"[]", b"{\"version\": \"five\"}", b"\xff\xfe"] {
        let (code, body) = call(&sock, Method::PUT, "/v1/state", Some(raw.to_vec()));
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    }
    // A wrongly typed field deep in the body: the 400 names it.
    let mut typed = good.clone();
    typed["version"] = json!(6);
    typed["listeners"][0]["backends"][0]["weight"] = json!("2");
    let (code, body) = put(&sock, &typed);
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["path"], "listeners[0].backends[0].weight", "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("listeners[0].backends[0].weight: invalid type"),
        "{message}"
    );
    // Invalid states: 422 with every error's path; nothing changes.
    let bad = |l: Value| json!({ "version": 6, "listeners": [l] });
    let base = listener("svc-b", "127.0.0.31:80", b.addr);
    let with = |k: &str, v: Value| {
        let mut l = base.clone();
        l[k] = v;
        bad(l)
    };
    let cases: Vec<(Value, &str)> = vec![
        (with("name", json!("bad name")), "listeners[0].name"),
        (with("bind", json!("nowhere")), "listeners[0].bind"),
        (with("bind", json!("127.0.0.31")), "listeners[0].bind"),
        (
            with("backends", json!([{ "addr": "x" }])),
            "listeners[0].backends[0].addr",
        ),
        (
            with("backends", json!([{ "addr": "127.0.0.2:0" }])),
            "listeners[0].backends[0].addr",
        ),
        (
            with("backends", json!([{ "addr": "127.0.0.2:1", "weight": 0 }])),
            "listeners[0].backends",
        ),
        (
            with("source_ranges", json!(["10.0.0.1/8"])),
            "listeners[0].source_ranges[0]",
        ),
        (
            with("connect_timeout", json!("0s")),
            "listeners[0].connect_timeout",
        ),
        (
            with("health", json!({ "kind": "http", "path": "no-slash" })),
            "listeners[0].health.path",
        ),
        (
            with("health", json!({ "kind": "tcp", "fall": 0 })),
            "listeners[0].health.fall",
        ),
        (
            json!({ "version": 6, "listeners": [base.clone(), base.clone()] }),
            "listeners[1].name",
        ),
        (
            json!({ "version": 6, "listeners": [base.clone(), base.clone().pipe(|mut l| { l["name"] = json!("other"); l })] }),
            "listeners[1].bind",
        ),
        (
            with("balance", json!("round_robin")).pipe(|mut v| {
                v["listeners"][0]["hash_key"] = json!("client_ip");
                v
            }),
            "listeners[0].hash_key",
        ),
        (
            with("protocol", json!("udp")).pipe(|mut v| {
                v["listeners"][0]["proxy_protocol"] = json!("v1");
                v
            }),
            "listeners[0].proxy_protocol",
        ),
    ];
    assert!(cases.len() >= 10);
    for (state, path) in &cases {
        let (code, body) = put(&sock, state);
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {body}");
        let paths: Vec<&str> = body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap())
            .collect();
        assert!(paths.contains(path), "expected {path} in {paths:?}");
        assert_eq!(
            call(&sock, Method::GET, "/v1/state", None).1,
            before,
            "state changed after a 422"
        );
    }
    // Stale and conflicting versions: 409 with the current version.
    let (code, body) = put(&sock, &json!({ "version": 4, "listeners": [] }));
    assert_eq!(
        (code, &body["current_version"]),
        (StatusCode::CONFLICT, &json!(5))
    );
    let (code, body) = put(&sock, &json!({ "version": 5, "listeners": [] }));
    assert_eq!(
        (code, &body["current_version"]),
        (StatusCode::CONFLICT, &json!(5))
    );
    // The same state again is idempotent.
    assert_eq!(put(&sock, &good).0, StatusCode::OK);
    // Oversized body: 413.
    let huge = vec![b' '; lb_core::admin::control::MAX_BODY + 1];
    assert_eq!(
        call(&sock, Method::PUT, "/v1/state", Some(huge)).0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // Unknown path: 404; wrong method: 405.
    assert_eq!(
        call(&sock, Method::GET, "/v2/nothing", None).0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&sock, Method::DELETE, "/v1/state", None).0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(call(&sock, Method::GET, "/healthz", None).0, StatusCode::OK);
    assert_eq!(call(&sock, Method::GET, "/readyz", None).0, StatusCode::OK);
    assert_eq!(call(&sock, Method::GET, "/v1/state", None).1, before);
    // The dynamic listener serves.
    assert_eq!(roundtrip(lbd.bound_addr("svc-a").unwrap()).unwrap(), b.name);
    let status = call(&sock, Method::GET, "/v1/status", None).1;
    assert_eq!(status["dynamic_version"], 5);
    assert_eq!(status["listeners"][0]["name"], "svc-a");
    let m = lbd.metrics_text();
    assert_eq!(metric(&m, "weir_dynamic_state_version"), Some(5.0), "{m}");
    assert!(
        metric(&m, "weir_api_applies_total{result=\"invalid\"}").unwrap() >= 13.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "weir_api_requests_total{code=\"404\",endpoint=\"other\"}"
        ) == Some(1.0),
        "{m}"
    );
}

/// A state that cannot be persisted is never in force: the PUT answers
/// 500, the new listener was never bound or published (the generation did
/// not move), and the state in force is the old one.
#[test]
fn a_state_that_cannot_be_persisted_is_never_applied() {
    let dir = Dir::new("persist");
    let b = TestBackend::start("127.0.0.2", Behavior::Echo);
    // A directory where the state's temporary file goes: writing the
    // state fails (even for root).
    std::fs::create_dir_all(dir.state().join(".state.json.tmp")).unwrap();
    let lbd = start_lbd(&admin(&dir), EngineChoice::Epoll);
    let sock = dir.socket();
    let generation = || metric(&lbd.metrics_text(), "weir_config_generation");
    let before = generation();
    let port = free_port("127.0.0.36");
    let state = json!({ "version": 3, "listeners": [listener("svc", &format!("127.0.0.36:{port}"), b.addr)] });
    let (code, body) = put(&sock, &state);
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("not persisted"),
        "{body}"
    );
    assert_eq!(generation(), before, "nothing was published");
    assert!(
        std::net::TcpStream::connect(("127.0.0.36", port)).is_err(),
        "the new listener is not bound"
    );
    assert_eq!(call(&sock, Method::GET, "/v1/state", None).1["version"], 0);
}

/// A version above 2^53 - 1 is refused (422 naming `version`): accepted,
/// it would hold every later state off with 409s, across restarts.
#[test]
fn versions_above_two_to_the_53_are_refused() {
    let dir = Dir::new("version");
    let _lbd = start_lbd(&admin(&dir), EngineChoice::Epoll);
    let sock = dir.socket();
    let (code, body) = put(
        &sock,
        &json!({ "version": 18446744073709551615u64, "listeners": [] }),
    );
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["errors"][0]["path"], "version", "{body}");
    let (code, body) = put(
        &sock,
        &json!({ "version": 9007199254740992u64, "listeners": [] }),
    );
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "2^53: {body}");
    let (code, body) = put(
        &sock,
        &json!({ "version": 9007199254740991u64, "listeners": [] }),
    );
    assert_eq!(code, StatusCode::OK, "2^53 - 1: {body}");
}

/// One lbd per state directory and per control socket: a second one fails
/// to start, says why, and leaves the first one's socket and state alone.
#[test]
fn a_second_lbd_cannot_take_the_state_dir_or_the_control_socket() {
    let dir = Dir::new("second");
    let first = start_lbd(&admin(&dir), EngineChoice::Epoll);
    let start = |config: &str| {
        let config = lb_config::parse_config(config).unwrap();
        lb_core::Server::start(
            &config,
            &lb_core::Options {
                engine: Some(EngineChoice::Epoll),
                workers: Some(1),
            },
        )
    };
    let err = start(&admin(&dir)).unwrap_err().to_string();
    assert!(err.contains("in use by another lbd"), "{err}");
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    // Same socket, its own state directory.
    let other = dir.0.join("other-state");
    let config = admin(&dir).replace(
        &format!("state_dir = \"{}\"", dir.state().display()),
        &format!("state_dir = \"{}\"", other.display()),
    );
    let err = start(&config).unwrap_err().to_string();
    assert!(err.contains("served by another running process"), "{err}");
    // The first one still answers on its socket.
    assert_eq!(
        call(&dir.socket(), Method::GET, "/readyz", None).0,
        StatusCode::OK
    );
    drop(first);
    // Gone: a new one takes both over (its stale socket file replaced).
    let _again = start(&admin(&dir)).expect("free once the first is gone");
}

/// A removed backend shows as draining while its connections run, and no
/// longer once the last one closed (not only at the next apply).
#[test]
fn a_drained_backend_stops_showing_as_draining() {
    let dir = Dir::new("drained");
    let b = TestBackend::start("127.0.0.2", Behavior::Echo);
    let c = TestBackend::start("127.0.0.3", Behavior::Echo);
    let lbd = start_lbd(&admin(&dir), EngineChoice::Epoll);
    let sock = dir.socket();
    let state = |version: u64, backends: &[SocketAddr]| {
        let list: Vec<Value> = backends
            .iter()
            .map(|a| json!({ "addr": a.to_string() }))
            .collect();
        json!({ "version": version, "listeners": [{ "name": "svc", "bind": "127.0.0.37:0", "balance": "round_robin", "backends": list, "health": { "kind": "none" } }] })
    };
    assert_eq!(put(&sock, &state(1, &[b.addr])).0, StatusCode::OK);
    let addr = lbd.bound_addr("svc").unwrap();
    let mut open = connect_from(None, addr).unwrap();
    let mut greeting = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(open.try_clone().unwrap()),
        &mut greeting,
    )
    .unwrap();
    assert_eq!(put(&sock, &state(2, &[c.addr])).0, StatusCode::OK);
    let draining = || {
        lbd.status().listeners[0]
            .backends
            .iter()
            .any(|x| x.addr == b.addr && x.draining)
    };
    assert!(draining(), "its connection is still open");
    std::io::Write::write_all(&mut open, b"x").unwrap();
    open.shutdown(std::net::Shutdown::Both).unwrap();
    drop(open);
    eventually(Duration::from_secs(5), "no longer draining", || !draining());
    let m = lbd.metrics_text();
    assert!(
        !m.lines()
            .any(|l| l.starts_with("weir_backend_draining") && l.ends_with(" 1")),
        "{m}"
    );
}

/// A state whose listener's port another process already holds with
/// SO_REUSEPORT (it would get a share of the connections) is refused with
/// a 422 naming the field and the holder; a reload of such a file too.
#[test]
fn a_port_held_by_another_socket_is_refused() {
    let dir = Dir::new("shared");
    let b = TestBackend::start("127.0.0.2", Behavior::Echo);
    let lbd = start_lbd(&admin(&dir), EngineChoice::Epoll);
    let foreign = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    foreign.set_reuse_port(true).unwrap();
    foreign
        .bind(&"127.0.0.46:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    foreign.listen(16).unwrap();
    let held = foreign.local_addr().unwrap().as_socket().unwrap();
    let (code, body) = put(
        &dir.socket(),
        &json!({ "version": 1, "listeners": [listener("svc", &held.to_string(), b.addr)] }),
    );
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["errors"][0]["path"], "listeners[0].bind", "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("already served by"), "{message}");
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    assert!(
        std::net::TcpStream::connect(held).is_ok(),
        "the foreign socket keeps its port"
    );
    // The same listener in the file: a rejected reload.
    let file = format!(
        "{}{}",
        admin(&dir),
        listener_toml("svc", &held.to_string(), "", &[b.addr], "kind = \"none\"")
    );
    let err = lbd
        .reload(&lb_config::parse_config(&file).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("already served by"), "{err}");
    // A wildcard on the same port overlaps it too.
    let wildcard = format!("0.0.0.0:{}", held.port());
    let (code, body) = put(
        &dir.socket(),
        &json!({ "version": 1, "listeners": [listener("svc", &wildcard, b.addr)] }),
    );
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
}

#[test]
fn control_socket_group_gives_mode_0660() {
    let dir = Dir::new("group");
    // By number, and by name through the system's group database (the
    // group of gid 0 is named "root" on every Linux).
    for group in ["0", "root"] {
        let config = admin(&dir).replace(
            "state_dir",
            &format!("control_socket_group = \"{group}\"\nstate_dir"),
        );
        let lbd = start_lbd(&config, EngineChoice::Epoll);
        let meta = std::fs::metadata(dir.socket()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660, "{group}");
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 0, "{group}");
        drop(lbd);
    }
    let config = admin(&dir).replace(
        "state_dir",
        "control_socket_group = \"no-such-group-weir\"\nstate_dir",
    );
    let config = lb_config::parse_config(&config).unwrap();
    let err = lb_core::Server::start(
        &config,
        &lb_core::Options {
            engine: Some(EngineChoice::Epoll),
            workers: Some(1),
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("no-such-group-weir"), "{err}");
}

#[test]
fn static_and_dynamic_collisions_name_both_sides() {
    let dir = Dir::new("collide");
    let b = TestBackend::start("127.0.0.2", Behavior::Echo);
    let port = free_port("127.0.0.33");
    let file_listener = listener_toml(
        "web",
        &format!("127.0.0.33:{port}"),
        "",
        &[b.addr],
        "kind = \"none\"",
    );
    let lbd = start_lbd(
        &format!("{}{file_listener}", admin(&dir)),
        EngineChoice::Epoll,
    );
    let sock = dir.socket();
    let (code, body) = put(
        &sock,
        &json!({ "version": 1, "listeners": [listener("web", "127.0.0.34:80", b.addr)] }),
    );
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    let msg = body["errors"][0]["message"].as_str().unwrap();
    assert_eq!(body["errors"][0]["path"], "listeners[0].name");
    assert!(msg.contains("static listener[0]"), "{msg}");
    let (code, body) = put(
        &sock,
        &json!({ "version": 1, "listeners": [listener("api", &format!("127.0.0.33:{port}"), b.addr)] }),
    );
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["errors"][0]["path"], "listeners[0].bind");
    // A file reload that collides with a dynamic listener is rejected.
    assert_eq!(
        put(
            &sock,
            &json!({ "version": 2, "listeners": [listener("api", "127.0.0.35:0", b.addr)] })
        )
        .0,
        StatusCode::OK
    );
    let clash = format!(
        "{}{file_listener}{}",
        admin(&dir),
        listener_toml("api", "127.0.0.36:0", "", &[b.addr], "kind = \"none\"")
    );
    let err = lbd
        .reload(&lb_config::parse_config(&clash).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("listener[1].name") && err.contains("dynamic listeners[0]"),
        "{err}"
    );
    // Both kinds serve together.
    assert_eq!(roundtrip(lbd.bound_addr("web").unwrap()).unwrap(), b.name);
    assert_eq!(roundtrip(lbd.bound_addr("api").unwrap()).unwrap(), b.name);
}

fn apply_under_load(engine: EngineChoice) {
    let dir = Dir::new(&format!("load-{engine:?}"));
    let backends = three_echo_backends();
    let lbd = start_lbd(&admin(&dir), engine);
    let sock = dir.socket();
    let bind = format!("127.0.0.37:{}", free_port("127.0.0.37"));
    let addr: SocketAddr = bind.parse().unwrap();
    // Its own address per engine (the two run at once in this process, and
    // lbd shares a port with no other socket).
    let extra_ip = match engine {
        EngineChoice::IoUring => "127.0.0.47",
        _ => "127.0.0.38",
    };
    let state = |v: u64, set: &[&TestBackend]| {
        let list: Vec<Value> = set
            .iter()
            .map(|b| json!({ "addr": b.addr.to_string() }))
            .collect();
        json!({ "version": v, "listeners": [{ "name": "svc", "bind": bind, "balance": "round_robin", "backends": list, "health": { "kind": "none" } },
                                              { "name": format!("extra-{}", v % 2), "bind": format!("{extra_ip}:{}", 40000 + v % 2), "backends": list }] })
    };
    assert_eq!(
        put(
            &sock,
            &state(1, &[&backends[0], &backends[1], &backends[2]])
        )
        .0,
        StatusCode::OK
    );
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let client = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                match roundtrip(addr) {
                    Ok(_) => {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        })
    };
    let sets: [Vec<&TestBackend>; 3] = [
        vec![&backends[0], &backends[1]],
        vec![&backends[1], &backends[2]],
        backends.iter().collect(),
    ];
    for v in 2..32u64 {
        let before = done.load(Ordering::SeqCst);
        let (code, body) = put(&sock, &state(v, &sets[v as usize % 3]));
        assert_eq!(code, StatusCode::OK, "{body}");
        eventually(Duration::from_secs(10), "clients progress", || {
            done.load(Ordering::SeqCst) > before + 3
        });
    }
    stop.store(true, Ordering::SeqCst);
    let failures = client.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    drop(lbd);
}

#[test]
fn apply_under_load_epoll() {
    apply_under_load(EngineChoice::Epoll);
}

#[test]
fn apply_under_load_io_uring() {
    apply_under_load(EngineChoice::IoUring);
}

#[test]
fn restart_serves_persisted_state_and_survives_a_corrupt_file() {
    let dir = Dir::new("restart");
    let b = TestBackend::start("127.0.0.2", Behavior::Echo);
    let dyn_bind = format!("127.0.0.39:{}", free_port("127.0.0.39"));
    let static_bind = format!("127.0.0.40:{}", free_port("127.0.0.40"));
    let config = format!(
        "{}{}",
        admin(&dir),
        listener_toml("static", &static_bind, "", &[b.addr], "kind = \"none\"")
    );
    let lbd = start_lbd(&config, EngineChoice::Epoll);
    assert_eq!(
        put(
            &dir.socket(),
            &json!({ "version": 9, "listeners": [listener("dyn", &dyn_bind, b.addr)] })
        )
        .0,
        StatusCode::OK
    );
    assert!(dir.state().join("state.json").exists());
    lbd.shutdown(Some(Duration::from_millis(100)));

    // Restart: the dynamic listener serves before anything is applied.
    let lbd = start_lbd(&config, EngineChoice::Epoll);
    assert_eq!(roundtrip(dyn_bind.parse().unwrap()).unwrap(), b.name);
    assert_eq!(
        call(&dir.socket(), Method::GET, "/v1/state", None).1["version"],
        9
    );
    lbd.shutdown(Some(Duration::from_millis(100)));

    // Corrupt file: moved aside (kept), static listeners serve, ready.
    std::fs::write(
        dir.state().join("state.json"),
        b"{\"version\": 10, \"listeners\": [",
    )
    .unwrap();
    let lbd = start_lbd(&config, EngineChoice::Epoll);
    assert_eq!(roundtrip(static_bind.parse().unwrap()).unwrap(), b.name);
    assert!(std::net::TcpStream::connect(dyn_bind.parse::<SocketAddr>().unwrap()).is_err());
    assert_eq!(
        call(&dir.socket(), Method::GET, "/readyz", None).0,
        StatusCode::OK
    );
    assert_eq!(
        call(&dir.socket(), Method::GET, "/v1/state", None).1["version"],
        0
    );
    let aside: Vec<_> = std::fs::read_dir(dir.state())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.bad-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the corrupt file is kept aside");
    assert_eq!(
        std::fs::read(aside[0].path()).unwrap(),
        b"{\"version\": 10, \"listeners\": ["
    );
    drop(lbd);
}

#[test]
fn lbd_status_and_apply_commands() {
    let dir = Dir::new("cli");
    let b = TestBackend::start("127.0.0.2", Behavior::Echo);
    let file = dir.0.join("lbd.toml");
    std::fs::write(
        &file,
        format!(
            "{}{}",
            admin(&dir),
            listener_toml(
                "static",
                "127.0.0.41:0",
                "",
                &[b.addr],
                "kind = \"tcp\"\ninterval = \"200ms\""
            )
        ),
    )
    .unwrap();
    let lbd_bin = env!("CARGO_BIN_EXE_lbd");
    let mut child = std::process::Command::new(lbd_bin)
        .args(["run", "--config"])
        .arg(&file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "control socket", || {
        dir.socket().exists()
    });
    let run = |args: &[&str]| {
        let out = std::process::Command::new(lbd_bin)
            .args(args)
            .arg("--socket")
            .arg(dir.socket())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let state = dir.0.join("state.toml");
    let dyn_bind = format!("127.0.0.42:{}", free_port("127.0.0.42"));
    std::fs::write(&state, format!("version = 3\n\n[[listener]]\nname = \"svc/web:80\"\nbind = \"{dyn_bind}\"\nbackends = [{{ addr = \"{}\" }}]\n", b.addr)).unwrap();
    let (code, out, err) = run(&["apply", state.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("applied version 3"), "{out}");
    assert_eq!(roundtrip(dyn_bind.parse().unwrap()).unwrap(), b.name);

    let bad = dir.0.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"version": 4, "listeners": [{"name": "x", "bind": "nowhere"}]}"#,
    )
    .unwrap();
    let (code, _, err) = run(&["apply", bad.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("listeners[0].bind"), "{err}");
    let (code, _, err) = run(&["apply", state.to_str().unwrap()]);
    assert_eq!(code, Some(0), "same state again is fine: {err}");
    std::fs::write(&state, "version = 1\n").unwrap();
    let (code, _, err) = run(&["apply", state.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("runs version 3"), "{err}");

    eventually(Duration::from_secs(10), "health visible", || {
        run(&["status"]).1.contains(" up ")
    });
    let (code, out, _) = run(&["status"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("dynamic state version 3"), "{out}");
    assert!(
        out.contains("static") && out.contains("svc/web:80") && out.contains(&b.addr.to_string()),
        "{out}"
    );
    let (code, out, _) = run(&["status", "--output", "json"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["listeners"].as_array().unwrap().len(), 2);
    let _ = child.kill();
    let _ = child.wait();
}

struct Pki {
    dir: Dir,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 and a client certificate
    /// signed by it, and an unrelated CA; written as PEM files.
    fn new(tag: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
        let dir = Dir::new(tag);
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&server_key, &ca, &ca_key)
            .unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(vec!["lb-controller".to_owned()]).unwrap();
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();
        let other_key = KeyPair::generate().unwrap();
        let mut other_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        other_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other = other_params.self_signed(&other_key).unwrap();
        for (name, pem) in [
            ("ca.pem", ca.pem()),
            ("server.pem", server.pem()),
            ("server.key", server_key.serialize_pem()),
            ("client.pem", client.pem()),
            ("client.key", client_key.serialize_pem()),
            ("other-ca.pem", other.pem()),
            ("token", "  s3cret-token\n".to_owned()),
            ("wrong-token", "guess".to_owned()),
        ] {
            std::fs::write(dir.0.join(name), pem).unwrap();
            // Secrets as an operator keeps them (lbd refuses a token file
            // that everyone can read).
            std::fs::set_permissions(dir.0.join(name), std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    fn config(&self, client_ca: bool) -> String {
        let ca = if client_ca {
            format!("client_ca = \"{}\"\n", self.path("ca.pem").display())
        } else {
            String::new()
        };
        format!(
            "[admin]\nmetrics = \"off\"\ncontrol_socket = \"off\"\ncontrol_tcp = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntoken_file = \"{}\"\n{ca}state_dir = \"{}\"\n",
            self.path("server.pem").display(),
            self.path("server.key").display(),
            self.path("token").display(),
            self.dir.0.join("state").display()
        )
    }

    fn target(&self, url: &str, token: &str, ca: &str, identity: bool) -> lb_api::client::Target {
        let (cert, key) = (self.path("client.pem"), self.path("client.key"));
        let tls = lb_api::tls::client_config(
            &self.path(ca),
            identity.then_some((cert.as_path(), key.as_path())),
        )
        .unwrap();
        lb_api::client::Target::Https {
            url: url.to_owned(),
            token: token.to_owned(),
            tls,
        }
    }
}

fn send(target: &lb_api::client::Target, path: &str) -> Result<(StatusCode, Value), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(lb_api::client::send(target, Method::GET, path, None))
        .map(|(c, b)| (c, serde_json::from_slice(&b).unwrap_or(Value::Null)))
        .map_err(|e| e.to_string())
}

#[test]
fn tls_control_api_needs_the_token_and_a_trusted_ca() {
    let pki = Pki::new("tls");
    let lbd = start_lbd(&pki.config(false), EngineChoice::Epoll);
    let url = format!("https://{}", lbd.control_tcp_addr().unwrap());
    let ok = send(
        &pki.target(&url, "s3cret-token", "ca.pem", false),
        "/v1/state",
    )
    .unwrap();
    assert_eq!(ok.0, StatusCode::OK, "{ok:?}");
    assert_eq!(ok.1["version"], 0);
    for token in ["", "guess", "s3cret-tokenx", "s3cret"] {
        let (code, body) = send(&pki.target(&url, token, "ca.pem", false), "/v1/state").unwrap();
        assert_eq!(code, StatusCode::UNAUTHORIZED, "token {token:?}");
        assert_eq!(body, json!({ "error": "unauthorized" }), "no detail");
    }
    let untrusted = send(
        &pki.target(&url, "s3cret-token", "other-ca.pem", false),
        "/v1/state",
    );
    assert!(
        untrusted.is_err(),
        "a server certificate from an unknown CA must be refused: {untrusted:?}"
    );
    // The CLI over TLS.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lbd"))
        .args(["status", "--url", &url, "--output", "json", "--token-file"])
        .arg(pki.path("token"))
        .arg("--ca")
        .arg(pki.path("ca.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"engine\""));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lbd"))
        .args(["status", "--url", &url, "--token-file"])
        .arg(pki.path("wrong-token"))
        .arg("--ca")
        .arg(pki.path("ca.pem"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

#[test]
fn mutual_tls_when_client_ca_is_set() {
    let pki = Pki::new("mtls");
    let lbd = start_lbd(&pki.config(true), EngineChoice::Epoll);
    let url = format!("https://{}", lbd.control_tcp_addr().unwrap());
    let anonymous = send(
        &pki.target(&url, "s3cret-token", "ca.pem", false),
        "/v1/status",
    );
    assert!(
        anonymous.is_err(),
        "a client without a certificate must be refused: {anonymous:?}"
    );
    let (code, body) = send(
        &pki.target(&url, "s3cret-token", "ca.pem", true),
        "/v1/status",
    )
    .unwrap();
    assert_eq!(code, StatusCode::OK, "{body}");
    let (code, _) = send(&pki.target(&url, "nope", "ca.pem", true), "/v1/status").unwrap();
    assert_eq!(
        code,
        StatusCode::UNAUTHORIZED,
        "a certificate does not replace the token"
    );
}

#[test]
fn unusable_tls_material_fails_the_start() {
    let pki = Pki::new("badtls");
    std::fs::write(pki.path("server.key"), "not a key").unwrap();
    let config = lb_config::parse_config(&pki.config(false)).unwrap();
    let err = lb_core::Server::start(
        &config,
        &lb_core::Options {
            engine: Some(EngineChoice::Epoll),
            workers: Some(1),
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("admin.tls_key"), "{err}");
}

/// Holds connections to `addr` from many source addresses (127.0.1.1 and
/// up, `per_source` each): half idle, half trickling `bytes` one at a time
/// every 100 ms, until dropped. Connections the server refuses are simply
/// not held.
struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Flood {
    fn tcp(addr: SocketAddr, total: usize, per_source: usize, bytes: &'static [u8]) -> Self {
        let mut held = Vec::with_capacity(total);
        for i in 0..total {
            let ip: std::net::IpAddr = format!("127.0.1.{}", 1 + i / per_source).parse().unwrap();
            if let Ok(s) = connect_from(Some(ip), addr) {
                held.push(s);
            }
        }
        Self::hold(held, bytes)
    }

    fn unix(path: &Path, total: usize, bytes: &'static [u8]) -> Self {
        let held = (0..total)
            .filter_map(|_| std::os::unix::net::UnixStream::connect(path).ok())
            .collect();
        Self::hold(held, bytes)
    }

    fn hold<S: std::io::Write + Send + 'static>(mut held: Vec<S>, bytes: &'static [u8]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let opened = held.len();
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                let mut sent = 0;
                while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                    if let Some(&b) = bytes.get(sent) {
                        for s in held.iter_mut().step_by(2) {
                            let _ = s.write_all(&[b]);
                        }
                        sent += 1;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                opened
            })
        };
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops; how many connections were opened.
    fn end(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Times `f` ten times; every call must succeed within 1 s.
fn served_promptly<T, E: std::fmt::Debug>(what: &str, mut f: impl FnMut() -> Result<T, E>) {
    for i in 0..10 {
        let started = std::time::Instant::now();
        let result = f();
        let took = started.elapsed();
        assert!(result.is_ok(), "{what} #{i}: {:?}", result.err());
        assert!(took < Duration::from_secs(1), "{what} #{i} took {took:?}");
    }
}

/// 1,000 connections that never finish their TLS handshake (half idle,
/// half trickling a record they never complete), from 50 addresses, do
/// not keep an authorised client out: its requests are served within 1 s.
#[test]
fn unauthenticated_connections_cannot_block_the_tls_control_api() {
    let pki = Pki::new("flood");
    let lbd = start_lbd(&pki.config(false), EngineChoice::Epoll);
    let addr = lbd.control_tcp_addr().unwrap();
    let url = format!("https://{addr}");
    // A TLS handshake record header announcing 16,000 bytes, then a trickle.
    let flood = Flood::tcp(
        addr,
        1000,
        20,
        b"\x16\x03\x01\x3e\x80\x01\x00\x3e\x7c\x03\x03aaaaaaaaaaaaaaa",
    );
    let target = pki.target(&url, "s3cret-token", "ca.pem", false);
    served_promptly("GET /v1/status over TLS", || send(&target, "/v1/status"));
    let opened = flood.end();
    assert!(opened >= 500, "the flood opened only {opened} connections");
}

/// The TLS control port's accept queue is the kernel's largest, not the
/// 128 `TcpListener::bind` asks for: `lb-bench chaos` saw 1,000 hostile
/// clients connecting at once fill 128, and an authorised client's connect
/// wait a second for its SYN to be sent again. (`ss` shows a listener's
/// queue size as its Send-Q.)
#[test]
fn the_tls_control_port_has_a_deep_accept_queue() {
    let pki = Pki::new("backlog");
    let lbd = start_lbd(&pki.config(false), EngineChoice::Epoll);
    let port = lbd.control_tcp_addr().unwrap().port();
    let Ok(out) = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
    else {
        eprintln!("SKIPPED: ss (iproute2) is not installed");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let queue: u32 = text
        .split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no listener on port {port} in ss's output: {text:?}"));
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(queue, somaxconn.min(4096), "{text}");
}

/// Idle connections and PUTs whose bodies trickle in, on the unix socket,
/// neither keep `GET /v1/status` waiting nor block a prompt PUT.
#[test]
fn slow_clients_cannot_block_the_control_socket() {
    let dir = Dir::new("slow");
    let _lbd = start_lbd(&admin(&dir), EngineChoice::Epoll);
    let sock = dir.socket();
    let idle = Flood::unix(&sock, 100, b"");
    let head = b"PUT /v1/state HTTP/1.1\r\nHost: lbd\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"version\": 1,";
    let mut slow = Vec::new();
    for _ in 0..40 {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        std::io::Write::write_all(&mut s, &head[..]).unwrap();
        slow.push(s);
    }
    let slow = Flood::hold(slow, b"                    ");
    served_promptly("GET /v1/status", || {
        let (code, body) = call(&sock, Method::GET, "/v1/status", None);
        (code == StatusCode::OK).then_some(()).ok_or(body)
    });
    let mut version = 0;
    served_promptly("PUT /v1/state", || {
        version += 1;
        let (code, body) = put(&sock, &json!({ "version": version, "listeners": [] }));
        (code == StatusCode::OK).then_some(()).ok_or(body)
    });
    idle.end();
    slow.end();
}
