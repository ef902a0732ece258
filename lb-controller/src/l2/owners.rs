//! Which forwarder answers ARP/NDP for each VIP of an `announce = "l2"`
//! pool, as pure code: no clock, no sockets, no locks.
//!
//! - [`rank`]: a pinned hash of (VIP, forwarder name) that orders the
//!   forwarders for one VIP, the same in every build and on every host;
//! - [`assign`]: the owners of the next state from the current ones and
//!   which forwarders are live. Sticky: a VIP whose owner is live stays
//!   where it is; a VIP with no owner, or whose owner is down, goes to the
//!   first live forwarder in its order. A failure moves only the failed
//!   forwarder's VIPs, and a forwarder that comes back takes none back
//!   (each move breaks the connections on the VIP: a proxy terminates TCP);
//! - [`recover`]: the owners the forwarders were found running at start,
//!   so a restarted controller moves nothing;
//! - [`Liveness`]: one forwarder's readiness probes folded into up or down.
//!
//! An owner's epoch is the version of the first state that named it: it
//! only grows, since versions do.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use lb_config::{DesiredState, L2State, VipOwner};

/// A VIP's owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The forwarder's name.
    pub name: String,
    /// The version of the first state that named this owner.
    pub epoch: u64,
}

/// Every L2 VIP's owner.
pub type Owners = BTreeMap<IpAddr, Owner>;

/// A change of owner, for the Event on the Services of the VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The VIP.
    pub vip: IpAddr,
    /// Its owner before (`None`: a new VIP).
    pub from: Option<String>,
    /// Its owner now.
    pub to: String,
    /// Why the previous owner lost it (`None` for a new VIP).
    pub why: Option<String>,
}

/// FNV-1a, 64 bits: pinned (never `DefaultHasher`, whose output may change
/// between Rust releases and would move VIPs on an upgrade).
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// MurmurHash3's 64-bit finaliser: FNV alone spreads short inputs that
/// differ in their last byte poorly.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The rank of forwarder `name` for `vip`: the lowest rank comes first.
pub fn rank(vip: IpAddr, name: &str) -> u64 {
    let addr: Vec<u8> = match vip.to_canonical() {
        IpAddr::V4(v4) => std::iter::once(4).chain(v4.octets()).collect(),
        IpAddr::V6(v6) => std::iter::once(6).chain(v6.octets()).collect(),
    };
    mix(fnv1a(addr.into_iter().chain([0xff]).chain(name.bytes())))
}

/// `names` in the order they would own `vip` (rank, then name).
pub fn order<'a>(vip: IpAddr, names: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = names.into_iter().collect();
    v.sort_by_key(|n| (rank(vip, n), *n));
    v
}

/// The owners of the next state, numbered `version`, for `vips`, among
/// `forwarders` (those configured), of which `live` are up; `down` says
/// why each of the others is down. Returns the owners and the moves.
///
/// A VIP keeps a live, configured owner. Otherwise it goes to the first
/// live forwarder in its [`order`], with `version` as epoch. With no live
/// forwarder at all nothing moves (a VIP keeps the owner it has, down or
/// not: the controller may be the one cut off).
pub fn assign(
    current: &Owners,
    vips: &BTreeSet<IpAddr>,
    forwarders: &[String],
    live: &BTreeSet<String>,
    down: &BTreeMap<String, String>,
    version: u64,
) -> (Owners, Vec<Move>) {
    let configured = |n: &str| forwarders.iter().any(|f| f == n);
    let up: Vec<&str> = forwarders
        .iter()
        .map(String::as_str)
        .filter(|n| live.contains(*n))
        .collect();
    let mut owners = Owners::new();
    let mut moves = Vec::new();
    for &vip in vips {
        let now = current.get(&vip).filter(|o| configured(&o.name));
        if let Some(o) = now {
            if live.contains(&o.name) || up.is_empty() {
                owners.insert(vip, o.clone());
                continue;
            }
        }
        let Some(first) = order(vip, up.iter().copied()).first().copied() else {
            continue;
        };
        owners.insert(
            vip,
            Owner {
                name: first.to_owned(),
                epoch: version,
            },
        );
        let from = current.get(&vip).map(|o| o.name.clone());
        let why = from.as_ref().map(|f| {
            down.get(f)
                .cloned()
                .unwrap_or_else(|| format!("{f} is no longer a configured forwarder"))
        });
        moves.push(Move {
            vip,
            from,
            to: first.to_owned(),
            why,
        });
    }
    (owners, moves)
}

