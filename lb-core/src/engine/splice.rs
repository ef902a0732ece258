//! Bulk transfers through a kernel pipe.
//!
//! Once a read fills the whole copy buffer, a connection is in a bulk
//! transfer, and its bytes can move socket → pipe → socket with `splice`:
//! the pipe takes references to the received pages and the send hands
//! them on, so the proxy copies nothing through user space. A pipe is two
//! descriptors and up to [`PIPE_SIZE`] bytes of kernel memory, so a
//! connection leases one only while data keeps waiting, and a worker
//! keeps a few between leases. See docs/design/0008-splice.md.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::pipe::{PipeFlags, SpliceFlags};

/// Bytes a pipe is asked to hold (64 pages; the kernel's default is 16).
/// A fill moves at most this much, so four times the default means a
/// quarter of the splice calls per byte.
pub const PIPE_SIZE: usize = 256 * 1024;

/// Pipes (open, leased or pooled) per worker; beyond that, bulk transfers
/// are copied. Each is two descriptors, kept out of the connection cap.
pub const PIPES_PER_WORKER: u64 = 64;

/// Idle pipes a worker keeps for the next bulk transfer.
pub const POOL_MAX: usize = 16;

/// A pipe with both ends non-blocking.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What it holds: [`PIPE_SIZE`], or the kernel's default where
    /// `F_SETPIPE_SZ` was refused (an unprivileged user past
    /// `fs.pipe-user-pages-soft`, or `fs.pipe-max-size` lower).
    capacity: usize,
}

impl Pipe {
    /// Opens a pipe (`pipe2`, non-blocking, close-on-exec).
    pub fn new() -> io::Result<Self> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let capacity = match rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE) {
            Ok(n) => n,
            Err(_) => rustix::pipe::fcntl_getpipe_size(&write)?,
        };
        Ok(Self {
            read,
            write,
            capacity,
        })
    }

    /// Bytes it holds; a fill asks for at most this, so it never meets a
    /// full pipe.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    loop {
        match rustix::pipe::splice(
            &from,
            None,
            &to,
            None,
            len,
            SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// Moves up to `len` bytes waiting on `socket` into `pipe`: 0 at end of
/// stream, `WouldBlock` when nothing waits. `socket` must be non-blocking
/// (a blocking TCP socket waits for data whatever the splice flags say).
pub fn fill(socket: impl AsFd, pipe: &Pipe, len: usize) -> io::Result<usize> {
    splice(socket, &pipe.write, len)
}

/// Moves up to `len` bytes from `pipe` to `socket`: `WouldBlock` when the
/// socket has no room. `socket` must be non-blocking.
pub fn drain(pipe: &Pipe, socket: impl AsFd, len: usize) -> io::Result<usize> {
    splice(&pipe.read, socket, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// A pipe is grown to PIPE_SIZE (within the kernel's limits for any
    /// user), and holds a fill of that size.
    #[test]
    fn a_pipe_holds_pipe_size() {
        let pipe = Pipe::new().unwrap();
        assert_eq!(pipe.capacity(), PIPE_SIZE);
        let data = vec![7u8; PIPE_SIZE];
        let n = rustix::io::write(&pipe.write, &data).unwrap();
        assert_eq!(n, PIPE_SIZE, "the pipe took only {n} bytes");
    }

    #[test]
    fn bytes_cross_a_pipe_in_order_and_eof_reads_zero() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (middle_in, _) = listener.accept().unwrap();
        let mut receiver_side = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (middle_out, _) = listener.accept().unwrap();
        middle_in.set_nonblocking(true).unwrap();
        middle_out.set_nonblocking(true).unwrap();
        let pipe = Pipe::new().unwrap();

        assert_eq!(
            fill(&middle_in, &pipe, PIPE_SIZE).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "nothing sent yet"
        );
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        sender.write_all(&data).unwrap();
        let mut moved = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while moved < data.len() {
            assert!(std::time::Instant::now() < deadline, "moved {moved}");
            match fill(&middle_in, &pipe, PIPE_SIZE) {
                Ok(n) => {
                    let mut left = n;
                    while left > 0 {
                        left -= drain(&pipe, &middle_out, left).unwrap();
                    }
                    moved += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        let mut got = vec![0; data.len()];
        receiver_side.read_exact(&mut got).unwrap();
        assert!(got == data, "bytes changed on the way");
        drop(sender);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match fill(&middle_in, &pipe, PIPE_SIZE) {
                Ok(0) => break,
                Ok(n) => panic!("{n} bytes after the sender closed"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "no EOF");
                    std::thread::yield_now();
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}
