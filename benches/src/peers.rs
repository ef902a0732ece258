//! The proxies under test and their configurations, each set up as its
//! documentation recommends for L4 forwarding, with logs off and the same
//! worker count. Everything listens on and forwards to loopback, or to
//! addresses inside the run's own network namespaces (see `topo`).

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::procs::{stop_groups, wait_for};
use crate::topo::{Side, Topology};

/// Front ports every proxy listens on (`Topology::front`).
pub const HTTP_PORT: u16 = 20080;
/// Front port for bulk (iperf3) traffic.
pub const BULK_PORT: u16 = 20201;
/// Front port for UDP.
pub const UDP_PORT: u16 = 20053;
/// Front port for one-way UDP.
pub const UDP_ONEWAY_PORT: u16 = 20054;
/// Front port for UDP downloads (backend to client).
pub const UDP_DOWNLOAD_PORT: u16 = 20055;
/// Backend ports (on `Topology::backend`): the HTTP backend (nginx, small
/// fixed response).
pub const BACKEND_HTTP_PORT: u16 = 18081;
/// The iperf3 server.
pub const BACKEND_BULK_PORT: u16 = 15201;
/// The UDP echo backend.
pub const BACKEND_UDP_PORT: u16 = 15353;
/// The one-way UDP sink (counted inside `lb-bench`).
pub const BACKEND_UDP_SINK_PORT: u16 = 15354;
/// The UDP download source (runs inside `lb-bench` for each measurement).
pub const BACKEND_UDP_SOURCE_PORT: u16 = 15355;

/// nginx's stream module, which Debian ships as libnginx-mod-stream.
pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// A proxy (or none) under test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Clients talk to the backends directly: the ceiling.
    Direct,
    /// `lbd` with an engine.
    Lbd(&'static str),
    /// HAProxy in TCP mode, with or without splice.
    Haproxy {
        /// `option splice-auto`.
        splice: bool,
    },
    /// nginx `stream` module.
    Nginx,
}

impl Peer {
    /// Column name.
    pub fn name(&self) -> String {
        match self {
            Peer::Direct => "direct".into(),
            Peer::Lbd(e) => format!("lbd-{e}"),
            Peer::Haproxy { splice: true } => "haproxy-splice".into(),
            Peer::Haproxy { splice: false } => "haproxy".into(),
            Peer::Nginx => "nginx-stream".into(),
        }
    }

    /// The binary it needs, and the Debian package that has it.
    pub fn requirement(&self) -> Option<(&'static str, &'static str)> {
        match self {
            Peer::Haproxy { .. } => Some(("haproxy", "haproxy")),
            Peer::Nginx => Some(("nginx", "nginx-light libnginx-mod-stream")),
            _ => None,
        }
    }

    /// Where clients send to reach the service on `front` (a proxy's
    /// port) or, on the direct path, on `backend`.
    fn target(&self, t: &Topology, front: u16, backend: u16) -> SocketAddr {
        match self {
            Peer::Direct => t.backend(backend),
            _ => t.front(front),
        }
    }

    /// Where one-way UDP senders send.
    pub fn oneway_target(&self, t: &Topology) -> SocketAddr {
        self.target(t, UDP_ONEWAY_PORT, BACKEND_UDP_SINK_PORT)
    }

    /// Where UDP download clients send their request.
    pub fn download_target(&self, t: &Topology) -> SocketAddr {
        self.target(t, UDP_DOWNLOAD_PORT, BACKEND_UDP_SOURCE_PORT)
    }

    /// Where clients connect for HTTP, bulk and UDP.
    pub fn targets(&self, t: &Topology) -> (SocketAddr, SocketAddr, SocketAddr) {
        (
            self.target(t, HTTP_PORT, BACKEND_HTTP_PORT),
            self.target(t, BULK_PORT, BACKEND_BULK_PORT),
            self.target(t, UDP_PORT, BACKEND_UDP_PORT),
        )
    }
}

/// A running process, killed when dropped.
pub struct Running {
    child: Option<Child>,
}

