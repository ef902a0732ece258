//! Test peers: real backends on loopback addresses, a client, and polling
//! with deadlines. Everything here talks to 127.0.0.0/8 or ::1 only.

#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use lb_config::EngineChoice;
use lb_core::{Options, Server};

/// How a test backend treats a connection.
#[derive(Clone)]
pub enum Behavior {
    /// Sends `name\n`, then echoes until EOF, then closes its write side.
    Echo,
    /// Reads until EOF, reports the bytes, replies with `reply_len` bytes, closes.
    Record { reply_len: usize },
    /// Answers each HTTP request with the given status and its name.
    Http { status: Arc<AtomicU16> },
}

/// A backend server on a loopback address.
pub struct TestBackend {
    pub addr: SocketAddr,
    pub name: String,
    stop: Arc<AtomicBool>,
    pub received: mpsc::Receiver<Vec<u8>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestBackend {
    /// Starts on `ip`, ephemeral port.
    pub fn start(ip: &str, behavior: Behavior) -> Self {
        Self::start_at(SocketAddr::new(ip.parse().unwrap(), 0), behavior)
    }

    /// Starts on exactly `addr` (to bring a killed backend back).
    pub fn start_at(addr: SocketAddr, behavior: Behavior) -> Self {
        let listener = bind_retrying(addr);
        let addr = listener.local_addr().unwrap();
        let name = format!("backend-{addr}");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, received) = mpsc::channel();
        let thread = {
            let (stop, name) = (stop.clone(), name.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let (b, name, tx) = (behavior.clone(), name.clone(), tx.clone());
                    std::thread::spawn(move || {
                        let _ = handle(stream, &b, &name, &tx);
                    });
                }
            })
        };
        Self {
            addr,
            name,
            stop,
            received,
            thread: Some(thread),
        }
    }

    /// Stops accepting and closes the listening socket (new connects are
    /// refused); established connections finish on their own.
    pub fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn bind_retrying(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }
}

fn handle(
    mut s: TcpStream,
    b: &Behavior,
    name: &str,
    tx: &mpsc::Sender<Vec<u8>>,
) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    match b {
        Behavior::Echo => {
            s.write_all(format!("{name}\n").as_bytes())?;
            let mut buf = [0u8; 16384];
            loop {
                let n = match s.read(&mut buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => r?,
                };
                if n == 0 {
                    return s.shutdown(Shutdown::Write);
                }
                s.write_all(&buf[..n])?;
            }
        }
        Behavior::Record { reply_len } => {
            let mut all = Vec::new();
            s.read_to_end(&mut all)?;
            let _ = tx.send(all);
            let reply: Vec<u8> = (0..*reply_len).map(|i| (i % 251) as u8).collect();
            s.write_all(&reply)?;
            s.shutdown(Shutdown::Write)
        }
        Behavior::Http { status } => {
            let mut reader = BufReader::new(s.try_clone()?);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                while line != "\r\n" && !line.is_empty() {
                    line.clear();
                    reader.read_line(&mut line)?;
                }
                let code = status.load(Ordering::SeqCst);
                let body = format!("{name}\n");
                let reply = format!(
                    "HTTP/1.1 {code} X\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(reply.as_bytes())?;
            }
        }
    }
}

/// Echo backends on 127.0.0.2, 127.0.0.3 and 127.0.0.4.
pub fn three_echo_backends() -> Vec<TestBackend> {
    ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|ip| TestBackend::start(ip, Behavior::Echo))
        .collect()
}

/// A `[[listener]]` table; `extra` holds more keys, `health` the health table's body.
pub fn listener_toml(
    name: &str,
    bind: &str,
    extra: &str,
    backends: &[SocketAddr],
    health: &str,
) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ addr = \"{b}\" }}"))
        .collect();
    format!(
        "[[listener]]\nname = \"{name}\"\nbind = \"{bind}\"\n{extra}\nbackends = [{}]\n[listener.health]\n{health}\n",
        list.join(", ")
    )
}

