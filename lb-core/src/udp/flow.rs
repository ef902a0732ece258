//! The UDP flow table: one entry per client address, with its last
//! activity. Pure: the caller passes `now`, and expiry returns what to
//! close; the shell owns the sockets and tasks stored as values.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Flows of one listener on one worker, keyed by client address.
#[derive(Debug)]
pub struct FlowTable<V> {
    flows: HashMap<SocketAddr, Flow<V>>,
}

#[derive(Debug)]
struct Flow<V> {
    value: V,
    last: Instant,
}

impl<V> Default for FlowTable<V> {
    fn default() -> Self {
        Self {
            flows: HashMap::new(),
        }
    }
}

impl<V> FlowTable<V> {
    /// Number of flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// True when there is no flow.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The flow of `client`, marked active at `now`.
    pub fn touch(&mut self, client: SocketAddr, now: Instant) -> Option<&mut V> {
        let f = self.flows.get_mut(&client)?;
        f.last = f.last.max(now);
        Some(&mut f.value)
    }

    /// Adds (or replaces) the flow of `client`; returns the replaced value.
    pub fn insert(&mut self, client: SocketAddr, value: V, now: Instant) -> Option<V> {
        self.flows
            .insert(client, Flow { value, last: now })
            .map(|f| f.value)
    }

    /// Removes the flow of `client`.
    pub fn remove(&mut self, client: SocketAddr) -> Option<V> {
        self.flows.remove(&client).map(|f| f.value)
    }

    /// Removes and returns every flow idle for `idle` or longer at `now`,
    /// and every flow `dead` says must close.
    pub fn expire(
        &mut self,
        now: Instant,
        idle: Duration,
        dead: impl Fn(&V) -> bool,
    ) -> Vec<(SocketAddr, V)> {
        let gone: Vec<SocketAddr> = self
            .flows
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.last) >= idle || dead(&f.value))
            .map(|(k, _)| *k)
            .collect();
        gone.into_iter()
            .filter_map(|k| self.flows.remove(&k).map(|f| (k, f.value)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn expiry_follows_last_activity() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(30);
        let mut t = FlowTable::default();
        t.insert(a(1), "one", t0);
        t.insert(a(2), "two", t0);
        assert!(t
            .expire(t0 + Duration::from_secs(29), idle, |_| false)
            .is_empty());
        assert_eq!(
            t.touch(a(2), t0 + Duration::from_secs(29)),
            Some(&mut "two")
        );
        let gone = t.expire(t0 + Duration::from_secs(30), idle, |_| false);
        assert_eq!(gone, vec![(a(1), "one")]);
        assert_eq!(t.len(), 1);
        // An older `now` never moves activity backwards.
        t.touch(a(2), t0);
        assert!(t
            .expire(t0 + Duration::from_secs(58), idle, |_| false)
            .is_empty());
        assert_eq!(
            t.expire(t0 + Duration::from_secs(59), idle, |_| false)
                .len(),
            1
        );
        assert!(t.is_empty());
    }

    #[test]
    fn dead_flows_expire_at_once() {
        let t0 = Instant::now();
        let mut t = FlowTable::default();
        t.insert(a(1), 1, t0);
        t.insert(a(2), 2, t0);
        let gone = t.expire(t0, Duration::from_secs(30), |v| *v == 2);
        assert_eq!(gone, vec![(a(2), 2)]);
        assert_eq!(t.remove(a(1)), Some(1));
        assert_eq!(t.touch(a(1), t0), None);
    }
}
