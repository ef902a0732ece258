//! The epoll engine: tokio's reactor, one current-thread runtime per worker.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;

use socket2::SockRef;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::{TcpStream, UdpSocket};

use super::splice::{self, Pipe};
use super::{gso, sys, Conn, Datagram, Engine, EngineKind};

/// A tokio UDP socket.
#[derive(Debug)]
pub struct EpollUdp(UdpSocket);

impl Datagram for EpollUdp {
    fn from_std(socket: std::net::UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        UdpSocket::from_std(socket).map(Self)
    }

    async fn recv_from(&self, mut buf: Vec<u8>) -> (io::Result<(usize, SocketAddr)>, Vec<u8>) {
        let r = self.0.recv_buf_from(&mut buf).await;
        (r, buf)
    }

    async fn send_to(&self, buf: Vec<u8>, to: SocketAddr) -> (io::Result<usize>, Vec<u8>) {
        let r = self.0.send_to(&buf, to).await;
        (r, buf)
    }

    async fn recv(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let r = self.0.recv_buf(&mut buf).await;
        (r, buf)
    }

    async fn send(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let r = self.0.send(&buf).await;
        (r, buf)
    }

    fn try_recv_from(&self, buf: &mut Vec<u8>) -> io::Result<(usize, SocketAddr)> {
        // Clears tokio's readiness on WouldBlock.
        self.0.try_recv_buf_from(buf)
    }

    async fn send_parts(
        &self,
        parts: &[IoSlice<'_>],
        segment: Option<u16>,
        to: Option<SocketAddr>,
    ) -> io::Result<usize> {
        loop {
            self.0.writable().await?;
            match self.0.try_io(Interest::WRITABLE, || {
                gso::send(self.0.as_fd(), parts, segment, to)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    fn close(&self) {
        let _ = SockRef::from(&self.0).shutdown(Shutdown::Both);
    }
}

/// Marker type for the epoll engine.
#[derive(Debug)]
pub struct Epoll;

/// A tokio TCP stream.
#[derive(Debug)]
pub struct EpollConn(TcpStream);

impl Conn for EpollConn {
    async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Self(s))
    }

    async fn ready(&self) -> io::Result<()> {
        self.0.readable().await
    }

    fn ready_while_writing(&self) -> Option<impl Future<Output = io::Result<()>> + '_> {
        // tokio registers a socket's readiness once: starting the wait
        // early saves no syscall, and its future (a waiter in tokio's
        // list) made idle connections 378 bytes bigger (docs/design/0007).
        None::<std::future::Pending<io::Result<()>>>
    }

    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        // One attempt: a spurious wake-up answers WouldBlock (which also
        // clears tokio's readiness), and the caller gives the buffer back
        // before waiting again, so an idle connection never holds one.
        //
        // A short read means the receive queue is empty now, so readiness
        // is cleared right away (by answering WouldBlock to `try_io`);
        // otherwise the next `ready` would return at once and cost a
        // `recv` that finds nothing, one per message. Data that arrives
        // after this read is a new edge, which sets readiness again.
        let room = buf.capacity() - buf.len();
        let mut short = None;
        let r = self.0.try_io(Interest::READABLE, || {
            let n = sys::recv(self.0.as_fd(), &mut buf)?;
            if n > 0 && n < room {
                short = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match short {
            Some(n) => (Ok(n), buf),
            None => (r, buf),
        }
    }

    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let mut done = 0;
        while done < buf.len() {
            if let Err(e) = self.0.writable().await {
                return (Err(e), buf);
            }
            // `try_io` clears tokio's readiness on WouldBlock.
            match self.0.try_io(Interest::WRITABLE, || {
                sys::send(self.0.as_fd(), &buf[done..])
            }) {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    fn splice_in(&self, pipe: &Pipe, len: usize) -> io::Result<usize> {
        // `try_io` clears tokio's readiness on WouldBlock.
        self.0
            .try_io(Interest::READABLE, || splice::fill(&self.0, pipe, len))
    }

    fn splice_out(&self, pipe: &Pipe, len: usize) -> io::Result<usize> {
        self.0
            .try_io(Interest::WRITABLE, || splice::drain(pipe, &self.0, len))
    }

    async fn writable(&self) -> io::Result<()> {
        self.0.writable().await
    }

    fn shutdown_write(&self) -> io::Result<()> {
        SockRef::from(&self.0).shutdown(Shutdown::Write)
    }

    fn shutdown_both(&self) {
        let _ = SockRef::from(&self.0).shutdown(Shutdown::Both);
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn from_std(stream: std::net::TcpStream) -> io::Result<Self> {
        // Accepted non-blocking: registering it is the only syscall.
        TcpStream::from_std(stream).map(Self)
    }
}

impl Engine for Epoll {
    type Conn = EpollConn;
    /// Not tokio's `TcpListener`, whose accept registers the new socket
    /// with this worker's reactor: the worker that serves a connection may
    /// be another one (`forward::place`).
    type Listener = AsyncFd<std::net::TcpListener>;
    type Udp = EpollUdp;
    const KIND: EngineKind = EngineKind::Epoll;

    fn run(worker: impl Future<Output = ()>) -> io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        tokio::task::LocalSet::new().block_on(&rt, worker);
        Ok(())
    }

    #[allow(unsafe_code)]
    fn listener(socket: std::net::TcpListener) -> io::Result<Self::Listener> {
        socket.set_nonblocking(true)?;
        // SAFETY: the `AsyncFd` owns the listener, so its descriptor stays
        // open, and the same, for as long as it is registered.
        unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(io::Error::from)
    }

    fn close_listener(listener: &Self::Listener) {
        let _ = SockRef::from(listener.get_ref()).shutdown(Shutdown::Both);
    }

    async fn accept(listener: &Self::Listener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        loop {
            let mut ready = listener.readable().await?;
            // `try_io` clears the readiness on WouldBlock.
            if let Ok(accepted) = ready.try_io(|l| sys::accept(l.as_fd())) {
                return accepted;
            }
        }
    }
}
