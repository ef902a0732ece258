//! L2 announcement on the controller's side: one owner per VIP of an
//! `announce = "l2"` pool, chosen among the live forwarders and sent to
//! every forwarder in the state (`l2`), with an epoch that only grows.
//!
//! - [`owners`]: the choice, recovery at start, liveness (pure);
//! - [`Book`]: what the ledger keeps between states (pure);
//! - the leader's readiness probes of each forwarder are the controller's
//!   shell (`controller::probes`).
//!
//! Kubernetes keeps no owner map: at start the controller reads it back
//! from what the forwarders run ([`owners::recover`]), so a restart moves
//! no VIP.

pub mod owners;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use lb_config::{DesiredState, L2State};

use self::owners::{Move, Owners};
use crate::config::L2Settings;

/// The L2 owners between states, and what is known of the forwarders.
#[derive(Clone, Debug)]
pub struct Book {
    settings: L2Settings,
    forwarders: Vec<String>,
    live: BTreeSet<String>,
    down: BTreeMap<String, String>,
    owners: Owners,
    moves: Vec<Move>,
    /// The last [`Book::build`] moved a VIP away from its owner.
    failover: bool,
}

impl Book {
    /// A book for `forwarders` (every one presumed live until probed),
    /// starting from the owners they were found running.
    pub fn recovered(
        settings: &L2Settings,
        forwarders: Vec<String>,
        running: &[Option<DesiredState>],
    ) -> Self {
        Self {
            settings: settings.clone(),
            live: forwarders.iter().cloned().collect(),
            forwarders,
            down: BTreeMap::new(),
            owners: owners::recover(running),
            moves: Vec::new(),
            failover: false,
        }
    }

    /// Whether `ip` gets an owner.
    pub fn covers(&self, ip: IpAddr) -> bool {
        self.settings.covers(ip)
    }

    /// Marks `name` up or down (`why`: the reason it is down); returns
    /// whether anything changed (a new state is due).
    pub fn set_live(&mut self, name: &str, up: bool, why: Option<String>) -> bool {
        if up {
            self.down.remove(name);
            self.live.insert(name.to_owned())
        } else {
            let reason = self
                .down
                .entry(name.to_owned())
                .or_insert_with(|| "down".into());
            if let Some(why) = why {
                *reason = why;
            }
            self.live.remove(name)
        }
    }

    /// The `l2` of the state numbered `version` whose VIPs are `vips`
    /// (those covered are kept); the moves are kept for
    /// [`Book::take_moves`].
    pub fn build(&mut self, vips: impl IntoIterator<Item = IpAddr>, version: u64) -> L2State {
        let vips: BTreeSet<IpAddr> = vips
            .into_iter()
            .map(|ip| ip.to_canonical())
            .filter(|ip| self.covers(*ip))
            .collect();
        let (owners, moves) = owners::assign(
            &self.owners,
            &vips,
            &self.forwarders,
            &self.live,
            &self.down,
            version,
        );
        self.owners = owners;
        self.failover = moves.iter().any(|m| m.from.is_some());
        self.moves.extend(moves);
        owners::state(&self.owners, self.settings.lease().as_millis() as u64)
    }

    /// Whether the last [`Book::build`] moved a VIP away from its owner
    /// (a failover or a handover: its state is urgent).
    pub fn failover(&self) -> bool {
        self.failover
    }

    /// The moves since the last call.
    pub fn take_moves(&mut self) -> Vec<Move> {
        std::mem::take(&mut self.moves)
    }

    /// The owner of `ip`, if it has one.
    pub fn owner_of(&self, ip: IpAddr) -> Option<&str> {
        self.owners.get(&ip.to_canonical()).map(|o| o.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::Pool;

    fn settings() -> L2Settings {
        L2Settings {
            pools: vec![Pool::new("lan", &["192.0.2.0/29"], true, false).unwrap()],
            probe_interval: std::time::Duration::from_millis(200),
            probe_failures: 3,
        }
    }

    #[test]
    fn only_covered_vips_get_owners_and_moves_are_reported_once() {
        let names: Vec<String> = ["edge-1", "edge-2"].map(String::from).into();
        let mut book = Book::recovered(&settings(), names, &[]);
        let vips: Vec<IpAddr> = ["192.0.2.1", "198.51.100.1", "192.0.2.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let l2 = book.build(vips.clone(), 5);
        assert_eq!(l2.lease_ms, 1200);
        assert_eq!(l2.owners.len(), 2, "198.51.100.1 is not in an l2 pool");
        assert!(l2.owners.iter().all(|o| o.epoch == 5));
        assert_eq!(book.take_moves().len(), 2);
        assert!(book.take_moves().is_empty());
        assert!(book.owner_of(vips[1]).is_none());

        let first = book.owner_of(vips[0]).unwrap().to_owned();
        assert!(book.set_live(&first, false, Some("missed 3 probes".into())));
        assert!(!book.set_live(&first, false, None), "no change");
        assert!(!book.failover(), "new VIPs are no failover");
        let l2 = book.build(vips.clone(), 6);
        assert!(book.failover());
        let moved = l2.owner_of(vips[0]).unwrap();
        assert_ne!(moved.owner, first);
        assert_eq!(moved.epoch, 6);
        let moves = book.take_moves();
        assert!(moves
            .iter()
            .any(|m| m.vip == vips[0] && m.why.as_deref() == Some("missed 3 probes")));
        assert!(book.set_live(&first, true, None));
        let back = book.build(vips, 7);
        assert_eq!(back.owners, l2.owners, "a return moves nothing back");
        assert!(!book.failover());
    }
}
