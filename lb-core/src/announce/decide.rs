//! Which VIPs to announce: a pure function of each VIP's health, the
//! server's lifecycle and `now`, and the difference from what is placed
//! now. No sockets, no clock: the shell ([`super::Announcer`]) gathers the
//! values, calls [`decide`], and applies [`changes`].
//!
//! BGP mode ([`decide`]): a VIP is announced exactly while lbd is ready (its
//! state applied and its listeners bound), not draining, and, with `when =
//! "healthy"`, at least one backend of a listener on the VIP is up with a
//! weight above 0.
//!
//! L2 mode ([`decide_l2`]): a VIP is announced (on the LAN interface, where
//! the kernel answers ARP/NDP for it) while the owner map names this lbd,
//! lbd is ready, and it has not yielded the VIP ([`yielded`]). A draining
//! lbd keeps what it owns until the map names another owner or the
//! withdraw grace has passed: a planned handover loses nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Instant;

use lb_config::{AnnounceWhen, L2State};
use std::time::Duration;

/// What the server is doing, as far as announcing goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifecycle {
    /// The initial state is applied and the listeners are bound.
    pub ready: bool,
    /// A drain (`lbd drain`, or a stop) is under way.
    pub draining: bool,
}

/// One VIP's health: its listeners' backends that take new connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipHealth {
    /// Listeners bound to the VIP (any port, either protocol).
    pub listeners: usize,
    /// Their backends that are up and weighted above 0.
    pub backends_up: usize,
}

/// Why a VIP is not announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Withheld {
    /// lbd has not applied its state yet.
    NotReady,
    /// lbd is draining.
    Draining,
    /// `when = "healthy"` and no backend of the VIP is up.
    NoBackendUp,
    /// L2: another forwarder owns the VIP.
    NotOwner,
    /// L2: the state names no owner for the VIP.
    NoOwner,
    /// L2: cut off from the controller, this lbd saw another host claim
    /// the VIP on the LAN, and gave it up.
    Yielded,
    /// L2: the owner map is the one persisted before a restart, and the
    /// controller has not confirmed it yet (nor has the lease passed).
    Unconfirmed,
}

impl Withheld {
    /// The reason as status and logs give it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotReady => "not_ready",
            Self::Draining => "draining",
            Self::NoBackendUp => "no_backend_up",
            Self::NotOwner => "not_owner",
            Self::NoOwner => "no_owner",
            Self::Yielded => "yielded",
            Self::Unconfirmed => "awaiting_controller",
        }
    }
}

/// The decision for one VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `None`: announce. `Some`: why not.
    pub withheld: Option<Withheld>,
    /// When this decision was first taken (it has held since).
    pub since: Instant,
}

impl Verdict {
    /// Whether the VIP is to be announced.
    pub fn announce(&self) -> bool {
        self.withheld.is_none()
    }
}

/// The decision for every VIP, in address order.
pub type Decisions = BTreeMap<IpAddr, Verdict>;

/// Decides every VIP of `vips`. A VIP whose decision is the same as in
/// `previous` keeps its `since`; a new or changed one gets `now`. VIPs not
/// in `vips` (no listener binds them any more) are not in the result.
pub fn decide(
    previous: &Decisions,
    vips: &BTreeMap<IpAddr, VipHealth>,
    when: AnnounceWhen,
    life: Lifecycle,
    now: Instant,
) -> Decisions {
    vips.iter()
        .map(|(&vip, health)| {
            let withheld = if life.draining {
                Some(Withheld::Draining)
            } else if !life.ready {
                Some(Withheld::NotReady)
            } else if when == AnnounceWhen::Healthy && health.backends_up == 0 {
                Some(Withheld::NoBackendUp)
            } else {
                None
            };
            let since = match previous.get(&vip) {
                Some(p) if p.withheld == withheld => p.since,
                _ => now,
            };
            (vip, Verdict { withheld, since })
        })
        .collect()
}

/// Where an lbd in L2 mode stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Life {
    /// Ready and draining, as for BGP.
    pub life: Lifecycle,
    /// A drain has gone on for the withdraw grace (or longer).
    pub grace_over: bool,
    /// The owner map may be acted on: the controller sent a state since
    /// lbd started, or a lease has passed since the start without one (a
    /// map persisted before a restart may be stale: another host may have
    /// taken the VIPs meanwhile; with the controller down, lbd takes them
    /// back after the lease, static stability).
    pub confirmed: bool,
}

