//! Readiness, draining and announcement together: what the control API
//! and the stop path see of a running `lbd` besides its state.
//!
//! A drain (`lbd drain`, `POST /v1/drain`, and every stop) goes in this
//! order: 1. lbd reports not ready and every VIP is withdrawn (the call
//! returns once the addresses are off the interface); 2. listeners keep
//! accepting for `announce.withdraw_grace`, while routers converge (no
//! grace when nothing was announced); 3. listeners close; 4. connections
//! finish, up to the longest `drain_timeout`; 5. a stop exits, `lbd drain`
//! stays drained until `lbd undrain`, which binds the listeners again and
//! announces the VIPs.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_api::wire::{DrainAnswer, DrainPhase, Status};
use lb_config::{Config, DesiredState};
use tokio::task::AbortHandle;

use super::core::{Core, ReloadError};
use crate::admin::control::{ControlApi, DrainError, PutError};
use crate::announce::Announcer;
use crate::lock;
use crate::plane::Applied;

/// The longest lbd waits for a withdrawal to reach the interface.
const SETTLE_LIMIT: Duration = Duration::from_secs(2);
/// How often the connections left are counted while draining.
const COUNT_EVERY: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
struct DrainState {
    phase: Option<DrainPhase>,
    /// Listeners close at this instant (the withdraw grace's end).
    grace_until: Option<Instant>,
    task: Option<AbortHandle>,
    /// The drain the background task acts for. An undrain or a stop
    /// moves it on, and the task acts only under this lock and only for
    /// its own drain: aborting it is not enough, since it may be running
    /// on another thread when the abort comes.
    current: u64,
    /// A stop is under way: nothing undoes it.
    stopping: bool,
}

impl DrainState {
    /// Ends the drain under way, if any: its task no longer acts.
    fn end_task(&mut self) {
        self.current += 1;
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A running `lbd`'s lifecycle.
#[derive(Debug)]
pub struct Lifecycle {
    core: Arc<Core>,
    announcer: Option<Arc<Announcer>>,
    drain: Arc<Mutex<DrainState>>,
    /// One drain, undrain or stop at a time.
    transitions: Mutex<()>,
    rt: tokio::runtime::Handle,
}

impl Lifecycle {
    /// The lifecycle of `core`, announcing through `announcer` (none with
    /// `announce.mode = "off"`); timers run on `rt`.
    pub fn new(
        core: Arc<Core>,
        announcer: Option<Arc<Announcer>>,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Self {
            core,
            announcer,
            drain: Arc::new(Mutex::new(DrainState::default())),
            transitions: Mutex::new(()),
            rt,
        }
    }

    /// Marks lbd ready (after start) and announces what should be (in L2
    /// mode, what the owner map of the state in force gives this lbd).
    pub fn set_ready(&self) {
        self.core.set_ready(true);
        if let Some(a) = &self.announcer {
            a.set_l2(self.core.l2(), false);
            a.poke();
        }
    }

    fn settle(&self) {
        if let Some(a) = &self.announcer {
            // The timer is made inside the runtime: the caller may be a
            // plain thread (the stop path).
            let settled = self
                .rt
                .block_on(async { tokio::time::timeout(SETTLE_LIMIT, a.settle()).await });
            if settled.is_err() {
                tracing::error!("the announcer did not apply the change within {SETTLE_LIMIT:?}");
            }
        }
    }

    /// Not ready, every VIP withdrawn (on the interface when this returns).
    /// Returns how many VIPs were announced before.
    fn withdraw_all(&self) -> usize {
        self.core.set_ready(false);
        let Some(a) = &self.announcer else { return 0 };
        let before = a.set_draining(true);
        self.settle();
        before
    }

    fn grace(&self, withdrawn: usize) -> Duration {
        match &self.announcer {
            Some(a) if withdrawn > 0 => a.withdraw_grace(),
            _ => Duration::ZERO,
        }
    }

    /// The stop path (SIGTERM): withdraw, keep accepting for the grace
    /// (or what is left of one a drain started), close listeners, let
    /// connections finish for up to `drain` (default: the longest
    /// `drain_timeout`). The caller then stops the workers.
    pub fn stop(&self, drain: Option<Duration>) {
        let _one = lock(&self.transitions);
        let withdrawn = self.withdraw_all();
        let grace = self.grace(withdrawn);
        let until = {
            let mut d = lock(&self.drain);
            d.stopping = true;
            d.end_task();
            if withdrawn > 0 {
                d.grace_until = Some(Instant::now() + grace);
            }
            d.phase = Some(DrainPhase::Grace);
            d.grace_until
        };
        if let Some(until) = until {
            let left = until.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                tracing::info!(vips = withdrawn, grace = ?left, "VIPs withdrawn; accepting until the grace ends, then closing listeners");
                std::thread::sleep(left);
            }
        }
        lock(&self.drain).phase = Some(DrainPhase::Connections);
        let drain = {
            let mut plane = self.core.plane();
            plane.stop_accepting();
            drain.unwrap_or_else(|| plane.max_drain())
        };
        let deadline = Instant::now() + drain;
        let active = || self.core.shared().active_total.load(Ordering::Relaxed);
        if active() > 0 {
            tracing::info!(connections = active(), grace = ?drain, "draining before exit");
        }
        while !drained(&self.core) && Instant::now() < deadline {
            std::thread::sleep(COUNT_EVERY);
        }
        lock(&self.drain).phase = Some(DrainPhase::Drained);
    }

    /// Removes every VIP for good (exit).
    pub fn release(&self) {
        if let Some(a) = &self.announcer {
            a.release();
        }
    }

    /// Applies a new configuration file (a reload) and announces accordingly.
    pub fn reload(&self, config: &Config) -> Result<Applied, ReloadError> {
        let applied = self.core.reload(config);
        self.poke();
        applied
    }

    fn poke(&self) {
        if let Some(a) = &self.announcer {
            a.poke();
        }
    }

    fn answer(&self, d: &DrainState, withdrawn: usize) -> DrainAnswer {
        DrainAnswer {
            draining: d.phase.is_some(),
            withdrawn,
            grace_ms: d
                .grace_until
                .map(|u| u.saturating_duration_since(Instant::now()).as_millis() as u64)
                .unwrap_or(0),
        }
    }
}

/// Whether nothing is left to drain: every stopped listener's sockets are
/// closed (so nothing more can be accepted), then no connection or flow
/// is open. In that order: a connection accepted just before a close is
/// counted before the close is seen.
fn drained(core: &Core) -> bool {
    core.plane().stopped_listeners_closed() && !core.shared().any_open()
}

/// The background half of `lbd drain` number `ticket`: the grace,
/// closing listeners, counting connections down. Each step that changes
/// something happens under the drain lock, and only while this drain is
/// the current one.
async fn drain_task(core: Arc<Core>, drain: Arc<Mutex<DrainState>>, until: Instant, ticket: u64) {
    tokio::time::sleep_until(until.into()).await;
    let limit = {
        let mut d = lock(&drain);
        if d.current != ticket {
            return; // undrained, or stopping
        }
        // The phase with the close (as `stop` does): whoever finds the
        // listeners closed then reads the phase that says so.
        d.phase = Some(DrainPhase::Connections);
        let mut plane = core.plane();
        plane.stop_accepting();
        plane.max_drain()
    };
    tracing::info!("drain: listeners closed; connections finishing");
    let deadline = tokio::time::Instant::now() + limit;
    while !drained(&core) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(COUNT_EVERY).await;
    }
    let left = core.shared().active_total.load(Ordering::Relaxed);
    {
        let mut d = lock(&drain);
        if d.current != ticket {
            return;
        }
        d.phase = Some(DrainPhase::Drained);
    }
    tracing::info!(
        connections_left = left,
        "drained; `lbd undrain` serves again"
    );
}

