//! The two I/O engines behind one small interface. Forwarding logic is
//! written once, generic over [`Engine`], so both engines have the same
//! behaviour by construction; only accept, connect, read, write and
//! shutdown differ. See docs/design/0001-engines-and-workers.md.

pub mod epoll;
pub mod gso;
mod ring;
pub mod splice;
mod sys;
pub mod uring;
pub mod wakeup;

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;

use lb_config::EngineChoice;

use splice::Pipe;

/// A proxied TCP stream, used through shared references so one task can
/// read it while another writes it (io_uring style owned buffers).
#[allow(async_fn_in_trait)]
pub trait Conn: Sized + 'static {
    /// Connects to `addr` with `TCP_NODELAY` set.
    async fn connect(addr: SocketAddr) -> io::Result<Self>;
    /// Waits until a read would not block, holding no buffer, so idle
    /// connections hold none.
    async fn ready(&self) -> io::Result<()>;
    /// A [`Conn::ready`] wait for the forwarder to start before it writes
    /// a message it read from this connection, so the wait runs during
    /// the write; `None` where that saves nothing (the future would only
    /// make every connection's state bigger).
    fn ready_while_writing(&self) -> Option<impl Future<Output = io::Result<()>> + '_>;
    /// Reads into `buf`'s spare capacity (`buf` arrives empty), after
    /// [`Conn::ready`]. It tries once and may answer `WouldBlock`: the
    /// caller then returns the buffer and waits on `ready` again.
    async fn read(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>);
    /// Writes all of `buf`.
    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>);
    /// Moves up to `len` bytes waiting on the socket into `pipe` without
    /// waiting: 0 at end of stream, `WouldBlock` when nothing waits (the
    /// caller then goes back to [`Conn::ready`]).
    fn splice_in(&self, pipe: &Pipe, len: usize) -> io::Result<usize>;
    /// Moves up to `len` bytes from `pipe` to the socket without waiting:
    /// `WouldBlock` when it has no room (the caller waits on
    /// [`Conn::writable`]).
    fn splice_out(&self, pipe: &Pipe, len: usize) -> io::Result<usize>;
    /// Waits until a write would not block.
    async fn writable(&self) -> io::Result<()>;
    /// Sends FIN (half-close).
    fn shutdown_write(&self) -> io::Result<()>;
    /// Shuts both directions down, which also completes any read still
    /// in flight (io_uring keeps a socket open until its operations end).
    fn shutdown_both(&self);
    /// The local address of the connection (the VIP the client reached).
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// Takes over a socket that this engine's [`Engine::accept`] returned,
    /// on this worker or another. Called inside `Engine::run`.
    fn from_std(stream: std::net::TcpStream) -> io::Result<Self>;
}

/// A UDP socket with owned-buffer operations. Listener sockets use
/// `recv_from`/`send_to`; per-flow upstream sockets are connected and use
/// `recv`/`send`.
#[allow(async_fn_in_trait)]
pub trait Datagram: Sized + 'static {
    /// Wraps a bound socket, setting the blocking mode the engine needs.
    /// Called inside `Engine::run`.
    fn from_std(socket: std::net::UdpSocket) -> io::Result<Self>;
    /// Receives one datagram into `buf`'s spare capacity (`buf` arrives empty).
    async fn recv_from(&self, buf: Vec<u8>) -> (io::Result<(usize, SocketAddr)>, Vec<u8>);
    /// Sends `buf` as one datagram to `to`.
    async fn send_to(&self, buf: Vec<u8>, to: SocketAddr) -> (io::Result<usize>, Vec<u8>);
    /// Receives one datagram on a connected socket.
    async fn recv(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>);
    /// Sends one datagram on a connected socket.
    async fn send(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>);
    /// Receives one more datagram into `buf`'s spare capacity (appending
    /// to what `buf` holds) without waiting: `WouldBlock` when none waits.
    /// A plain syscall on both engines, for draining a socket after a
    /// receive found it busy.
    fn try_recv_from(&self, buf: &mut Vec<u8>) -> io::Result<(usize, SocketAddr)>;
    /// Sends `parts`, concatenated, in one syscall, to `to` (or a connected
    /// socket's peer): as one datagram, or with `segment` as datagrams of
    /// that many bytes (the last may be shorter; see [`gso`]). Waits while
    /// the socket has no room.
    async fn send_parts(
        &self,
        parts: &[IoSlice<'_>],
        segment: Option<u16>,
        to: Option<SocketAddr>,
    ) -> io::Result<usize>;
    /// Shuts the socket down, completing any receive still in flight.
    fn close(&self);
}

