//! Health checks of backends that require the PROXY protocol on every
//! connection: real nginx (`listen ... proxy_protocol`) and HAProxy
//! (`bind ... accept-proxy`) backends, started by the test on loopback.
//! With the listener's `proxy_protocol`, checks of the backend's own port
//! send a header first (v1 `PROXY UNKNOWN`, v2 `LOCAL`) and pass; without
//! it, the backends refuse every check (the control case that shows the
//! test can fail).
//!
//! nginx and HAProxy come from Debian (`.ci/run` installs them); where one
//! is missing the test says so and skips it.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use lb_config::EngineChoice;

struct Backend {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn have(program: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| std::path::Path::new(d).join(program).exists())
}

fn work_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("weir-hproxy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An nginx that answers `GET /healthz` with 200, only after a PROXY header.
fn nginx(ip: &str) -> Backend {
    let addr: SocketAddr = format!("{ip}:{}", free_port(ip)).parse().unwrap();
    let dir = work_dir(&format!("nginx-{ip}"));
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n\
         server {{\n    listen {addr} proxy_protocol;\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx starts");
    wait_listening(addr);
    Backend { child, dir, addr }
}

/// A HAProxy that answers every HTTP request with 200, only after a PROXY
/// header.
fn haproxy(ip: &str) -> Backend {
    let addr: SocketAddr = format!("{ip}:{}", free_port(ip)).parse().unwrap();
    let dir = work_dir(&format!("haproxy-{ip}"));
    let conf = format!(
        "global\n  maxconn 64\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n\
         frontend health\n  bind {addr} accept-proxy\n  http-request return status 200 content-type text/plain string ok\n"
    );
    std::fs::write(dir.join("haproxy.cfg"), conf).unwrap();
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(dir.join("haproxy.cfg"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy starts");
    wait_listening(addr);
    Backend { child, dir, addr }
}

fn wait_listening(addr: SocketAddr) {
    eventually(Duration::from_secs(10), "the backend listens", || {
        std::net::TcpStream::connect(addr).is_ok()
    });
}

/// One HTTP request through `addr`; the status code.
fn get(addr: SocketAddr) -> Option<u16> {
    let mut s = connect_from(None, addr).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    reply.split_whitespace().nth(1)?.parse().ok()
}

/// Checks through lbd of `backend` with the listener's `proxy` and the
/// health table's `extra` lines: once some checks have run, whether they
/// all passed (and the backend is up), or all failed (and it is down).
fn checks_pass(backend: &Backend, proxy: &str, extra: &str) -> bool {
    let health = format!("kind = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n{extra}");
    let toml = format!(
        "[admin]\nmetrics = \"off\"\ncontrol_socket = \"off\"\n{}",
        listener_toml(
            "web",
            "127.0.0.1:0",
            &format!("proxy_protocol = \"{proxy}\""),
            &[backend.addr],
            &health
        )
    );
    let lbd = start_lbd_workers(&toml, EngineChoice::Epoll, 1);
    let series = |result: &str| {
        format!(
            "weir_health_checks_total{{kind=\"http\",result=\"{result}\",target=\"{}\"}}",
            backend.addr
        )
    };
    let count = |result: &str| metric(&lbd.metrics_text(), &series(result)).unwrap_or(0.0);
    eventually(Duration::from_secs(10), "three checks ran", || {
        count("ok") + count("fail") >= 3.0
    });
    let (ok, fail) = (count("ok"), count("fail"));
    let healthy = backend_healthy(&lbd, "web", backend.addr);
    assert!(
        (ok > 0.0) != (fail > 0.0),
        "checks both passed ({ok}) and failed ({fail})"
    );
    if ok > 0.0 {
        assert_eq!(healthy, Some(true));
        // Traffic, too, carries the header the backend requires.
        assert_eq!(get(lbd.bound_addr("web").unwrap()), Some(200));
    } else {
        assert_eq!(healthy, Some(false));
    }
    ok > 0.0
}

fn both_versions(name: &str, start: fn(&str) -> Backend, ip: &str) {
    if !have(name) {
        eprintln!("SKIPPED: {name} is not installed (apt-get install {name}); .ci/run installs it");
        return;
    }
    let backend = start(ip);
    for version in ["v1", "v2"] {
        assert!(
            checks_pass(&backend, version, ""),
            "{name}: {version} checks of the backend's own port must send the header"
        );
        assert!(
            !checks_pass(&backend, version, "send_proxy = false"),
            "{name}: checks without the header must fail (the backend requires it)"
        );
    }
}

#[test]
fn nginx_with_proxy_protocol_passes_checks() {
    both_versions("nginx", nginx, "127.0.0.43");
}

#[test]
fn haproxy_with_accept_proxy_passes_checks() {
    both_versions("haproxy", haproxy, "127.0.0.44");
}
