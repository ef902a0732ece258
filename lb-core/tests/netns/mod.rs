//! A harness for multi-host tests in network namespaces (root only):
//! namespaces and processes that are removed when their guard drops,
//! even when the test fails, veth links between namespaces, code run
//! inside a namespace (a thread that joins it), BIRD daemons with their
//! own control sockets, and polling with deadlines.
//!
//! Traffic stays inside the namespaces a test creates.

#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whether this process may create namespaces (root).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs `ip` with `args`; panics with its stderr when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `ip` with `args` and returns its stdout, or its stderr as the error.
pub fn ip_out(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `name` (deleting a stale one of that name first), with `lo` up.
    pub fn new(name: &str) -> Self {
        let _ = ip_out(&["netns", "del", name]);
        ip(&["netns", "add", name]);
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME args...`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// `ip -n NAME args...`, its output or error.
    pub fn ip_out(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip_out(&all)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-q", "-w"])
            .arg(format!("{key}={value}"))
            .output()
            .expect("run sysctl");
        assert!(
            out.status.success(),
            "sysctl {key}={value} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a thread inside the namespace and returns its result.
    /// Sockets it creates belong to the namespace wherever they are used.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .expect("thread in namespace")
    }

    /// Starts `f` on a thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &str) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip_out(&["netns", "del", &self.name]);
    }
}

/// A veth pair from `a` (named `a_if`, address `a_addr` with prefix) to
/// `b` (`b_if`, `b_addr`), both up.
pub fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
    if !a_addr.is_empty() {
        a.ip(&["addr", "add", a_addr, "dev", a_if]);
    }
    if !b_addr.is_empty() {
        b.ip(&["addr", "add", b_addr, "dev", b_if]);
    }
}

/// A child process, killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub what: String,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, what: &str, log: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        Self {
            child,
            what: what.to_owned(),
        }
    }

    /// Sends `signal` (a name such as `TERM`).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{signal} {}", self.what);
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits for the exit, up to `within`.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.what);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 10 ms until it returns `Some` or `within` passes.
pub fn wait_for<T>(within: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A private directory for configuration files, sockets and logs,
/// removed on drop unless `WEIR_KEEP_NETNS_LOGS` is set.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("weir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        Self(d)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("WEIR_KEEP_NETNS_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// BIRD running in a namespace with its own control socket.
pub struct Bird {
    pub proc: Proc,
    pub socket: PathBuf,
}

impl Bird {
    /// Starts `bird -f` in `ns` with `config` written under `dir`.
    pub fn start(ns: &Netns, dir: &TempDir, tag: &str, config: &str) -> Self {
        let conf = dir.path(&format!("{tag}-bird.conf"));
        std::fs::write(&conf, config).expect("bird config");
        let socket = dir.path(&format!("{tag}-bird.ctl"));
        let pid = dir.path(&format!("{tag}-bird.pid"));
        let mut cmd = ns.command("bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .arg("-P")
            .arg(&pid);
        let proc = Proc::spawn(
            cmd,
            &format!("bird in {}", ns.name),
            &dir.path(&format!("{tag}-bird.log")),
        );
        Self { proc, socket }
    }

    /// `birdc -s SOCKET args...`, its output.
    pub fn birdc(&self, args: &[&str]) -> String {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("birdc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The shipped edge configuration (`deploy/bird/bird-edge.conf`) with a
/// router id, the router's address and, when given, another IPv4 pool
/// than the example's `192.0.2.0/24`.
pub fn bird_edge_config(router_id: Ipv4Addr, neighbor: &str, pool4: Option<&str>) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/bird/bird-edge.conf"
    ))
    .expect("deploy/bird/bird-edge.conf");
    let mut out = text;
    let mut edits = vec![
        (
            "router id 10.0.0.21;".to_owned(),
            format!("router id {router_id};"),
        ),
        (
            "neighbor 10.0.0.1 as 64500;".to_owned(),
            format!("neighbor {neighbor} as 64500;"),
        ),
        (
            "192.0.2.0/24{32,32}".to_owned(),
            "192.0.2.0/24{32,32}".to_owned(),
        ),
    ];
    if let Some(pool) = pool4 {
        edits[2].1 = format!("{pool}{{32,32}}");
    }
    for (from, to) in edits {
        assert!(out.contains(&from), "bird-edge.conf no longer has {from:?}");
        out = out.replace(&from, &to);
    }
    out
}

/// A router's BIRD: BGP (AS 64500) with BFD to each edge (AS 64512),
/// ECMP routes (`merge paths`) written to kernel table 100.
pub fn bird_router_config(router_id: &str, edges: &[Ipv4Addr]) -> String {
    let mut c = format!(
        r#"router id {router_id};
protocol device {{
}}
protocol kernel {{
  kernel table 100;
  merge paths on;
  ipv4 {{ import none; export all; }};
}}
protocol bfd {{
  interface "*" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }};
}}
template bgp edge {{
  local as 64500;
  bfd on;
  hold time 9;
  connect delay time 1;
  connect retry time 1;
  error wait time 1, 5;
  ipv4 {{ import all; export none; }};
}}
"#
    );
    for (n, ip) in edges.iter().enumerate() {
        c.push_str(&format!(
            "protocol bgp edge{} from edge {{ neighbor {ip} as 64512; }}\n",
            n + 1
        ));
    }
    c
}

/// What a test backend answers first: its name and the address of the
/// peer (the edge that connected), one line.
pub fn hello(name: &str, peer: SocketAddr) -> String {
    format!("{name} {}\n", peer.ip())
}

/// A TCP and UDP server on `addr`'s IP in namespace `ns`: each TCP
/// connection gets [`hello`] and then an echo; each UDP datagram gets
/// [`hello`] back. Stops (and closes its sockets) on drop.
pub struct NamedServer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl NamedServer {
    pub fn start(ns: &Netns, name: &str, tcp_ports: &[u16], udp_port: u16, ip: IpAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &port in tcp_ports {
            let (stop, name) = (stop.clone(), name.to_owned());
            let listener = ns.run(move || TcpListener::bind((ip, port)).expect("bind backend"));
            listener.set_nonblocking(true).unwrap();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, peer)) => {
                            let name = name.clone();
                            std::thread::spawn(move || {
                                let _ = echo(s, &hello(&name, peer));
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        let (stop2, name) = (stop.clone(), name.to_owned());
        let udp = ns.run(move || UdpSocket::bind((ip, udp_port)).expect("bind udp backend"));
        udp.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop2.load(Ordering::SeqCst) {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(hello(&name, peer).as_bytes(), peer);
                }
            }
        }));
        Self { stop, threads }
    }
}

impl Drop for NamedServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn echo(mut s: TcpStream, first: &str) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(first.as_bytes())?;
    let mut buf = [0u8; 16384];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return s.shutdown(std::net::Shutdown::Write);
        }
        s.write_all(&buf[..n])?;
    }
}

/// A connection through the load balancer to a named backend.
pub struct Conn {
    pub stream: TcpStream,
    /// The backend's name.
    pub backend: String,
    /// The address the backend saw: the edge that proxied.
    pub edge: IpAddr,
    reader: BufReader<TcpStream>,
}

impl Conn {
    /// Connects to `addr` (from the calling thread's namespace) and reads
    /// the backend's hello.
    pub fn open(addr: SocketAddr, timeout: Duration) -> io::Result<Self> {
        Self::from_stream(TcpStream::connect_timeout(&addr, timeout)?)
    }

    /// Reads the backend's hello on a connected `stream`.
    pub fn from_stream(stream: TcpStream) -> io::Result<Self> {
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let mut parts = line.split_whitespace();
        let (Some(backend), Some(edge)) = (parts.next(), parts.next()) else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("no hello from the backend: {line:?}"),
            ));
        };
        let edge = edge
            .parse()
            .map_err(|_| io::Error::other(format!("bad hello {line:?}")))?;
        Ok(Self {
            stream,
            backend: backend.to_owned(),
            edge,
            reader,
        })
    }

    /// Sends `data` and reads it back.
    pub fn echo(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data)?;
        let mut back = vec![0u8; data.len()];
        self.reader.read_exact(&mut back)?;
        if back != data {
            return Err(io::Error::other("echo differs"));
        }
        Ok(())
    }
}
