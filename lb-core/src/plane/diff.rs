//! The difference between two sets of listeners, as the plane applies it.
//! Pure: values in, a [`Diff`] out; the shell ([`super::Plane`]) binds,
//! publishes and drains from it.
//!
//! Listeners are matched by their socket's identity ([`BindKey`]: protocol
//! and address), not by name, so a renamed listener keeps its socket and
//! its connections. Within one set, bind keys are unique (validation and
//! the static/dynamic collision check see to it).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use lb_config::Listener;

use crate::routing::BindKey;

/// What changes from one set of listeners to the next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Listeners with a bind key the old set did not have: their sockets
    /// are bound before anything else, and a failure changes nothing.
    pub added: Vec<Listener>,
    /// Listeners whose bind key stays and whose configuration changed.
    pub changed: Vec<Changed>,
    /// Listeners whose bind key is gone: their sockets close after the new
    /// snapshot is published, and all their backends drain.
    pub removed: Vec<Listener>,
    /// The new set's bind keys, in its order (status and metrics follow it).
    pub order: Vec<BindKey>,
}

/// One listener that stays on its socket with a new configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changed {
    /// The new configuration.
    pub listener: Listener,
    /// The selector must be built again: the algorithm or the backends
    /// (addresses, weights, order) changed. Otherwise the old one serves.
    pub reselect: bool,
    /// Backends that join (new addresses).
    pub joined: Vec<SocketAddr>,
    /// Backends that leave, and drain.
    pub left: Vec<SocketAddr>,
}

impl Diff {
    /// Whether nothing at all changes (not even the order).
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }

    /// Every backend that starts draining: those that left a listener that
    /// stays, and every backend of a removed listener.
    pub fn draining(&self) -> impl Iterator<Item = (BindKey, SocketAddr)> + '_ {
        let left = self.changed.iter().flat_map(|c| {
            let key = BindKey::of(&c.listener);
            c.left.iter().map(move |&a| (key, a))
        });
        let removed = self.removed.iter().flat_map(|l| {
            let key = BindKey::of(l);
            l.backends.iter().map(move |b| (key, b.addr))
        });
        left.chain(removed)
    }
}

/// The difference from `old` to `new`.
pub fn diff(old: &[Listener], new: &[Listener]) -> Diff {
    let before: HashMap<BindKey, &Listener> = old.iter().map(|l| (BindKey::of(l), l)).collect();
    let after: HashSet<BindKey> = new.iter().map(BindKey::of).collect();
    let mut d = Diff {
        order: new.iter().map(BindKey::of).collect(),
        ..Diff::default()
    };
    for l in new {
        match before.get(&BindKey::of(l)) {
            None => d.added.push(l.clone()),
            Some(&was) if was == l => {}
            Some(&was) => d.changed.push(changed(was, l)),
        }
    }
    d.removed = old
        .iter()
        .filter(|l| !after.contains(&BindKey::of(l)))
        .cloned()
        .collect();
    d
}

fn changed(was: &Listener, now: &Listener) -> Changed {
    let addrs = |l: &Listener| l.backends.iter().map(|b| b.addr).collect::<HashSet<_>>();
    let (before, after) = (addrs(was), addrs(now));
    let in_order = |l: &Listener, other: &HashSet<SocketAddr>| {
        let mut seen = HashSet::new();
        l.backends
            .iter()
            .map(|b| b.addr)
            .filter(|a| !other.contains(a) && seen.insert(*a))
            .collect()
    };
    Changed {
        listener: now.clone(),
        reselect: was.balance != now.balance || was.backends != now.backends,
        joined: in_order(now, &before),
        left: in_order(was, &after),
    }
}

