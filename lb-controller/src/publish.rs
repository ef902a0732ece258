//! Programming the forwarders: one [`Publisher`] per configured `lbd`.
//!
//! Every forwarder gets the full desired state (`PUT /v1/state`, which is
//! idempotent), debounced so bursts of changes coalesce, retried with
//! exponential backoff. Each publisher reports what its forwarder
//! acknowledged; the controller frees an address only once every reachable
//! forwarder has acknowledged a state without it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::{Method, StatusCode};
use lb_api::client::{self, Target};
use lb_config::{DesiredState, ListenerSpec};
use tokio::sync::{mpsc, watch};

use crate::config::{Forwarder, ForwarderTarget};
use crate::ipam::ServiceKey;

/// A state to publish, with the Service that owns each listener (by index),
/// so a forwarder's 422 can be reported on the right Services.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Version and listeners.
    pub state: DesiredState,
    /// `owners[i]` owns `state.listeners[i]`.
    pub owners: Vec<ServiceKey>,
    /// An L2 VIP moved away from a failed or draining forwarder: sent
    /// without the debounce (the VIP is unanswered, or its owner leaving,
    /// until it arrives).
    pub urgent: bool,
}

/// What one forwarder has acknowledged, shared with the controller.
#[derive(Debug, Default)]
pub struct Progress {
    /// Highest version the forwarder confirmed running (0 = none yet).
    pub acked: AtomicU64,
    /// Whether the last attempt reached the forwarder and got an answer.
    pub reachable: AtomicBool,
    /// Whether at least one attempt has finished (until then the forwarder
    /// counts as reachable: an address is not freed before we know).
    pub tried: AtomicBool,
    /// The last error, for conditions and logs.
    pub last_error: Mutex<Option<String>>,
}

impl Progress {
    /// Whether the forwarder runs `version` or later, or cannot be reached
    /// (an unreachable forwarder does not hold up releasing an address).
    pub fn settled(&self, version: u64) -> bool {
        self.acked.load(Ordering::Acquire) >= version
            || (self.tried.load(Ordering::Acquire) && !self.reachable.load(Ordering::Acquire))
    }
}

/// What a publisher tells the controller.
#[derive(Debug)]
pub enum Report {
    /// The forwarder acknowledged a version.
    Acked {
        /// Forwarder name.
        forwarder: String,
        /// The version.
        version: u64,
    },
    /// The forwarder refused the state (422): per listener owner, the errors.
    Rejected {
        /// Forwarder name.
        forwarder: String,
        /// `(owner, "path: message")`.
        errors: Vec<(Option<ServiceKey>, String)>,
    },
    /// The forwarder runs a newer version than ours (another writer, or a
    /// previous leader): the counter must go above it.
    Stale {
        /// Forwarder name.
        forwarder: String,
        /// Its version.
        current: u64,
    },
    /// The forwarder could not be reached or failed.
    Failed {
        /// Forwarder name.
        forwarder: String,
    },
}

/// Builds the client target of a forwarder (reads its token and CA).
pub fn target(f: &Forwarder) -> anyhow::Result<Target> {
    Ok(match &f.target {
        ForwarderTarget::Unix(path) => Target::Unix(path.clone()),
        ForwarderTarget::Https {
            url,
            token_file,
            ca_file,
            identity,
        } => {
            let token = std::fs::read_to_string(token_file)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "forwarder {}: token_file {}: {e}",
                        f.name,
                        token_file.display()
                    )
                })?
                .trim()
                .to_owned();
            anyhow::ensure!(
                !token.is_empty(),
                "forwarder {}: token_file {} is empty",
                f.name,
                token_file.display()
            );
            let tls = lb_api::tls::client_config(
                ca_file,
                identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            )
            .map_err(|e| anyhow::anyhow!("forwarder {}: {e}", f.name))?;
            Target::Https {
                url: url.clone(),
                token,
                tls,
            }
        }
    })
}

/// The state a forwarder runs now (`GET /v1/state`): its version and
/// dynamic listeners.
pub async fn current_state(target: &Target, timeout: Duration) -> anyhow::Result<DesiredState> {
    let (status, body) = tokio::time::timeout(
        timeout,
        client::send(target, Method::GET, "/v1/state", None),
    )
    .await
    .map_err(|_| anyhow::anyhow!("timed out"))??;
    anyhow::ensure!(status == StatusCode::OK, "GET /v1/state: {status}");
    Ok(serde_json::from_slice(&body)?)
}

