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
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

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

/// One operation in flight. `R` is what the kernel may touch until it
/// completes; the future gives it back with the result.
///
/// Not `Send`: it belongs to the ring of the thread that created it.
pub struct Op<R: 'static> {
    /// The ring, and the operation's slot in it (`None`: not queued).
    at: Option<(u64, OpId)>,
    resources: Option<R>,
    _ring_thread: PhantomData<*const ()>,
}

impl<R: 'static> Op<R> {
    /// Queues `entry`.
    ///
    /// # Safety
    ///
    /// `entry` may only point into memory owned by `resources` whose
    /// address does not change when `resources` moves (heap allocations),
    /// or memory that outlives the operation.
    pub unsafe fn new(entry: squeue::Entry, resources: R) -> Self {
        let at = with_driver(None, |d| {
            let id = d.insert().ok()?;
            match d.push(&entry.user_data(id.user_data())) {
                Ok(()) => Some((d.id, id)),
                Err(_) => {
                    d.slots.remove(id.key as usize);
                    None
                }
            }
        })
        .flatten();
        Self {
            at,
            resources: Some(resources),
            _ring_thread: PhantomData,
        }
    }
}

impl<R: Unpin + 'static> Future for Op<R> {
    /// The kernel's result (negative: `-errno`), and the resources.
    type Output = (io::Result<u32>, R);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let result = match this.at {
            None => Err(io::Error::other(
                "io_uring: the operation could not be queued (no ring on this thread, or submission failed)",
            )),
            Some((ring, id)) => match with_driver(Some(ring), |d| {
                let slot = d.slot(id)?;
                match &mut slot.state {
                    State::Done(res) => {
                        let res = *res;
                        d.slots.remove(id.key as usize);
                        Some(Some(res))
                    }
                    State::Waiting(waker) => {
                        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            *waker = Some(cx.waker().clone());
                        }
                        Some(None)
                    }
                    State::Orphan(_) => None,
                }
            })
            .flatten()
            {
                Some(None) => return Poll::Pending,
                Some(Some(res)) if res < 0 => Err(io::Error::from_raw_os_error(-res)),
                Some(Some(res)) => Ok(res as u32),
                None => Err(io::Error::other(
                    "io_uring: the operation's ring is not running on this thread",
                )),
            },
        };
        this.at = None;
        let resources = this.resources.take().expect("Op polled after completion");
        Poll::Ready((result, resources))
    }
}

