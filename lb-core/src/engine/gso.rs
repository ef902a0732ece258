//! UDP segmentation offload: a run of datagrams to one peer in one
//! `sendmsg`.
//!
//! A run of datagrams of one size (the last may be shorter) is handed to
//! the kernel as one buffer with a `UDP_SEGMENT` control message; the
//! kernel (or the NIC) cuts it back into the same datagrams, in order, so
//! the receiver sees exactly what was sent. The route lookup, the skb and
//! the trip through the stack are paid once per run instead of once per
//! datagram. Both engines use it for flows whose client sends faster than
//! one datagram per wake-up (see docs/design/0009-udp-batches.md).
//!
//! This module only sends; it does not wait (both engines wait for
//! writability their own way) and never coalesces received datagrams.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};

/// Most datagrams in one run (`UDP_MAX_SEGMENTS` is 64 on older kernels,
/// 128 on newer ones).
pub const MAX_SEGMENTS: usize = 64;

/// Most payload bytes in one run: a run travels as one IP packet up to
/// segmentation, whose length field has 16 bits.
pub const MAX_BYTES: usize = 65_000;

/// Sends `parts` (concatenated) without waiting, to `to` or, on a
/// connected socket, to its peer. With `segment`, the payload leaves as
/// datagrams of `segment` bytes each, the last one possibly shorter;
/// without, as one datagram. Returns the bytes sent; `WouldBlock` when the
/// socket has no room. `EINTR` is retried.
///
/// Errors: whatever `sendmsg` says. A kernel or device without UDP
/// segmentation answers `EIO`, `EINVAL` or `ENOPROTOOPT` (see
/// [`unsupported`]), and then nothing was sent.
pub fn send(
    fd: BorrowedFd<'_>,
    parts: &[IoSlice<'_>],
    segment: Option<u16>,
    to: Option<SocketAddr>,
) -> io::Result<usize> {
    let to = to.map(SockaddrStorage::from);
    let size;
    let control: &[ControlMessage<'_>] = match segment {
        Some(s) => {
            size = s;
            &[ControlMessage::UdpGsoSegments(&size)]
        }
        None => &[],
    };
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    loop {
        match sendmsg(fd.as_raw_fd(), parts, control, flags, to.as_ref()) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether `e`, from a segmented send, says this kernel, device or path
/// cannot segment (no `UDP_SEGMENT`, no checksum offload on the device, a
/// segment larger than the path MTU): the caller then sends the run one
/// datagram at a time and stops trying segmentation on that socket.
pub fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP | libc::EMSGSIZE)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    fn pair() -> (UdpSocket, UdpSocket) {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        (tx, rx)
    }

    #[test]
    fn a_run_arrives_as_the_same_datagrams_in_order() {
        let (tx, rx) = pair();
        // Three parts that do not line up with the segments: segmentation
        // cuts the concatenation, not the parts.
        let payload: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
        let parts = [
            IoSlice::new(&payload[..70]),
            IoSlice::new(&payload[70..180]),
            IoSlice::new(&payload[180..]),
        ];
        assert_eq!(send(tx.as_fd(), &parts, Some(100), None).unwrap(), 250);
        let mut buf = [0u8; 1024];
        for expect in [&payload[..100], &payload[100..200], &payload[200..]] {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], expect);
        }
    }

    #[test]
    fn without_a_segment_size_the_parts_are_one_datagram() {
        let (tx, rx) = pair();
        let parts = [IoSlice::new(b"hello "), IoSlice::new(b"world")];
        assert_eq!(send(tx.as_fd(), &parts, None, None).unwrap(), 11);
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello world");
    }

    #[test]
    fn a_run_to_an_address_leaves_an_unconnected_socket() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let payload = [1u8; 30];
        let parts = [IoSlice::new(&payload)];
        let to = Some(rx.local_addr().unwrap());
        assert_eq!(send(tx.as_fd(), &parts, Some(10), to).unwrap(), 30);
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!((n, from), (10, tx.local_addr().unwrap()));
        }
    }

    #[test]
    fn too_many_segments_is_an_unsupported_run() {
        let (tx, _rx) = pair();
        // More segments than any kernel takes in one run.
        let payload = vec![7u8; 1000];
        let e = send(tx.as_fd(), &[IoSlice::new(&payload)], Some(1), None).unwrap_err();
        assert!(unsupported(&e), "{e}");
    }
}
