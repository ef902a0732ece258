//! A small io_uring driver on the `io-uring` crate: one ring per worker
//! thread, living inside that worker's tokio current-thread runtime, so
//! tokio's timers, channels and `LocalSet` keep working next to it.
//!
//! Operations are futures that own everything the kernel may touch
//! (buffers, addresses, message headers) until their completion arrives.
//! A future dropped early hands those resources to its slot and submits a
//! cancel; they are freed when the kernel posts the completion. SQEs are
//! queued without a syscall and submitted in one batch when the runtime is
//! about to park (or the queue is full); completions are reaped in the same
//! hook and whenever the ring's fd turns readable (see [`run`]).
//!
//! Guarantees:
//! - An operation belongs to the ring of the thread that created it: it is
//!   `!Send`, and it checks the ring's identity whenever it touches it.
//! - `user_data` carries the slot and a generation, so a late completion or
//!   cancel can never reach an operation that reused the slot.
//! - Resources and wakers are dropped and called only after the driver is
//!   released, so their `Drop` may use the driver again.
//! - A completion that arrives while the worker sleeps in tokio's
//!   `epoll_wait` wakes it through the kernel's task-work notification,
//!   which wakes the sleeping thread directly (no eventfd, no RCU
//!   callback, no timer in between). See docs/design/0007.
//!
//! Why not tokio-uring: see docs/design/0007-own-io-uring-driver.md.

#![allow(unsafe_code)]

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Waker;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

mod op;

pub use op::Op;

/// `user_data` of cancel requests: their own completions are ignored. No
/// operation has it (slot numbers stay below `u32::MAX`).
const CANCEL: u64 = u64::MAX;
/// Submission queue entries per ring (the completion queue is twice that).
const ENTRIES: u32 = 1024;
/// How long teardown waits for cancelled operations to complete.
const TEARDOWN_WAIT: Duration = Duration::from_secs(2);

/// Identities of rings, so an operation knows the ring it belongs to.
static NEXT_RING_ID: AtomicU64 = AtomicU64::new(1);

/// An operation's name in `user_data`: its slot, and the generation of the
/// slot's current occupant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OpId {
    key: u32,
    generation: u32,
}

impl OpId {
    fn user_data(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.key)
    }

    fn from_user_data(data: u64) -> Self {
        Self {
            key: data as u32,
            generation: (data >> 32) as u32,
        }
    }
}

enum State {
    /// In flight; the waker of the task waiting for it, once polled.
    Waiting(Option<Waker>),
    /// Completed with this result; the future has not seen it yet.
    Done(i32),
    /// The future went away first: what the kernel may still write to is
    /// kept here until the completion arrives.
    Orphan(Box<dyn Any>),
}

struct Slot {
    generation: u32,
    state: State,
}

struct Driver {
    ring: IoUring,
    /// This ring's identity (see [`NEXT_RING_ID`]).
    id: u64,
    slots: Slab<Slot>,
    /// Generation for the next operation (wraps; a slot is reused by a new
    /// operation only after its previous one completed, so a wrap would
    /// need four billion operations on one slot while a cancel waits).
    generation: u32,
    /// Wakers of completed operations, called once the driver is no longer
    /// borrowed; kept between batches so reaping does not allocate.
    wakers: Vec<Waker>,
    /// Resources of orphaned operations whose completion arrived, dropped
    /// once the driver is no longer borrowed.
    released: Vec<Box<dyn Any>>,
}

thread_local! {
    static DRIVER: RefCell<Option<Driver>> = const { RefCell::new(None) };
}

/// A ring built for this thread's driver.
pub struct Ring {
    ring: IoUring,
}

/// Builds a ring for this thread (the one that will submit to it).
///
/// Completion work runs on this thread at its next syscall instead of
/// interrupting it (`COOP_TASKRUN`, kernel 5.19+), and the kernel raises a
/// flag in the shared ring when such work waits (`TASKRUN_FLAG`), so the
/// park hook knows to collect it. When completion work arrives while the
/// thread sleeps (in tokio's `epoll_wait`), the kernel wakes the thread
/// directly. `SINGLE_ISSUER` (6.0+) drops the kernel's submission locking.
/// Older kernels refuse these flags; then fewer flags, then a plain ring.
///
/// `DEFER_TASKRUN` is not used: a thread parked outside `io_uring_enter`
/// learns of deferred work only through an eventfd, which recent kernels
/// may signal from an RCU callback, tens of milliseconds late
/// (docs/design/0007, "Waking a parked worker").
pub fn new_ring() -> io::Result<Ring> {
    let builder = || {
        let mut b = IoUring::builder();
        b.setup_cqsize(ENTRIES * 2);
        b
    };
    let ring = builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_single_issuer()
        .build(ENTRIES)
        .or_else(|_| {
            builder()
                .setup_coop_taskrun()
                .setup_taskrun_flag()
                .build(ENTRIES)
        })
        .or_else(|e| {
            tracing::debug!(error = %e, "io_uring: COOP_TASKRUN refused, using a plain ring");
            builder().build(ENTRIES)
        })?;
    Ok(Ring { ring })
}