impl<R: 'static> Drop for Op<R> {
    fn drop(&mut self) {
        let Some((ring, id)) = self.at else {
            return;
        };
        let mut resources = self.resources.take();
        // What to drop once the driver is released: the resources of an
        // operation that already completed.
        let finished = with_driver(Some(ring), |d| {
            let slot = d.slot(id)?;
            if matches!(slot.state, State::Done(_)) {
                d.slots.remove(id.key as usize);
                return Some(resources.take());
            }
            slot.state = State::Orphan(Box::new(resources.take()));
            d.cancel(id);
            None
        })
        .flatten();
        drop(finished);
        // Still here: the ring is gone (thread teardown) while the kernel
        // may own the memory. Leak it rather than free it under the kernel.
        std::mem::forget(resources);
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
        ("accept", opcode::Accept::CODE),
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
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn slots_in_use() -> usize {
        with_driver(None, |d| d.slots.len()).unwrap_or(0)
    }

    fn on_ring(test: impl Future<Output = ()>) {
        let ring = match new_ring() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("io_uring unavailable here ({e}); skipping");
                return;
            }
        };
        run(ring, test).unwrap();
    }

    /// More operations at once than the submission queue holds, and more
    /// completions than the completion queue holds: every one completes.
    #[test]
    fn more_operations_than_the_queues_hold() {
        on_ring(async {
            let ops: Vec<_> = (0..3 * ENTRIES)
                // SAFETY: a no-op touches no memory.
                .map(|_| unsafe { Op::new(opcode::Nop::new().build(), ()) })
                .collect();
            for op in ops {
                let (r, ()) = op.await;
                assert_eq!(r.unwrap(), 0);
            }
            assert_eq!(slots_in_use(), 0);
        });
    }

    /// Completions that arrive while the worker sleeps in tokio's
    /// `epoll_wait` wake it, every one of them, many at once. The writer waits
    /// (with a deadline) until the worker thread is asleep before it makes
    /// the sockets readable. The worker has no timer that could wake it
    /// instead: if the completions have not all woken it 5 s after the
    /// writes, the writer does, through a channel, and the test fails.
    #[test]
    fn completions_wake_a_parked_worker() {
        const SOCKETS: usize = 64;
        on_ring(async {
            let pairs: Vec<_> = (0..SOCKETS).map(|_| UnixStream::pair().unwrap()).collect();
            // SAFETY: gettid has no preconditions.
            let worker = unsafe { libc::gettid() };
            let polls = pairs.iter().map(|(a, _)| {
                let entry =
                    opcode::PollAdd::new(types::Fd(a.as_raw_fd()), libc::POLLIN as u32).build();
                // SAFETY: a poll touches no user memory.
                unsafe { Op::new(entry, ()) }
            });
            let ready = futures::future::join_all(polls);
            flush();
            let (woken_tx, woken_rx) = std::sync::mpsc::channel::<()>();
            let (give_up_tx, give_up_rx) = tokio::sync::oneshot::channel::<()>();
            let writer = std::thread::spawn(move || {
                let stat = format!("/proc/self/task/{worker}/stat");
                let asleep = || {
                    std::fs::read_to_string(&stat)
                        .ok()
                        .and_then(|s| Some(s.rsplit_once(") ")?.1.starts_with('S')))
                        .unwrap_or(false)
                };
                let deadline = Instant::now() + Duration::from_secs(5);
                while !asleep() && Instant::now() < deadline {
                    std::thread::yield_now();
                }
                let slept = asleep();
                for (_, b) in &pairs {
                    std::io::Write::write_all(&mut &*b, b"x").unwrap();
                }
                if woken_rx.recv_timeout(Duration::from_secs(5)).is_err() {
                    let _ = give_up_tx.send(());
                }
                (slept, pairs)
            });
            let done = tokio::select! {
                biased;
                _ = give_up_rx => panic!("the completions never woke the worker"),
                done = ready => done,
            };
            woken_tx.send(()).unwrap();
            for (r, ()) in done {
                assert_ne!(r.unwrap() & libc::POLLIN as u32, 0);
            }
            let (slept, _pairs) = writer.join().unwrap();
            assert!(
                slept,
                "the worker never went to sleep, so no wake-up was tested"
            );
        });
    }

    /// A poll dropped before it completes is cancelled, and its slot is
    /// freed once the kernel confirms; a poll that completes reports it.
    #[test]
    fn dropped_operation_is_cancelled_and_freed() {
        on_ring(async {
            let (a, mut b) = UnixStream::pair().unwrap();
            let fd = types::Fd(a.as_raw_fd());
            let poll = || opcode::PollAdd::new(fd, libc::POLLIN as u32).build();
            // SAFETY: a poll touches no user memory.
            let idle = unsafe { Op::new(poll(), ()) };
            let waited = tokio::time::timeout(Duration::from_millis(50), idle).await;
            assert!(
                waited.is_err(),
                "nothing was written: the poll must still wait"
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while slots_in_use() != 0 {
                assert!(Instant::now() < deadline, "cancelled poll never completed");
                // Sleeping parks the worker, whose park hook reaps.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // SAFETY: as above.
            let ready = unsafe { Op::new(poll(), ()) };
            std::io::Write::write_all(&mut b, b"x").unwrap();
            let (r, ()) = ready.await;
            assert_ne!(r.unwrap() & libc::POLLIN as u32, 0);
        });
    }

    /// Not `Send`: an operation moved to another worker would name a slot
    /// of that worker's ring. (This fails to compile if `Op` becomes
    /// `Send`: the call below is then ambiguous.)
    #[test]
    fn operations_stay_on_their_thread() {
        trait AmbiguousIfSend<A> {
            fn check() {}
        }
        impl<T: ?Sized> AmbiguousIfSend<()> for T {}
        struct IsSend;
        impl<T: ?Sized + Send> AmbiguousIfSend<IsSend> for T {}
        <Op<Vec<u8>> as AmbiguousIfSend<_>>::check();
    }

    /// A cancel that arrives after its operation completed, and after a new
    /// operation took the same slot, leaves the new operation alone: a
    /// cancel names the operation's generation, not just its slot.
    #[test]
    fn a_late_cancel_misses_the_slots_next_operation() {
        on_ring(async {
            let (a, mut b) = UnixStream::pair().unwrap();
            let poll =
                || opcode::PollAdd::new(types::Fd(a.as_raw_fd()), libc::POLLIN as u32).build();
            // SAFETY: a no-op touches no memory.
            let first = unsafe { Op::new(opcode::Nop::new().build(), ()) };
            let (_, first_id) = first.at.unwrap();
            assert_eq!(first.await.0.unwrap(), 0);
            // SAFETY: a poll touches no user memory.
            let second = unsafe { Op::new(poll(), ()) };
            let (_, second_id) = second.at.unwrap();
            assert_eq!(second_id.key, first_id.key, "the slot is reused");
            with_driver(None, |d| {
                d.cancel(first_id);
                d.flush();
            });
            let waited = tokio::time::timeout(Duration::from_millis(100), second).await;
            let second = match waited {
                Err(_) => {
                    // Still waiting, as it should: now let it complete.
                    std::io::Write::write_all(&mut b, b"x").unwrap();
                    return;
                }
                Ok((r, ())) => r,
            };
            panic!("the late cancel reached the slot's next operation: {second:?}");
        });
    }

    /// Resources whose `Drop` uses the driver (a socket flushes queued
    /// entries before it closes) are dropped after the driver is released,
    /// whether the completion arrives before or after the future goes.
    #[test]
    fn dropping_resources_may_use_the_driver() {
        struct Flushes;
        impl Drop for Flushes {
            fn drop(&mut self) {
                flush();
            }
        }
        on_ring(async {
            let (a, mut b) = UnixStream::pair().unwrap();
            let fd = types::Fd(a.as_raw_fd());
            let poll = || opcode::PollAdd::new(fd, libc::POLLIN as u32).build();
            // Orphaned, then completed by its cancel: reaped in the park hook.
            // SAFETY: a poll touches no user memory.
            let orphan = unsafe { Op::new(poll(), Flushes) };
            flush();
            drop(orphan);
            let deadline = Instant::now() + Duration::from_secs(5);
            while slots_in_use() != 0 {
                assert!(Instant::now() < deadline, "the orphan never completed");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // Completed, then dropped before it was polled.
            // SAFETY: as above.
            let done = unsafe { Op::new(poll(), Flushes) };
            std::io::Write::write_all(&mut b, b"x").unwrap();
            flush();
            while !with_driver(None, |d| {
                d.reap();
                drop(d.take_aside());
                matches!(d.slots.iter().next(), Some((_, s)) if matches!(s.state, State::Done(_)))
            })
            .unwrap()
            {
                assert!(Instant::now() < deadline, "the poll never completed");
                tokio::task::yield_now().await;
            }
            drop(done);
            assert_eq!(slots_in_use(), 0);
        });
    }

    /// An operation that outlived its ring (kept across a second ring on the
    /// same thread) fails when polled there, and never touches the second
    /// ring's slots.
    #[test]
    fn an_operation_belongs_to_its_ring() {
        let kept = std::rc::Rc::new(std::cell::RefCell::new(None));
        let (a, _b) = UnixStream::pair().unwrap();
        let fd = types::Fd(a.as_raw_fd());
        let poll = move || opcode::PollAdd::new(fd, libc::POLLIN as u32).build();
        on_ring({
            let kept = kept.clone();
            async move {
                // SAFETY: a poll touches no user memory.
                *kept.borrow_mut() = Some(unsafe { Op::new(poll(), ()) });
                flush();
            }
        });
        on_ring(async move {
            // SAFETY: as above.
            let mine = unsafe { Op::new(poll(), ()) };
            let stale = kept.borrow_mut().take();
            let Some(stale) = stale else { return }; // no io_uring here
            assert_eq!(stale.at.unwrap().1.key, mine.at.unwrap().1.key);
            let polled = tokio::time::timeout(Duration::from_secs(2), stale).await;
            let Ok((r, ())) = polled else {
                panic!("the stale operation waited on the second ring's slot");
            };
            assert!(r.is_err(), "polled away from its ring: {r:?}");
            assert_eq!(
                slots_in_use(),
                1,
                "the second ring's operation is untouched"
            );
            drop(mine);
        });
    }
}
