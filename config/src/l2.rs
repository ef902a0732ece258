//! L2 ownership in a dynamic state (`l2`): which forwarder answers ARP/NDP
//! for each VIP, as `lb-controller` decides it and every `lbd` receives it.
//!
//! The controller sends each forwarder the same owner map with that
//! forwarder's own name in `forwarder`: an `lbd` learns who it is from the
//! controller, so no name in a file can disagree with the controller's.
//! A state without `l2` (every state before L2 mode, and every state of a
//! controller with no `announce = "l2"` pool) names no owner.
//!
//! Pure: the model and its validation, nothing else.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{FieldError, MAX_VERSION};

/// The longest `lease_ms` accepted: one hour.
pub const MAX_LEASE_MS: u64 = 3_600_000;

/// `l2` of a dynamic state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L2State {
    /// The name the controller knows the receiving forwarder by: the
    /// entries whose `owner` is this name are the receiver's to announce.
    pub forwarder: String,
    /// How long the receiver may go without a request from the controller
    /// (a readiness probe or a state) before it counts as cut off; the
    /// controller's own time to declare a silent forwarder failed. A
    /// forwarder cut off longer than this gives up a VIP as soon as
    /// another host claims it on the LAN.
    pub lease_ms: u64,
    /// Every VIP with an owner, in address order.
    #[serde(default)]
    pub owners: Vec<VipOwner>,
}

/// One VIP's owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipOwner {
    /// The address.
    pub vip: IpAddr,
    /// The forwarder that answers for it.
    pub owner: String,
    /// Grows with every change of owner (the controller uses the version
    /// of the first state that named this owner), never goes back: of two
    /// claims on a VIP, the one with the larger epoch is the current one.
    pub epoch: u64,
}

impl L2State {
    /// The entry of `vip`, if it has an owner.
    pub fn owner_of(&self, vip: IpAddr) -> Option<&VipOwner> {
        self.owners.iter().find(|o| o.vip == vip)
    }
}

/// Whether `name` can name a forwarder: 1 to 253 bytes, none of them a
/// control character or white space.
pub fn valid_forwarder_name(name: &str) -> bool {
    (1..=253).contains(&name.len()) && name.chars().all(|c| !c.is_control() && !c.is_whitespace())
}

/// Every problem in `l2`, each with its path (`l2.owners[3].vip`).
pub fn validate(l2: &L2State) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let shown = crate::shown;
    if !valid_forwarder_name(&l2.forwarder) {
        errors.push(FieldError::new(
            "l2.forwarder",
            format!(
                "{} is not a forwarder name (1 to 253 characters, no spaces or control characters)",
                shown(&l2.forwarder)
            ),
        ));
    }
    if l2.lease_ms == 0 || l2.lease_ms > MAX_LEASE_MS {
        errors.push(FieldError::new(
            "l2.lease_ms",
            format!("{} is not between 1 and {MAX_LEASE_MS}", l2.lease_ms),
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, o) in l2.owners.iter().enumerate() {
        let path = |field: &str| format!("l2.owners[{i}].{field}");
        let vip = o.vip.to_canonical();
        if vip.is_unspecified() || vip.is_loopback() || vip.is_multicast() {
            errors.push(FieldError::new(
                path("vip"),
                format!("{vip} cannot be a VIP on a LAN (unspecified, loopback or multicast)"),
            ));
        } else if !seen.insert(vip) {
            errors.push(FieldError::new(
                path("vip"),
                format!("{vip} is listed twice; a VIP has one owner"),
            ));
        }
        if !valid_forwarder_name(&o.owner) {
            errors.push(FieldError::new(
                path("owner"),
                format!("{} is not a forwarder name", shown(&o.owner)),
            ));
        }
        if o.epoch == 0 || o.epoch > MAX_VERSION {
            errors.push(FieldError::new(
                path("epoch"),
                format!("{} is not between 1 and {MAX_VERSION}", o.epoch),
            ));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(vip: &str, owner: &str, epoch: u64) -> VipOwner {
        VipOwner {
            vip: vip.parse().unwrap(),
            owner: owner.into(),
            epoch,
        }
    }

    #[test]
    fn every_problem_names_its_field() {
        let l2 = L2State {
            forwarder: "edge 1".into(),
            lease_ms: 0,
            owners: vec![
                owner("192.0.2.1", "edge-1", 3),
                owner("192.0.2.1", "edge-2", 4),
                owner("::1", "", 0),
            ],
        };
        let paths: Vec<String> = validate(&l2).into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            [
                "l2.forwarder",
                "l2.lease_ms",
                "l2.owners[1].vip",
                "l2.owners[2].vip",
                "l2.owners[2].owner",
                "l2.owners[2].epoch",
            ]
        );
    }

    #[test]
    fn a_good_map_passes() {
        let l2 = L2State {
            forwarder: "edge-1".into(),
            lease_ms: 600,
            owners: vec![
                owner("192.0.2.1", "edge-1", 3),
                owner("2001:db8::1", "edge-2", 9),
            ],
        };
        assert_eq!(validate(&l2), []);
        assert_eq!(
            l2.owner_of("2001:db8::1".parse().unwrap()).unwrap().owner,
            "edge-2"
        );
    }
}