/// The owners the forwarders were found running (`None`: not read): per
/// VIP, the claim with the largest epoch. Every forwarder gets the same
/// owners, so any one that answers is enough.
pub fn recover(running: &[Option<DesiredState>]) -> Owners {
    let mut owners = Owners::new();
    for l2 in running.iter().flatten().filter_map(|s| s.l2.as_ref()) {
        for o in &l2.owners {
            let vip = o.vip.to_canonical();
            if owners.get(&vip).is_none_or(|had| had.epoch < o.epoch) {
                owners.insert(
                    vip,
                    Owner {
                        name: o.owner.clone(),
                        epoch: o.epoch,
                    },
                );
            }
        }
    }
    owners
}

/// The `l2` of a state with `owners` (the receiver's name is filled in by
/// each publisher).
pub fn state(owners: &Owners, lease_ms: u64) -> L2State {
    L2State {
        forwarder: String::new(),
        lease_ms,
        owners: owners
            .iter()
            .map(|(&vip, o)| VipOwner {
                vip,
                owner: o.name.clone(),
                epoch: o.epoch,
            })
            .collect(),
    }
}

/// What one readiness probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// 200: ready.
    Ready,
    /// 503: not ready (draining, or not started).
    NotReady(String),
    /// No usable answer (refused, timed out, another status).
    Missed(String),
}

/// One forwarder's liveness from its probes: down at once when it says it
/// is not ready (a drain: planned handover), or after `failures` probes in
/// a row get no answer; up again at its first ready answer. Starts up: a
/// forwarder not probed yet keeps its VIPs (nothing moves on a restart).
#[derive(Clone, Debug)]
pub struct Liveness {
    failures: u32,
    missed: u32,
    up: bool,
    /// Why it is down.
    pub why: Option<String>,
}

impl Liveness {
    /// Up, with `failures` misses allowed (at least 1).
    pub fn new(failures: u32) -> Self {
        Self {
            failures: failures.max(1),
            missed: 0,
            up: true,
            why: None,
        }
    }

    /// Whether it is up.
    pub fn up(&self) -> bool {
        self.up
    }

