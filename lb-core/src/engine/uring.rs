//! The io_uring engine: one ring per worker, run by our own driver
//! (`engine/ring/`).
//!
//! Reads wait for readability with a poll operation that holds no buffer,
//! then receive at once with a plain `recv(MSG_DONTWAIT)` into a buffer
//! taken at that moment, so an idle connection holds no buffer and a
//! message costs one ring round trip (the poll), not two. A write, too, is
//! a plain `send(MSG_DONTWAIT)` first; only what the socket does not take
//! goes to the ring. Accepts are plain too, while the backlog holds
//! connections; the ring polls for the next one. Polls, those sends and
//! connects are ring operations; everything a task queues is submitted in
//! one batch when the worker's runtime is about to park.
//!
//! A bulk transfer (reads that fill the whole buffer) leaves the ring:
//! while data keeps waiting, the connection receives and sends with plain
//! non-blocking syscalls, because a ring operation costs a trip through
//! the scheduler and one more syscall (tokio's `epoll_wait`) for the same
//! work, about a fifth of the CPU per byte. It returns to the ring when a
//! read comes back short or a send would block, and while data keeps
//! waiting the forwarder moves it through a kernel pipe
//! ([`super::splice`]). See docs/design/0007-own-io-uring-driver.md and
//! 0008-splice.md.

#![allow(unsafe_code)]

use std::cell::Cell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};

use io_uring::{opcode, types};
use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};

use super::ring::{self, Op};
use super::splice::{self, Pipe};
use super::{gso, sys, Conn, Datagram, Engine, EngineKind};

/// A socket used by ring operations. Queued entries name it by number, so
/// they are submitted before it is closed (the number could be reused).
struct RingSocket(Socket);

impl RingSocket {
    fn fd(&self) -> types::Fd {
        types::Fd(self.0.as_raw_fd())
    }
}

impl Drop for RingSocket {
    fn drop(&mut self) {
        ring::flush();
    }
}

/// Io_uring operations may wait in the kernel; they need no O_NONBLOCK
/// (a connection sets it when it first splices; ring operations pass their
/// own flags and do not depend on it).
fn blocking(s: Socket) -> io::Result<RingSocket> {
    s.set_nonblocking(false)?;
    Ok(RingSocket(s))
}

async fn poll(fd: types::Fd, events: libc::c_short) -> io::Result<()> {
    let entry = opcode::PollAdd::new(fd, events as u32).build();
    // SAFETY: a poll touches no user memory.
    let (r, ()) = unsafe { Op::new(entry, ()) }.await;
    r.map(drop)
}

/// Receives into `buf`'s spare capacity.
async fn recv(fd: types::Fd, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
    let len = buf.len();
    let spare = buf.spare_capacity_mut();
    let want = u32::try_from(spare.len()).unwrap_or(u32::MAX);
    let entry = opcode::Recv::new(fd, spare.as_mut_ptr().cast(), want).build();
    // SAFETY: the entry points into `buf`'s heap allocation, owned by the op.
    let (r, mut buf) = unsafe { Op::new(entry, buf) }.await;
    match r {
        Ok(n) => {
            // SAFETY: the kernel initialised `n` bytes after `len`.
            unsafe { buf.set_len(len + n as usize) };
            (Ok(n as usize), buf)
        }
        Err(e) => (Err(e), buf),
    }
}

/// Sends `buf[from..]` once; returns the bytes sent.
async fn send(fd: types::Fd, buf: Vec<u8>, from: usize) -> (io::Result<usize>, Vec<u8>) {
    let rest = &buf[from..];
    let want = u32::try_from(rest.len()).unwrap_or(u32::MAX);
    let entry = opcode::Send::new(fd, rest.as_ptr(), want)
        .flags(libc::MSG_NOSIGNAL)
        .build();
    // SAFETY: the entry points into `buf`'s heap allocation, owned by the op.
    let (r, buf) = unsafe { Op::new(entry, buf) }.await;
    (r.map(|n| n as usize), buf)
}

/// A message header with its one iovec and address, boxed so the
/// pointers between them stay valid while the kernel uses them.
struct Msg {
    hdr: libc::msghdr,
    iov: libc::iovec,
    addr: SockAddrStorage,
}

impl Msg {
    fn boxed(buf: *mut u8, len: usize, addr: Option<&SockAddr>) -> Box<Msg> {
        // SAFETY: all-zero is a valid msghdr and iovec.
        let mut m = Box::new(Msg {
            hdr: unsafe { std::mem::zeroed() },
            iov: libc::iovec {
                iov_base: buf.cast(),
                iov_len: len,
            },
            addr: SockAddrStorage::zeroed(),
        });
        let namelen = match addr {
            Some(a) => {
                // SAFETY: `a` holds `a.len()` initialised bytes, no more than
                // the storage's size.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        a.as_ptr().cast::<u8>(),
                        (&raw mut m.addr).cast::<u8>(),
                        a.len() as usize,
                    )
                };
                a.len()
            }
            None => m.addr.size_of(),
        };
        m.hdr.msg_iov = &raw mut m.iov;
        m.hdr.msg_iovlen = 1;
        m.hdr.msg_name = (&raw mut m.addr).cast();
        m.hdr.msg_namelen = namelen;
        m
    }
}

