//! Hand-over between workers: which worker serves a connection that one
//! of them accepted (placement), and the message that carries it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use crate::routing::BindKey;
use crate::stats::Padded;

/// A connection one worker accepted for another to serve, already counted
/// in the other's `worker_conns`.
#[derive(Debug)]
pub struct Handoff {
    /// The listener that accepted it.
    pub key: BindKey,
    /// The accepted socket, on no worker's runtime yet.
    pub stream: std::net::TcpStream,
    /// The client.
    pub peer: SocketAddr,
}

/// Which worker serves a connection that worker `me` just accepted, given
/// each worker's connection count: `me`, unless the least loaded worker
/// serves clearly fewer ([`handoff_slack`]).
///
/// The kernel spreads accepts over the workers' `SO_REUSEPORT` sockets by
/// a hash of the addresses, which evens out over many connections but not
/// over a few long-lived ones: 16 connections often split 11 to 5. A
/// worker that is clearly ahead passes the new connection on, as HAProxy
/// does between its threads (docs/design/0001).
pub fn place(counts: &[Padded], me: usize) -> usize {
    let count = |i: usize| counts[i].0.load(Ordering::Relaxed);
    let mine = count(me);
    let (least, fewest) = (0..counts.len())
        .map(|i| (i, count(i)))
        .min_by_key(|&(_, n)| n)
        .unwrap_or((me, mine));
    if mine > fewest + handoff_slack(fewest) {
        least
    } else {
        me
    }
}

/// How many more connections than the least loaded worker a worker keeps
/// before it hands new ones over: 1, plus a sixteenth of the load, so many
/// short connections (each hand-off costs a wake-up of the other worker)
/// move only when the spread is wider than their churn.
fn handoff_slack(fewest: u64) -> u64 {
    1 + fewest / 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn counts(ns: &[u64]) -> Vec<Padded> {
        ns.iter().map(|&n| Padded(AtomicU64::new(n))).collect()
    }

    #[test]
    fn a_worker_keeps_connections_while_the_spread_is_small() {
        assert_eq!(place(&counts(&[0]), 0), 0, "one worker");
        assert_eq!(place(&counts(&[0, 0]), 1), 1);
        assert_eq!(
            place(&counts(&[1, 0]), 0),
            0,
            "one ahead is within the slack"
        );
        assert_eq!(place(&counts(&[39, 36, 38]), 0), 0, "39 <= 36 + 1 + 36/16");
    }

    #[test]
    fn a_worker_clearly_ahead_hands_over_to_the_least_loaded() {
        assert_eq!(place(&counts(&[2, 0]), 0), 1);
        assert_eq!(place(&counts(&[7, 5, 3, 4]), 0), 2);
        assert_eq!(place(&counts(&[40, 36, 35]), 0), 2, "40 > 35 + 1 + 35/16");
        // Only the accepting worker's own lead matters.
        assert_eq!(place(&counts(&[9, 3, 8]), 2), 1);
        assert_eq!(place(&counts(&[9, 3, 4]), 2), 2);
    }

    #[test]
    fn placing_one_by_one_keeps_workers_within_the_slack() {
        // Every connection accepted by worker 0 (the worst a hash can do).
        let c = counts(&[0, 0, 0, 0]);
        for _ in 0..40 {
            let to = place(&c, 0);
            c[to].0.fetch_add(1, Ordering::Relaxed);
        }
        let n: Vec<u64> = c.iter().map(|p| p.0.load(Ordering::Relaxed)).collect();
        let (max, min) = (*n.iter().max().unwrap(), *n.iter().min().unwrap());
        assert!(max - min <= 2, "{n:?}");
        assert_eq!(n.iter().sum::<u64>(), 40);
    }
}
