//! The announce interface and its addresses, over rtnetlink: find or
//! create the link, list its addresses, add and remove host addresses
//! (/32, /128), and keep `local` routes for VIPs through `lo` (local
//! delivery, independent of the addresses: a route through the interface
//! itself would go when its last address does). Blocking calls on a `NETLINK_ROUTE` socket, each a few
//! microseconds; the kernel acknowledges every request. Needs
//! `CAP_NET_ADMIN` for changes.
//!
//! Nothing here decides which address belongs where: BGP mode places VIPs
//! on a dedicated interface, and L2 mode places the ones this host owns on
//! the LAN one, both through [`Link::add`] and [`Link::remove`].

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};

/// The protocol number lbd's local routes carry (`ip route show table
/// local` shows `proto 87`): how lbd recognises its own at start.
pub const ROUTE_PROTOCOL: u8 = 87;
/// The kernel's `local` table.
const TABLE_LOCAL: u8 = 255;
/// The metric of lbd's local routes: distinct from the kernel's own route
/// for an address (metric 0), which comes and goes with the address.
const LOCAL_METRIC: u32 = 1024;

/// How long one request may wait for the kernel's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the interface could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// It does not exist and may not be created.
    #[error("announce.interface: there is no interface {0:?} (create it, or set announce.create_interface = true)")]
    Missing(String),
    /// It could not be created.
    #[error("announce.interface: cannot create {name:?} (as a dummy link, nor as a bridge with no ports): {error}")]
    Create {
        /// The name.
        name: String,
        /// The last error.
        error: io::Error,
    },
    /// A netlink request failed.
    #[error("announce.interface {name:?}: {error}")]
    Netlink {
        /// The name.
        name: String,
        /// The error (EPERM: lbd lacks CAP_NET_ADMIN).
        error: io::Error,
    },
}

/// An address on the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    /// The address.
    pub ip: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
}

impl Placed {
    /// An IPv6 link-local address (the kernel's own, never lbd's).
    pub fn is_link_local(&self) -> bool {
        matches!(self.ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
    }
}

/// An interface lbd places addresses on.
pub struct Link {
    socket: Socket,
    seq: u32,
    /// Its index.
    pub index: u32,
    /// The index of `lo`, which lbd's local routes go through.
    lo: u32,
    /// Its name.
    pub name: String,
    /// What it is: `dummy` or `bridge` when lbd created it, else the
    /// kernel's kind (`unknown` for a physical one).
    pub kind: String,
    /// Whether lbd created it at this start.
    pub created: bool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("name", &self.name)
            .field("index", &self.index)
            .field("kind", &self.kind)
            .finish()
    }
}

impl Link {
    /// Opens the interface `name`; when it is missing and `create` is set,
    /// creates it as a dummy link, or, where the kernel has no dummy link
    /// type, as a bridge with no ports. Sets it up.
    pub fn open(name: &str, create: bool) -> Result<Self, LinkError> {
        let netlink = |error| LinkError::Netlink {
            name: name.to_owned(),
            error,
        };
        let socket = Socket::new(NETLINK_ROUTE).map_err(netlink)?;
        rustix::net::sockopt::set_socket_timeout(
            &socket,
            rustix::net::sockopt::Timeout::Recv,
            Some(ANSWER_TIMEOUT),
        )
        .map_err(|e| netlink(e.into()))?;
        let mut link = Self {
            socket,
            seq: 0,
            index: 0,
            lo: 0,
            name: name.to_owned(),
            kind: String::new(),
            created: false,
        };
        link.socket.bind_auto().map_err(netlink)?;
        link.socket
            .connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(netlink)?;
        link.lo = match link.find_named("lo").map_err(netlink)? {
            Some((index, _)) => index,
            None => return Err(netlink(io::Error::other("no loopback interface"))),
        };
        match link.find().map_err(netlink)? {
            Some((index, kind)) => {
                link.index = index;
                link.kind = kind;
            }
            None if !create => return Err(LinkError::Missing(name.to_owned())),
            None => {
                let kind = link.create()?;
                let (index, _) = link
                    .find()
                    .map_err(netlink)?
                    .ok_or_else(|| LinkError::Missing(name.to_owned()))?;
                link.index = index;
                link.kind = kind.to_owned();
                link.created = true;
            }
        }
        link.set_up().map_err(netlink)?;
        Ok(link)
    }