/// Applies `d` to `old`: the set the diff leads to. The plane does the same
/// to sockets, handles and selectors; this is its model, for tests.
pub fn apply(old: &[Listener], d: &Diff) -> Vec<Listener> {
    let mut by_key: HashMap<BindKey, Listener> =
        old.iter().map(|l| (BindKey::of(l), l.clone())).collect();
    for l in &d.removed {
        by_key.remove(&BindKey::of(l));
    }
    for c in &d.changed {
        by_key.insert(BindKey::of(&c.listener), c.listener.clone());
    }
    for l in &d.added {
        by_key.insert(BindKey::of(l), l.clone());
    }
    d.order.iter().filter_map(|k| by_key.remove(k)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_config::{Backend, Balance, Protocol};
    use proptest::prelude::*;

    fn listener(port: u16, backends: &[(u8, u32)], balance: Balance) -> Listener {
        let toml = format!(
            "[[listener]]\nname = \"l{port}\"\nbind = \"127.0.0.1:{port}\"\nbackends = [{}]\n",
            backends
                .iter()
                .map(|(ip, w)| format!("{{ addr = \"127.0.0.{ip}:80\", weight = {w} }}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut l = lb_config::parse_config(&toml).unwrap().listeners.remove(0);
        l.balance = balance;
        l
    }

    #[test]
    fn unchanged_listeners_are_not_in_the_diff() {
        let a = vec![listener(1, &[(2, 1)], Balance::Maglev)];
        let d = diff(&a, &a);
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(d.order, vec![BindKey::of(&a[0])]);
        assert_eq!(d.draining().count(), 0);
    }

    #[test]
    fn a_changed_listener_names_what_joined_and_left() {
        let a = vec![listener(1, &[(2, 1), (3, 1)], Balance::Maglev)];
        let b = vec![listener(1, &[(3, 1), (4, 1)], Balance::Maglev)];
        let d = diff(&a, &b);
        assert!(d.added.is_empty() && d.removed.is_empty());
        let c = &d.changed[0];
        assert!(c.reselect);
        assert_eq!(c.joined, vec!["127.0.0.4:80".parse().unwrap()]);
        assert_eq!(c.left, vec!["127.0.0.2:80".parse().unwrap()]);
        let draining: Vec<_> = d.draining().map(|(_, a)| a).collect();
        assert_eq!(
            draining,
            vec!["127.0.0.2:80".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn a_new_timeout_keeps_the_selector() {
        let a = vec![listener(1, &[(2, 1)], Balance::Maglev)];
        let mut b = a.clone();
        b[0].idle_timeout = lb_config::Duration::from_secs(5);
        let d = diff(&a, &b);
        assert_eq!(d.changed.len(), 1);
        assert!(!d.changed[0].reselect);
        assert!(d.changed[0].joined.is_empty() && d.changed[0].left.is_empty());
    }

    #[test]
    fn a_removed_listener_drains_every_backend() {
        let a = vec![
            listener(1, &[(2, 1), (3, 1)], Balance::Maglev),
            listener(2, &[(2, 1)], Balance::RoundRobin),
        ];
        let d = diff(&a, &a[1..]);
        assert_eq!(d.removed, vec![a[0].clone()]);
        assert_eq!(d.draining().count(), 2);
    }

    fn arb_listener() -> impl Strategy<Value = Listener> {
        (
            1u16..6,
            proptest::collection::vec((2u8..8, 0u32..3), 0..4),
            prop_oneof![Just(Balance::Maglev), Just(Balance::RoundRobin)],
            any::<bool>(),
        )
            .prop_map(|(port, backends, balance, udp)| {
                let mut l = listener(port, &[], balance);
                l.backends = backends
                    .into_iter()
                    .map(|(ip, weight)| Backend {
                        addr: format!("127.0.0.{ip}:80").parse().unwrap(),
                        weight,
                    })
                    .collect();
                if udp {
                    l.protocol = Protocol::Udp;
                }
                l
            })
    }

    /// A set with unique bind keys, in some order.
    fn arb_set() -> impl Strategy<Value = Vec<Listener>> {
        proptest::collection::vec(arb_listener(), 0..6).prop_map(|ls| {
            let mut seen = HashSet::new();
            ls.into_iter()
                .filter(|l| seen.insert(BindKey::of(l)))
                .collect()
        })
    }

    proptest! {
        /// Applying `diff(a, b)` to `a` gives `b`, and the diff is minimal:
        /// nothing unchanged is in it, and a selector is rebuilt only when
        /// the algorithm or the backends changed.
        #[test]
        fn applying_the_diff_gives_the_new_set(a in arb_set(), b in arb_set()) {
            let d = diff(&a, &b);
            prop_assert_eq!(apply(&a, &d), b.clone());
            let old: HashMap<_, _> = a.iter().map(|l| (BindKey::of(l), l)).collect();
            for c in &d.changed {
                let was = old[&BindKey::of(&c.listener)];
                prop_assert_ne!(was, &c.listener);
                prop_assert_eq!(
                    c.reselect,
                    was.balance != c.listener.balance || was.backends != c.listener.backends
                );
            }
            for l in &d.added {
                prop_assert!(!old.contains_key(&BindKey::of(l)));
            }
            // Every backend of `a` that `b` no longer has on the same socket drains.
            let kept: HashSet<(BindKey, SocketAddr)> = b
                .iter()
                .flat_map(|l| l.backends.iter().map(move |x| (BindKey::of(l), x.addr)))
                .collect();
            let gone: HashSet<(BindKey, SocketAddr)> = a
                .iter()
                .flat_map(|l| l.backends.iter().map(move |x| (BindKey::of(l), x.addr)))
                .filter(|k| !kept.contains(k))
                .collect();
            prop_assert_eq!(d.draining().collect::<HashSet<_>>(), gone);
            prop_assert!(diff(&b, &b).is_empty());
        }
    }
}