/// Runs `f` on this thread's driver, if it is ring `id` (any ring: `None`).
fn with_driver<T>(id: Option<u64>, f: impl FnOnce(&mut Driver) -> T) -> Option<T> {
    DRIVER.with(|d| {
        d.borrow_mut()
            .as_mut()
            .filter(|d| id.is_none_or(|id| d.id == id))
            .map(f)
    })
}

impl Driver {
    /// Queues `entry`, submitting first when the queue is full.
    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry pushed here points only at memory owned by
            // an `Op` (or its orphaned slot) until its completion arrives.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Takes a slot for a new operation.
    fn insert(&mut self) -> io::Result<OpId> {
        let generation = self.generation;
        self.generation = self.generation.wrapping_add(1);
        let entry = self.slots.vacant_entry();
        let key = u32::try_from(entry.key())
            .ok()
            .filter(|&k| k != u32::MAX)
            .ok_or_else(|| io::Error::other("io_uring: too many operations in flight"))?;
        entry.insert(Slot {
            generation,
            state: State::Waiting(None),
        });
        Ok(OpId { key, generation })
    }

    /// The slot of operation `id`, if it is still that operation's.
    fn slot(&mut self, id: OpId) -> Option<&mut Slot> {
        self.slots
            .get_mut(id.key as usize)
            .filter(|s| s.generation == id.generation)
    }

    /// Queues a cancel of operation `id`. A cancel that finds nothing (the
    /// operation completed meanwhile) does nothing: it names the
    /// generation too, never just the slot.
    fn cancel(&mut self, id: OpId) {
        let cancel = opcode::AsyncCancel::new(id.user_data())
            .build()
            .user_data(CANCEL);
        let _ = self.push(&cancel);
    }

    /// Whether entries are queued that the kernel has not taken yet.
    fn queued(&mut self) -> bool {
        !self.ring.submission().is_empty()
    }

    /// Whether some operation still waits for its completion.
    fn in_flight(&self) -> bool {
        self.slots
            .iter()
            .any(|(_, s)| !matches!(s.state, State::Done(_)))
    }

    /// Whether the kernel has completions for us that `reap` cannot see yet:
    /// completion work not run yet (`TASKRUN_FLAG`), or completions that
    /// overflowed the queue.
    fn pending(&mut self) -> bool {
        let sq = self.ring.submission();
        sq.cq_overflow() || sq.taskrun()
    }

    /// Hands the queued entries to the kernel, which also runs the
    /// completion work waiting for this thread.
    fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is backed up: make room, then retry
                // (the wakers are called at the next flush).
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.reap(),
                Err(e) => return Err(e),
            }
        }
    }

    fn submit_logged(&mut self) {
        if let Err(e) = self.submit() {
            tracing::error!(error = %e, "io_uring submit failed");
        }
    }

    /// Submits what is queued, if anything.
    fn flush(&mut self) {
        if self.queued() {
            self.submit_logged();
        }
    }

    /// Moves completions into their slots, their wakers to `wakers` and
    /// the resources of orphans to `released`. Drops and wakes nothing:
    /// the caller does that once the driver is released.
    fn reap(&mut self) {
        let Self {
            ring,
            slots,
            wakers,
            released,
            ..
        } = self;
        let mut cq = ring.completion();
        cq.sync();
        for cqe in &mut cq {
            if cqe.user_data() == CANCEL {
                continue;
            }
            let id = OpId::from_user_data(cqe.user_data());
            let key = id.key as usize;
            let Some(slot) = slots.get_mut(key).filter(|s| s.generation == id.generation) else {
                continue; // not this slot's operation any more
            };
            match std::mem::replace(&mut slot.state, State::Done(cqe.result())) {
                State::Waiting(waker) => wakers.extend(waker),
                State::Orphan(resources) => {
                    released.push(resources);
                    slots.remove(key);
                }
                State::Done(_) => {}
            }
        }
    }

    /// Takes what [`Driver::reap`] set aside, to be used after the borrow.
    fn take_aside(&mut self) -> (Vec<Waker>, Vec<Box<dyn Any>>) {
        (
            std::mem::take(&mut self.wakers),
            std::mem::take(&mut self.released),
        )
    }
}

