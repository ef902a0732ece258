//! Shared test helpers: the in-test API server, object builders, and the
//! real `lb-controller` and `lbd` processes.

#![allow(dead_code)]

pub mod apiserver;
pub mod deploy;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[allow(unused_imports)]
pub use apiserver::{ApiServer, EVENTS, LEASES, NODES, SERVICES, SLICES};

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

/// A Node with an InternalIP.
pub fn node(name: &str, ip: &str) -> Value {
    json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
           "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}})
}

/// A LoadBalancer Service with TCP ports `(port, nodePort)`; nodePort 0 = let the server pick.
pub fn lb_service(name: &str, ports: &[(u16, u16)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .enumerate()
        .map(|(i, (p, np))| {
            let mut v =
                json!({"name": format!("p{i}"), "port": p, "protocol": "TCP", "targetPort": 8080});
            if *np != 0 {
                v["nodePort"] = json!(np);
            }
            v
        })
        .collect();
    json!({"metadata": {"name": name}, "spec": {"type": "LoadBalancer", "ports": ports,
           "externalTrafficPolicy": "Cluster", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"}})
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
    let (status, body) = lb_core::client::request(socket, hyper::Method::GET, "/v1/state", None)
        .await
        .ok()?;
    (status == hyper::StatusCode::OK).then(|| serde_json::from_slice(&body).ok())?
}