/// Publishing settings.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Wait after a change before sending.
    pub debounce: Duration,
    /// Longest retry wait.
    pub backoff_max: Duration,
    /// One request's timeout.
    pub timeout: Duration,
}

/// One forwarder's publishing loop.
pub struct Publisher {
    /// The forwarder.
    pub forwarder: Forwarder,
    /// Shared progress.
    pub progress: Arc<Progress>,
}

impl Publisher {
    /// Runs until `states` closes: publishes the latest snapshot whenever it
    /// changes, and retries failures with exponential backoff.
    pub async fn run(
        self,
        mut states: watch::Receiver<Arc<Snapshot>>,
        reports: mpsc::UnboundedSender<Report>,
        timing: Timing,
        metrics: crate::metrics::Metrics,
    ) {
        let name = self.forwarder.name.clone();
        let mut failures: u32 = 0;
        loop {
            // Debounce: let a burst of changes settle, then take the latest;
            // an L2 failover goes at once.
            if !states.borrow().urgent {
                tokio::time::sleep(timing.debounce).await;
            }
            let snapshot = states.borrow_and_update().clone();
            let acked = self.progress.acked.load(Ordering::Acquire);
            let outcome = if snapshot.state.version <= acked {
                Ok(())
            } else {
                self.publish(&snapshot, &reports, timing.timeout).await
            };
            match outcome {
                Ok(()) => {
                    failures = 0;
                    if states.changed().await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    metrics.publish_errors.with_label_values(&[&name]).inc();
                    tracing::warn!(forwarder = %name, %error, "publish failed");
                    let wait = backoff(failures, timing.backoff_max);
                    // A new state ends the wait early, but never sooner than the debounce.
                    let _ = tokio::time::timeout(wait, states.changed()).await;
                }
            }
        }
    }

    /// Records a failed attempt in the progress, before any report about
    /// it goes out (the controller reads the progress when it gets one).
    fn failed(&self, error: &str, reachable: bool) {
        self.progress.reachable.store(reachable, Ordering::Release);
        *self.progress.last_error.lock().unwrap() = Some(error.to_owned());
        self.progress.tried.store(true, Ordering::Release);
    }

    /// One attempt. The progress is updated before the report is sent.
    async fn publish(
        &self,
        snapshot: &Snapshot,
        reports: &mpsc::UnboundedSender<Report>,
        timeout: Duration,
    ) -> Result<(), String> {
        let name = &self.forwarder.name;
        let fail = |e: String| {
            self.failed(&e, false);
            let _ = reports.send(Report::Failed {
                forwarder: name.clone(),
            });
            e
        };
        let target = target(&self.forwarder).map_err(|e| fail(e.to_string()))?;
        let body = match &snapshot.state.l2 {
            // The owner map names the receiver (each forwarder learns its
            // own name from the controller).
            Some(l2) => {
                let mut state = snapshot.state.clone();
                state.l2 = Some(lb_config::L2State {
                    forwarder: name.clone(),
                    ..l2.clone()
                });
                serde_json::to_vec(&state)
            }
            None => serde_json::to_vec(&snapshot.state),
        }
        .map_err(|e| fail(e.to_string()))?;
        let sent = tokio::time::timeout(
            timeout,
            client::send(&target, Method::PUT, "/v1/state", Some(body)),
        )
        .await;
        let (status, body) = match sent {
            Err(_) => return Err(fail(format!("no answer within {timeout:?}"))),
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Ok(Ok(answer)) => answer,
        };
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        match status {
            StatusCode::OK => {
                let version = snapshot.state.version;
                self.progress.reachable.store(true, Ordering::Release);
                self.progress.acked.fetch_max(version, Ordering::AcqRel);
                *self.progress.last_error.lock().unwrap() = None;
                self.progress.tried.store(true, Ordering::Release);
                let _ = reports.send(Report::Acked {
                    forwarder: name.clone(),
                    version,
                });
                Ok(())
            }
            StatusCode::CONFLICT => {
                let current = json["current_version"].as_u64().unwrap_or(0);
                let error = format!(
                    "forwarder runs version {current}, newer than {}",
                    snapshot.state.version
                );
                self.failed(&error, true);
                let _ = reports.send(Report::Stale {
                    forwarder: name.clone(),
                    current,
                });
                Err(error)
            }
            StatusCode::UNPROCESSABLE_ENTITY => {
                let errors = rejected(&json, &snapshot.state.listeners, &snapshot.owners);
                let summary = errors
                    .iter()
                    .map(|(_, m)| m.as_str())
                    .collect::<Vec<_>>()
                    .join("; ");
                let error = format!("rejected: {summary}");
                self.failed(&error, true);
                let _ = reports.send(Report::Rejected {
                    forwarder: name.clone(),
                    errors,
                });
                Err(error)
            }
            other => {
                let error = format!(
                    "PUT /v1/state: {other}: {}",
                    String::from_utf8_lossy(&body)
                        .chars()
                        .take(300)
                        .collect::<String>()
                );
                self.failed(&error, true);
                let _ = reports.send(Report::Failed {
                    forwarder: name.clone(),
                });
                Err(error)
            }
        }
    }
}

