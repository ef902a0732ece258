//! Who gets a CPU first. The forwarding workers run at the process's
//! priority; everything else gives way to them, in two tiers.
//!
//! The control runtime (health checks, drain timers, VIP announcement,
//! signals) runs [`CONTROL_NICER`] nicer, so that under contention it gets
//! about a tenth of a CPU against a busy worker, and asks for the
//! scheduler's shortest slice: once picked, a fair-class thread keeps the
//! CPU for its slice before a woken thread of its class may take it (1.4 ms
//! by default on a 2-CPU host). With a 0.1 ms slice a woken worker waits at
//! most that. It keeps a real share of the CPU on a saturated host, which
//! health checks need to answer within their timeouts.
//!
//! The admin runtime (the control API and the metrics endpoint: applies of
//! large states, status and scrapes) runs at idle priority (`SCHED_IDLE`)
//! while the host has CPU to spare: any woken worker preempts it at once,
//! and the scheduler counts a CPU that runs only idle-priority threads as
//! free when it places a woken thread. A nice-10 thread did neither well
//! enough: with 2,000 listeners applied back to back, p99 on an untouched
//! listener went from 0.5 ms idle to 1.0-2.5 ms; at idle priority it stays
//! within the idle run's noise (`lb-bench listeners`, docs/design/0001).
//! Idle priority alone could starve the API on a saturated host (and a
//! thread holding the plane's lock with it), so [`AdminThreads`] watches a
//! heartbeat on that runtime: late by [`Timing::starved`], its threads are
//! raised to the control priority for [`Timing::hold`], then lowered again.
//! A process that may not raise a thread back (no `CAP_SYS_NICE`, and
//! `RLIMIT_NICE` below the control niceness) never lowers it: its admin
//! runtime runs at the control priority.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::lock;

/// How much nicer than the process the control threads run (at most 19).
const CONTROL_NICER: i32 = 10;

/// The slice the control threads ask for, in nanoseconds: the smallest
/// the kernel takes. Linux 6.12 and later take a fair-class thread's
/// `sched_runtime` as its slice; older kernels ignore it, and only the
/// niceness applies.
const CONTROL_SLICE_NS: u64 = 100_000;

/// `SCHED_OTHER` and `SCHED_IDLE` of `sched_setattr(2)`.
const SCHED_OTHER: u32 = 0;
const SCHED_IDLE: u32 = 5;

/// `SCHED_FLAG_KEEP_POLICY`: keep the thread's scheduling policy (normal,
/// batch, or whatever the unit file set) and change only what is given.
const SCHED_FLAG_KEEP_POLICY: u64 = 0x08;

/// `struct sched_attr` of `sched_setattr(2)`, its first version (48 bytes;
/// `size` tells the kernel which version it reads).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Run by every control thread as it starts. A failure costs only the
/// priority, and is logged.
pub(super) fn lower_control_thread() {
    let this_thread = Some(rustix::thread::gettid());
    let nice = rustix::process::getpriority_process(this_thread)
        .map(|nice| (nice + CONTROL_NICER).min(19))
        .and_then(|nice| rustix::process::setpriority_process(this_thread, nice).map(|()| nice));
    let nice = match nice {
        Ok(nice) => nice,
        Err(error) => {
            tracing::debug!(%error, "cannot lower the control thread's priority");
            return;
        }
    };
    if let Err(error) = set_attr(0, Level::Control, nice, true) {
        tracing::debug!(%error, "cannot shorten the control thread's slice");
    }
}

/// The two priorities of an admin thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Level {
    /// `SCHED_IDLE`: runs on CPU time nobody else wants.
    Idle,
    /// The control threads' niceness and slice.
    Control,
}

/// Sets thread `tid`'s (0: the caller's) policy to `level` at niceness
/// `nice`; `keep_policy` changes only the niceness and slice.
fn set_attr(tid: i32, level: Level, nice: i32, keep_policy: bool) -> std::io::Result<()> {
    if level == Level::Idle {
        // `sched_setattr` takes no niceness for the idle policy; the one
        // the thread keeps decides whether it may be raised back (see
        // `can_return_from_idle`), so set it first.
        let thread = rustix::process::Pid::from_raw(tid);
        rustix::process::setpriority_process(thread, nice)?;
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: match level {
            Level::Idle => SCHED_IDLE,
            Level::Control => SCHED_OTHER,
        },
        flags: if keep_policy {
            SCHED_FLAG_KEEP_POLICY
        } else {
            0
        },
        nice,
        priority: 0,
        runtime: match level {
            Level::Idle => 0,
            Level::Control => CONTROL_SLICE_NS,
        },
        deadline: 0,
        period: 0,
    };
    // SAFETY: `attr` is a whole `struct sched_attr` of the size it states,
    // alive for the call; `tid` is a thread id or 0 (the caller); flags
    // argument 0.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &attr as *const SchedAttr, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The control niceness: the process's, [`CONTROL_NICER`] nicer.
fn control_nice() -> i32 {
    rustix::process::getpriority_process(None).map_or(19, |nice| (nice + CONTROL_NICER).min(19))
}

/// Whether this process may lower a thread to idle priority and raise it
/// back to `nice`: tried on a thread of its own, which then ends.
fn can_return_from_idle(nice: i32) -> bool {
    std::thread::spawn(move || {
        set_attr(0, Level::Idle, nice, false).is_ok()
            && set_attr(0, Level::Control, nice, false).is_ok()
    })
    .join()
    .unwrap_or(false)
}

/// How the admin runtime's heartbeat is judged.
#[derive(Clone, Copy, Debug)]
pub(super) struct Timing {
    /// How often the heartbeat beats.
    pub beat: Duration,
    /// A heartbeat this late means the runtime is starved.
    pub starved: Duration,
    /// How long a starved runtime's threads stay raised.
    pub hold: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            beat: Duration::from_millis(50),
            starved: Duration::from_millis(250),
            hold: Duration::from_secs(10),
        }
    }
}

