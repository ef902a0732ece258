//! Backend selection. A [`Selector`] is built once from a listener's backend
//! set and picked from many times; it never looks at sockets or clocks.
//! Which backends may be used right now (health, draining, already tried) is
//! the caller's [`Pool`], so a health flip never rebuilds a table: Maglev
//! skips an unusable entry instead, which keeps every other key in place.

pub mod hash;
pub mod maglev;

use std::sync::atomic::{AtomicUsize, Ordering};

use lb_config::{Backend, Balance};

use maglev::Maglev;

/// What the selector may use, as seen by the caller at pick time.
pub trait Pool {
    /// Whether backend `i` may take this connection.
    fn usable(&self, i: usize) -> bool;
    /// Active connections on backend `i` (for least_conn and random_two).
    fn active(&self, i: usize) -> u64;
}

/// Longest weighted round-robin cycle kept; larger weight sums are scaled down.
const MAX_CYCLE: u64 = 1 << 16;
/// Maglev lookups with a rehashed key before falling back to a weighted scan.
const MAGLEV_PROBES: u64 = 8;

enum Kind {
    Maglev(Option<Maglev>),
    RoundRobin {
        cycle: Box<[u32]>,
        cursor: AtomicUsize,
    },
    LeastConn,
    RandomTwo,
}

/// A selection algorithm bound to one backend list.
pub struct Selector {
    kind: Kind,
    weights: Box<[u32]>,
    /// Prefix sums of weights, for weighted random choice.
    cumulative: Box<[u64]>,
}

impl std::fmt::Debug for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selector")
            .field("weights", &self.weights)
            .finish()
    }
}

impl Selector {
    /// Builds the selector for `backends` (indices in picks refer to this slice).
    pub fn new(balance: Balance, backends: &[Backend]) -> Self {
        let weights: Box<[u32]> = backends.iter().map(|b| b.weight).collect();
        let mut acc = 0u64;
        let cumulative = weights
            .iter()
            .map(|&w| {
                acc += u64::from(w);
                acc
            })
            .collect();
        let kind = match balance {
            Balance::Maglev => {
                let pairs: Vec<_> = backends.iter().map(|b| (b.addr, b.weight)).collect();
                Kind::Maglev(Maglev::build(&pairs))
            }
            Balance::RoundRobin => Kind::RoundRobin {
                cycle: smooth_cycle(&weights),
                cursor: AtomicUsize::new(0),
            },
            Balance::LeastConn => Kind::LeastConn,
            Balance::RandomTwo => Kind::RandomTwo,
        };
        Self {
            kind,
            weights,
            cumulative,
        }
    }

    /// Number of backends the selector was built from.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// True when built from no backends.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Picks a usable backend. `key` is the connection's hash (Maglev),
    /// `random` a fresh random number (random_two, tie breaks).
    pub fn pick(&self, pool: &impl Pool, key: u64, random: u64) -> Option<usize> {
        if self.is_empty() {
            return None;
        }
        let usable = |i: usize| self.weights[i] > 0 && pool.usable(i);
        let picked = match &self.kind {
            Kind::Maglev(Some(table)) => (0..MAGLEV_PROBES)
                .map(|probe| {
                    table.lookup(hash::fmix64(
                        key ^ probe.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    ))
                })
                .find(|&i| usable(i)),
            Kind::Maglev(None) => None,
            Kind::RoundRobin { cycle, cursor } => {
                let start = cursor.fetch_add(1, Ordering::Relaxed);
                (0..cycle.len().min(64))
                    .map(|step| cycle[(start + step) % cycle.len()] as usize)
                    .find(|&i| usable(i))
            }
            Kind::LeastConn => {
                self.least_loaded(pool, (0..self.len()).filter(|&i| usable(i)), random)
            }
            Kind::RandomTwo => {
                let a = self.weighted_random(random);
                let b = self.weighted_random(hash::fmix64(random));
                match (usable(a), usable(b)) {
                    (true, true) => self.least_loaded(pool, [a, b].into_iter(), random),
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => None,
                }
            }
        };
        // Fallback when the fast path found nothing usable: a weighted
        // deterministic choice among what is usable (keyed, so Maglev stays
        // sticky per key while its own entry is down).
        picked.or_else(|| self.weighted_among(key ^ random_if_unkeyed(&self.kind, random), usable))
    }

