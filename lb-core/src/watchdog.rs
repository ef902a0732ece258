//! The systemd watchdog: `WATCHDOG=1` at half of `WATCHDOG_USEC`, sent
//! only while every worker answers a ping, so that systemd restarts an
//! `lbd` whose workers hang even though the process still lives.
//!
//! Does nothing unless systemd asked for it (`WatchdogSec=` sets
//! `WATCHDOG_USEC`, and `WATCHDOG_PID` when it names a process, which must
//! be this one). Not a health check of backends: a stuck backend is the
//! health machine's business, not a reason to restart.

use std::sync::{Mutex, Weak};
use std::time::Duration;

use crate::plane::Plane;

/// How often to send `WATCHDOG=1` for the given `WATCHDOG_USEC` and
/// `WATCHDOG_PID` values, as `sd_watchdog_enabled(3)` decides: half the
/// timeout, or `None` when the watchdog is off or meant for another process.
pub fn interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

/// The narrow handle the watchdog needs: ask the workers whether they run.
#[derive(Debug, Clone)]
pub struct Liveness {
    plane: Weak<Mutex<Plane>>,
}

impl Liveness {
    pub(crate) fn new(plane: Weak<Mutex<Plane>>) -> Self {
        Self { plane }
    }

    /// True when every worker answered within `within`. False once the
    /// server is gone, its plane lock is poisoned, or a worker is silent.
    pub async fn workers_answer(&self, within: Duration) -> bool {
        let pings = {
            let Some(plane) = self.plane.upgrade() else {
                return false;
            };
            let Ok(plane) = plane.lock() else {
                return false;
            };
            plane.ping_workers()
        };
        if pings.is_empty() {
            return false;
        }
        let all = futures::future::join_all(pings);
        match tokio::time::timeout(within, all).await {
            Ok(answers) => answers.iter().all(Result::is_ok),
            Err(_) => false,
        }
    }
}

/// Starts feeding the watchdog on `runtime` (the server's control
/// runtime) when systemd asked for it (see [`interval`]), asking
/// `liveness` (`Server::liveness`) before each feed; returns the interval,
/// or `None` when there is nothing to feed.
pub fn spawn(liveness: Liveness, runtime: &tokio::runtime::Handle) -> Option<Duration> {
    let every = interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )?;
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if liveness.workers_answer(every).await {
                crate::notify::notify("WATCHDOG=1");
            } else {
                tracing::warn!(
                    within = ?every,
                    "a worker did not answer; not feeding the systemd watchdog"
                );
            }
        }
    });
    tracing::debug!(every = ?every, "feeding the systemd watchdog");
    Some(every)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_the_timeout_when_systemd_asks() {
        assert_eq!(
            interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            interval(Some("200000"), Some("7"), 7),
            Some(Duration::from_millis(100))
        );
    }

    #[test]
    fn off_when_unset_zero_garbled_or_for_another_process() {
        assert_eq!(interval(None, None, 7), None);
        assert_eq!(interval(Some("0"), None, 7), None);
        assert_eq!(interval(Some("soon"), None, 7), None);
        assert_eq!(interval(Some("200000"), Some("8"), 7), None);
        assert_eq!(interval(Some("200000"), Some("x"), 7), None);
    }
}
