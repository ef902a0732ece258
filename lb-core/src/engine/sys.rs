//! The non-blocking socket calls both engines make on the hot path (and
//! the epoll engine's accept).
//!
//! They go straight to the kernel through rustix rather than through
//! glibc's `recv` and `send` (or std's, which call them): those two are
//! thread-cancellation points, so glibc switches asynchronous cancellation
//! on and off around every call, work a forwarder that never cancels a
//! thread does not need twice per message (docs/design/0007, "Socket calls
//! without glibc").

use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;

use rustix::buffer::spare_capacity;
use rustix::io::retry_on_intr;
use rustix::net::{RecvFlags, SendFlags, SocketFlags};

/// Receives into `buf`'s spare capacity without waiting: the bytes
/// received (0 at end of stream), or `WouldBlock` when none wait. `buf`
/// must have spare capacity (none would read as end of stream).
pub fn recv(fd: BorrowedFd<'_>, buf: &mut Vec<u8>) -> io::Result<usize> {
    debug_assert!(buf.len() < buf.capacity(), "no room to receive into");
    let (n, _) =
        retry_on_intr(|| rustix::net::recv(fd, spare_capacity(&mut *buf), RecvFlags::DONTWAIT))?;
    Ok(n)
}

/// Sends as much of `buf` as the socket takes without waiting, or
/// `WouldBlock` when it takes nothing. A peer that has gone away is an
/// error (`MSG_NOSIGNAL`: never a `SIGPIPE`, whatever the process does
/// with that signal).
pub fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
    Ok(retry_on_intr(|| rustix::net::send(fd, buf, flags))?)
}

/// Accepts one connection waiting on a non-blocking listener, or
/// `WouldBlock`; the socket comes non-blocking and close-on-exec, with the
/// peer's address.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
    let (fd, peer) = retry_on_intr(|| rustix::net::acceptfrom_with(listener, flags))?;
    // Closes the socket (`fd` drops) if the peer is not an IP address.
    let peer = peer
        .and_then(|p| SocketAddr::try_from(p).ok())
        .ok_or_else(|| io::Error::other("accepted a connection with no IP peer"))?;
    Ok((fd.into(), peer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::fd::AsFd;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        (a, b)
    }

    #[test]
    fn recv_appends_what_waits_and_never_blocks() {
        let (mut a, b) = pair();
        let mut buf = Vec::with_capacity(64);
        let e = recv(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "nothing sent yet");

        a.write_all(b"hello").unwrap();
        buf.extend_from_slice(b">");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let n = loop {
            match recv(b.as_fd(), &mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "data never arrived");
                    std::thread::yield_now();
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(n, 5);
        assert_eq!(buf, b">hello", "appended after what was there");

        a.shutdown(Shutdown::Write).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut rest = Vec::with_capacity(8);
        loop {
            match recv(b.as_fd(), &mut rest) {
                Ok(0) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "FIN never arrived");
                    std::thread::yield_now();
                }
                r => panic!("expected end of stream, got {r:?}"),
            }
        }
    }

    #[test]
    fn send_to_a_reset_peer_fails() {
        let (a, b) = pair();
        assert_eq!(send(a.as_fd(), b"x").unwrap(), 1);
        // Unread data makes the close a reset.
        drop(b);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let e = loop {
            match send(a.as_fd(), b"more") {
                Ok(_) => {
                    assert!(std::time::Instant::now() < deadline, "send never failed");
                    std::thread::yield_now();
                }
                Err(e) => break e,
            }
        };
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{e}"
        );
    }
}
