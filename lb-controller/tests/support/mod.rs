//! Shared test helpers: the in-test API server (from the library's
//! `test-support` feature), object builders, and the real `lb-controller`
//! and `lbd` processes.

#![allow(dead_code)]

pub mod deploy;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[allow(unused_imports)]
pub use lb_controller::test_apiserver::{
    self as apiserver, lb_service, node, ApiServer, EVENTS, LEASES, NODES, SERVICES, SLICES,
};

pub const CONTROLLER: &str = env!("CARGO_BIN_EXE_lb-controller");

/// A fresh directory for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("weir-ctl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Polls `cond` until it holds or `within` passes.
pub async fn eventually<T>(within: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `status.loadBalancer.ingress[*].ip` of a stored Service.
pub fn ingress_ips(svc: &Value) -> Vec<String> {
    svc["status"]["loadBalancer"]["ingress"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["ip"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Events about `name` with `reason`.
pub fn events_for(api: &ApiServer, name: &str, reason: &str) -> Vec<Value> {
    api.list(EVENTS)
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name && e["reason"] == reason)
        .collect()
}

/// Waits (20 s at most) for an Event about `name` with `reason`; the
/// note of the first.
pub async fn event_note(api: &ApiServer, name: &str, reason: &str) -> String {
    let event = eventually(
        Duration::from_secs(20),
        &format!("a {reason} Event about {name}"),
        || events_for(api, name, reason).into_iter().next(),
    )
    .await;
    event["note"].as_str().unwrap_or_default().to_owned()
}

/// The RBAC rules `deploy/kubernetes/lb-controller.yaml` grants the controller.
pub fn manifest_rules() -> Vec<apiserver::Rule> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/lb-controller.yaml"
    );
    let docs: Vec<Value> =
        serde_saphyr::from_str_multiple(&std::fs::read_to_string(path).unwrap()).unwrap();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for doc in docs {
        let namespace = match doc["kind"].as_str() {
            Some("ClusterRole") => None,
            Some("Role") => doc["metadata"]["namespace"].as_str().map(str::to_owned),
            _ => continue,
        };
        for rule in doc["rules"].as_array().into_iter().flatten() {
            out.push(apiserver::Rule {
                groups: strings(&rule["apiGroups"]),
                resources: strings(&rule["resources"]),
                verbs: strings(&rule["verbs"]),
                names: strings(&rule["resourceNames"]),
                namespace: namespace.clone(),
            });
        }
    }
    assert!(!out.is_empty(), "no RBAC rules found in {path}");
    out
}

/// Writes a controller config.
pub fn controller_config(dir: &Path, kubeconfig: &Path, extra: &str) -> PathBuf {
    let path = dir.join(format!("controller-{}.toml", rand_suffix()));
    let admin = if extra.contains("[admin]") {
        ""
    } else {
        "[admin]\nmetrics = \"off\"\n"
    };
    let text = format!(
        "[kubernetes]\nkubeconfig = \"{}\"\ndefault_class = true\n\n{admin}\n[publish]\ndebounce = \"50ms\"\nbackoff_max = \"1s\"\ntimeout = \"3s\"\n\n{extra}\n",
        kubeconfig.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A child process killed on drop; its stderr goes to a file shown on failure.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdout(Stdio::null()).stderr(file);
        let child = cmd.spawn().expect("spawn");
        Self { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log_text());
        }
    }
}

/// Starts `lb-controller run`.
pub fn start_controller(config: &Path, identity: &str) -> Proc {
    let mut cmd = Command::new(CONTROLLER);
    cmd.args(["run", "--config"])
        .arg(config)
        .args(["--identity", identity])
        .env("RUST_LOG", "info,kube=warn");
    let log = config.with_extension(format!("{identity}.log"));
    Proc::spawn(cmd, log)
}

/// The `lbd` binary of this workspace (built on demand when only this
/// package's tests were built).
pub fn lbd_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let lbd = dir.join("lbd");
    if !lbd.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "lb-core", "--bin", "lbd"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "building lbd");
    }
    lbd
}

