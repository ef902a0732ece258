//! Who else holds the address a listener binds. Listeners bind with
//! `SO_REUSEPORT`, so a process of the same user that already holds the
//! port with `SO_REUSEPORT` (another `lbd`, anything) would silently share
//! its connections; a socket on a more specific address would take them
//! all. After binding, the plane asks the kernel's socket table (sock_diag)
//! for every listening TCP socket and every unconnected UDP socket, and
//! refuses a listener whose address overlaps one that is not its own.
//!
//! [`overlaps`] is pure; [`Table::read`] and [`describe`] are the shell.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;

use lb_config::{binds_overlap, Protocol};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

/// A socket that may receive what a listener's address receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    /// TCP (listening) or UDP (unconnected).
    pub protocol: Protocol,
    /// Its local address.
    pub local: SocketAddr,
    /// Its inode (what `/proc/<pid>/fd` links name).
    pub inode: u64,
    /// Its owner.
    pub uid: u32,
}

/// The listening TCP and unconnected UDP sockets of this network namespace.
#[derive(Debug, Default)]
pub struct Table {
    holders: Vec<Holder>,
}

impl Table {
    /// Reads the sockets of `protocols` from the kernel.
    pub fn read(protocols: &[Protocol]) -> io::Result<Self> {
        let mut holders = Vec::new();
        for &protocol in protocols {
            for family in [AF_INET, AF_INET6] {
                dump(protocol, family, &mut holders)?;
            }
        }
        Ok(Self { holders })
    }

    /// The sockets that overlap `addr` for `protocol` and are not in `ours`.
    pub fn others(&self, protocol: Protocol, addr: SocketAddr, ours: &HashSet<u64>) -> Vec<Holder> {
        self.holders
            .iter()
            .filter(|h| {
                h.protocol == protocol && !ours.contains(&h.inode) && binds_overlap(addr, h.local)
            })
            .copied()
            .collect()
    }
}

fn dump(protocol: Protocol, family: u8, out: &mut Vec<Holder>) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let (proto, states) = match protocol {
        Protocol::Tcp => (IPPROTO_TCP, StateFlags::LISTEN),
        Protocol::Udp => (IPPROTO_UDP, StateFlags::all()),
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: proto,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut received = Vec::with_capacity(64 * 1024);
    loop {
        received.clear();
        let n = socket.recv(&mut received, 0)?;
        if n > received.len() {
            return Err(io::Error::other(
                "sock_diag: a message larger than the buffer",
            ));
        }
        let mut offset = 0;
        while offset < n {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&received[offset..n])
                .map_err(|e| io::Error::other(format!("sock_diag: {e}")))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let id = &r.header.socket_id;
                    // A connected UDP socket receives only from its peer.
                    let unconnected = id.destination_port == 0;
                    if protocol == Protocol::Tcp || unconnected {
                        out.push(Holder {
                            protocol,
                            local: SocketAddr::new(id.source_address, id.source_port),
                            inode: u64::from(r.header.inode),
                            uid: r.header.uid,
                        });
                    }
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(io::Error::other(format!("sock_diag: {e:?}")))
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// The inode of a socket of ours.
pub fn inode(fd: impl std::os::fd::AsFd) -> io::Result<u64> {
    Ok(rustix::fs::fstat(fd)?.st_ino)
}

/// Says who holds `holder`: the process (pid and name) when it can be
/// found in /proc, else the owner's uid. Read only when refusing.
pub fn describe(holder: &Holder) -> String {
    let link = format!("socket:[{}]", holder.inode);
    let owner = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == link.as_str())
                })
        });
    match owner {
        Some(pid) => {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("pid {pid} ({})", name.trim())
        }
        None => format!("uid {}", holder.uid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listening socket of this process shows in the kernel's table
    /// with its inode, and is not another's once named as ours.
    #[test]
    fn the_table_shows_a_listening_socket_and_its_inode() {
        let l = std::net::TcpListener::bind("127.0.0.9:0").unwrap();
        let addr = l.local_addr().unwrap();
        let table = Table::read(&[Protocol::Tcp]).unwrap();
        let others = table.others(Protocol::Tcp, addr, &HashSet::new());
        let mine = inode(&l).unwrap();
        assert!(
            others.iter().any(|h| h.inode == mine && h.local == addr),
            "{others:?}"
        );
        assert!(table
            .others(Protocol::Tcp, addr, &HashSet::from([mine]))
            .is_empty());
        assert!(describe(&others[0]).contains(&format!("pid {}", std::process::id())));
        let u = std::net::UdpSocket::bind("127.0.0.9:0").unwrap();
        let table = Table::read(&[Protocol::Udp]).unwrap();
        let uaddr = u.local_addr().unwrap();
        assert!(!table
            .others(Protocol::Udp, uaddr, &HashSet::new())
            .is_empty());
    }
}