impl Running {
    /// The process id (and its children, for nginx's workers).
    pub fn pids(&self) -> Vec<u32> {
        let Some(c) = &self.child else {
            return Vec::new();
        };
        let mut pids = vec![c.id()];
        if let Ok(out) = Command::new("pgrep")
            .args(["-P", &c.id().to_string()])
            .output()
        {
            pids.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        pids
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        stop_groups(&[c.id()]);
        let _ = c.wait();
        crate::interrupt::untrack_group(c.id());
    }
}

/// Whether `bin` is on PATH.
pub fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn wait_port(addr: SocketAddr) -> anyhow::Result<()> {
    let accepts = || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
    anyhow::ensure!(
        wait_for(Duration::from_secs(10), accepts),
        "{addr} never accepted"
    );
    Ok(())
}

/// Fails when something still listens on `addr`: a stray proxy would share
/// the port (reuseport) and take part of the load.
fn ensure_free(addr: SocketAddr) -> anyhow::Result<()> {
    let refused = || TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err();
    anyhow::ensure!(
        wait_for(Duration::from_secs(5), refused),
        "something already listens on {addr}; stop it first (a leftover proxy would take part of the load)"
    );
    Ok(())
}

/// Fails when a socket already holds UDP `addr`: a leftover proxy's
/// `SO_REUSEPORT` listener would silently take part of the datagrams. A
/// plain bind (no reuseport) is refused while any socket holds the port.
fn ensure_udp_free(addr: SocketAddr, wait: Duration) -> anyhow::Result<()> {
    let mut error = None;
    let free = wait_for(wait, || match std::net::UdpSocket::bind(addr) {
        Ok(_) => true,
        Err(e) => {
            error = Some(e);
            false
        }
    });
    anyhow::ensure!(
        free,
        "something already holds UDP {addr} ({}); stop it first (a leftover proxy would take part of the datagrams)",
        error.map(|e| e.to_string()).unwrap_or_default()
    );
    Ok(())
}

fn spawn(cmd: &mut Command) -> anyhow::Result<Running> {
    use std::os::unix::process::CommandExt;
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    // Dropped at once when a signal is being handled: stopped, not tracked.
    let running = Running { child: Some(child) };
    anyhow::ensure!(
        crate::interrupt::track_group(running.child.as_ref().map_or(0, Child::id)),
        "interrupted"
    );
    Ok(running)
}

/// Where and how peers run.
pub struct Site {
    /// Configs, pid files and error logs.
    pub dir: PathBuf,
    /// The `lbd` binary.
    pub lbd: PathBuf,
    /// Idle connections the memory figure holds open through each proxy.
    pub idle: usize,
    /// Loopback or network namespaces.
    pub topo: Topology,
}

/// Connections a proxy holds beside the idle ones (load clients, probes).
const CONN_ROOM: usize = 128;
/// Open files a proxy needs beside two per connection (listeners, logs,
/// its own event machinery, HAProxy's pipes); lbd keeps 256 back from its
/// connection cap, plus two per splice pipe (64 pipes per worker).
const FILE_ROOM: u64 = 768;

impl Site {
    /// Connections every proxy (and the HTTP backend) must be able to hold.
    pub fn conns(&self) -> usize {
        self.idle + CONN_ROOM
    }

    /// Open files a process needs to hold [`Site::conns`] proxied
    /// connections, two sockets each.
    pub fn files(&self) -> u64 {
        2 * self.conns() as u64 + FILE_ROOM
    }

    /// Raises this process's open-files limit to [`Site::files`]; every
    /// peer inherits it. Raising the hard limit needs CAP_SYS_RESOURCE;
    /// where the hard limit is lower and cannot be raised, `idle` comes
    /// down to what fits (to a multiple of 100), and the returned note says
    /// so: a proxy out of descriptors would refuse connections, and the
    /// figure would be taken over fewer than it claims.
    pub fn fit_open_files(&mut self) -> anyhow::Result<Option<String>> {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let limit = getrlimit(Resource::Nofile);
        let raise = |need: u64, hard: Option<u64>| {
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(need),
                    maximum: hard,
                },
            )
        };
        let need = self.files();
        if limit.current.is_none_or(|c| c >= need)
            || raise(need, limit.maximum.map(|m| m.max(need))).is_ok()
        {
            return Ok(None);
        }
        let hard = limit.maximum.unwrap_or(u64::MAX);
        let fits = (hard.saturating_sub(FILE_ROOM) / 2) as usize;
        let fits = fits.saturating_sub(CONN_ROOM) / 100 * 100;
        anyhow::ensure!(
            fits > 0,
            "the open-files hard limit ({hard}) leaves no room for idle connections"
        );
        let asked = self.idle;
        self.idle = fits.min(asked);
        raise(self.files(), limit.maximum)?;
        Ok(Some(format!(
            "{asked} asked; the open-files hard limit here is {hard} (raising it needs \
             CAP_SYS_RESOURCE), and each proxied connection takes two descriptors"
        )))
    }
}