impl ControlApi for Lifecycle {
    fn ready(&self) -> bool {
        self.core.ready()
    }

    fn state(&self) -> DesiredState {
        self.core.state()
    }

    fn status(&self) -> Status {
        let mut status = self.core.status();
        status.drain = lock(&self.drain).phase;
        status.announce = self.announcer.as_ref().map(|a| a.status(Instant::now()));
        status
    }

    fn put_state(&self, state: DesiredState) -> Result<u64, PutError> {
        let applied = self.core.put_state(state);
        if let (Some(a), Ok(_)) = (&self.announcer, &applied) {
            a.set_l2(self.core.l2(), true);
        }
        self.poke();
        applied
    }

    fn contact(&self) {
        if let Some(a) = &self.announcer {
            a.contact();
        }
    }

    fn drain(&self) -> Result<DrainAnswer, DrainError> {
        let _one = lock(&self.transitions);
        {
            let d = lock(&self.drain);
            if d.stopping {
                return Err(DrainError::Stopping);
            }
            if d.phase.is_some() {
                return Ok(self.answer(&d, 0));
            }
        }
        let withdrawn = self.withdraw_all();
        let grace = self.grace(withdrawn);
        let until = Instant::now() + grace;
        // The phase is set before the task exists: with no grace, the task
        // may close the listeners and finish before this call returns.
        let mut d = lock(&self.drain);
        d.phase = Some(DrainPhase::Grace);
        d.grace_until = Some(until);
        let ticket = d.current;
        let task = self.rt.spawn(drain_task(
            self.core.clone(),
            self.drain.clone(),
            until,
            ticket,
        ));
        d.task = Some(task.abort_handle());
        tracing::info!(vips = withdrawn, grace = ?grace, "drain: not ready, VIPs withdrawn; listeners close when the grace ends");
        Ok(self.answer(&d, withdrawn))
    }

    fn undrain(&self) -> Result<DrainAnswer, DrainError> {
        let _one = lock(&self.transitions);
        let phase = {
            let mut d = lock(&self.drain);
            if d.stopping {
                return Err(DrainError::Stopping);
            }
            d.end_task();
            d.grace_until = None;
            d.phase
        };
        let Some(phase) = phase else {
            return Ok(self.answer(&lock(&self.drain), 0));
        };
        if phase != DrainPhase::Grace {
            if let Err(e) = self.core.plane().resume_accepting() {
                // The other listeners serve; this one is reported.
                tracing::error!(error = %e, "undrain: a listener could not be bound again");
            }
        }
        self.core.set_ready(true);
        if let Some(a) = &self.announcer {
            a.set_draining(false);
        }
        self.settle();
        let mut d = lock(&self.drain);
        d.phase = None;
        tracing::info!(
            "undrained: ready, listeners accepting, VIPs announced as their health says"
        );
        Ok(self.answer(&d, 0))
    }
}
