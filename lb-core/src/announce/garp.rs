//! L2 announcements as bytes and as a schedule, pure: the gratuitous ARP
//! (IPv4) and unsolicited neighbour advertisement (IPv6) frames that tell
//! a LAN where a VIP is now, when each is due, and which frames seen on
//! the LAN are another host claiming one of ours. No sockets, no clock:
//! the shell ([`super::packet`]) sends and receives.
//!
//! The frames are built with `etherparse`, which computes the ICMPv6
//! checksum over the pseudo-header (the part easiest to get wrong by hand).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use etherparse::icmpv6::NeighborAdvertisementHeader;
use etherparse::{ArpHardwareId, ArpOperation, ArpPacket, EtherType, Icmpv6Type, PacketBuilder};

/// Announcements sent back to back at takeover.
pub const BURST: u8 = 3;
/// The gap between the announcements of a burst.
pub const BURST_GAP: Duration = Duration::from_millis(100);
/// The gap between periodic announcements after a burst.
pub const PERIOD: Duration = Duration::from_secs(30);

const BROADCAST: [u8; 6] = [0xff; 6];
/// `ff02::1`'s Ethernet group address.
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
const ALL_NODES: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// The frame announcing that `vip` is at `mac`: a gratuitous ARP request
/// (sender and target address both the VIP, to every host) for IPv4, an
/// unsolicited neighbour advertisement with the override flag and the
/// target link-layer address option (to all nodes, hop limit 255, from
/// the VIP) for IPv6.
pub fn announcement(vip: IpAddr, mac: [u8; 6]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(86);
    let built = match vip.to_canonical() {
        IpAddr::V4(v4) => {
            let ip = v4.octets();
            let arp = ArpPacket::new(
                ArpHardwareId::ETHERNET,
                EtherType::IPV4,
                ArpOperation::REQUEST,
                &mac,
                &ip,
                &[0; 6],
                &ip,
            )
            .expect("Ethernet and IPv4 address lengths");
            PacketBuilder::ethernet2(mac, BROADCAST)
                .arp(arp)
                .write(&mut frame)
        }
        IpAddr::V6(v6) => {
            let na = NeighborAdvertisementHeader {
                router: false,
                solicited: false,
                r#override: true,
            };
            let mut payload = v6.octets().to_vec();
            // Option 2: target link-layer address, 1 unit of 8 bytes.
            payload.extend_from_slice(&[2, 1]);
            payload.extend_from_slice(&mac);
            PacketBuilder::ethernet2(mac, ALL_NODES_MAC)
                .ipv6(v6.octets(), ALL_NODES, 255)
                .icmpv6(Icmpv6Type::NeighborAdvertisement(na))
                .write(&mut frame, &payload)
        }
    };
    built.expect("writing to a Vec does not fail");
    frame
}

/// Another host's claim seen on the LAN: `ip` announced or answered for
/// from a MAC that is not ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The address claimed.
    pub ip: IpAddr,
    /// The claimer's MAC.
    pub mac: [u8; 6],
}

/// The claim an ARP frame (Ethernet header included) makes: its sender
/// address, when the sender is not `ours`. Anything else, malformed
/// frames included, is `None`.
pub fn claim_in(frame: &[u8], ours: [u8; 6]) -> Option<Claim> {
    let eth = etherparse::Ethernet2Slice::from_slice_without_fcs(frame).ok()?;
    if eth.ether_type() != EtherType::ARP {
        return None;
    }
    let arp = ArpPacket::from_slice(eth.payload_slice())
        .ok()?
        .try_eth_ipv4()
        .ok()?;
    let mac = arp.sender_mac;
    let ip = arp.sender_ipv4_addr();
    (mac != ours && !ip.is_unspecified()).then_some(Claim {
        ip: IpAddr::V4(ip),
        mac,
    })
}

/// The claim an ICMPv6 message (as a raw ICMPv6 socket gets it, without
/// the IPv6 header) makes: a neighbour advertisement's target, when its
/// target link-layer address option names a MAC that is not `ours`.
/// Anything else, malformed messages included, is `None`.
pub fn claim_in_na(icmp: &[u8], ours: [u8; 6]) -> Option<Claim> {
    const NEIGHBOR_ADVERTISEMENT: u8 = 136;
    if icmp.len() < 24 || icmp[0] != NEIGHBOR_ADVERTISEMENT || icmp[1] != 0 {
        return None;
    }
    let target: [u8; 16] = icmp[8..24].try_into().ok()?;
    let mut options = &icmp[24..];
    while options.len() >= 8 {
        let len = usize::from(options[1]) * 8;
        if len == 0 || len > options.len() {
            return None;
        }
        if options[0] == 2 && len == 8 {
            let mac: [u8; 6] = options[2..8].try_into().ok()?;
            return (mac != ours).then_some(Claim {
                ip: IpAddr::from(target),
                mac,
            });
        }
        options = &options[len..];
    }
    None
}