/// A UDP socket on the ring.
pub struct UringUdp(RingSocket);

impl Datagram for UringUdp {
    fn from_std(socket: std::net::UdpSocket) -> io::Result<Self> {
        blocking(Socket::from(socket)).map(Self)
    }

    async fn recv_from(&self, mut buf: Vec<u8>) -> (io::Result<(usize, SocketAddr)>, Vec<u8>) {
        let len = buf.len();
        let spare = buf.spare_capacity_mut();
        let mut msg = Msg::boxed(spare.as_mut_ptr().cast(), spare.len(), None);
        let entry = opcode::RecvMsg::new(self.0.fd(), &raw mut msg.hdr).build();
        // SAFETY: the entry points into `msg` and `buf`'s heap allocations,
        // both owned by the op.
        let (r, (mut buf, msg)) = unsafe { Op::new(entry, (buf, msg)) }.await;
        let n = match r {
            Ok(n) => n as usize,
            Err(e) => return (Err(e), buf),
        };
        // SAFETY: the kernel initialised `n` bytes after `len`, and the
        // address up to `msg_namelen`.
        unsafe { buf.set_len(len + n) };
        let from = unsafe { SockAddr::new(msg.addr, msg.hdr.msg_namelen) };
        match from.as_socket() {
            Some(from) => (Ok((n, from)), buf),
            None => (Err(io::Error::other("datagram from a non-IP address")), buf),
        }
    }

    async fn send_to(&self, mut buf: Vec<u8>, to: SocketAddr) -> (io::Result<usize>, Vec<u8>) {
        let to = SockAddr::from(to);
        let msg = Msg::boxed(buf.as_mut_ptr(), buf.len(), Some(&to));
        let entry = opcode::SendMsg::new(self.0.fd(), &raw const msg.hdr).build();
        // SAFETY: as in `recv_from`.
        let (r, (buf, _msg)) = unsafe { Op::new(entry, (buf, msg)) }.await;
        (r.map(|n| n as usize), buf)
    }

    async fn recv(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        recv(self.0.fd(), buf).await
    }

    async fn send(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        send(self.0.fd(), buf, 0).await
    }

    fn try_recv_from(&self, buf: &mut Vec<u8>) -> io::Result<(usize, SocketAddr)> {
        let (n, from) = self
            .0
             .0
            .recv_from_with_flags(buf.spare_capacity_mut(), libc::MSG_DONTWAIT)?;
        // SAFETY: the kernel initialised `n` bytes of the spare capacity
        // (`n` never exceeds it: no MSG_TRUNC).
        unsafe { buf.set_len(buf.len() + n) };
        let from = from
            .as_socket()
            .ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
        Ok((n, from))
    }

    async fn send_parts(
        &self,
        parts: &[IoSlice<'_>],
        segment: Option<u16>,
        to: Option<SocketAddr>,
    ) -> io::Result<usize> {
        // A plain syscall, like bulk TCP: the run is already a batch, and a
        // ring operation would cost a scheduler trip for the same work.
        loop {
            match gso::send(self.0 .0.as_fd(), parts, segment, to) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    poll(self.0.fd(), libc::POLLOUT).await?;
                }
                r => return r,
            }
        }
    }

    fn close(&self) {
        let _ = self.0 .0.shutdown(Shutdown::Both);
    }
}

/// Marker type for the io_uring engine.
#[derive(Debug)]
pub struct IoUring;

/// A TCP stream on the ring.
pub struct UringConn {
    sock: RingSocket,
    /// The last read filled its buffer: more data is likely waiting, so
    /// the next read skips the poll and the ring.
    hot: Cell<bool>,
    /// O_NONBLOCK is set (for splice, which has no per-call flag for the
    /// socket's side; ring operations do not depend on it).
    nonblocking: Cell<bool>,
}

impl UringConn {
    fn new(sock: RingSocket) -> Self {
        Self {
            sock,
            hot: Cell::new(false),
            nonblocking: Cell::new(false),
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        if !self.nonblocking.get() {
            self.sock.0.set_nonblocking(true)?;
            self.nonblocking.set(true);
        }
        Ok(())
    }
}

impl Conn for UringConn {
    async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        sock.set_tcp_nodelay(true)?;
        let sock = RingSocket(sock);
        let to = Box::new(SockAddr::from(addr));
        let entry = opcode::Connect::new(sock.fd(), to.as_ptr().cast(), to.len()).build();
        // SAFETY: the entry points into `to`'s heap allocation, owned by the op.
        let (r, _to) = unsafe { Op::new(entry, to) }.await;
        r?;
        Ok(Self::new(sock))
    }

