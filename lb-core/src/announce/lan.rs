//! L2 mode's parts of the announcer: the LAN interface opened with its raw
//! sockets ([`open_lan`]), what the loop keeps for L2 ([`L2`]: the owner
//! map, contact with the controller, claims heard on the LAN), and the
//! threads that listen for other hosts' claims.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_config::Announce;

use super::decide::OwnerMap;
use super::link::{Link, LinkError};
use super::packet::PacketSocket;
use super::{arp, garp, lock, Announcer};

/// What L2 mode adds: the owner map in force, the LAN interface's raw
/// socket and address, and what the LAN and the controller were last
/// heard saying.
pub(super) struct L2 {
    /// The owner map of the state in force.
    pub(super) map: Mutex<Option<Arc<OwnerMap>>>,
    /// The map changed: addresses it names that are on the interface (left
    /// by an earlier run) are adopted, so those not ours are removed.
    pub(super) adopt: AtomicBool,
    pub(super) mac: [u8; 6],
    pub(super) sender: PacketSocket,
    /// The last request from the controller (a probe or a state).
    pub(super) last_contact: Mutex<Instant>,
    /// When the announcer started.
    pub(super) started: Instant,
    /// The controller has sent a state since the start.
    pub(super) confirmed: AtomicBool,
    /// When the current drain started.
    pub(super) drain_since: Mutex<Option<Instant>>,
    /// Per VIP the map gives us, when another host last claimed it.
    pub(super) claims: Arc<Mutex<BTreeMap<IpAddr, Instant>>>,
    /// The VIPs the map gives us, for the receivers of claims.
    pub(super) watched: Arc<Mutex<BTreeSet<IpAddr>>>,
    /// The VIPs given up while cut off: they stay given up until the
    /// controller sends a state (a probe alone says nothing of owners).
    pub(super) given_up: Mutex<BTreeSet<IpAddr>>,
}

/// The LAN interface opened for L2 mode.
pub struct Lan {
    mac: [u8; 6],
    sender: PacketSocket,
    /// ARP frames on the LAN interface.
    arp: PacketSocket,
    /// ICMPv6 messages (neighbour advertisements).
    ndp: PacketSocket,
}

/// A receiver of claims: its thread's name, its socket and its parser.
type Receiver = (
    &'static str,
    PacketSocket,
    fn(&[u8], [u8; 6]) -> Option<garp::Claim>,
);

impl L2 {
    /// The L2 state for `lan`, and the receivers of claims to start with
    /// [`spawn_receivers`] once the announcer exists.
    pub(super) fn new(lan: Lan) -> (Self, Vec<Receiver>) {
        let l2 = L2 {
            map: Mutex::new(None),
            adopt: AtomicBool::new(false),
            mac: lan.mac,
            sender: lan.sender,
            last_contact: Mutex::new(Instant::now()),
            started: Instant::now(),
            confirmed: AtomicBool::new(false),
            drain_since: Mutex::new(None),
            claims: Arc::new(Mutex::new(BTreeMap::new())),
            watched: Arc::new(Mutex::new(BTreeSet::new())),
            given_up: Mutex::new(BTreeSet::new()),
        };
        let receivers: Vec<Receiver> = vec![
            ("lbd-arp", lan.arp, garp::claim_in),
            ("lbd-ndp", lan.ndp, garp::claim_in_na),
        ];
        (l2, receivers)
    }
}

/// Starts one thread per receiver of claims; each stops when `announcer`
/// is gone.
pub(super) fn spawn_receivers(announcer: &Arc<Announcer>, l2: &L2, receivers: Vec<Receiver>) {
    for (name, receiver, parse) in receivers {
        let (mac, watched, claims) = (l2.mac, l2.watched.clone(), l2.claims.clone());
        let stop = Arc::downgrade(announcer);
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || receive_claims(receiver, parse, mac, watched, claims, stop));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start {name}, the receiver of claims");
        }
    }
}

/// Opens the LAN interface for L2 mode: it must exist (it is never
/// created, and none of its addresses is touched here: those an earlier run
/// left are adopted when the owner map arrives), with an Ethernet address,
/// and raw sockets on it. Warns when the host would answer ARP for VIPs it
/// does not own.
pub fn open_lan(config: &Announce) -> Result<(Link, Lan), LinkError> {
    let mut link = Link::open(&config.interface, false)?;
    let netlink = |error| LinkError::Netlink {
        name: config.interface.clone(),
        error,
    };
    let mac = link.hardware_address().map_err(netlink)?.ok_or_else(|| {
        netlink(std::io::Error::other(
            "it has no Ethernet address: l2 mode needs an Ethernet LAN interface",
        ))
    })?;
    let sender = PacketSocket::sender(link.index).map_err(netlink)?;
    let arp =
        PacketSocket::arp_receiver(link.index, Duration::from_millis(200)).map_err(netlink)?;
    let ndp = PacketSocket::icmpv6_receiver(Duration::from_millis(200)).map_err(netlink)?;
    match arp::ignores(&config.interface) {
        Some(true) => {}
        Some(false) => tracing::warn!(
            interface = %config.interface,
            "net.ipv4.conf.{0}.arp_ignore (and .all) is 0: this host answers ARP on {0} for every VIP it delivers, owned or not; set net.ipv4.conf.all.arp_ignore = 1",
            config.interface
        ),
        None => tracing::info!(
            "cannot read net.ipv4.conf.*.arp_ignore: make sure net.ipv4.conf.all.arp_ignore = 1, or every edge host answers ARP for every VIP"
        ),
    }
    tracing::info!(interface = %link.name, mac = %mac_text(mac), "L2 announcements on the LAN interface");
    Ok((
        link,
        Lan {
            mac,
            sender,
            arp,
            ndp,
        },
    ))
}

pub(super) fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Receives frames (ARP) or messages (ICMPv6) until `stop`, recording the
/// claims `parse` finds in them on the VIPs `watched`.
fn receive_claims(
    receiver: PacketSocket,
    parse: fn(&[u8], [u8; 6]) -> Option<garp::Claim>,
    mac: [u8; 6],
    watched: Arc<Mutex<BTreeSet<IpAddr>>>,
    claims: Arc<Mutex<BTreeMap<IpAddr, Instant>>>,
    stop: std::sync::Weak<Announcer>,
) {
    let mut buf = [0u8; 256];
    while stop.strong_count() > 0 {
        match receiver.recv(&mut buf) {
            Ok(Some(frame)) => {
                let Some(claim) = parse(frame, mac) else {
                    continue;
                };
                if lock(&watched).contains(&claim.ip) {
                    let first = lock(&claims).insert(claim.ip, Instant::now()).is_none();
                    if first {
                        tracing::warn!(vip = %claim.ip, by = %mac_text(claim.mac), "another host claims a VIP this lbd answers for");
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot receive ARP or NDP; a partitioned owner will not see new owners' claims");
                return;
            }
        }
    }
}