/// What the guard does next, from the level now, how long ago the
/// heartbeat last beat, and how long the threads have been raised.
pub(super) fn decide(
    level: Level,
    since_beat: Duration,
    raised_for: Duration,
    t: &Timing,
) -> Option<Level> {
    match level {
        Level::Idle if since_beat > t.starved => Some(Level::Control),
        Level::Control if raised_for >= t.hold && since_beat <= t.starved => Some(Level::Idle),
        _ => None,
    }
}

/// The admin runtime's threads and their level (see the module's text).
#[derive(Clone)]
pub(super) struct AdminThreads {
    inner: Arc<Inner>,
}

struct Inner {
    /// The control niceness, kept in either level.
    nice: i32,
    /// Whether idle priority is used at all (see [`can_return_from_idle`]).
    idle_ok: bool,
    timing: Timing,
    /// Counts raises to the control level (`weir_admin_priority_raises_total`).
    raises: prometheus::IntCounter,
    state: Mutex<State>,
    /// When the heartbeat last beat, in milliseconds since `epoch`.
    beat_ms: AtomicU64,
    epoch: Instant,
}

struct State {
    level: Level,
    /// Since when the threads are at the control level.
    raised_at: Instant,
    threads: Vec<i32>,
}

impl AdminThreads {
    /// With the default [`Timing`]; `raises` counts each raise.
    pub fn new(raises: prometheus::IntCounter) -> Self {
        Self::with_timing(Timing::default(), raises)
    }

    /// With `timing` (tests shorten it).
    pub fn with_timing(timing: Timing, raises: prometheus::IntCounter) -> Self {
        let nice = control_nice();
        let idle_ok = can_return_from_idle(nice);
        if !idle_ok {
            tracing::info!(
                "the control API runs at the control threads' priority: this process may not raise a thread back from idle priority (it needs CAP_SYS_NICE or LimitNICE=+{nice})"
            );
        }
        let now = Instant::now();
        Self {
            inner: Arc::new(Inner {
                nice,
                idle_ok,
                timing,
                raises,
                state: Mutex::new(State {
                    level: if idle_ok { Level::Idle } else { Level::Control },
                    raised_at: now,
                    threads: Vec::new(),
                }),
                beat_ms: AtomicU64::new(0),
                epoch: now,
            }),
        }
    }

    /// Run by every admin thread as it starts: counted, and set to the
    /// level in force.
    pub fn on_start(&self) {
        let tid = rustix::thread::gettid().as_raw_nonzero().get();
        let mut state = lock(&self.inner.state);
        state.threads.push(tid);
        if let Err(error) = set_attr(0, state.level, self.inner.nice, false) {
            tracing::debug!(%error, "cannot set the admin thread's priority");
        }
    }

    /// Run by every admin thread as it stops.
    pub fn on_stop(&self) {
        let tid = rustix::thread::gettid().as_raw_nonzero().get();
        lock(&self.inner.state).threads.retain(|&t| t != tid);
    }

