//! `lbd demo`: the quickstart. Three HTTP backends on 127.0.0.2-4 that name
//! themselves, and an embedded configuration that balances over them
//! round robin with HTTP health checks, so repeated `curl`s show the
//! balancing. Everything stays on loopback; Ctrl-C stops it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use lb_config::{Config, ConfigErrors};
use lb_core::server::StartError;
use lb_core::{Options, Server};
use tokio::net::TcpListener;

use super::run::{serve_until_stopped, Signals};
use crate::EngineArg;

/// The embedded configuration; `{listen}`, `{metrics}`, `{backends}` and
/// `{run_dir}` (control socket and state, in a private temporary directory)
/// are filled in at start.
pub const TEMPLATE: &str = r#"
[runtime]
workers = 0
engine = "auto"

[admin]
metrics = "{metrics}"
control_socket = "{run_dir}/control.sock"
state_dir = "{run_dir}"

[[listener]]
name = "demo"
bind = "{listen}"
balance = "round_robin"
backends = [{backends}]
[listener.health]
kind = "http"
path = "/healthz"
interval = "1s"
timeout = "500ms"
rise = 1
fall = 2
"#;

/// Renders and parses the demo configuration.
pub fn config(
    listen: SocketAddr,
    metrics: SocketAddr,
    backends: &[SocketAddr],
    run_dir: &std::path::Path,
) -> Result<Config, ConfigErrors> {
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ addr = \"{b}\" }}"))
        .collect();
    let text = TEMPLATE
        .replace("{listen}", &listen.to_string())
        .replace("{metrics}", &metrics.to_string())
        .replace("{backends}", &list.join(", "))
        .replace("{run_dir}", &run_dir.display().to_string());
    lb_config::parse_config(&text)
}

/// Starts `count` named HTTP backends on 127.0.0.2, 127.0.0.3, ... (ephemeral
/// ports) on their own thread; they live as long as the process.
pub fn start_backends(count: usize) -> std::io::Result<Vec<SocketAddr>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut addrs = Vec::with_capacity(count);
    let mut listeners = Vec::with_capacity(count);
    for i in 0..count {
        let ip = std::net::Ipv4Addr::new(127, 0, 0, 2 + i as u8);
        let std_listener = std::net::TcpListener::bind((ip, 0))?;
        std_listener.set_nonblocking(true)?;
        addrs.push(std_listener.local_addr()?);
        listeners.push(std_listener);
    }
    let named: Vec<(String, std::net::TcpListener)> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| (format!("backend-{} at {}", i + 1, addrs[i]), l))
        .collect();
    std::thread::Builder::new()
        .name("lbd-demo-backends".into())
        .spawn(move || {
            rt.block_on(async move {
                for (name, l) in named {
                    let Ok(listener) = TcpListener::from_std(l) else {
                        continue;
                    };
                    tokio::spawn(serve_named(name, listener));
                }
                std::future::pending::<()>().await;
            });
        })?;
    Ok(addrs)
}

async fn serve_named(name: String, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let name = name.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let body = if req.uri().path() == "/healthz" {
                        "ok\n".to_owned()
                    } else {
                        format!("Hello from weir demo {name}\n")
                    };
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(StatusCode::OK)
                                .header("content-type", "text/plain")
                                .body(Full::new(Bytes::from(body)))
                                .expect("static response"),
                        )
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Where the demo listens and serves metrics when not told: these ports,
/// or the next free ones.
pub const LISTEN: &str = "127.0.0.1:8080";
/// See [`LISTEN`].
pub const METRICS: &str = "127.0.0.1:9600";
/// How many ports after the default the demo tries before giving up.
const TRIES: u16 = 20;