/// Starts the shared backends: nginx (HTTP), iperf3, and a UDP echo server
/// (this binary's `udp-echo`), on the backend side.
pub fn start_backends(site: &Site) -> anyhow::Result<Vec<Running>> {
    site.topo.within(Side::Backend, || backends(site))?
}

fn backends(site: &Site) -> anyhow::Result<Vec<Running>> {
    let (dir, t) = (&site.dir, &site.topo);
    let (http, bulk) = (t.backend(BACKEND_HTTP_PORT), t.backend(BACKEND_BULK_PORT));
    ensure_free(http)?;
    ensure_free(bulk)?;
    let conf = dir.join("backend-nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\ndaemon off;\nerror_log {d}/backend-error.log crit;\npid {d}/backend.pid;\nworker_rlimit_nofile {files};\n\
             events {{ worker_connections {conns}; }}\n\
             http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 300s;\n\
               server {{ listen {http} reuseport backlog=4096; location / {{ return 200 \"hello\\n\"; }} }} }}\n",
            d = dir.display(),
            files = site.files(),
            conns = 2 * site.conns(),
        ),
    )?;
    let nginx = spawn(
        Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir),
    )?;
    let (ip, port) = (bulk.ip().to_string(), bulk.port().to_string());
    let iperf = spawn(Command::new("iperf3").args(["-s", "-B", &ip, "-p", &port]))?;
    let echo = t.backend(BACKEND_UDP_PORT).to_string();
    let udp = spawn(Command::new(std::env::current_exe()?).args(["udp-echo", "--addr", &echo]))?;
    wait_port(http)?;
    wait_port(bulk)?;
    Ok(vec![nginx, iperf, udp])
}

/// Starts `peer` with `workers` workers on the proxy side; `None` for the
/// direct path.
pub fn start(peer: &Peer, workers: usize, site: &Site) -> anyhow::Result<Option<Running>> {
    site.topo
        .within(Side::Proxy, || proxy(peer, workers, site))?
}