/// The owner map of a state (`l2`), indexed by VIP: built once per state,
/// read at every evaluation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerMap {
    /// This lbd's name, as the controller knows it.
    pub me: String,
    /// No word from the controller this long: cut off.
    pub lease: Duration,
    /// Per VIP, its owner and epoch.
    pub owners: BTreeMap<IpAddr, (String, u64)>,
}

impl From<&L2State> for OwnerMap {
    fn from(l2: &L2State) -> Self {
        Self {
            me: l2.forwarder.clone(),
            lease: Duration::from_millis(l2.lease_ms),
            owners: l2
                .owners
                .iter()
                .map(|o| (o.vip.to_canonical(), (o.owner.clone(), o.epoch)))
                .collect(),
        }
    }
}

impl OwnerMap {
    /// The owner and epoch of `vip`.
    pub fn owner_of(&self, vip: IpAddr) -> Option<&(String, u64)> {
        self.owners.get(&vip.to_canonical())
    }

    /// The VIPs the map gives this lbd.
    pub fn mine(&self) -> BTreeSet<IpAddr> {
        self.owners
            .iter()
            .filter(|(_, (owner, _))| *owner == self.me)
            .map(|(vip, _)| *vip)
            .collect()
    }
}

/// Decides every VIP of `vips` in L2 mode from the owner map `l2` (the
/// entries naming `l2.me` are ours) and the VIPs `yielded`; `since` as in
/// [`decide`].
pub fn decide_l2(
    previous: &Decisions,
    vips: &BTreeMap<IpAddr, VipHealth>,
    l2: Option<&OwnerMap>,
    at: L2Life,
    yielded: &BTreeSet<IpAddr>,
    now: Instant,
) -> Decisions {
    vips.keys()
        .map(|&vip| {
            let owner = l2.and_then(|m| Some((m, m.owner_of(vip)?)));
            let withheld = match owner {
                None => Some(Withheld::NoOwner),
                Some((m, (owner, _))) if *owner != m.me => Some(Withheld::NotOwner),
                Some(_) if yielded.contains(&vip) => Some(Withheld::Yielded),
                Some(_) if !at.confirmed => Some(Withheld::Unconfirmed),
                Some(_) if at.life.draining && at.grace_over => Some(Withheld::Draining),
                Some(_) if !at.life.ready && !at.life.draining => Some(Withheld::NotReady),
                Some(_) => None,
            };
            let since = match previous.get(&vip) {
                Some(p) if p.withheld == withheld => p.since,
                _ => now,
            };
            (vip, Verdict { withheld, since })
        })
        .collect()
}

/// The VIPs an lbd in L2 mode gives up to bound a partition: only while it
/// is cut off (no word from the controller for `lease` since
/// `last_contact`), a VIP that another host has claimed on the LAN since
/// that last word. (The shell keeps a VIP given up until the controller
/// sends a state: the first probe after a partition heals says nothing of
/// owners, and announcing the VIP again would pull clients back.) With the controller down and no new owner, nobody
/// claims and nothing is given up (static stability); a new owner's claim
/// reaches a cut-off old one at its takeover burst or, at the latest, its
/// next periodic announcement.
pub fn yielded(
    claims: &BTreeMap<IpAddr, Instant>,
    last_contact: Instant,
    lease: std::time::Duration,
    now: Instant,
) -> BTreeSet<IpAddr> {
    if now.saturating_duration_since(last_contact) < lease {
        return BTreeSet::new();
    }
    claims
        .iter()
        .filter(|(_, &at)| at > last_contact)
        .map(|(&vip, _)| vip)
        .collect()
}

/// What to add to and remove from the interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// VIPs to announce that are not placed.
    pub add: Vec<IpAddr>,
    /// VIPs placed that are not to be announced (withheld, or gone).
    pub remove: Vec<IpAddr>,
}

