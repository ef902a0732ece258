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

#![allow(unsafe_code)]

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use socket2::SockAddr;

/// Most datagrams in one run (`UDP_MAX_SEGMENTS` is 64 on older kernels,
/// 128 on newer ones).
pub const MAX_SEGMENTS: usize = 64;

/// Most payload bytes in one run: a run travels as one IP packet up to
/// segmentation, whose length field has 16 bits.
pub const MAX_BYTES: usize = 65_000;

/// Control-message space for one `u16`, aligned like a `cmsghdr`.
#[repr(C, align(8))]
struct Control([u8; 32]);

/// Sends `parts` (concatenated) without waiting, to `to` or, on a
/// connected socket, to its peer. With `segment`, the payload leaves as datagrams of `segment`
/// bytes each, the last one possibly shorter; without, as one datagram.
/// Returns the bytes sent; `WouldBlock` when the socket has no room.
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
    // SAFETY: all-zero is a valid msghdr (no name, no control).
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    let to = to.map(SockAddr::from);
    if let Some(to) = &to {
        // The kernel only reads the address, which lives until the call ends.
        hdr.msg_name = to.as_ptr().cast_mut().cast();
        hdr.msg_namelen = to.len();
    }
    // `IoSlice` is guaranteed ABI-compatible with `iovec` on Unix; the
    // kernel only reads through these pointers.
    hdr.msg_iov = parts.as_ptr().cast_mut().cast();
    hdr.msg_iovlen = parts.len() as _;
    let mut control = Control([0; 32]);
    if let Some(size) = segment {
        // SAFETY: CMSG_SPACE of a u16 (24 bytes) fits in `control`, which is
        // aligned for a cmsghdr; CMSG_FIRSTHDR then points into it, and the
        // u16 is written inside the space CMSG_LEN reserves.
        unsafe {
            let space = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
            debug_assert!(space <= control.0.len());
            hdr.msg_control = control.0.as_mut_ptr().cast();
            hdr.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&raw const hdr);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size);
        }
    }
    loop {
        // SAFETY: `hdr` points at `parts`, `control` and `to`, all alive for
        // the call; `fd` is a live socket borrowed for the call.
        let n = unsafe {
            libc::sendmsg(
                fd.as_raw_fd(),
                &raw const hdr,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
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