/// An engine: how a worker runs and accepts.
#[allow(async_fn_in_trait)]
pub trait Engine: 'static {
    /// Its streams.
    type Conn: Conn;
    /// Its listening socket.
    type Listener: 'static;
    /// Its UDP sockets.
    type Udp: Datagram;
    /// Which engine this is.
    const KIND: EngineKind;
    /// Runs `worker` to completion on a new runtime on this thread.
    fn run(worker: impl Future<Output = ()>) -> io::Result<()>;
    /// Wraps a bound, listening, non-blocking socket. Called inside `run`.
    fn listener(socket: std::net::TcpListener) -> io::Result<Self::Listener>;
    /// Stops the listening socket now, failing an accept still in flight
    /// (io_uring would otherwise keep the socket open until it completes).
    fn close_listener(listener: &Self::Listener);
    /// Accepts one connection: its socket, on no worker's runtime yet (the
    /// worker that serves it takes it with [`Conn::from_std`]), and the
    /// peer's address.
    async fn accept(listener: &Self::Listener) -> io::Result<(std::net::TcpStream, SocketAddr)>;
}

/// The engine in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring (our driver on the `io-uring` crate).
    IoUring,
    /// epoll (tokio).
    Epoll,
}

impl EngineKind {
    /// The name used in config, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::IoUring => "io_uring",
            Self::Epoll => "epoll",
        }
    }
}

/// The engine a configuration resolves to, and what the log should say
/// about the choice.
#[derive(Clone, Debug)]
pub struct Chosen {
    /// The engine to run.
    pub kind: EngineKind,
    /// Why `auto` fell back to epoll (a warning).
    pub fallback: Option<String>,
    /// What the start-up checks measured (information), or why an explicit
    /// `io_uring` may be slow here (a warning, in `slow`).
    pub note: Option<String>,
    /// An explicit `io_uring` failed the wake-up check: it runs anyway, as
    /// configured, but every idle worker will answer late.
    pub slow: bool,
}

/// Resolves the configured choice to an engine. `auto` takes io_uring when
/// it can be set up, supports every operation the engine submits, and
/// wakes a parked worker promptly ([`wakeup::check`]); otherwise epoll,
/// with the reason. An explicit `io_uring` that cannot be set up is an
/// error; one that wakes late runs, with a warning.
pub fn choose(choice: EngineChoice) -> Result<Chosen, String> {
    let chosen = |kind, fallback, note, slow| Chosen {
        kind,
        fallback,
        note,
        slow,
    };
    match choice {
        EngineChoice::Epoll => Ok(chosen(EngineKind::Epoll, None, None, false)),
        EngineChoice::IoUring => {
            probe_io_uring()?;
            Ok(match wakeup::check() {
                Ok(figures) => chosen(EngineKind::IoUring, None, Some(figures), false),
                Err(why) => chosen(EngineKind::IoUring, None, Some(why), true),
            })
        }
        EngineChoice::Auto => match probe_io_uring().and_then(|()| wakeup::check()) {
            Ok(figures) => Ok(chosen(EngineKind::IoUring, None, Some(figures), false)),
            Err(why) => Ok(chosen(EngineKind::Epoll, Some(why), None, false)),
        },
    }
}

/// Checks that io_uring can be set up here and supports every operation
/// the engine submits.
pub fn probe_io_uring() -> Result<(), String> {
    let ring = ring::new_ring().map_err(|e| {
        let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|v| format!(" (kernel.io_uring_disabled = {})", v.trim()))
            .unwrap_or_default();
        format!("io_uring_setup failed: {e}{sysctl}")
    })?;
    ring::probe_opcodes(&ring)
}
