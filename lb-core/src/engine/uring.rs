//! The io_uring engine: tokio-uring, one ring per worker. Reads and writes
//! are submitted as ring operations with owned buffers.

#![allow(unsafe_code)]

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};

use socket2::SockRef;
use tokio_uring::net::{TcpListener, TcpStream, UdpSocket};

use super::{Conn, Datagram, Engine, EngineKind};

/// A tokio-uring UDP socket.
pub struct UringUdp(UdpSocket);

impl Datagram for UringUdp {
    fn from_std(socket: std::net::UdpSocket) -> io::Result<Self> {
        Ok(Self(UdpSocket::from_std(socket)))
    }

    async fn recv_from(&self, buf: Vec<u8>) -> (io::Result<(usize, SocketAddr)>, Vec<u8>) {
        self.0.recv_from(buf).await
    }

    async fn send_to(&self, buf: Vec<u8>, to: SocketAddr) -> (io::Result<usize>, Vec<u8>) {
        self.0.send_to(buf, to).await
    }

    async fn recv(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        self.0.read(buf).await
    }

    async fn send(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        self.0.send(buf).await
    }

    fn close(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// Marker type for the io_uring engine.
#[derive(Debug)]
pub struct IoUring;

/// A tokio-uring TCP stream.
pub struct UringConn(TcpStream);

impl UringConn {
    fn sock(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd belongs to `self.0`, which outlives the returned
        // borrow (tied to `&self`); it is only used for getsockname/setsockopt.
        unsafe { BorrowedFd::borrow_raw(self.0.as_raw_fd()) }
    }
}

impl Conn for UringConn {
    const READ_HOLDS_BUFFER: bool = true;

    async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Self(s))
    }

    async fn ready(&self) -> io::Result<()> {
        Ok(())
    }

    async fn read(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        self.0.read(buf).await
    }

    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        self.0.write_all(buf).await
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.0.shutdown(Shutdown::Write)
    }

    fn shutdown_both(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        let fd = self.sock();
        SockRef::from(&fd)
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("not an IP socket"))
    }

    fn set_nodelay(&self) -> io::Result<()> {
        self.0.set_nodelay(true)
    }
}

impl Engine for IoUring {
    type Conn = UringConn;
    type Listener = TcpListener;
    type Udp = UringUdp;
    const UDP_RECEIVERS: usize = 4;
    const KIND: EngineKind = EngineKind::IoUring;

    fn run(worker: impl Future<Output = ()>) -> io::Result<()> {
        let mut builder = tokio_uring::builder();
        builder.entries(1024);
        // Completions are handled by this thread only: let the kernel run
        // their task work at our next syscall instead of interrupting us
        // (an interrupt per completion showed as ~10% of CPU in perf).
        // Kernels before 6.0 refuse these flags: then use a plain ring.
        let mut ring = tokio_uring::uring_builder();
        ring.setup_coop_taskrun().setup_single_issuer();
        builder.uring_builder(&ring);
        let rt = match tokio_uring::Runtime::new(&builder) {
            Ok(rt) => rt,
            Err(e) => {
                tracing::info!(error = %e, "io_uring: COOP_TASKRUN/SINGLE_ISSUER refused, using a plain ring");
                builder.uring_builder(&tokio_uring::uring_builder());
                tokio_uring::Runtime::new(&builder)?
            }
        };
        rt.block_on(worker);
        Ok(())
    }

    fn listener(socket: std::net::TcpListener) -> io::Result<TcpListener> {
        Ok(TcpListener::from_std(socket))
    }

    fn close_listener(listener: &TcpListener) {
        // SAFETY: the fd belongs to `listener`, alive for this call.
        let fd = unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) };
        let _ = SockRef::from(&fd).shutdown(Shutdown::Both);
    }

    async fn accept(listener: &TcpListener) -> io::Result<(UringConn, SocketAddr)> {
        let (s, peer) = listener.accept().await?;
        Ok((UringConn(s), peer))
    }
}
