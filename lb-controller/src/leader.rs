//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Only the leader allocates, writes status and programs forwarders. A
//! candidate takes the Lease when it is free, or when the holder has not
//! renewed it for `lease_duration` as measured on the candidate's own clock
//! since it last saw the record change (so clock skew between replicas does
//! not matter). Writes carry the Lease's `resourceVersion`, so two
//! candidates racing for it cannot both win: one gets `409 Conflict`.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::time::Instant;

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

/// One candidate.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    /// `(resourceVersion, first seen)` of the last record observed.
    observed: Option<(String, Instant)>,
}

impl Elector {
    /// A candidate named `identity` for the Lease `namespace/name`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            lease_duration,
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
            lease_duration_seconds: Some(self.lease_duration.as_secs().max(1) as i32),
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

    /// One attempt to acquire or renew. `Ok(true)`: we hold the Lease.
    pub async fn try_hold(&mut self) -> Result<bool, kube::Error> {
        let now = Instant::now();
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
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
            .unwrap_or(self.lease_duration);
        match decide(
            spec.holder_identity.as_deref(),
            &self.identity,
            observed,
            now,
            duration,
        ) {
            Decision::Wait => Ok(false),
            Decision::Take => {
                let mut next = lease.clone();
                next.spec = Some(self.spec(Some(&spec)));
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &next)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Gives the Lease up (on shutdown) so a standby need not wait it out.
    pub async fn release(&mut self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                spec.holder_identity = None;
                spec.renew_time = None;
                let _ = self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
}