    fn least_loaded(
        &self,
        pool: &impl Pool,
        candidates: impl Iterator<Item = usize>,
        random: u64,
    ) -> Option<usize> {
        // Compare active/weight without division: a.active * b.weight < b.active * a.weight.
        // Ties go to a rotating start so equal backends share the load.
        let all: Vec<usize> = candidates.collect();
        if all.is_empty() {
            return None;
        }
        let start = (random % all.len() as u64) as usize;
        let mut best = all[start];
        for k in 1..all.len() {
            let i = all[(start + k) % all.len()];
            let lhs = u128::from(pool.active(i)) * u128::from(self.weights[best]);
            let rhs = u128::from(pool.active(best)) * u128::from(self.weights[i]);
            if lhs < rhs {
                best = i;
            }
        }
        Some(best)
    }

    fn weighted_random(&self, random: u64) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0);
        if total == 0 {
            return 0;
        }
        let point = random % total;
        self.cumulative.partition_point(|&c| c <= point)
    }

    fn weighted_among(&self, key: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let total: u64 = (0..self.len())
            .filter(|&i| usable(i))
            .map(|i| u64::from(self.weights[i]))
            .sum();
        if total == 0 {
            return None;
        }
        let mut point = hash::fmix64(key) % total;
        for i in (0..self.len()).filter(|&i| usable(i)) {
            let w = u64::from(self.weights[i]);
            if point < w {
                return Some(i);
            }
            point -= w;
        }
        None
    }
}

fn random_if_unkeyed(kind: &Kind, random: u64) -> u64 {
    match kind {
        Kind::Maglev(_) => 0,
        _ => random,
    }
}

