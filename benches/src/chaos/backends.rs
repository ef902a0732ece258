//! The chaos scenarios' backends: a small HTTP/1.1 server (in this process,
//! or as a child process that can be killed or stopped) and a UDP echo
//! server. They answer every request at once; the faults come from the
//! scenarios, never from here.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The body every HTTP answer carries.
const REPLY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nchaos\n";
const REPLY_CLOSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nchaos\n";
/// Stack of a connection's thread: it only reads lines and writes a reply,
/// and a scenario may hold a thousand of them.
const STACK: usize = 64 * 1024;

/// An HTTP server in this process: every request on every connection gets
/// a 200 at once (keep-alive unless the request says `Connection: close`).
/// Stops accepting when dropped; open connections end with their clients.
pub struct HttpServer {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Binds `addr` (in the calling thread's network namespace) and serves.
    pub fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = Arc::new(listen(addr).map_err(|e| anyhow::anyhow!("backend {addr}: {e}"))?);
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let thread = {
            let (listener, stop, served) = (listener.clone(), stop.clone(), served.clone());
            std::thread::spawn(move || accept_loop(&listener, &stop, &served))
        };
        Ok(Self {
            listener,
            stop,
            served,
            thread: Some(thread),
        })
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the blocked accept (Linux returns EINVAL from it).
        let _ = rustix::net::shutdown(&*self.listener, rustix::net::Shutdown::Read);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `addr` until the process is killed: the backend a scenario kills
/// or stops as a whole process (`lb-bench chaos-backend`).
pub fn serve_forever(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = listen(addr)?;
    accept_loop(
        &listener,
        &AtomicBool::new(false),
        &Arc::new(AtomicU64::new(0)),
    );
    Ok(())
}

/// A listening socket on `addr` with the kernel's largest accept queue
/// (`std` asks for 128): when lbd connects in a burst (a backlog of
/// clients accepted at once after it ran out of descriptors), a backend
/// with a short queue drops SYNs, lbd's connects time out, and the
/// backend's ejection would say more about the test server than about lbd.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use rustix::net::{sockopt, AddressFamily, SocketType};
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket(family, SocketType::STREAM, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, 4096)?;
    Ok(TcpListener::from(fd))
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, served: &Arc<AtomicU64>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(stream) = stream else {
            // Out of descriptors or a connection reset before accept.
            continue;
        };
        let served = served.clone();
        let spawned = std::thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || answer(stream, &served));
        if spawned.is_err() {
            // Out of threads: this connection is dropped, the next tried.
            continue;
        }
    }
}

/// Answers every request head on `stream` until the client closes or asks
/// to. Requests carry no body (lbd's checks and the scenarios' clients).
fn answer(stream: TcpStream, served: &AtomicU64) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    let mut line = String::new();
    let mut close = false;
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => {
                let reply = if close { REPLY_CLOSE } else { REPLY };
                if writer.write_all(reply).is_err() {
                    return;
                }
                served.fetch_add(1, Ordering::Relaxed);
                if close {
                    return;
                }
            }
            Ok(_) => {
                let lower = line.to_ascii_lowercase();
                if lower.starts_with("connection:") && lower.contains("close") {
                    close = true;
                }
            }
        }
    }
}

/// A UDP echo server in this process: every datagram goes back to its
/// sender. Stops when dropped.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    /// Binds `addr` and echoes.
    pub fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let sock = UdpSocket::bind(addr).map_err(|e| anyhow::anyhow!("udp backend {addr}: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            })
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The usual backends: HTTP servers on 127.0.0.2, .3 and .4 at one port.
pub struct Trio {
    /// Their addresses.
    pub addrs: Vec<SocketAddr>,
    servers: Vec<HttpServer>,
}

impl Trio {
    /// Starts them on a port free on all three addresses.
    pub fn start() -> anyhow::Result<Self> {
        const IPS: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
        let port = crate::support::common_port(&IPS)?;
        let addrs: Vec<SocketAddr> = IPS
            .iter()
            .map(|ip| SocketAddr::new(ip.parse().expect("an IPv4 address"), port))
            .collect();
        let servers = addrs
            .iter()
            .map(|a| HttpServer::start(*a))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { addrs, servers })
    }

    /// Requests each has answered.
    pub fn served(&self) -> Vec<u64> {
        self.servers.iter().map(HttpServer::served).collect()
    }

    /// The backends with weight `w` each, and `first` for the first.
    pub fn weighted(&self, first: u32, w: u32) -> Vec<(SocketAddr, u32)> {
        self.addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (*a, if i == 0 { first } else { w }))
            .collect()
    }
}

/// An address on 127.0.0.1 whose TCP port is free now (for a listener lbd
/// binds next).
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Keep-alive requests are answered on one connection; one that asks
    /// to close gets its answer, then the end of the stream.
    #[test]
    fn answers_keep_alive_and_close() {
        let server = HttpServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.listener.local_addr().unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let n = s.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], REPLY);
        s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, REPLY_CLOSE);
        assert_eq!(server.served(), 2);
    }
}
