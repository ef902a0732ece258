//! Load generators that no Debian package provides in the form needed:
//! a closed-loop UDP request/response client, a one-way UDP sender, a UDP
//! download source and its clients, a UDP echo server, a counting UDP
//! sink, a fixed-rate HTTP latency client, a one-request-at-a-time HTTP
//! client (the latency floor), and an idle connection holder.
//! All of them target loopback, or the run's own namespaces (`topo`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where clients bind: the address the route to the target picks (on
/// loopback, 127.0.0.1).
const ANY: &str = "0.0.0.0:0";

/// Runs a UDP echo server on `addr` until the process ends (replies to
/// every datagram, or only counts them with `sink`).
pub fn udp_echo(addr: SocketAddr, threads: usize) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(addr)?;
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let s = sock.try_clone().expect("clone udp socket");
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                loop {
                    if let Ok((n, from)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(&buf[..n], from);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// A UDP sink on `addr` (the one-way backend): counts the datagrams that
/// reach it, those it receives and those its socket drops because the
/// sink is behind. Runs in this process so the count can be read directly.
///
/// Drops count because the sink is not what is measured: on a host with
/// two CPUs, four senders, the proxy and the sink share them, and the
/// sink received 110–160k datagrams/s of the 340–430k/s a proxy forwarded
/// to it (the proxy's own counter; also with `recvmmsg`), so a count of
/// received datagrams measured the CPU share the sink won. It takes up to
/// [`SINK_BATCH`] datagrams per syscall all the same.
pub struct UdpSink {
    /// A handle on the sink's socket, for its drop counter.
    socket: UdpSocket,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Datagrams a sink takes per syscall, at most.
const SINK_BATCH: usize = 64;

/// The sink's receive buffers and the headers pointing at them, built
/// once and reused by every `recvmmsg` (the kernel rewrites only each
/// header's length and flags).
struct Batch {
    /// Owned here so the pointers in `msgs` stay valid; never read.
    _bufs: Vec<[u8; 2048]>,
    _iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl Batch {
    #[allow(unsafe_code)]
    fn new() -> Self {
        let mut bufs = vec![[0u8; 2048]; SINK_BATCH];
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let msgs = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: all-zero is a valid mmsghdr (no name, no control).
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // Moving the vectors into the struct moves no heap allocation.
        Self {
            _bufs: bufs,
            _iovs: iovs,
            msgs,
        }
    }

    /// Receives up to [`SINK_BATCH`] datagrams (each cut to 2 KiB) in one
    /// syscall, waiting (up to the socket's read timeout) for the first
    /// only.
    #[allow(unsafe_code)]
    fn recv(&mut self, sock: &UdpSocket) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: each header points at one live iovec, each iovec at one
        // live buffer of its stated length; `self` owns them all.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                self.msgs.len() as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Datagrams `sock` dropped because its receive queue was full
/// (`SO_MEMINFO`); 0 where the kernel does not say.
#[allow(unsafe_code)]
fn socket_drops(sock: &UdpSocket) -> u64 {
    use std::os::fd::AsRawFd;
    let mut info = [0u32; libc::SK_MEMINFO_DROPS as usize + 1];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r == 0 && len as usize >= std::mem::size_of_val(&info) {
        u64::from(info[libc::SK_MEMINFO_DROPS as usize])
    } else {
        0
    }
}

impl UdpSink {
    /// Binds `addr` and starts counting.
    pub fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let sock = UdpSocket::bind(addr)?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, st) = (received.clone(), stop.clone());
        let socket = sock.try_clone()?;
        let thread = std::thread::spawn(move || {
            let mut batch = Batch::new();
            while !st.load(Ordering::Relaxed) {
                if let Ok(n) = batch.recv(&sock) {
                    r.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        });
        Ok(Self {
            socket,
            received,
            stop,
            thread: Some(thread),
        })
    }

    /// Datagrams that reached the sink so far: received, or dropped by its
    /// socket because the sink was behind.
    pub fn reached(&self) -> u64 {
        self.received.load(Ordering::Relaxed) + socket_drops(&self.socket)
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One-way UDP: `sockets` senders each send 64-byte datagrams to `target`
/// as fast as they can for `duration`. Returns the datagrams/s that
/// reached `sink` (what a proxy forwards under overload: see [`UdpSink`]).
pub fn udp_oneway(
    target: SocketAddr,
    sink: &UdpSink,
    sockets: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..sockets {
        let s = UdpSocket::bind(ANY)?;
        s.connect(target)?;
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let payload = [b'x'; 64];
            while !stop.load(Ordering::Relaxed) {
                // ECONNREFUSED from an earlier ICMP error, ENOBUFS: go on.
                let _ = s.send(&payload);
            }
        }));
    }
    Ok(measure_rate(duration, || sink.reached(), &stop, threads))
}

/// Size of a download datagram: what a QUIC or media server sends.
pub const DOWNLOAD_SIZE: usize = 1200;

/// UDP download, the direction that carries a QUIC or media server's bytes:
/// `clients` sockets each send one request to `target`, and the source
/// `src` (bound by the caller where the target forwards, for this
/// measurement only) answers every new sender with [`DOWNLOAD_SIZE`]-byte
/// datagrams as fast as it can. Returns the datagrams/s that reached the
/// clients: received, or dropped by a client's full socket (as at the
/// one-way sink, [`UdpSink`]: what the proxy forwards, not the share of
/// the CPU the clients won).
pub fn udp_download(
    target: SocketAddr,
    src: UdpSocket,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    // More senders than that is not this measurement: ignore them.
    const MAX_PEERS: usize = 64;
    src.set_read_timeout(Some(Duration::from_millis(100)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    let st = stop.clone();
    threads.push(std::thread::spawn(move || {
        let (mut peers, mut floods) = (Vec::new(), Vec::new());
        let mut buf = [0u8; 2048];
        while !st.load(Ordering::Relaxed) {
            let Ok((_, from)) = src.recv_from(&mut buf) else {
                continue;
            };
            if peers.contains(&from) || peers.len() >= MAX_PEERS {
                continue;
            }
            peers.push(from);
            let (s, st) = (src.try_clone().expect("clone udp socket"), st.clone());
            floods.push(std::thread::spawn(move || {
                let payload = [b'y'; DOWNLOAD_SIZE];
                while !st.load(Ordering::Relaxed) {
                    // ENOBUFS under overload: go on.
                    let _ = s.send_to(&payload, from);
                }
            }));
        }
        for f in floods {
            let _ = f.join();
        }
    }));
    let mut sockets = Vec::new();
    for _ in 0..clients {
        let c = UdpSocket::bind(ANY)?;
        c.set_read_timeout(Some(Duration::from_millis(100)))?;
        c.connect(target)?;
        sockets.push(c.try_clone()?);
        let (stop, received) = (stop.clone(), received.clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let (mut asked, mut counted) = (false, 0u64);
            while !stop.load(Ordering::Relaxed) {
                // Asks again after 100 ms of silence (a lost request).
                if !asked {
                    asked = c.send(b"download").is_ok();
                }
                match c.recv(&mut buf) {
                    Ok(_) => counted += 1,
                    Err(_) => asked = false,
                }
                // One shared counter touched per 64 datagrams, not each.
                if counted == 64 {
                    received.fetch_add(counted, Ordering::Relaxed);
                    counted = 0;
                }
            }
        }));
    }
    let reached =
        || received.load(Ordering::Relaxed) + sockets.iter().map(socket_drops).sum::<u64>();
    Ok(measure_rate(duration, reached, &stop, threads))
}

/// Lets `threads` warm up for half a second, then returns how fast `count`
/// grows over `duration` (per second), and stops and joins them.
fn measure_rate(
    duration: Duration,
    count: impl Fn() -> u64,
    stop: &AtomicBool,
    threads: Vec<std::thread::JoinHandle<()>>,
) -> f64 {
    std::thread::sleep(Duration::from_millis(500));
    let start_count = count();
    let start = Instant::now();
    std::thread::sleep(duration);
    let counted = count() - start_count;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    counted as f64 / elapsed
}

/// Closed-loop UDP request/response: `sockets` clients each send a
/// datagram and wait for its reply, for `duration`. Returns replies/s.
pub fn udp_rr(target: SocketAddr, sockets: usize, duration: Duration) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..sockets {
        let s = UdpSocket::bind(ANY)?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        s.connect(target)?;
        let (stop, done) = (stop.clone(), done.clone());
        threads.push(std::thread::spawn(move || {
            let payload = [b'x'; 64];
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if s.send(&payload).is_err() {
                    continue;
                }
                if s.recv(&mut buf).is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    Ok(measure_rate(
        duration,
        || done.load(Ordering::Relaxed),
        &stop,
        threads,
    ))
}

/// Fixed-rate HTTP/1.1 keep-alive client: `rate` requests/s spread over
/// `connections`, each request timed from its scheduled start (so a stall
/// counts against every request it delays). The connections' schedules are
/// staggered ([`scheduled_at`]), so requests arrive evenly, not in bursts
/// of one per connection. Returns sorted latencies in µs.
///
/// One thread drives every connection, on a clock of [`TICK`]: each tick
/// it collects the responses that arrived (one `epoll_wait` that does not
/// block) and sends the requests that are due. A thread per connection,
/// each sleeping until its next request and blocking on the response,
/// woke twice per request and cost about 11 µs of CPU per request at 62k
/// requests/s, so with 2 cores shared by client, proxy and backend the
/// proxy waited for a CPU as long as it ran. Requests leave up to a tick
/// late and responses are seen up to a tick late; both count, alike for
/// every peer. A connection that fails, closes, or leaves a request
/// unanswered for [`STALL`] fails the measurement.
pub fn http_latency(
    target: SocketAddr,
    rate: f64,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Vec<u64>> {
    use rustix::event::epoll;
    use rustix::time::{
        timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags,
        TimerfdTimerFlags, Timespec,
    };

    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let poll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    let mut clients = Vec::with_capacity(connections);
    for c in 0..connections {
        let stream = TcpStream::connect(target)?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        epoll::add(
            &poll,
            &stream,
            epoll::EventData::new_u64(c as u64),
            epoll::EventFlags::IN,
        )?;
        clients.push(Client {
            stream,
            next: 0,
            waiting: None,
            buf: Vec::with_capacity(4096),
        });
    }
    let timer = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::CLOEXEC)?;
    let tick = Timespec {
        tv_sec: 0,
        tv_nsec: TICK.as_nanos() as _,
    };
    let every_tick = Itimerspec {
        it_interval: tick,
        it_value: tick,
    };
    timerfd_settime(&timer, TimerfdTimerFlags::empty(), &every_tick)?;
    let start = monotonic();
    let mut out = Vec::with_capacity((rate * duration.as_secs_f64()) as usize + connections);
    let mut events = Vec::with_capacity(connections);
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        let now = monotonic();
        // What arrived since the last tick.
        events.clear();
        match epoll::wait(
            &poll,
            rustix::buffer::spare_capacity(&mut events),
            Some(&zero),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        for event in &events {
            let id = event.data.u64();
            let client = &mut clients[id as usize];
            client.receive(id)?;
            while let Some(len) = response_len(&client.buf) {
                let Some(due) = client.waiting.take() else {
                    anyhow::bail!("response with no request on connection {id}");
                };
                out.push(now.saturating_sub(due).as_micros() as u64);
                client.buf.drain(..len);
                client.next += 1;
            }
        }
        // What is due now.
        let mut busy = false;
        for (c, client) in clients.iter_mut().enumerate() {
            if let Some(due) = client.waiting {
                anyhow::ensure!(
                    now.saturating_sub(due) < STALL,
                    "no response within {STALL:?} on connection {c}"
                );
                busy = true;
                continue;
            }
            let due = scheduled_at(interval, client.next, c, connections);
            if due >= duration {
                continue; // this connection's schedule is done
            }
            busy = true;
            let due = start + due;
            if due <= now {
                // One request in flight per connection: the socket's send
                // buffer is empty, so it takes the request whole.
                let n = (&client.stream).write(REQUEST)?;
                anyhow::ensure!(n == REQUEST.len(), "request cut short on connection {c}");
                client.waiting = Some(due);
            }
        }
        if !busy {
            out.sort_unstable();
            return Ok(out);
        }
        // Until the next tick (the count of ticks passed is not needed).
        let mut expirations = [0u8; 8];
        match rustix::io::read(&timer, &mut expirations) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// One keep-alive connection to `target`, one request at a time for
/// `duration`, each sent as soon as the previous response is whole: the
/// round-trip times in nanoseconds, sorted (the latency floor: no
/// queueing, every request reaching a proxy that waits for it).
pub fn round_trips(target: SocketAddr, duration: Duration) -> anyhow::Result<Vec<u64>> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(STALL))?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let mut out = Vec::new();
    let end = monotonic() + duration;
    loop {
        let sent = monotonic();
        if sent >= end {
            break;
        }
        stream.write_all(REQUEST)?;
        let len = loop {
            if let Some(len) = response_len(&buf) {
                break len;
            }
            match stream.read(&mut chunk) {
                Ok(0) => anyhow::bail!("closed by the peer"),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A peer that closes with our request unread resets.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    anyhow::bail!("closed by the peer (reset)")
                }
                Err(e) => return Err(e.into()),
            }
        };
        out.push(monotonic().saturating_sub(sent).as_nanos() as u64);
        buf.drain(..len);
    }
    out.sort_unstable();
    Ok(out)
}

/// The latency client's clock: how often it sends what is due and looks
/// for responses.
const TICK: Duration = Duration::from_micros(50);

/// The request the latency client sends.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

/// How long the latency client waits for a response before it gives up.
const STALL: Duration = Duration::from_secs(5);

/// One connection of the latency client.
struct Client {
    stream: TcpStream,
    /// Index of its next request.
    next: u32,
    /// When the request in flight was due (its latency counts from there).
    waiting: Option<Duration>,
    /// Bytes of responses received and not yet consumed.
    buf: Vec<u8>,
}

impl Client {
    /// Reads what the socket holds; end of stream is an error.
    fn receive(&mut self, id: u64) -> anyhow::Result<()> {
        let mut chunk = [0u8; 4096];
        loop {
            match (&self.stream).read(&mut chunk) {
                Ok(0) => anyhow::bail!("connection {id} closed by the peer"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    anyhow::bail!("connection {id} closed by the peer (reset)")
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// `CLOCK_MONOTONIC` now, the clock the timerfd counts in.
fn monotonic() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The length of the first HTTP/1.1 response in `buf` if all of it is
/// there: status line and headers up to the blank line, then
/// `Content-Length` bytes of body.
pub fn response_len(buf: &[u8]) -> Option<usize> {
    let head = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let body = String::from_utf8_lossy(&buf[..head])
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())
                .flatten()
        })
        .unwrap_or(0);
    (buf.len() >= head + body).then_some(head + body)
}

/// When request `k` of connection `conn` (of `connections`, each sending
/// one request per `interval`) is due, after the start: connection `conn`
/// is offset by `conn / connections` of an interval, so the requests of
/// all connections together are `interval / connections` apart.
fn scheduled_at(interval: Duration, k: u32, conn: usize, connections: usize) -> Duration {
    interval * k + interval.mul_f64(conn as f64 / connections as f64)
}

/// Opens `count` TCP connections to `target` and keeps them idle; returns them.
pub fn idle_connections(target: SocketAddr, count: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        out.push(TcpStream::connect_timeout(&target, Duration::from_secs(5))?);
    }
    Ok(out)
}

/// Established IPv4 TCP connections whose local end is `local`, counted in
/// /proc/net/tcp (on a server's address: the connections it has accepted),
/// in the calling thread's network namespace.
pub fn established_at(local: SocketAddr) -> anyhow::Result<usize> {
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp")?;
    Ok(table
        .lines()
        .skip(1)
        .filter(|line| is_established_at(line, local))
        .count())
}

/// Whether a /proc/net/tcp row is an established connection with local end
/// `local`. The kernel prints the address as the native-endian number of its
/// network-order bytes, and the port in host order, both in hex.
fn is_established_at(row: &str, local: SocketAddr) -> bool {
    const ESTABLISHED: &str = "01";
    let mut fields = row.split_whitespace().skip(1);
    let (Some(addr), Some(_remote), Some(state)) = (fields.next(), fields.next(), fields.next())
    else {
        return false;
    };
    let Some((ip, port)) = addr.split_once(':') else {
        return false;
    };
    let (Ok(ip), Ok(port)) = (u32::from_str_radix(ip, 16), u16::from_str_radix(port, 16)) else {
        return false;
    };
    state == ESTABLISHED
        && SocketAddr::from((std::net::Ipv4Addr::from(ip.to_ne_bytes()), port)) == local
}

/// The value at quantile `q` of sorted samples.
pub fn quantile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn finds_whole_responses_only() {
        let one = b"HTTP/1.1 200 OK\r\ncontent-LENGTH: 6\r\n\r\nhello\n";
        assert_eq!(response_len(one), Some(one.len()));
        assert_eq!(response_len(&one[..one.len() - 1]), None, "body cut");
        assert_eq!(response_len(&one[..20]), None, "headers cut");
        let mut two = one.to_vec();
        two.extend_from_slice(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(response_len(&two), Some(one.len()), "the first of two");
        assert_eq!(response_len(&two[one.len()..]), Some(27), "no body");
    }

    /// An HTTP server on loopback answering every request on every
    /// connection; with `close_after`, it closes each connection after that
    /// many requests.
    fn http_server(close_after: Option<usize>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut answered = 0;
                    while close_after != Some(answered) {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n";
                        if s.write_all(reply).is_err() {
                            return;
                        }
                        answered += 1;
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn latency_client_sends_exactly_its_schedule() {
        let addr = http_server(None);
        // 4 connections, one request each per 2 ms, for 0.5 s: 250 each.
        let lat = http_latency(addr, 2000.0, 4, Duration::from_millis(500)).unwrap();
        assert_eq!(lat.len(), 1000);
        assert!(lat.windows(2).all(|w| w[0] <= w[1]), "sorted");
        assert!(lat[0] > 0, "every request takes some time");
    }

    #[test]
    fn latency_client_fails_when_a_connection_closes() {
        let addr = http_server(Some(3));
        let e = http_latency(addr, 2000.0, 2, Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().contains("closed by the peer"), "{e}");
    }

    /// One request in flight at a time: every round trip is counted, and
    /// a connection the server closes is an error.
    #[test]
    fn round_trips_one_at_a_time() {
        let addr = http_server(None);
        let trips = round_trips(addr, Duration::from_millis(200)).unwrap();
        assert!(trips.len() > 10, "only {} round trips", trips.len());
        assert!(trips.windows(2).all(|w| w[0] <= w[1]), "sorted");
        assert!(trips[0] > 0);
        let e = round_trips(http_server(Some(3)), Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("closed by the peer"), "{e}");
    }

    /// Sends `n` 64-byte datagrams to `to` from a new socket on loopback.
    fn send_datagrams(to: SocketAddr, n: usize) {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..n {
            tx.send_to(&[b'x'; 64], to).unwrap();
        }
    }

    /// A socket nobody reads keeps what fits and drops the rest; what it
    /// kept and what it dropped add up to what was sent.
    #[test]
    fn a_full_socket_counts_what_it_dropped() {
        const SENT: usize = 20_000;
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        send_datagrams(sock.local_addr().unwrap(), SENT);
        sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 128];
        let mut kept = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while kept + socket_drops(&sock) < SENT as u64 {
            match sock.recv(&mut buf) {
                Ok(_) => kept += 1,
                Err(_) => assert!(Instant::now() < deadline, "lost some: kept {kept}"),
            }
        }
        assert!(
            socket_drops(&sock) > 0,
            "a default socket holds {SENT} datagrams?"
        );
        assert_eq!(kept + socket_drops(&sock), SENT as u64);
    }

    /// The sink counts every datagram that reaches it, read or dropped.
    #[test]
    fn the_sink_counts_what_reached_it() {
        const SENT: usize = 20_000;
        let sink = UdpSink::start("127.0.0.1:0".parse().unwrap()).unwrap();
        send_datagrams(sink.socket.local_addr().unwrap(), SENT);
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.reached() < SENT as u64 {
            assert!(
                Instant::now() < deadline,
                "reached {} of {SENT}",
                sink.reached()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sink.reached(), SENT as u64);
    }

    #[test]
    fn connections_take_turns_at_even_gaps() {
        let interval = Duration::from_millis(1);
        let mut due: Vec<Duration> = (0..3)
            .flat_map(|k| (0..4).map(move |c| scheduled_at(interval, k, c, 4)))
            .collect();
        due.sort();
        let gaps: Vec<Duration> = due.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(due.len(), 12);
        assert!(
            gaps.iter().all(|&g| g == Duration::from_micros(250)),
            "{gaps:?}"
        );
        assert_eq!(scheduled_at(interval, 2, 0, 4), Duration::from_millis(2));
    }

    #[test]
    fn reads_a_proc_net_tcp_row() {
        // 127.0.0.2:18081 accepted from 127.0.0.1:50000, established; then
        // the same address listening (state 0A).
        let est = "   7: 0200007F:46A1 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 1 1 0 20 4 30 10 -1";
        let listen = "   0: 0200007F:46A1 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0";
        let at: SocketAddr = "127.0.0.2:18081".parse().unwrap();
        assert!(is_established_at(est, at));
        assert!(!is_established_at(listen, at));
        assert!(!is_established_at(est, "127.0.0.2:18082".parse().unwrap()));
        assert!(!is_established_at(est, "127.0.0.3:18081".parse().unwrap()));
        assert!(!is_established_at("  sl  local_address", at));
    }

    /// Counts the connections a real listener accepted, and only those.
    #[test]
    fn counts_connections_accepted_at_an_address() {
        let listener = TcpListener::bind("127.0.0.9:0").unwrap();
        let at = listener.local_addr().unwrap();
        assert_eq!(established_at(at).unwrap(), 0);
        let clients: Vec<_> = (0..3).map(|_| TcpStream::connect(at).unwrap()).collect();
        let seen =
            crate::procs::wait_for(Duration::from_secs(5), || established_at(at).unwrap() == 3);
        assert!(seen, "never saw 3 connections");
        drop(clients);
    }
}