    /// Starts the heartbeat on `rt` (the admin runtime) and the guard
    /// thread that judges it. Both end with the runtime and this value.
    pub fn watch(&self, rt: &tokio::runtime::Handle) {
        if !self.inner.idle_ok {
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        let beat = self.inner.timing.beat;
        rt.spawn({
            let inner = inner.clone();
            async move {
                let mut every = tokio::time::interval(beat);
                loop {
                    every.tick().await;
                    let Some(inner) = inner.upgrade() else { return };
                    inner.beat();
                }
            }
        });
        self.inner.beat();
        self.guard(inner);
    }

    /// The guard thread alone (tests run it without a heartbeat).
    fn guard(&self, inner: Weak<Inner>) {
        let spawned = std::thread::Builder::new()
            .name("lbd-admin-guard".into())
            .spawn(move || loop {
                let Some(inner) = inner.upgrade() else { return };
                let period = inner.timing.beat;
                inner.check(Instant::now());
                drop(inner);
                std::thread::sleep(period);
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the admin runtime's guard; its threads stay at the control priority");
            self.inner.set_level(Level::Control, Instant::now());
        }
    }
}

impl Inner {
    fn beat(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.beat_ms.store(ms, Ordering::Relaxed);
    }

    fn check(&self, now: Instant) {
        let since_beat = now
            .saturating_duration_since(self.epoch)
            .saturating_sub(Duration::from_millis(self.beat_ms.load(Ordering::Relaxed)));
        let (level, raised_at) = {
            let state = lock(&self.state);
            (state.level, state.raised_at)
        };
        let raised_for = now.saturating_duration_since(raised_at);
        if let Some(next) = decide(level, since_beat, raised_for, &self.timing) {
            if next == Level::Control {
                self.raises.inc();
                tracing::info!(
                    late_ms = since_beat.as_millis() as u64,
                    hold_s = self.timing.hold.as_secs(),
                    "the host has no CPU to spare: the control API runs at the control priority for a while"
                );
            }
            self.set_level(next, now);
        }
    }

    fn set_level(&self, level: Level, now: Instant) {
        let mut state = lock(&self.state);
        state.level = level;
        state.raised_at = now;
        for &tid in &state.threads {
            if let Err(error) = set_attr(tid, level, self.nice, false) {
                tracing::debug!(tid, %error, "cannot change an admin thread's priority");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        beat: Duration::from_millis(20),
        starved: Duration::from_millis(100),
        hold: Duration::from_millis(300),
    };
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn a_late_heartbeat_raises_and_a_held_raise_lowers() {
        // Idle: raised only when the heartbeat is later than `starved`.
        assert_eq!(decide(Level::Idle, MS(20), MS(0), &T), None);
        assert_eq!(decide(Level::Idle, MS(100), MS(5_000), &T), None);
        assert_eq!(
            decide(Level::Idle, MS(101), MS(0), &T),
            Some(Level::Control)
        );
        // Raised: kept for `hold`, then lowered, unless still starved.
        assert_eq!(decide(Level::Control, MS(20), MS(299), &T), None);
        assert_eq!(
            decide(Level::Control, MS(20), MS(300), &T),
            Some(Level::Idle)
        );
        assert_eq!(decide(Level::Control, MS(150), MS(10_000), &T), None);
    }

    /// The policy of the calling thread.
    fn policy() -> u32 {
        // SAFETY: no arguments but pid 0, the calling thread.
        #[allow(unsafe_code)]
        let p = unsafe { libc::sched_getscheduler(0) };
        p as u32
    }

    /// A real thread, lowered to idle priority as it starts; with no
    /// heartbeat the guard raises it, and lowers it back after `hold` once
    /// the heartbeat is fresh again.
    #[test]
    fn the_guard_raises_a_starved_thread_and_lowers_it_again() {
        let raises = prometheus::IntCounter::new("raises", "raises").unwrap();
        let threads = AdminThreads::with_timing(T, raises.clone());
        if !threads.inner.idle_ok {
            // Not permitted here (no CAP_SYS_NICE, RLIMIT_NICE too low):
            // the thread stays at the control priority, as checked below.
            let t = threads.clone();
            let p = std::thread::spawn(move || {
                t.on_start();
                policy()
            });
            assert_eq!(p.join().unwrap(), SCHED_OTHER);
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let t = threads.clone();
        let worker = std::thread::spawn(move || {
            t.on_start();
            tx.send(policy()).unwrap();
            // Report each change of policy until told to stop.
            let mut last = policy();
            while stop_rx.try_recv().is_err() {
                let now = policy();
                if now != last {
                    tx.send(now).unwrap();
                    last = now;
                }
                std::thread::sleep(MS(2));
            }
            t.on_stop();
        });
        assert_eq!(rx.recv().unwrap(), SCHED_IDLE, "lowered at start");
        // The heartbeat never beats: starved.
        threads.inner.beat();
        threads.guard(Arc::downgrade(&threads.inner));
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            SCHED_OTHER,
            "raised"
        );
        assert_eq!(raises.get(), 1, "the raise is counted");
        // Fresh again: lowered after `hold`.
        let beating = threads.clone();
        let beat_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let beater = {
            let stop = beat_stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    beating.inner.beat();
                    std::thread::sleep(MS(10));
                }
            })
        };
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            SCHED_IDLE,
            "lowered again"
        );
        assert_eq!(raises.get(), 1, "lowering is not a raise");
        beat_stop.store(true, Ordering::Relaxed);
        beater.join().unwrap();
        stop_tx.send(()).unwrap();
        worker.join().unwrap();
        assert!(
            lock(&threads.inner.state).threads.is_empty(),
            "unregistered as it stopped"
        );
    }
}
