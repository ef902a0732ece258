//! Hostile control clients: connections that never finish a request, half
//! of them idle and half trickling one byte every 100 ms of a request head
//! (or a TLS record) that never ends. With `reconnect`, a connection lbd
//! closes is opened again at the next round, as a client that means harm
//! would, so the pressure lasts as long as the flood (and the server sees
//! a churn of new connections); without, each client connects once.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, SocketType};

/// Where the flood goes.
#[derive(Clone, Debug)]
pub enum Dest {
    /// A unix socket.
    Unix(PathBuf),
    /// A TCP port, from these source addresses in turn.
    Tcp(SocketAddr, Vec<IpAddr>),
}

/// What a flood did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Count {
    /// Connections opened at the start.
    pub opened: usize,
    /// Connections lbd closed.
    pub closed: usize,
    /// Connections opened again after lbd closed them.
    pub reopened: usize,
    /// Connects that failed (refused, or the backlog full).
    pub failed: usize,
}

/// A flood running on its own thread until [`Flood::end`].
pub struct Flood {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Count>,
}

/// How long one connect may take (lbd's backlog full: give up, count it).
const CONNECT: Duration = Duration::from_millis(200);
/// One byte per slow client per round.
const ROUND: Duration = Duration::from_millis(100);
/// No flood outlives this.
const LONGEST: Duration = Duration::from_secs(10 * 60);

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn open(dest: &Dest, i: usize) -> std::io::Result<Self> {
        let conn = match dest {
            Dest::Unix(path) => {
                let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None)?;
                rustix::net::sockopt::set_socket_timeout(
                    &fd,
                    rustix::net::sockopt::Timeout::Send,
                    Some(CONNECT),
                )?;
                rustix::net::connect(&fd, &rustix::net::SocketAddrUnix::new(path.as_path())?)?;
                Self::Unix(UnixStream::from(fd))
            }
            Dest::Tcp(addr, sources) => {
                let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None)?;
                rustix::net::sockopt::set_socket_timeout(
                    &fd,
                    rustix::net::sockopt::Timeout::Send,
                    Some(CONNECT),
                )?;
                rustix::net::bind(&fd, &SocketAddr::new(sources[i % sources.len()], 0))?;
                rustix::net::connect(&fd, addr)?;
                Self::Tcp(TcpStream::from(fd))
            }
        };
        match &conn {
            Conn::Unix(s) => s.set_nonblocking(true)?,
            Conn::Tcp(s) => s.set_nonblocking(true)?,
        }
        Ok(conn)
    }

    /// Sends `byte`; false when the connection is gone.
    fn trickle(&mut self, byte: u8) -> bool {
        let r = match self {
            Conn::Unix(s) => s.write(&[byte]),
            Conn::Tcp(s) => s.write(&[byte]),
        };
        !matches!(r, Ok(0))
            && r.as_ref()
                .map_or_else(|e| e.kind() == ErrorKind::WouldBlock, |_| true)
    }

    /// False when lbd has closed the connection.
    fn alive(&mut self) -> bool {
        let mut b = [0u8; 64];
        let r = match self {
            Conn::Unix(s) => s.read(&mut b),
            Conn::Tcp(s) => s.read(&mut b),
        };
        matches!(r, Ok(n) if n > 0) || r.is_err_and(|e| e.kind() == ErrorKind::WouldBlock)
    }
}

struct Slot {
    conn: Option<Conn>,
    trickle: bool,
    sent: usize,
}

impl Flood {
    /// Opens `n` connections to `dest` (the odd ones trickle `head`, then
    /// `a`s) and keeps them up until [`Flood::end`].
    pub fn start(dest: Dest, n: usize, head: &'static [u8], reconnect: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || run(&dest, n, head, reconnect, &stop))
        };
        Self { stop, thread }
    }

    /// Stops, closes every connection, and says what it did.
    pub fn end(self) -> Count {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn run(dest: &Dest, n: usize, head: &[u8], reconnect: bool, stop: &AtomicBool) -> Count {
    let started = Instant::now();
    let mut count = Count::default();
    let mut slots: Vec<Slot> = (0..n)
        .map(|i| {
            let conn = Conn::open(dest, i).ok();
            match conn {
                Some(_) => count.opened += 1,
                None => count.failed += 1,
            }
            Slot {
                conn,
                trickle: i % 2 == 1,
                sent: 0,
            }
        })
        .collect();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < LONGEST {
        let round = Instant::now();
        for (i, slot) in slots.iter_mut().enumerate() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let alive = match slot.conn.as_mut() {
                None => false,
                Some(c) if slot.trickle => {
                    let byte = head.get(slot.sent).copied().unwrap_or(b'a');
                    slot.sent += 1;
                    c.trickle(byte)
                }
                Some(c) => c.alive(),
            };
            if !alive && slot.conn.take().is_some() {
                count.closed += 1;
            }
            if !alive && reconnect {
                slot.sent = 0;
                slot.conn = Conn::open(dest, i).ok();
                match slot.conn {
                    Some(_) => count.reopened += 1,
                    None => count.failed += 1,
                }
            }
        }
        if let Some(rest) = ROUND.checked_sub(round.elapsed()) {
            // The trickle's pace, not a wait for a condition.
            std::thread::sleep(rest);
        }
    }
    count
}