/// Maps a 422's `errors[].path` (`listeners[3].bind`) to the listener's owner.
pub fn rejected(
    body: &serde_json::Value,
    listeners: &[ListenerSpec],
    owners: &[ServiceKey],
) -> Vec<(Option<ServiceKey>, String)> {
    let empty = Vec::new();
    let errors = body["errors"].as_array().unwrap_or(&empty);
    errors
        .iter()
        .map(|e| {
            let path = e["path"].as_str().unwrap_or_default();
            let message = e["message"].as_str().unwrap_or_default();
            let index = path
                .strip_prefix("listeners[")
                .and_then(|rest| rest.split(']').next())
                .and_then(|i| i.parse::<usize>().ok());
            let owner = index.and_then(|i| owners.get(i)).cloned();
            let listener = index
                .and_then(|i| listeners.get(i))
                .map(|l| format!("listener {}: ", l.name))
                .unwrap_or_default();
            (owner, format!("{listener}{path}: {message}"))
        })
        .collect()
}

/// 0.5 s, 1 s, 2 s, ... capped at `max`.
pub fn backoff(failures: u32, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    Duration::from_millis(500u64.saturating_mul(1 << exp)).min(max)
}

/// Starts one publisher per forwarder, `running[i]` being the version the
/// i-th one was found running at start (0 when unknown); returns their
/// progress handles.
pub fn spawn_all(
    forwarders: &[Forwarder],
    running: &[u64],
    states: &watch::Receiver<Arc<Snapshot>>,
    reports: &mpsc::UnboundedSender<Report>,
    timing: Timing,
    metrics: &crate::metrics::Metrics,
) -> Vec<(String, Arc<Progress>)> {
    forwarders
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let progress = Arc::new(Progress::default());
            progress
                .acked
                .store(running.get(i).copied().unwrap_or(0), Ordering::Release);
            let publisher = Publisher {
                forwarder: f.clone(),
                progress: progress.clone(),
            };
            tokio::spawn(publisher.run(states.clone(), reports.clone(), timing, metrics.clone()));
            (f.name.clone(), progress)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let max = Duration::from_secs(5);
        let waits: Vec<u64> = (1..=6)
            .map(|n| backoff(n, max).as_millis() as u64)
            .collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 5000, 5000]);
        assert_eq!(backoff(u32::MAX, max), max);
    }

    #[test]
    fn rejections_map_to_the_owning_service() {
        let listener = |name: &str| ListenerSpec::new(name, "192.0.2.1:80");
        let listeners = [
            listener("a/x:80/tcp/192.0.2.1"),
            listener("b/y:80/tcp/192.0.2.1"),
        ];
        let owners = [ServiceKey::new("a", "x"), ServiceKey::new("b", "y")];
        let body = serde_json::json!({"errors": [
            {"path": "listeners[1].bind", "message": "already bound"},
            {"path": "", "message": "something global"},
            {"path": "listeners[9].bind", "message": "out of range"},
        ]});
        let got = rejected(&body, &listeners, &owners);
        assert_eq!(got[0].0, Some(ServiceKey::new("b", "y")));
        assert_eq!(
            got[0].1,
            "listener b/y:80/tcp/192.0.2.1: listeners[1].bind: already bound"
        );
        assert_eq!(got[1].0, None);
        assert_eq!(got[2].0, None);
    }

    #[test]
    fn unreachable_forwarders_do_not_hold_up_a_release() {
        let p = Progress::default();
        assert!(!p.settled(3), "not tried yet: wait");
        p.tried.store(true, Ordering::Release);
        p.reachable.store(true, Ordering::Release);
        p.acked.store(2, Ordering::Release);
        assert!(!p.settled(3), "reachable and behind: wait");
        p.acked.store(3, Ordering::Release);
        assert!(p.settled(3));
        p.acked.store(0, Ordering::Release);
        p.reachable.store(false, Ordering::Release);
        assert!(p.settled(3), "unreachable: does not block");
    }
}