/// One short exchange with an `Echo` backend through `addr`: returns the
/// backend's name.
pub fn roundtrip(addr: SocketAddr) -> io::Result<String> {
    roundtrip_from(None, addr)
}

/// Like [`roundtrip`], from a chosen local IP.
pub fn roundtrip_from(local: Option<IpAddr>, addr: SocketAddr) -> io::Result<String> {
    let mut s = connect_from(local, addr)?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut name = String::new();
    reader.read_line(&mut name)?;
    if name.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before the backend spoke",
        ));
    }
    s.write_all(b"ping")?;
    let mut echo = [0u8; 4];
    reader.read_exact(&mut echo)?;
    if &echo != b"ping" {
        return Err(io::Error::other("bad echo"));
    }
    Ok(name.trim_end().to_owned())
}

/// Connects with a timeout and read/write timeouts, optionally from `local`.
pub fn connect_from(local: Option<IpAddr>, addr: SocketAddr) -> io::Result<TcpStream> {
    let s = match local {
        None => TcpStream::connect_timeout(&addr, Duration::from_secs(5))?,
        Some(ip) => {
            let sock = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )?;
            sock.bind(&SocketAddr::new(ip, 0).into())?;
            sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
            sock.into()
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// True when the peer closed `s` (EOF or reset) within the read timeout.
pub fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
pub fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An `[admin]` section with nothing on: no metrics endpoint, no control
/// socket, so no state directory either.
pub const ADMIN_OFF: &str = "[admin]\nmetrics = \"off\"\ncontrol_socket = \"off\"\n";

/// Starts an in-process lbd with `toml` on `engine`, two workers.
pub fn start_lbd(toml: &str, engine: EngineChoice) -> Server {
    start_lbd_workers(toml, engine, 2)
}

/// Starts an in-process lbd with `toml` on `engine` and `workers` workers.
pub fn start_lbd_workers(toml: &str, engine: EngineChoice, workers: usize) -> Server {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    // Without an [admin] section lbd would take the system's defaults
    // (/run/lbd, /var/lib/lbd, port 9600): a test never touches those.
    let toml = if toml.contains("[admin]") {
        toml.to_owned()
    } else {
        format!("{ADMIN_OFF}{toml}")
    };
    let toml = toml.as_str();
    let config =
        lb_config::parse_config(toml).unwrap_or_else(|e| panic!("test config:\n{e}\n{toml}"));
    Server::start(
        &config,
        &Options {
            engine: Some(engine),
            workers: Some(workers),
        },
    )
    .expect("lbd starts")
}

/// The health of `backend` in listener `listener`.
pub fn backend_healthy(server: &Server, listener: &str, backend: SocketAddr) -> Option<bool> {
    let st = server.status();
    let l = st.listeners.iter().find(|l| l.name == listener)?;
    l.backends
        .iter()
        .find(|b| b.addr == backend && !b.draining)
        .map(|b| b.healthy)
}

/// The value of one metric line (exact labels), from the text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A port free right now on `ip` (for configs that need a fixed port).
pub fn free_port(ip: &str) -> u16 {
    free_addr(ip).port()
}

/// `ip` with a port that is free there now.
pub fn free_addr(ip: &str) -> std::net::SocketAddr {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

/// Both engines run every scenario.
#[macro_export]
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod epoll {
            $( #[test] fn $name() { super::$name(lb_config::EngineChoice::Epoll) } )*
        }
        mod io_uring {
            $( #[test] fn $name() { super::$name(lb_config::EngineChoice::IoUring) } )*
        }
    };
}

/// A fresh directory for this test process, named by `tag`.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("weir-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One `GET path` to the HTTP server at `addr` (the admin endpoint): the
/// whole response, head and body.
pub fn admin_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = connect_from(None, addr).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}
