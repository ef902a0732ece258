//! Raw Ethernet frames on the LAN interface (`AF_PACKET`): sending the
//! announcements of [`super::garp`], and receiving the ARP frames other
//! hosts send (their claims on our IPv4 VIPs); and a raw ICMPv6 socket
//! for their neighbour advertisements (claims on our IPv6 VIPs: ICMPv6
//! only, not every IPv6 frame a packet socket would copy). Needs
//! `CAP_NET_RAW`.
//!
//! The one `unsafe` outside the engines: neither `rustix` nor `nix` can
//! build a `sockaddr_ll` safely, so [`bind`] and [`PacketSocket::send`]
//! hand one to `bind(2)` and `sendto(2)` through `libc`. Everything else
//! goes through `rustix`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use rustix::net::{AddressFamily, Protocol, SocketFlags, SocketType};

/// `ETH_P_ARP`.
const ETH_P_ARP: u16 = 0x0806;

fn link_address(ifindex: u32, ether_type: u16) -> libc::sockaddr_ll {
    libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: ether_type.to_be(),
        sll_ifindex: ifindex as i32,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    }
}

/// Binds `fd` to interface `ifindex` for frames of `ether_type`.
#[allow(unsafe_code)]
fn bind(fd: &OwnedFd, ifindex: u32, ether_type: u16) -> io::Result<()> {
    let addr = link_address(ifindex, ether_type);
    // SAFETY: `addr` is a valid, initialised `sockaddr_ll` that lives
    // across the call, and its size is the length passed; `fd` is open.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A packet socket on one interface.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: u32,
}

impl PacketSocket {
    /// A socket that only sends (it is bound to no protocol, so the kernel
    /// queues nothing on it).
    pub fn sender(ifindex: u32) -> io::Result<Self> {
        let fd = rustix::net::socket_with(
            AddressFamily::PACKET,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            None,
        )?;
        Ok(Self { fd, ifindex })
    }

    /// A socket that receives every ARP frame on the interface, waiting at
    /// most `timeout` in [`PacketSocket::recv`].
    pub fn arp_receiver(ifindex: u32, timeout: Duration) -> io::Result<Self> {
        let fd = rustix::net::socket_with(
            AddressFamily::PACKET,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            Some(Protocol::from_raw(
                std::num::NonZeroU32::new(u32::from(ETH_P_ARP.to_be())).expect("non-zero"),
            )),
        )?;
        bind(&fd, ifindex, ETH_P_ARP)?;
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(timeout),
        )?;
        Ok(Self { fd, ifindex })
    }

    /// A raw ICMPv6 socket that receives the ICMPv6 messages this host gets
    /// (without their IPv6 header), waiting at most `timeout` in
    /// [`PacketSocket::recv`]; not for sending.
    pub fn icmpv6_receiver(timeout: Duration) -> io::Result<Self> {
        let fd = rustix::net::socket_with(
            AddressFamily::INET6,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            Some(rustix::net::ipproto::ICMPV6),
        )?;
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(timeout),
        )?;
        Ok(Self { fd, ifindex: 0 })
    }

    /// Sends one whole frame (Ethernet header included).
    #[allow(unsafe_code)]
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let ether_type = frame
            .get(12..14)
            .map(|t| u16::from_be_bytes([t[0], t[1]]))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "short frame"))?;
        let addr = link_address(self.ifindex, ether_type);
        // SAFETY: `frame` and `addr` are valid for the lengths passed and
        // live across the call; `self.fd` is open.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Receives one frame into `buf`; `Ok(None)` when the timeout passed.
    pub fn recv<'a>(&self, buf: &'a mut [u8]) -> io::Result<Option<&'a [u8]>> {
        match rustix::net::recv(&self.fd, &mut *buf, rustix::net::RecvFlags::empty()) {
            Ok((n, _)) => Ok(Some(&buf[..n.min(buf.len())])),
            Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