impl Changes {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

/// The changes that take `placed` (what is on the interface now) to what
/// `decided` announces. Only VIPs whose placement differs are named, so a
/// change to one VIP touches that VIP only.
pub fn changes(placed: &BTreeSet<IpAddr>, decided: &Decisions) -> Changes {
    Changes {
        add: decided
            .iter()
            .filter(|(vip, v)| v.announce() && !placed.contains(vip))
            .map(|(&vip, _)| vip)
            .collect(),
        remove: placed
            .iter()
            .filter(|vip| !decided.get(vip).is_some_and(Verdict::announce))
            .copied()
            .collect(),
    }
}

/// The local routes to add and remove so that every VIP in `vips`, and
/// no other, is delivered to this host (`delivered`: those in place now).
/// Delivery does not depend on announcement: a withdrawn VIP still
/// accepts, and its established connections go on.
pub fn delivery(delivered: &BTreeSet<IpAddr>, vips: &BTreeMap<IpAddr, VipHealth>) -> Changes {
    Changes {
        add: vips
            .keys()
            .filter(|v| !delivered.contains(v))
            .copied()
            .collect(),
        remove: delivered
            .iter()
            .filter(|v| !vips.contains_key(v))
            .copied()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    const READY: Lifecycle = Lifecycle {
        ready: true,
        draining: false,
    };

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    fn health(up: usize) -> VipHealth {
        VipHealth {
            listeners: 1,
            backends_up: up,
        }
    }

    #[test]
    fn every_condition_is_needed() {
        let now = Instant::now();
        let vips = BTreeMap::from([(ip(1), health(1)), (ip(2), health(0))]);
        let d = decide(&Decisions::new(), &vips, AnnounceWhen::Healthy, READY, now);
        assert!(d[&ip(1)].announce());
        assert_eq!(d[&ip(2)].withheld, Some(Withheld::NoBackendUp));

        let d = decide(&Decisions::new(), &vips, AnnounceWhen::Always, READY, now);
        assert!(d[&ip(1)].announce() && d[&ip(2)].announce());

        let not_ready = Lifecycle {
            ready: false,
            draining: false,
        };
        let d = decide(
            &Decisions::new(),
            &vips,
            AnnounceWhen::Always,
            not_ready,
            now,
        );
        assert_eq!(d[&ip(1)].withheld, Some(Withheld::NotReady));

        let draining = Lifecycle {
            ready: false,
            draining: true,
        };
        let d = decide(
            &Decisions::new(),
            &vips,
            AnnounceWhen::Always,
            draining,
            now,
        );
        assert_eq!(
            d[&ip(1)].withheld,
            Some(Withheld::Draining),
            "draining is the reason a draining lbd gives, though it is not ready either"
        );
    }

    #[test]
    fn since_holds_until_the_decision_changes() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let t2 = t0 + Duration::from_secs(2);
        let mut vips = BTreeMap::from([(ip(1), health(1))]);
        let d0 = decide(&Decisions::new(), &vips, AnnounceWhen::Healthy, READY, t0);
        vips.insert(ip(1), health(3));
        let d1 = decide(&d0, &vips, AnnounceWhen::Healthy, READY, t1);
        assert_eq!(d1[&ip(1)].since, t0, "still announced: same decision");
        vips.insert(ip(1), health(0));
        let d2 = decide(&d1, &vips, AnnounceWhen::Healthy, READY, t2);
        assert_eq!(d2[&ip(1)].since, t2);
    }

    #[test]
    fn changes_name_only_what_differs() {
        let now = Instant::now();
        let vips = BTreeMap::from([(ip(1), health(1)), (ip(2), health(0)), (ip(3), health(2))]);
        let d = decide(&Decisions::new(), &vips, AnnounceWhen::Healthy, READY, now);
        let placed = BTreeSet::from([ip(2), ip(3), ip(9)]);
        assert_eq!(
            changes(&placed, &d),
            Changes {
                add: vec![ip(1)],
                remove: vec![ip(2), ip(9)],
            }
        );
    }

    #[test]
    fn delivery_follows_listeners_not_announcement() {
        let vips = BTreeMap::from([(ip(1), health(0)), (ip(2), health(1))]);
        let delivered = BTreeSet::from([ip(2), ip(3)]);
        assert_eq!(
            delivery(&delivered, &vips),
            Changes {
                add: vec![ip(1)],
                remove: vec![ip(3)],
            },
            "192.0.2.1 has no backend up: not announced, but delivered"
        );
    }

    fn map(me: &str, owners: &[(u8, &str)]) -> OwnerMap {
        OwnerMap::from(&L2State {
            forwarder: me.into(),
            lease_ms: 1000,
            owners: owners
                .iter()
                .map(|(last, o)| lb_config::VipOwner {
                    vip: ip(*last),
                    owner: (*o).into(),
                    epoch: 1,
                })
                .collect(),
        })
    }

    #[test]
    fn l2_announces_only_what_this_lbd_owns() {
        let now = Instant::now();
        let vips = BTreeMap::from([(ip(1), health(0)), (ip(2), health(1)), (ip(3), health(1))]);
        let m = map("edge-1", &[(1, "edge-1"), (2, "edge-2")]);
        let at = L2Life {
            life: READY,
            grace_over: false,
            confirmed: true,
        };
        let none = BTreeSet::new();
        let d = decide_l2(&Decisions::new(), &vips, Some(&m), at, &none, now);
        assert!(d[&ip(1)].announce(), "owned, whatever its backends' health");
        assert_eq!(d[&ip(2)].withheld, Some(Withheld::NotOwner));
        assert_eq!(d[&ip(3)].withheld, Some(Withheld::NoOwner));
        let d = decide_l2(&Decisions::new(), &vips, None, at, &none, now);
        assert!(d.values().all(|v| v.withheld == Some(Withheld::NoOwner)));
        let d = decide_l2(
            &Decisions::new(),
            &vips,
            Some(&m),
            at,
            &BTreeSet::from([ip(1)]),
            now,
        );
        assert_eq!(d[&ip(1)].withheld, Some(Withheld::Yielded));
    }

    #[test]
    fn a_draining_owner_keeps_its_vips_until_handed_over_or_the_grace_ends() {
        let now = Instant::now();
        let vips = BTreeMap::from([(ip(1), health(1))]);
        let none = BTreeSet::new();
        let draining = Lifecycle {
            ready: false,
            draining: true,
        };
        let mine = map("edge-1", &[(1, "edge-1")]);
        let within = L2Life {
            life: draining,
            grace_over: false,
            confirmed: true,
        };
        let d = decide_l2(&Decisions::new(), &vips, Some(&mine), within, &none, now);
        assert!(
            d[&ip(1)].announce(),
            "not ready, but nobody else has it yet"
        );
        let moved = map("edge-1", &[(1, "edge-2")]);
        let d = decide_l2(&Decisions::new(), &vips, Some(&moved), within, &none, now);
        assert_eq!(d[&ip(1)].withheld, Some(Withheld::NotOwner));
        let over = L2Life {
            life: draining,
            grace_over: true,
            confirmed: true,
        };
        let d = decide_l2(&Decisions::new(), &vips, Some(&mine), over, &none, now);
        assert_eq!(d[&ip(1)].withheld, Some(Withheld::Draining));
        let starting = L2Life {
            life: Lifecycle {
                ready: false,
                draining: false,
            },
            grace_over: false,
            confirmed: true,
        };
        let d = decide_l2(&Decisions::new(), &vips, Some(&mine), starting, &none, now);
        assert_eq!(d[&ip(1)].withheld, Some(Withheld::NotReady));
    }

    #[test]
    fn only_a_cut_off_lbd_yields_and_only_to_claims_since_its_last_word() {
        let t0 = Instant::now();
        let lease = Duration::from_secs(1);
        let claims = BTreeMap::from([
            (ip(1), t0 + Duration::from_millis(500)),
            (ip(2), t0 - Duration::from_millis(1)),
        ]);
        assert!(
            yielded(&claims, t0, lease, t0 + Duration::from_millis(999)).is_empty(),
            "in contact: the controller decides"
        );
        assert_eq!(
            yielded(&claims, t0, lease, t0 + lease),
            BTreeSet::from([ip(1)]),
            "192.0.2.2 was claimed before the last word: a stale claim"
        );
        assert!(yielded(&BTreeMap::new(), t0, lease, t0 + lease * 100).is_empty());
    }

    proptest! {
        /// Applying the changes to what is placed gives exactly the
        /// announced set, and a VIP is named only if its placement differs
        /// (incremental: nothing is re-announced).
        #[test]
        fn changes_are_minimal_and_complete(
            placed in proptest::collection::btree_set(0u8..40, 0..40),
            vips in proptest::collection::btree_map(0u8..40, 0usize..3, 0..40),
            always in any::<bool>(),
            ready in any::<bool>(),
            draining in any::<bool>(),
        ) {
            let now = Instant::now();
            let placed: BTreeSet<IpAddr> = placed.into_iter().map(ip).collect();
            let vips: BTreeMap<IpAddr, VipHealth> =
                vips.into_iter().map(|(k, up)| (ip(k), health(up))).collect();
            let when = if always { AnnounceWhen::Always } else { AnnounceWhen::Healthy };
            let d = decide(&Decisions::new(), &vips, when, Lifecycle { ready, draining }, now);
            let c = changes(&placed, &d);
            let mut after = placed.clone();
            for v in &c.remove { prop_assert!(after.remove(v)); }
            for v in &c.add { prop_assert!(after.insert(*v)); }
            let wanted: BTreeSet<IpAddr> =
                d.iter().filter(|(_, v)| v.announce()).map(|(k, _)| *k).collect();
            prop_assert_eq!(&after, &wanted);
            prop_assert_eq!(
                c.add.len() + c.remove.len(),
                placed.symmetric_difference(&wanted).count()
            );
            for (vip, v) in &d {
                let expected = ready && !draining && (always || vips[vip].backends_up > 0);
                prop_assert_eq!(v.announce(), expected);
            }
        }
    }
}