/// A free TCP port on `ip`.
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a real `lbd` with a control socket (programmed by the
/// controller) and `extra` file content (static listeners, say); returns
/// the process and its socket path.
fn spawn_lbd(dir: &Path, tag: &str, extra: &str) -> (Proc, PathBuf) {
    let socket = dir.join(format!("{tag}.sock"));
    let state = dir.join(format!("{tag}-state"));
    std::fs::create_dir_all(&state).unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let cfg = dir.join(format!("{tag}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[runtime]\nworkers = 1\n\n[admin]\nmetrics = \"{metrics}\"\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\n\n[defaults.health]\ninterval = \"200ms\"\ntimeout = \"200ms\"\n\n{extra}",
            socket.display(),
            state.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(lbd_binary());
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .env("LBD_LOG", "info");
    let proc = Proc::spawn(cmd, dir.join(format!("{tag}.log")));
    (proc, socket)
}

/// Waits (30 s at most) until a Service has an address; returns it.
pub async fn assigned(api: &ApiServer, ns: &str, name: &str) -> Value {
    eventually(
        Duration::from_secs(30),
        &format!("{ns}/{name} gets an address"),
        || {
            api.get(SERVICES, ns, name)
                .filter(|s| !ingress_ips(s).is_empty())
        },
    )
    .await
}

/// A real `lbd` ready to be programmed, and the `[[forwarder]]` table that
/// names it in a controller config.
pub struct Forwarder {
    pub proc: Proc,
    pub socket: PathBuf,
    pub toml: String,
}

/// Starts [`spawn_lbd`] and waits for its control socket.
pub async fn start_forwarder(dir: &Path, extra: &str) -> Forwarder {
    let (proc, socket) = spawn_lbd(dir, "edge", extra);
    eventually(Duration::from_secs(30), "lbd control socket", || {
        socket.exists().then_some(())
    })
    .await;
    let toml = format!(
        "[[forwarder]]\nname = \"edge\"\nurl = \"unix://{}\"\n",
        socket.display()
    );
    Forwarder { proc, socket, toml }
}

/// `GET /v1/state` of an lbd.
pub async fn lbd_state(socket: &Path) -> Option<Value> {
    let (status, body) = lb_api::client::request(socket, hyper::Method::GET, "/v1/state", None)
        .await
        .ok()?;
    (status == hyper::StatusCode::OK).then(|| serde_json::from_slice(&body).ok())?
}

/// `GET path` over HTTP/1.0; the whole answer, headers included.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The value of one Prometheus series (`name{labels}`) in a scrape.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The Service's `weir.dev/ForwardersProgrammed` condition status, if any.
pub fn programmed_status(svc: &Value) -> Option<&str> {
    svc["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "weir.dev/ForwardersProgrammed")?["status"]
        .as_str()
}

/// Waits (30 s at most) until the Service's condition is True; returns it.
pub async fn programmed(api: &ApiServer, ns: &str, name: &str) -> Value {
    eventually(
        Duration::from_secs(30),
        &format!("{ns}/{name} programmed"),
        || {
            api.get(SERVICES, ns, name)
                .filter(|s| programmed_status(s) == Some("True"))
        },
    )
    .await
}

/// Waits (30 s at most) until the forwarder runs `n` listeners.
pub async fn listeners_become(edge: &Forwarder, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let count = lbd_state(&edge.socket)
            .await
            .and_then(|s| s["listeners"].as_array().map(Vec::len));
        if count == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} listeners on the forwarder (now {count:?})"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Three Nodes, at 127.0.0.2, 127.0.0.3 and 127.0.0.4.
pub fn three_nodes(api: &ApiServer) {
    for (i, ip) in ["127.0.0.2", "127.0.0.3", "127.0.0.4"].iter().enumerate() {
        api.create(NODES, "", node(&format!("node-{i}"), ip));
    }
}

/// An API server behaving like `release` with three Nodes, a real `lbd`,
/// and the configuration of a controller (user `ctl`) that programs it
/// (`extra`, then the forwarder and TCP health checks).
pub struct Bed {
    pub dir: PathBuf,
    pub api: ApiServer,
    pub edge: Forwarder,
    pub cfg: PathBuf,
}

/// Sets up a [`Bed`].
pub async fn bed(tag: &str, release: apiserver::Release, extra: &str) -> Bed {
    let dir = temp_dir(tag);
    let api = ApiServer::start_as(release).await;
    three_nodes(&api);
    let edge = start_forwarder(&dir, "").await;
    let cfg = controller_config(
        &dir,
        &api.kubeconfig(&dir, "ctl"),
        &format!("{extra}{}[health]\ncluster = \"tcp\"\n", edge.toml),
    );
    Bed {
        dir,
        api,
        edge,
        cfg,
    }
}

/// Creates LoadBalancer Services named `names` in `default` and waits until
/// every one is programmed and the forwarder runs them all.
pub async fn create_programmed(api: &ApiServer, edge: &Forwarder, names: &[String]) {
    for name in names {
        api.create(SERVICES, "default", lb_service(name, &[(80, 0)]));
    }
    for name in names {
        programmed(api, "default", name).await;
    }
    listeners_become(edge, names.len()).await;
}

/// A LoadBalancer Service in `default` that another implementation (user
/// `other-lb`) has taken: its class (or none), the shared finalizer, and
/// its address in status.
pub fn foreign(api: &ApiServer, name: &str, class: Option<&str>, ip: &str) {
    let mut svc = lb_service(name, &[(80, 0)]);
    if let Some(class) = class {
        svc["spec"]["loadBalancerClass"] = serde_json::json!(class);
    }
    svc["metadata"]["finalizers"] =
        serde_json::json!(["service.kubernetes.io/load-balancer-cleanup"]);
    api.create(SERVICES, "default", svc);
    api.try_patch(
        "other-lb",
        SERVICES,
        "default",
        name,
        true,
        serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}}),
    )
    .unwrap();
}