/// Calls the wakers and drops the resources that [`Driver::reap`] set
/// aside, outside the driver's borrow, then gives the (empty) vectors back
/// so the next batch does not allocate.
fn finish_aside((mut wakers, mut released): (Vec<Waker>, Vec<Box<dyn Any>>)) {
    released.clear();
    wakers.drain(..).for_each(Waker::wake);
    with_driver(None, |d| {
        d.wakers = wakers;
        d.released = released;
    });
}

/// Submits what is queued and dispatches completions. Runs in the
/// runtime's park hook, so one syscall carries every operation the tasks
/// queued since the last park.
fn flush_and_reap() {
    if let Some(aside) = with_driver(None, |d| {
        if d.queued() || d.pending() {
            d.submit_logged();
        }
        d.reap();
        d.take_aside()
    }) {
        finish_aside(aside);
    }
}

/// Submits what is queued now. Called before a socket is closed, so no
/// queued entry can name a file descriptor number that gets reused.
pub fn flush() {
    if let Some(aside) = with_driver(None, |d| {
        d.flush();
        d.take_aside()
    }) {
        finish_aside(aside);
    }
}

struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Runs `worker` on a new current-thread runtime with a ring on this thread.
///
/// The runtime parks in tokio's `epoll_wait`. A completion that arrives
/// then queues completion work for this thread, and the kernel wakes the
/// thread at once (the wait ends with `EINTR`, the work runs on the way
/// back to user space); the park hook then reaps. The ring's fd is also
/// registered with tokio's reactor (edge-triggered): it turns readable
/// when completions are posted during some other syscall of this thread,
/// and its task reaps them.
pub fn run(ring: Ring, worker: impl Future<Output = ()>) -> io::Result<()> {
    let Ring { ring } = ring;
    let ring_fd = ring.as_raw_fd();
    DRIVER.with(|d| {
        *d.borrow_mut() = Some(Driver {
            ring,
            id: NEXT_RING_ID.fetch_add(1, Ordering::Relaxed),
            slots: Slab::with_capacity(256),
            generation: 0,
            wakers: Vec::new(),
            released: Vec::new(),
        })
    });
    let result = (|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(flush_and_reap)
            .build()?;
        let local = tokio::task::LocalSet::new();
        let ready = {
            let _guard = rt.enter();
            // SAFETY: the ring's fd stays open until `teardown`, which runs
            // after this task (which owns the AsyncFd) is dropped with `local`.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    RingFd(ring_fd),
                    tokio::io::Interest::READABLE,
                )
            }
            .map_err(|e| io::Error::other(e.to_string()))?
        };
        local.spawn_local(async move {
            while let Ok(mut guard) = ready.readable().await {
                guard.clear_ready();
                flush_and_reap();
            }
        });
        local.block_on(&rt, worker);
        // Dropping the tasks drops their operations, which orphan their
        // resources and queue cancels.
        drop(local);
        drop(rt);
        Ok(())
    })();
    teardown();
    result
}

/// Cancels what is still in flight and waits (bounded) for the kernel to
/// let go of it. Memory the kernel might still write to is leaked rather
/// than freed if it does not answer in time.
fn teardown() {
    let Some(mut driver) = DRIVER.with(|d| d.borrow_mut().take()) else {
        return;
    };
    let waiting: Vec<OpId> = driver
        .slots
        .iter()
        .filter(|(_, s)| matches!(s.state, State::Waiting(_)))
        .map(|(k, s)| OpId {
            key: k as u32,
            generation: s.generation,
        })
        .collect();
    for id in waiting {
        driver.cancel(id);
    }
    let deadline = Instant::now() + TEARDOWN_WAIT;
    while driver.in_flight() && Instant::now() < deadline {
        let ts = types::Timespec::from(Duration::from_millis(50));
        let args = types::SubmitArgs::new().timespec(&ts);
        match driver.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
            Err(_) => break,
        }
        driver.reap();
        // The driver is out of the thread-local: dropping here is safe.
        drop(driver.take_aside());
    }
    if driver.in_flight() {
        tracing::warn!("io_uring teardown: operations still in flight; leaking their buffers");
        std::mem::forget(driver);
    }
}

/// Checks that the kernel supports every operation this driver submits.
pub fn probe_opcodes(ring: &Ring) -> Result<(), String> {
    let mut probe = io_uring::Probe::new();
    ring.ring
        .submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e}"))?;
    let needed = [
        ("connect", opcode::Connect::CODE),
        ("poll_add", opcode::PollAdd::CODE),
        ("recv", opcode::Recv::CODE),
        ("send", opcode::Send::CODE),
        ("async_cancel", opcode::AsyncCancel::CODE),
        ("recvmsg", opcode::RecvMsg::CODE),
        ("sendmsg", opcode::SendMsg::CODE),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(_, c)| !probe.is_supported(*c))
        .map(|(n, _)| *n)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("io_uring lacks operations: {}", missing.join(", ")))
    }
}

#[cfg(test)]
mod tests;