    async fn ready(&self) -> io::Result<()> {
        if self.hot.get() {
            // A bulk transfer may not wait for anything: let the worker's
            // other tasks run whenever this task's budget is spent.
            tokio::task::coop::consume_budget().await;
            return Ok(());
        }
        poll(self.sock.fd(), libc::POLLIN | libc::POLLRDHUP).await
    }

    fn ready_while_writing(&self) -> Option<impl Future<Output = io::Result<()>> + '_> {
        // The poll is queued now and goes to the kernel in the same batch
        // as the send, which saves one ring round trip per message.
        Some(self.ready())
    }

    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        // The caller waited for readability (`ready`), or the last read
        // filled its buffer: receive now with a plain syscall. A ring
        // receive would do the same work one scheduler round trip later.
        // Nothing there after all answers WouldBlock, and the caller waits
        // again without holding the buffer.
        let spare = buf.capacity() - buf.len();
        let r = sys::recv(self.sock.0.as_fd(), &mut buf);
        self.hot.set(matches!(r, Ok(n) if n == spare && n > 0));
        (r, buf)
    }

    async fn write_all(&self, mut buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let mut done = 0;
        if !buf.is_empty() {
            // Send what the socket takes now, and only the rest (if any)
            // through the ring, which waits for room in the kernel. Ring
            // sends that left in one batch at the park hook made the rate
            // at two workers swing by a tenth from run to run (0007).
            match sys::send(self.sock.0.as_fd(), &buf) {
                Ok(n) => done = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return (Err(e), buf),
            }
        }
        while done < buf.len() {
            let (r, b) = send(self.sock.fd(), buf, done).await;
            buf = b;
            match r {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    fn splice_in(&self, pipe: &Pipe, len: usize) -> io::Result<usize> {
        self.set_nonblocking()?;
        let r = splice::fill(&self.sock.0, pipe, len);
        if r.is_err() {
            // Nothing waits (or it failed): back to polling before reads.
            self.hot.set(false);
        }
        r
    }

    fn splice_out(&self, pipe: &Pipe, len: usize) -> io::Result<usize> {
        self.set_nonblocking()?;
        splice::drain(pipe, &self.sock.0, len)
    }

    async fn writable(&self) -> io::Result<()> {
        poll(self.sock.fd(), libc::POLLOUT).await
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.sock.0.shutdown(Shutdown::Write)
    }

    fn shutdown_both(&self) {
        let _ = self.sock.0.shutdown(Shutdown::Both);
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock
            .0
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("not an IP socket"))
    }

    fn from_std(stream: std::net::TcpStream) -> io::Result<Self> {
        // Accepted by the ring without SOCK_NONBLOCK: blocking already,
        // as ring operations want it.
        Ok(Self::new(RingSocket(Socket::from(stream))))
    }
}

/// A listening socket on the ring.
pub struct UringListener(RingSocket);

impl Engine for IoUring {
    type Conn = UringConn;
    type Listener = UringListener;
    type Udp = UringUdp;
    const KIND: EngineKind = EngineKind::IoUring;

    fn run(worker: impl Future<Output = ()>) -> io::Result<()> {
        ring::run(ring::new_ring()?, worker)
    }

    fn listener(socket: std::net::TcpListener) -> io::Result<UringListener> {
        // Non-blocking: accepts are plain syscalls that must not wait
        // (the ring polls for a connection instead).
        let socket = Socket::from(socket);
        socket.set_nonblocking(true)?;
        Ok(UringListener(RingSocket(socket)))
    }

    fn close_listener(listener: &UringListener) {
        let _ = listener.0 .0.shutdown(Shutdown::Both);
    }

    async fn accept(listener: &UringListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        // Plain accepts while the backlog holds connections; the ring only
        // waits for it to fill. A ring accept takes one connection per
        // ring round trip, so a burst of N connections waited N trips
        // (lb-bench new connections/s at 1 worker: 0.81x HAProxy).
        loop {
            match listener.0 .0.accept() {
                Ok((sock, addr)) => {
                    // A burst may fill the backlog faster than this loop
                    // empties it: let the worker's other tasks run between.
                    tokio::task::coop::consume_budget().await;
                    let addr = addr
                        .as_socket()
                        .ok_or_else(|| io::Error::other("accepted a non-IP connection"))?;
                    // Accepted without SOCK_NONBLOCK: blocking, as ring
                    // operations want it.
                    return Ok((sock.into(), addr));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    poll(listener.0.fd(), libc::POLLIN).await?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}