    /// Takes in one probe; returns whether up-or-down changed.
    pub fn observe(&mut self, probe: &Probe) -> bool {
        let was = self.up;
        match probe {
            Probe::Ready => {
                self.missed = 0;
                self.up = true;
                self.why = None;
            }
            Probe::NotReady(what) => {
                self.missed = 0;
                if self.up {
                    self.why = Some(format!("reports not ready ({what})"));
                }
                self.up = false;
            }
            Probe::Missed(what) => {
                self.missed = self.missed.saturating_add(1);
                if self.up && self.missed >= self.failures {
                    self.up = false;
                    self.why = Some(format!(
                        "missed {} readiness probes in a row ({what})",
                        self.missed
                    ));
                }
            }
        }
        was != self.up
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("edge-{i}")).collect()
    }

    fn vip(i: u32) -> IpAddr {
        IpAddr::from((0xc000_0200u32 + i).to_be_bytes())
    }

    fn all(f: &[String]) -> BTreeSet<String> {
        f.iter().cloned().collect()
    }

    #[test]
    fn the_hash_is_pinned() {
        // Changing these moves every VIP of every cluster on an upgrade.
        assert_eq!(
            rank("192.0.2.1".parse().unwrap(), "edge-1"),
            0xefc5_2f9f_ac80_c777
        );
        assert_eq!(
            rank("2001:db8::1".parse().unwrap(), "edge-1"),
            0x9422_16c7_2b08_a663
        );
        assert_eq!(
            rank("::ffff:192.0.2.1".parse().unwrap(), "edge-1"),
            rank("192.0.2.1".parse().unwrap(), "edge-1"),
            "a mapped address is the IPv4 one"
        );
    }

    #[test]
    fn vips_spread_over_the_forwarders() {
        let f = names(3);
        let vips: BTreeSet<IpAddr> = (0..300).map(vip).collect();
        let (owners, moves) = assign(&Owners::new(), &vips, &f, &all(&f), &BTreeMap::new(), 7);
        assert_eq!(moves.len(), 300, "every VIP is new");
        for name in &f {
            let n = owners.values().filter(|o| &o.name == name).count();
            assert!((70..=130).contains(&n), "{name} owns {n} of 300");
        }
        assert!(owners.values().all(|o| o.epoch == 7));
    }

    #[test]
    fn nothing_moves_when_nobody_is_live() {
        let f = names(2);
        let vips: BTreeSet<IpAddr> = (0..10).map(vip).collect();
        let (owners, _) = assign(&Owners::new(), &vips, &f, &all(&f), &BTreeMap::new(), 1);
        let (after, moves) = assign(&owners, &vips, &f, &BTreeSet::new(), &BTreeMap::new(), 2);
        assert_eq!(after, owners);
        assert!(moves.is_empty());
    }

    #[test]
    fn liveness_counts_misses_and_obeys_not_ready_at_once() {
        let mut l = Liveness::new(3);
        let miss = Probe::Missed("refused".into());
        assert!(!l.observe(&miss) && !l.observe(&miss) && l.up());
        assert!(l.observe(&miss) && !l.up(), "the third miss in a row");
        assert!(l.why.as_deref().unwrap().contains("missed 3"));
        assert!(l.observe(&Probe::Ready) && l.up());
        assert!(!l.observe(&miss) && !l.observe(&Probe::Ready) && !l.observe(&miss));
        assert!(l.up(), "misses are counted in a row");
        assert!(l.observe(&Probe::NotReady("503".into())) && !l.up());
        assert!(l.why.as_deref().unwrap().contains("not ready"));
    }

    #[test]
    fn recovery_takes_the_newest_claim() {
        let l2 = |owner: &str, epoch| {
            Some(DesiredState {
                version: 9,
                listeners: Vec::new(),
                l2: Some(L2State {
                    forwarder: "x".into(),
                    lease_ms: 1000,
                    owners: vec![VipOwner {
                        vip: vip(1),
                        owner: owner.into(),
                        epoch,
                    }],
                }),
            })
        };
        let got = recover(&[l2("edge-1", 3), None, l2("edge-2", 5), l2("edge-1", 4)]);
        assert_eq!(
            got[&vip(1)],
            Owner {
                name: "edge-2".into(),
                epoch: 5
            }
        );
    }

    proptest! {
        /// A failure moves exactly the failed forwarder's VIPs, each to a
        /// live forwarder with the new version as epoch; the others keep
        /// owner and epoch. A return moves nothing. Recovering the owners
        /// from the states sent and assigning again moves nothing.
        #[test]
        fn a_failure_moves_only_the_failed_forwarders_vips(
            n in 2usize..6,
            vip_count in 1u32..60,
            failed in 0usize..6,
        ) {
            let f = names(n);
            let failed = &f[failed % n];
            let vips: BTreeSet<IpAddr> = (0..vip_count).map(vip).collect();
            let (before, _) = assign(&Owners::new(), &vips, &f, &all(&f), &BTreeMap::new(), 10);
            let mut live = all(&f);
            live.remove(failed);
            let down = BTreeMap::from([(failed.clone(), "gone".to_owned())]);
            let (after, moves) = assign(&before, &vips, &f, &live, &down, 11);
            for (ip, o) in &before {
                if &o.name == failed {
                    prop_assert!(live.contains(&after[ip].name));
                    prop_assert_eq!(after[ip].epoch, 11);
                    prop_assert!(moves.iter().any(|m| m.vip == *ip && m.why.as_deref() == Some("gone")));
                } else {
                    prop_assert_eq!(&after[ip], o);
                }
            }
            prop_assert_eq!(moves.len(), before.values().filter(|o| &o.name == failed).count());
            let (back, moves) = assign(&after, &vips, &f, &all(&f), &BTreeMap::new(), 12);
            prop_assert_eq!(&back, &after);
            prop_assert!(moves.is_empty());
            let sent = DesiredState { version: 12, listeners: Vec::new(), l2: Some(state(&back, 1000)) };
            let recovered = recover(&[None, Some(sent)]);
            prop_assert_eq!(&recovered, &back);
            let (again, moves) = assign(&recovered, &vips, &f, &all(&f), &BTreeMap::new(), 13);
            prop_assert_eq!(again, back);
            prop_assert!(moves.is_empty());
        }
    }
}