/// Runs the demo until Ctrl-C, on `listen` and `metrics`, or where not
/// given on [`LISTEN`] and [`METRICS`] or the first free ports after them
/// (another demo or service may hold them; the banner says which). A
/// given address is used as is: if it is taken, the error says by whom.
pub fn demo(
    listen: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    engine: Option<EngineArg>,
) -> anyhow::Result<()> {
    let backends = start_backends(3).context("cannot start the demo backends on 127.0.0.2-4")?;
    // Removed however the demo ends, a failed start included.
    let run_dir = RunDir(std::env::temp_dir().join(format!("lbd-demo-{}", std::process::id())));
    let options = Options {
        engine: engine.map(Into::into),
        workers: None,
    };
    // Free ports are found before lbd starts, so a failed attempt neither
    // logs a listener it then drops nor blames the wrong port.
    let (listen_default, metrics_default) = (default(LISTEN), default(METRICS));
    let picked_listen = listen.is_none();
    let picked_metrics = metrics.is_none();
    // Each picked port also avoids the other's (`--listen 127.0.0.1:9600`
    // moves the metrics, not the other way round).
    let listen = listen.map_or_else(|| first_free(listen_default, metrics, "--listen"), Ok)?;
    let metrics = metrics.map_or_else(
        || first_free(metrics_default, Some(listen), "--metrics"),
        Ok,
    )?;
    let config = config(listen, metrics, &backends, &run_dir.0)
        .map_err(|e| anyhow::anyhow!("demo config:\n{e}"))?;
    let server = match Server::start(&config, &options) {
        Ok(server) => server,
        Err(StartError::Io {
            what: "admin.metrics bind",
            error,
        }) => anyhow::bail!("cannot start the demo: --metrics {metrics}: {error}"),
        Err(e) => return Err(anyhow::Error::from(e).context("cannot start the demo")),
    };
    for (picked, default, used, what) in [
        (picked_listen, listen_default, listen, "listens"),
        (picked_metrics, metrics_default, metrics, "serves metrics"),
    ] {
        if picked && used != default {
            println!();
            println!("{default} is in use (another demo?): this demo {what} on {used}.");
        }
    }
    let signals = Signals::register(&server)?;
    let url = format!("http://{}/", server.bound_addr("demo").unwrap_or(listen));
    println!();
    println!(
        "Weir demo: lbd ({} engine, {} workers) balancing round robin over 3 backends:",
        server.engine().name(),
        server.status().workers
    );
    for b in &backends {
        println!("  backend  http://{b}/");
    }
    println!();
    println!("  try:     for i in 1 2 3 4 5 6; do curl -s {url}; done");
    if let Some(m) = server.admin_addr() {
        println!("  metrics: curl -s http://{m}/metrics | grep weir_");
    }
    println!(
        "  status:  {} status --socket {}",
        self_command(),
        run_dir.0.join("control.sock").display()
    );
    println!();
    println!("Ctrl-C to stop.");
    serve_until_stopped(server, signals, None)
}

fn default(text: &str) -> SocketAddr {
    text.parse().expect("a valid default address")
}

/// `from`, or the first of the [`TRIES`] - 1 ports after it that no
/// socket listens on now (a plain bind succeeds: it fails on a port that
/// another process serves, with `SO_REUSEPORT` or not) and that is not
/// `besides` (the demo's other address).
fn first_free(
    from: SocketAddr,
    besides: Option<SocketAddr>,
    option: &str,
) -> anyhow::Result<SocketAddr> {
    (0..TRIES)
        .map(|i| SocketAddr::new(from.ip(), from.port() + i))
        .filter(|a| besides.is_none_or(|b| b.port() != a.port()))
        .find(|a| std::net::TcpListener::bind(a).is_ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot start the demo: {from} and the {} ports after it are in use; choose an address with {option}",
                TRIES - 1
            )
        })
}

/// How to run this `lbd` again: `lbd` when that is the one on `PATH`,
/// else its full path (`cargo run` leaves it in `target/`).
fn self_command() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "lbd".into();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            dir.join("lbd")
                .canonicalize()
                .is_ok_and(|found| exe.canonicalize().is_ok_and(|me| me == found))
        })
    });
    if on_path {
        "lbd".into()
    } else {
        exe.display().to_string()
    }
}

/// The demo's private directory (control socket, state), removed on drop.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_picked_port_is_free_and_not_the_other_address() {
        let probe = std::net::TcpListener::bind("127.0.0.31:0").unwrap();
        let free = probe.local_addr().unwrap();
        drop(probe);
        assert_eq!(first_free(free, None, "--listen").unwrap(), free);
        // The other address's port is skipped, even though it is free.
        let picked = first_free(free, Some(free), "--metrics").unwrap();
        assert!(picked.port() > free.port(), "{picked}");
        // A port something listens on is skipped.
        let held = std::net::TcpListener::bind("127.0.0.31:0").unwrap();
        let taken = held.local_addr().unwrap();
        assert_ne!(first_free(taken, None, "--listen").unwrap(), taken);
    }
}