fn proxy(peer: &Peer, workers: usize, site: &Site) -> anyhow::Result<Option<Running>> {
    let (dir, conns, t) = (&site.dir, site.conns(), &site.topo);
    let front = t.front(HTTP_PORT);
    ensure_free(front)?;
    ensure_free(t.front(BULK_PORT))?;
    for port in [UDP_PORT, UDP_ONEWAY_PORT, UDP_DOWNLOAD_PORT] {
        ensure_udp_free(t.front(port), Duration::from_secs(5))?;
    }
    let (f_bulk, f_udp, f_oneway, f_download) = (
        t.front(BULK_PORT),
        t.front(UDP_PORT),
        t.front(UDP_ONEWAY_PORT),
        t.front(UDP_DOWNLOAD_PORT),
    );
    let (b_http, b_bulk, b_udp, b_sink, b_source) = (
        t.backend(BACKEND_HTTP_PORT),
        t.backend(BACKEND_BULK_PORT),
        t.backend(BACKEND_UDP_PORT),
        t.backend(BACKEND_UDP_SINK_PORT),
        t.backend(BACKEND_UDP_SOURCE_PORT),
    );
    let running = match peer {
        Peer::Direct => return Ok(None),
        Peer::Lbd(engine) => {
            let conf = dir.join("lbd.toml");
            std::fs::write(
                &conf,
                format!(
                    "[runtime]\nworkers = {workers}\n[admin]\nmetrics = \"off\"\ncontrol_socket = \"off\"\n\
                     [defaults.health]\nkind = \"none\"\n\
                     [[listener]]\nname = \"http\"\nbind = \"{front}\"\nbackends = [{{ addr = \"{b_http}\" }}]\n\
                     [[listener]]\nname = \"bulk\"\nbind = \"{f_bulk}\"\nbackends = [{{ addr = \"{b_bulk}\" }}]\n\
                     [[listener]]\nname = \"udp\"\nbind = \"{f_udp}\"\nprotocol = \"udp\"\nbackends = [{{ addr = \"{b_udp}\" }}]\n\
                     [[listener]]\nname = \"udp-oneway\"\nbind = \"{f_oneway}\"\nprotocol = \"udp\"\nbackends = [{{ addr = \"{b_sink}\" }}]\n\
                     [[listener]]\nname = \"udp-download\"\nbind = \"{f_download}\"\nprotocol = \"udp\"\nbackends = [{{ addr = \"{b_source}\" }}]\n"
                ),
            )?;
            spawn(
                Command::new(&site.lbd)
                    .args(["run", "--engine", engine, "--config"])
                    .arg(&conf)
                    .env("LBD_LOG", "error"),
            )?
        }
        Peer::Haproxy { splice } => {
            let conf = dir.join("haproxy.cfg");
            // A pipe (two descriptors) is held only while a connection
            // splices; the default pool (maxconn / 4) would need more
            // descriptors than the idle connections leave, and HAProxy
            // refuses to start. One per direction of every load client's
            // connection is enough.
            let (splice, pipes) = if *splice {
                (
                    "  option splice-auto\n",
                    format!("  maxpipes {CONN_ROOM}\n"),
                )
            } else {
                ("", String::new())
            };
            std::fs::write(
                &conf,
                format!(
                    "global\n  nbthread {workers}\n  maxconn {conns}\n{pipes}  tune.bufsize 16384\n\
                     defaults\n  mode tcp\n{splice}  timeout connect 3s\n  timeout client 10m\n  timeout server 10m\n\
                     listen http\n  bind {front}\n  server b {b_http}\n\
                     listen bulk\n  bind {f_bulk}\n  server b {b_bulk}\n"
                ),
            )?;
            spawn(Command::new("haproxy").arg("-db").arg("-f").arg(&conf))?
        }
        Peer::Nginx => {
            let conf = dir.join("nginx-stream.conf");
            std::fs::write(
                &conf,
                format!(
                    "load_module {NGINX_STREAM_MODULE};\n\
                     worker_processes {workers};\ndaemon off;\nerror_log {d}/stream-error.log crit;\npid {d}/stream.pid;\nworker_rlimit_nofile {files};\n\
                     events {{ worker_connections {stream_conns}; }}\n\
                     stream {{\n\
                       server {{ listen {front} reuseport backlog=4096; proxy_pass {b_http}; }}\n\
                       server {{ listen {f_bulk} reuseport; proxy_pass {b_bulk}; }}\n\
                       server {{ listen {f_udp} udp reuseport; proxy_pass {b_udp}; proxy_responses 1; proxy_timeout 30s; }}\n\
                       server {{ listen {f_oneway} udp reuseport; proxy_pass {b_sink}; proxy_responses 0; proxy_timeout 30s; }}\n\
                       server {{ listen {f_download} udp reuseport; proxy_pass {b_source}; proxy_timeout 30s; }}\n\
                     }}\n",
                    d = dir.display(),
                    files = site.files(),
                    // Each proxied connection is two nginx connections.
                    stream_conns = 2 * conns,
                ),
            )?;
            spawn(
                Command::new("nginx")
                    .arg("-c")
                    .arg(&conf)
                    .arg("-p")
                    .arg(dir),
            )?
        }
    };
    wait_port(front)?;
    Ok(Some(running))
}

/// Resident memory (KiB) of `pids`, summed.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum()
}

/// CPU seconds (user + system) used so far by `pids`.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / 100.0
}

/// The directory for configs and logs.
pub fn work_dir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("weir-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_udp_port_is_not_free() {
        let held = std::net::UdpSocket::bind("127.0.0.9:0").unwrap();
        let addr = held.local_addr().unwrap();
        let err = ensure_udp_free(addr, Duration::from_millis(100)).unwrap_err();
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        drop(held);
        ensure_udp_free(addr, Duration::from_secs(5)).unwrap();
    }
}