/// Smooth weighted round robin (as nginx does it): interleaves backends so a
/// weight-5 backend does not take five connections in a row.
fn smooth_cycle(weights: &[u32]) -> Box<[u32]> {
    let g = weights.iter().copied().filter(|&w| w > 0).fold(0u32, gcd);
    if g == 0 {
        return Box::new([]);
    }
    let mut w: Vec<u64> = weights.iter().map(|&x| u64::from(x / g)).collect();
    let sum: u64 = w.iter().sum();
    if sum > MAX_CYCLE {
        // Scale down, keeping every positive weight at least 1.
        for x in w.iter_mut().filter(|x| **x > 0) {
            *x = (*x * MAX_CYCLE / sum).max(1);
        }
    }
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; w.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] || w[best] == 0 {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(best as u32);
    }
    cycle.into_boxed_slice()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::net::SocketAddr;

    struct TestPool {
        up: Vec<bool>,
        active: RefCell<Vec<u64>>,
    }

    impl Pool for TestPool {
        fn usable(&self, i: usize) -> bool {
            self.up[i]
        }
        fn active(&self, i: usize) -> u64 {
            self.active.borrow()[i]
        }
    }

    fn backends(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Backend {
                addr: SocketAddr::from(([127, 0, 0, 2 + i as u8], 8000)),
                weight,
            })
            .collect()
    }

    fn pool(n: usize) -> TestPool {
        TestPool {
            up: vec![true; n],
            active: RefCell::new(vec![0; n]),
        }
    }

    /// Picks many times; with `hold`, each pick stays active (long connections).
    fn distribution(
        balance: Balance,
        weights: &[u32],
        pool: &TestPool,
        picks: u64,
        hold: bool,
    ) -> Vec<u64> {
        let sel = Selector::new(balance, &backends(weights));
        let mut counts = vec![0u64; weights.len()];
        let mut rng = 0x1234_5678u64;
        for k in 0..picks {
            rng = hash::fmix64(rng.wrapping_add(k));
            let i = sel
                .pick(pool, hash::fmix64(k.wrapping_mul(7919)), rng)
                .expect("a backend");
            counts[i] += 1;
            if hold {
                pool.active.borrow_mut()[i] += 1;
            }
        }
        counts
    }

    fn assert_shares(counts: &[u64], weights: &[u32], tolerance: f64) {
        let total: u64 = counts.iter().sum();
        let wsum: u32 = weights.iter().sum();
        for (i, (&c, &w)) in counts.iter().zip(weights).enumerate() {
            let expected = total as f64 * f64::from(w) / f64::from(wsum);
            let err = (c as f64 - expected).abs() / expected.max(1.0);
            assert!(
                err <= tolerance,
                "backend {i}: {c} vs expected {expected:.0} ({counts:?})"
            );
        }
    }

    #[test]
    fn every_algorithm_respects_weights() {
        let weights = [1, 2, 3];
        for balance in [
            Balance::Maglev,
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::RandomTwo,
        ] {
            let hold = matches!(balance, Balance::LeastConn | Balance::RandomTwo);
            let counts = distribution(balance, &weights, &pool(3), 60_000, hold);
            let tol = if balance == Balance::RandomTwo {
                0.1
            } else {
                0.05
            };
            assert_shares(&counts, &weights, tol);
        }
    }

    #[test]
    fn round_robin_is_exact_and_interleaved() {
        let sel = Selector::new(Balance::RoundRobin, &backends(&[1, 1, 1]));
        let p = pool(3);
        let seq: Vec<usize> = (0..6).map(|_| sel.pick(&p, 0, 0).unwrap()).collect();
        assert_eq!(seq, [0, 1, 2, 0, 1, 2]);
        let sel = Selector::new(Balance::RoundRobin, &backends(&[5, 1]));
        let seq: Vec<usize> = (0..6).map(|_| sel.pick(&p, 0, 0).unwrap()).collect();
        assert_eq!(seq.iter().filter(|&&i| i == 1).count(), 1);
        assert_ne!(
            &seq[..5],
            &[0, 0, 0, 0, 0],
            "smooth: the light backend is not last"
        );
    }

    #[test]
    fn never_picks_unusable_and_skips_weight_zero() {
        for balance in [
            Balance::Maglev,
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::RandomTwo,
        ] {
            let mut p = pool(4);
            p.up[1] = false;
            let counts = distribution(balance, &[1, 1, 1, 0], &p, 5_000, false);
            assert_eq!(counts[1], 0, "{balance:?} picked a down backend");
            assert_eq!(counts[3], 0, "{balance:?} picked a weight-0 backend");
            assert!(counts[0] > 0 && counts[2] > 0, "{balance:?}: {counts:?}");
            p.up = vec![false; 4];
            let sel = Selector::new(balance, &backends(&[1, 1, 1, 0]));
            assert_eq!(sel.pick(&p, 1, 1), None);
        }
    }

    #[test]
    fn maglev_keeps_keys_of_healthy_backends_when_one_goes_down() {
        let sel = Selector::new(Balance::Maglev, &backends(&[1, 1, 1, 1]));
        let all = pool(4);
        let mut one_down = pool(4);
        one_down.up[2] = false;
        for key in 0..20_000u64 {
            let k = hash::fmix64(key);
            let before = sel.pick(&all, k, 0).unwrap();
            let after = sel.pick(&one_down, k, 99).unwrap();
            if before != 2 {
                assert_eq!(before, after, "key {key} moved off a healthy backend");
            }
            // Sticky: the same key picks the same fallback every time.
            assert_eq!(after, sel.pick(&one_down, k, 12345).unwrap());
        }
    }

    #[test]
    fn least_conn_prefers_the_idle() {
        let sel = Selector::new(Balance::LeastConn, &backends(&[1, 1, 1]));
        let p = pool(3);
        *p.active.borrow_mut() = vec![5, 0, 5];
        for r in 0..10 {
            assert_eq!(sel.pick(&p, 0, r), Some(1));
        }
    }

    #[test]
    fn empty_selector_picks_nothing() {
        for balance in [
            Balance::Maglev,
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::RandomTwo,
        ] {
            let sel = Selector::new(balance, &[]);
            assert_eq!(sel.pick(&pool(0), 1, 2), None);
        }
    }

    proptest::proptest! {
        /// Whatever the algorithm, weights, health, load, key and random
        /// number, a pick is a usable backend with a weight above zero, or
        /// nothing when there is none.
        #[test]
        fn selection_never_returns_an_unusable_backend(
            balance in proptest::sample::select(vec![
                Balance::Maglev, Balance::RoundRobin, Balance::LeastConn, Balance::RandomTwo,
            ]),
            backends_up in proptest::collection::vec((0u32..4, proptest::bool::ANY, 0u64..5), 0..9),
            picks in proptest::collection::vec((proptest::num::u64::ANY, proptest::num::u64::ANY), 1..20),
        ) {
            let weights: Vec<u32> = backends_up.iter().map(|b| b.0).collect();
            let sel = Selector::new(balance, &backends(&weights));
            let p = TestPool {
                up: backends_up.iter().map(|b| b.1).collect(),
                active: RefCell::new(backends_up.iter().map(|b| b.2).collect()),
            };
            let any = backends_up.iter().any(|b| b.0 > 0 && b.1);
            for (key, random) in picks {
                match sel.pick(&p, key, random) {
                    Some(i) => {
                        proptest::prop_assert!(p.up[i], "{balance:?} picked down backend {i}");
                        proptest::prop_assert!(weights[i] > 0, "{balance:?} picked weight-0 backend {i}");
                    }
                    // Maglev and round robin look a bounded number of places
                    // (8 probes, 64 steps) before they give up; the others
                    // find a usable backend whenever there is one.
                    None if matches!(balance, Balance::LeastConn) => proptest::prop_assert!(!any),
                    None => {}
                }
            }
        }
    }
}
