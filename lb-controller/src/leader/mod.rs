//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Only the leader allocates, writes status and programs forwarders. A
//! candidate takes the Lease when it is free, or when the holder has not
//! renewed it for `lease_duration` as measured on the candidate's own clock
//! since it last saw the record change (so clock skew between replicas does
//! not matter). Writes carry the Lease's `resourceVersion`, so two
//! candidates racing for it cannot both win: one gets `409 Conflict`.
//!
//! The decisions ([`decide`], [`next_attempt`]) are pure; [`Elector`] is the
//! shell that reads the clock and talks to a [`LeaseStore`] (the API
//! server, or a fake in tests).

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

mod lease;

pub use lease::{ApiLease, LeaseStore, Written};

/// What a candidate should do about the Lease it sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write the Lease naming us (acquire or renew).
    Take,
    /// Someone else holds a live Lease.
    Wait,
}

/// Pure decision: `holder` is the Lease's holder, `observed` when we first
/// saw its current record, `now` the current instant.
pub fn decide(
    holder: Option<&str>,
    me: &str,
    observed: Instant,
    now: Instant,
    lease_duration: Duration,
) -> Decision {
    match holder {
        None | Some("") => Decision::Take,
        Some(h) if h == me => Decision::Take,
        Some(_) if now.saturating_duration_since(observed) >= lease_duration => Decision::Take,
        Some(_) => Decision::Wait,
    }
}

/// How often a standby reads the Lease at most: it learns of the leader's
/// renewals this late at worst, which bounds how late it takes over.
pub const STANDBY_POLL: Duration = Duration::from_millis(500);

/// When a waiting candidate tries again, `now` being when it found the
/// Lease held by another until `expires` (on its own clock): at the expiry
/// itself, or after a poll interval (the smaller of [`STANDBY_POLL`] and
/// the renew interval) if that comes first.
///
/// The expiry is measured from when this candidate first saw the current
/// record, which is at most one poll interval after the leader wrote it; so
/// a standby takes over at most `lease_duration` + one poll interval (plus
/// the API server's answers) after the leader's last renewal, and never
/// before `lease_duration` after it.
pub fn next_attempt(now: Instant, expires: Instant, timing: Timing) -> Instant {
    let poll = timing.renew_interval.min(STANDBY_POLL);
    (now + poll).min(expires)
}

/// Lease timing (from `[leader_election]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the leader renews.
    pub renew_interval: Duration,
}

/// What one attempt found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// We hold the Lease.
    Held,
    /// Another holds it until `expires` (our clock), as far as we know.
    Waiting {
        /// When it expires unless renewed.
        expires: Instant,
    },
}

/// Why a leader stopped leading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lost {
    /// Another replica holds the Lease.
    TakenOver,
    /// No renewal succeeded for long enough that the Lease may expire for
    /// the others: stop before they take over.
    CannotRenew(String),
}

/// One candidate.
pub struct Elector<S> {
    store: S,
    name: String,
    identity: String,
    timing: Timing,
    /// `(resourceVersion, first seen)` of the last record observed.
    observed: Option<(String, Instant)>,
}

impl<S: LeaseStore> Elector<S> {
    /// A candidate named `identity` for the Lease `name` in `store`.
    pub fn new(store: S, name: &str, identity: &str, timing: Timing) -> Self {
        Self {
            store,
            name: name.to_owned(),
            identity: identity.to_owned(),
            timing,
            observed: None,
        }
    }