    /// The index and kind of the interface named `self.name`, if any.
    fn find(&mut self) -> io::Result<Option<(u32, String)>> {
        let name = self.name.clone();
        self.find_named(&name)
    }

    /// The index and kind of the interface `name`, if any.
    fn find_named(&mut self, name: &str) -> io::Result<Option<(u32, String)>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        let answers = match self.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(None),
            other => other?,
        };
        for answer in answers {
            if let RouteNetlinkMessage::NewLink(l) = answer {
                let kind = l
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                            LinkInfo::Kind(k) => Some(k.to_string()),
                            _ => None,
                        }),
                        _ => None,
                    })
                    .unwrap_or_else(|| "unknown".to_owned());
                return Ok(Some((l.header.index, kind)));
            }
        }
        Ok(None)
    }

    /// The interface's Ethernet address (`None`: it has none of 6 bytes).
    pub fn hardware_address(&mut self) -> io::Result<Option<[u8; 6]>> {
        let mut msg = LinkMessage::default();
        msg.header.index = self.index;
        let answers = self.request(RouteNetlinkMessage::GetLink(msg), 0)?;
        Ok(answers.into_iter().find_map(|answer| match answer {
            RouteNetlinkMessage::NewLink(l) => l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
                _ => None,
            }),
            _ => None,
        }))
    }

    /// Creates the link: a dummy, else a bridge with no ports.
    fn create(&mut self) -> Result<&'static str, LinkError> {
        let mut last = None;
        for (kind, name) in [(InfoKind::Dummy, "dummy"), (InfoKind::Bridge, "bridge")] {
            let mut msg = LinkMessage::default();
            msg.attributes
                .push(LinkAttribute::IfName(self.name.clone()));
            msg.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]));
            match self.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL) {
                Ok(_) => return Ok(name),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    tracing::info!(
                        interface = %self.name,
                        "this kernel has no {name} link type"
                    );
                    last = Some(e);
                }
                Err(error) => {
                    return Err(LinkError::Create {
                        name: self.name.clone(),
                        error,
                    })
                }
            }
        }
        Err(LinkError::Create {
            name: self.name.clone(),
            error: last.unwrap_or_else(|| io::Error::other("no link type left to try")),
        })
    }

    fn set_up(&mut self) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = self.index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(msg), 0)
            .map(|_| ())
    }

    /// Every address on the interface.
    pub fn addresses(&mut self) -> io::Result<Vec<Placed>> {
        let answers = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|a| match a {
                RouteNetlinkMessage::NewAddress(m) if m.header.index == self.index => {
                    let ip = m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    let ip = ip.or_else(|| {
                        m.attributes.iter().find_map(|a| match a {
                            AddressAttribute::Address(ip) => Some(*ip),
                            _ => None,
                        })
                    })?;
                    Some(Placed {
                        ip,
                        prefix: m.header.prefix_len,
                    })
                }
                _ => None,
            })
            .collect())
    }

    fn address_message(&self, ip: IpAddr, prefix: u8) -> AddressMessage {
        let mut msg = AddressMessage::default();
        msg.header.index = self.index;
        msg.header.prefix_len = prefix;
        msg.header.scope = AddressScope::Universe;
        match ip {
            IpAddr::V4(_) => {
                msg.header.family = AddressFamily::Inet;
                msg.attributes.push(AddressAttribute::Local(ip));
                msg.attributes.push(AddressAttribute::Address(ip));
            }
            IpAddr::V6(_) => {
                msg.header.family = AddressFamily::Inet6;
                // Usable at once: duplicate address detection would keep
                // it tentative for a second, on an interface with no link.
                msg.header.flags = AddressHeaderFlags::Nodad;
                msg.attributes.push(AddressAttribute::Address(ip));
                msg.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
        }
        msg
    }

    /// Places `ip` as a host address (/32 or /128). Already there is fine.
    pub fn add(&mut self, ip: IpAddr) -> io::Result<()> {
        let msg = self.address_message(ip, host_prefix(ip));
        self.change(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &[libc::EEXIST],
        )
    }

    /// Removes the host address `ip` (/32 or /128). Already gone is fine.
    pub fn remove_host(&mut self, ip: IpAddr) -> io::Result<()> {
        self.remove(Placed {
            ip,
            prefix: host_prefix(ip),
        })
    }

    /// Removes the address `placed`. Already gone is fine.
    pub fn remove(&mut self, placed: Placed) -> io::Result<()> {
        let msg = self.address_message(placed.ip, placed.prefix);
        self.change(
            RouteNetlinkMessage::DelAddress(msg),
            0,
            &[libc::EADDRNOTAVAIL, libc::ENOENT],
        )
    }

    fn local_route_message(&self, ip: IpAddr) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.destination_prefix_length = host_prefix(ip);
        msg.header.table = TABLE_LOCAL;
        msg.header.protocol = RouteProtocol::from(ROUTE_PROTOCOL);
        msg.header.scope = RouteScope::Host;
        msg.header.kind = RouteType::Local;
        msg.attributes.push(RouteAttribute::Destination(match ip {
            IpAddr::V4(v4) => RouteAddress::Inet(v4),
            IpAddr::V6(v6) => RouteAddress::Inet6(v6),
        }));
        msg.attributes.push(RouteAttribute::Oif(self.lo));
        msg.attributes.push(RouteAttribute::Priority(LOCAL_METRIC));
        msg
    }

    /// Delivers packets for `ip` to this host's sockets, whether or not the
    /// address is on the interface: a `local` route through `lo`, marked
    /// with [`ROUTE_PROTOCOL`]. Already there is fine.
    pub fn add_local(&mut self, ip: IpAddr) -> io::Result<()> {
        let msg = self.local_route_message(ip);
        self.change(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &[libc::EEXIST],
        )
    }

    /// Removes the local route of `ip`. Already gone is fine.
    pub fn remove_local(&mut self, ip: IpAddr) -> io::Result<()> {
        let msg = self.local_route_message(ip);
        self.change(RouteNetlinkMessage::DelRoute(msg), 0, &[libc::ESRCH])
    }

    /// The destinations of lbd's local routes (through `lo`, marked with
    /// [`ROUTE_PROTOCOL`]).
    pub fn local_routes(&mut self) -> io::Result<Vec<IpAddr>> {
        let answers = self.request(
            RouteNetlinkMessage::GetRoute(RouteMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|a| match a {
                RouteNetlinkMessage::NewRoute(m)
                    if m.header.protocol == RouteProtocol::from(ROUTE_PROTOCOL)
                        && m.header.kind == RouteType::Local
                        && m.attributes.contains(&RouteAttribute::Oif(self.lo)) =>
                {
                    m.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Destination(RouteAddress::Inet(v4)) => {
                            Some(IpAddr::V4(*v4))
                        }
                        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => {
                            Some(IpAddr::V6(*v6))
                        }
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// A change whose errors `done` mean it is already in effect.
    fn change(&mut self, message: RouteNetlinkMessage, flags: u16, done: &[i32]) -> io::Result<()> {
        match self.request(message, flags) {
            Err(e) if e.raw_os_error().is_some_and(|c| done.contains(&c)) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Sends one request and collects its answers until the kernel's
    /// acknowledgement (or the end of a dump).
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = seq;
        let mut request = NetlinkMessage::new(header, message.into());
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        let mut received = Vec::with_capacity(64 * 1024);
        loop {
            received.clear();
            let n = self.socket.recv(&mut received, 0)?;
            if n > received.len() {
                return Err(io::Error::other(
                    "netlink: an answer larger than the buffer",
                ));
            }
            let mut offset = 0;
            while offset < n {
                let message =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&received[offset..n])
                        .map_err(|e| io::Error::other(format!("netlink: {e}")))?;
                let length = message.header.length as usize;
                if length == 0 {
                    return Err(io::Error::other("netlink: a message of length 0"));
                }
                offset += length;
                if message.header.sequence_number != seq {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    // The acknowledgement: the request is done (a dump
                    // ends with Done, then its acknowledgement).
                    NetlinkPayload::Error(_) => return Ok(out),
                    NetlinkPayload::Done(_) if dump => return Ok(out),
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }
}

/// The host prefix of `ip`: 32 or 128.
pub fn host_prefix(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}