/// When each placed VIP is next announced, and how many of its takeover
/// burst are left.
#[derive(Clone, Debug, Default)]
pub struct Schedule {
    due: BTreeMap<IpAddr, (Instant, u8)>,
}

impl Schedule {
    /// A VIP just placed: a burst of [`BURST`] from `now`.
    pub fn placed(&mut self, vip: IpAddr, now: Instant) {
        self.due.insert(vip, (now, BURST));
    }

    /// A VIP no longer placed.
    pub fn removed(&mut self, vip: IpAddr) {
        self.due.remove(&vip);
    }

    /// The VIPs to announce at `now`; each is then due again after
    /// [`BURST_GAP`] while its burst lasts, after [`PERIOD`] afterwards.
    pub fn take_due(&mut self, now: Instant) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for (vip, (at, left)) in self.due.iter_mut() {
            if *at <= now {
                out.push(*vip);
                *left = left.saturating_sub(1);
                *at = now + if *left > 0 { BURST_GAP } else { PERIOD };
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];

    #[test]
    fn a_gratuitous_arp_names_the_vip_twice() {
        let f = announcement("192.0.2.7".parse().unwrap(), MAC);
        assert_eq!(f.len(), 42);
        assert_eq!(&f[0..6], &BROADCAST);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!(&f[22..28], &MAC);
        assert_eq!(&f[28..32], &[192, 0, 2, 7]);
        assert_eq!(&f[38..42], &[192, 0, 2, 7]);
        assert_eq!(claim_in(&f, MAC), None, "our own");
        assert_eq!(
            claim_in(&f, [2, 0, 0, 0, 0, 0x0b]),
            Some(Claim {
                ip: "192.0.2.7".parse().unwrap(),
                mac: MAC
            })
        );
        assert_eq!(claim_in(&f[..20], [0; 6]), None);
        assert_eq!(claim_in(&[], [0; 6]), None);
    }

    #[test]
    fn a_neighbour_advertisement_overrides_and_checks_out() {
        let vip: IpAddr = "2001:db8::7".parse().unwrap();
        let f = announcement(vip, MAC);
        let parsed = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = parsed.transport else {
            panic!("not ICMPv6: {parsed:?}");
        };
        let Some(etherparse::NetSlice::Ipv6(ip)) = parsed.net else {
            panic!("not IPv6");
        };
        assert_eq!(ip.header().hop_limit(), 255);
        assert_eq!(&f[0..6], &ALL_NODES_MAC);
        match icmp.icmp_type() {
            Icmpv6Type::NeighborAdvertisement(h) => assert!(h.r#override && !h.solicited),
            other => panic!("{other:?}"),
        }
        let v6 = match vip {
            IpAddr::V6(v6) => v6,
            IpAddr::V4(_) => unreachable!(),
        };
        assert!(icmp.is_checksum_valid(ip.header().source(), ip.header().destination()));
        assert_eq!(&icmp.payload()[..16], &v6.octets());
        assert_eq!(&icmp.payload()[16..], &[2, 1, 2, 0, 0, 0, 0, 0x0a]);
        let message = &f[14 + 40..];
        assert_eq!(claim_in_na(message, MAC), None, "our own");
        assert_eq!(
            claim_in_na(message, [2, 0, 0, 0, 0, 0x0b]),
            Some(Claim { ip: vip, mac: MAC })
        );
        assert_eq!(claim_in_na(&message[..30], [0; 6]), None);
        let mut zero_len = message.to_vec();
        zero_len[25] = 0;
        assert_eq!(claim_in_na(&zero_len, [0; 6]), None, "a zero-length option");
    }

    proptest::proptest! {
        /// Whatever arrives on the LAN, parsing a claim never panics.
        #[test]
        fn any_bytes_parse_without_panicking(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            let _ = claim_in(&bytes, MAC);
            let _ = claim_in_na(&bytes, MAC);
            let mut na = bytes.clone();
            if na.len() >= 2 {
                na[0] = 136;
                na[1] = 0;
            }
            let _ = claim_in_na(&na, MAC);
        }
    }

    #[test]
    fn a_takeover_bursts_then_repeats_every_period() {
        let t0 = Instant::now();
        let vip: IpAddr = "192.0.2.7".parse().unwrap();
        let mut s = Schedule::default();
        s.placed(vip, t0);
        assert_eq!(s.take_due(t0), [vip]);
        assert!(s.take_due(t0).is_empty());
        assert_eq!(s.take_due(t0 + BURST_GAP), [vip]);
        let t2 = t0 + BURST_GAP * 2;
        assert_eq!(s.take_due(t2), [vip], "the third of the burst");
        assert!(s
            .take_due(t2 + PERIOD - Duration::from_millis(1))
            .is_empty());
        assert_eq!(s.take_due(t2 + PERIOD), [vip]);
        s.removed(vip);
        assert!(s.take_due(t2 + PERIOD * 5).is_empty());
    }
}