    fn spec(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let ours = previous
            .and_then(|s| s.holder_identity.as_deref())
            .is_some_and(|h| h == self.identity);
        let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_duration.as_secs().max(1) as i32),
            acquire_time: if ours {
                previous.and_then(|s| s.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if ours || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// One attempt to acquire or renew.
    pub async fn try_hold(&mut self) -> Result<Hold, kube::Error> {
        let Some(lease) = self.store.get().await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None)),
            };
            return Ok(match self.store.create(lease).await? {
                Written::Stored => Hold::Held,
                Written::Conflict => Hold::Waiting {
                    expires: Instant::now() + self.timing.lease_duration,
                },
            });
        };
        let now = Instant::now();
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let observed = match &self.observed {
            Some((seen, at)) if *seen == rv => *at,
            _ => {
                self.observed = Some((rv, now));
                now
            }
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(1) as u64))
            .unwrap_or(self.timing.lease_duration);
        match decide(
            spec.holder_identity.as_deref(),
            &self.identity,
            observed,
            now,
            duration,
        ) {
            Decision::Wait => Ok(Hold::Waiting {
                expires: observed + duration,
            }),
            Decision::Take => {
                let mut next = lease.clone();
                next.spec = Some(self.spec(Some(&spec)));
                Ok(match self.store.replace(next).await? {
                    Written::Stored => Hold::Held,
                    // Someone wrote in between: what they wrote is a new
                    // record, seen on the next attempt.
                    Written::Conflict => Hold::Waiting {
                        expires: Instant::now() + duration,
                    },
                })
            }
        }
    }

    /// Waits until this candidate holds the Lease (`true`), or `stopped`
    /// resolves first (`false`).
    pub async fn acquire(&mut self, stopped: impl Future<Output = ()>) -> bool {
        let mut stopped = std::pin::pin!(stopped);
        loop {
            let at = match self.try_hold().await {
                Ok(Hold::Held) => return true,
                Ok(Hold::Waiting { expires }) => next_attempt(Instant::now(), expires, self.timing),
                Err(e) => {
                    tracing::warn!(error = %e, "lease");
                    Instant::now() + self.timing.renew_interval
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = &mut stopped => return false,
            }
        }
    }

    /// Renews every `renew_interval` until leadership is lost; returns why.
    /// A leader that cannot renew stops while its Lease is still valid for
    /// the others (one renew interval before it expires).
    pub async fn keep(&mut self) -> Lost {
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(self.timing.renew_interval).await;
            match self.try_hold().await {
                Ok(Hold::Held) => last = Instant::now(),
                Ok(Hold::Waiting { .. }) => return Lost::TakenOver,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the lease");
                    if last.elapsed() + self.timing.renew_interval >= self.timing.lease_duration {
                        return Lost::CannotRenew(e.to_string());
                    }
                }
            }
        }
    }

    /// Gives the Lease up (on shutdown) so a standby need not wait it out.
    pub async fn release(&mut self) {
        if let Ok(Some(mut lease)) = self.store.get().await {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                spec.holder_identity = None;
                spec.renew_time = None;
                let _ = self.store.replace(lease).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn takes_free_own_or_expired_leases_only() {
        let t0 = Instant::now();
        let d = Duration::from_secs(15);
        assert_eq!(decide(None, "a", t0, t0, d), Decision::Take);
        assert_eq!(decide(Some(""), "a", t0, t0, d), Decision::Take);
        assert_eq!(decide(Some("a"), "a", t0, t0, d), Decision::Take);
        assert_eq!(
            decide(Some("b"), "a", t0, t0 + Duration::from_secs(14), d),
            Decision::Wait
        );
        assert_eq!(decide(Some("b"), "a", t0, t0 + d, d), Decision::Take);
    }

    /// What the fake stores: the Lease, its resourceVersion counter, and
    /// when each holder's writes were stored.
    #[derive(Default)]
    struct Stored {
        lease: Option<Lease>,
        rv: u64,
        log: Vec<(String, Instant)>,
    }

    /// A Lease in memory, as the API server keeps it: a resourceVersion per
    /// write, 409 for a write at a stale one, and each request takes
    /// `latency`.
    #[derive(Clone)]
    struct MemoryLease {
        inner: Arc<Mutex<Stored>>,
        latency: Duration,
    }

    impl MemoryLease {
        fn new(latency: Duration) -> Self {
            Self {
                inner: Arc::default(),
                latency,
            }
        }

        fn write(&self, mut lease: Lease, create: bool) -> Written {
            let mut stored = self.inner.lock().unwrap();
            let current = stored
                .lease
                .as_ref()
                .and_then(|l| l.metadata.resource_version.clone());
            if create != stored.lease.is_none() || lease.metadata.resource_version != current {
                return Written::Conflict;
            }
            stored.rv += 1;
            lease.metadata.resource_version = Some(stored.rv.to_string());
            let holder = lease
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.clone())
                .unwrap_or_default();
            stored.log.push((holder, Instant::now()));
            stored.lease = Some(lease);
            Written::Stored
        }

        /// When `holder`'s writes were stored.
        fn writes_by(&self, holder: &str) -> Vec<Instant> {
            let stored = self.inner.lock().unwrap();
            stored
                .log
                .iter()
                .filter(|(h, _)| h == holder)
                .map(|(_, t)| *t)
                .collect()
        }
    }

    impl LeaseStore for MemoryLease {
        async fn get(&self) -> Result<Option<Lease>, kube::Error> {
            tokio::time::sleep(self.latency).await;
            Ok(self.inner.lock().unwrap().lease.clone())
        }

        async fn create(&self, lease: Lease) -> Result<Written, kube::Error> {
            tokio::time::sleep(self.latency).await;
            Ok(self.write(lease, true))
        }

        async fn replace(&self, lease: Lease) -> Result<Written, kube::Error> {
            tokio::time::sleep(self.latency).await;
            Ok(self.write(lease, false))
        }
    }

    /// The documented defaults: lease 15 s, renewals every 2 s.
    const TIMING: Timing = Timing {
        lease_duration: Duration::from_secs(15),
        renew_interval: Duration::from_secs(2),
    };

    /// The leader dies (stops renewing, keeps its Lease) at some moment;
    /// a standby that started at some other moment takes over within
    /// lease_duration + 1 s of the leader's last stored renewal, and never
    /// before lease_duration. Every phase between the two replicas'
    /// schedules and the moment of death is tried, on the paused clock.
    #[tokio::test(start_paused = true)]
    async fn a_standby_takes_over_within_a_second_of_the_lease_expiring() {
        let mut worst = Duration::ZERO;
        for standby_start_ms in (0..2000).step_by(125) {
            for death_ms in (9000..11000).step_by(250) {
                let store = MemoryLease::new(Duration::from_millis(5));
                let t0 = Instant::now();
                let mut alpha = Elector::new(store.clone(), "l", "alpha", TIMING);
                assert!(alpha.acquire(std::future::pending()).await);
                let leader = tokio::spawn(async move { alpha.keep().await });
                tokio::time::sleep_until(t0 + Duration::from_millis(standby_start_ms)).await;
                let mut beta = Elector::new(store.clone(), "l", "beta", TIMING);
                let standby =
                    tokio::spawn(async move { beta.acquire(std::future::pending()).await });
                tokio::time::sleep_until(t0 + Duration::from_millis(death_ms)).await;
                leader.abort();
                assert!(standby.await.unwrap());
                let renewed = *store.writes_by("alpha").last().unwrap();
                let taken = store.writes_by("beta")[0];
                let after = taken - renewed;
                assert!(
                    after >= TIMING.lease_duration,
                    "took over {after:?} after the last renewal (start {standby_start_ms} ms, death {death_ms} ms)"
                );
                assert!(
                    after <= TIMING.lease_duration + Duration::from_secs(1),
                    "took over {after:?} after the last renewal (start {standby_start_ms} ms, death {death_ms} ms)"
                );
                worst = worst.max(after);
            }
        }
        println!("slowest takeover: {worst:?} after the last renewal");
    }
}
