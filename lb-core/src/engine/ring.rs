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
//! hook and whenever the ring wakes the parked runtime (see [`run`]).
//!
//! Why not tokio-uring: see docs/design/0007-own-io-uring-driver.md.

#![allow(unsafe_code)]

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

/// `user_data` of cancel requests: their own completions are ignored.
const CANCEL: u64 = u64::MAX;
/// Submission queue entries per ring (the completion queue is twice that).
const ENTRIES: u32 = 1024;
/// How long teardown waits for cancelled operations to complete.
const TEARDOWN_WAIT: Duration = Duration::from_secs(2);

enum Slot {
    /// In flight; the waker of the task waiting for it, once polled.
    Waiting(Option<Waker>),
    /// Completed with this result; the future has not seen it yet.
    Done(i32),
    /// The future went away first: what the kernel may still write to is
    /// kept here until the completion arrives.
    Orphan(#[allow(dead_code)] Box<dyn Any>),
}

struct Driver {
    ring: IoUring,
    /// Completion work waits for our next `io_uring_enter` with
    /// `GETEVENTS` (`DEFER_TASKRUN`) instead of interrupting the thread.
    deferred: bool,
    slots: Slab<Slot>,
    /// Wakers of completed operations, called once the driver is no longer
    /// borrowed; kept between batches so reaping does not allocate.
    wakers: Vec<Waker>,
}

thread_local! {
    static DRIVER: RefCell<Option<Driver>> = const { RefCell::new(None) };
}

/// `IORING_ENTER_GETEVENTS`: with `min_complete` 0 it waits for nothing,
/// but runs the completion work a `DEFER_TASKRUN` ring kept for us.
const ENTER_GETEVENTS: u32 = 1;

/// A ring, and whether its completion work is deferred to our own
/// `io_uring_enter` calls.
pub struct Ring {
    ring: IoUring,
    deferred: bool,
}

/// Builds a ring for this thread (the one that will submit to it).
/// Completions are handled by this thread only, so the kernel may keep
/// their task work until we ask for it (`DEFER_TASKRUN`, kernel 6.1+), or
/// run it at our next syscall instead of interrupting us (`COOP_TASKRUN`,
/// 5.19+); older kernels refuse these flags, and then a plain ring is used.
pub fn new_ring() -> io::Result<Ring> {
    let builder = || {
        let mut b = IoUring::builder();
        b.setup_cqsize(ENTRIES * 2);
        b
    };
    if let Ok(ring) = builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .build(ENTRIES)
    {
        return Ok(Ring {
            ring,
            deferred: true,
        });
    }
    let ring = builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(ENTRIES)
        .or_else(|e| {
            tracing::debug!(error = %e, "io_uring: COOP_TASKRUN/SINGLE_ISSUER refused, using a plain ring");
            builder().build(ENTRIES)
        })?;
    Ok(Ring {
        ring,
        deferred: false,
    })
}

fn with_driver<T>(f: impl FnOnce(&mut Driver) -> T) -> Option<T> {
    DRIVER.with(|d| d.borrow_mut().as_mut().map(f))
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

    /// Queues a cancel of the operation in slot `key`.
    fn cancel(&mut self, key: usize) {
        let cancel = opcode::AsyncCancel::new(key as u64)
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
        self.slots.iter().any(|(_, s)| !matches!(s, Slot::Done(_)))
    }

    /// Hands the queued entries to the kernel; on a deferred ring, also runs
    /// the completion work the kernel kept for us.
    fn enter(&mut self) -> io::Result<usize> {
        if !self.deferred {
            return self.ring.submit();
        }
        let queued = self.ring.submission().len() as u32;
        // SAFETY: no argument is passed; the entries handed over point only
        // at memory their operations own (see `push`).
        unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(queued, 0, ENTER_GETEVENTS, None)
        }
    }

    /// Whether the kernel has completions for us that `reap` cannot see yet:
    /// deferred completion work, or completions that overflowed the queue.
    fn pending(&mut self) -> bool {
        let sq = self.ring.submission();
        sq.cq_overflow() || (self.deferred && sq.taskrun())
    }

    fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.enter() {
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

    /// Moves completions into their slots and their wakers to `wakers`.
    fn reap(&mut self) {
        let wakers = &mut self.wakers;
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let key = cqe.user_data();
            if key == CANCEL {
                continue;
            }
            let key = key as usize;
            match self.slots.get_mut(key) {
                Some(slot @ Slot::Waiting(_)) => {
                    if let Slot::Waiting(Some(w)) =
                        std::mem::replace(slot, Slot::Done(cqe.result()))
                    {
                        wakers.push(w);
                    }
                }
                Some(Slot::Orphan(_)) => {
                    self.slots.remove(key);
                }
                Some(Slot::Done(_)) | None => {}
            }
        }
    }
}

/// Submits what is queued and dispatches completions. Runs in the
/// runtime's park hook, so one syscall carries every operation the tasks
/// queued since the last park.
fn flush_and_reap() {
    let Some(mut wakers) = with_driver(|d| {
        if d.queued() || d.pending() {
            d.submit_logged();
        }
        d.reap();
        std::mem::take(&mut d.wakers)
    }) else {
        return;
    };
    wakers.drain(..).for_each(Waker::wake);
    with_driver(|d| d.wakers = wakers);
}

/// Submits what is queued now. Called before a socket is closed, so no
/// queued entry can name a file descriptor number that gets reused.
pub fn flush() {
    with_driver(Driver::flush);
}

struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Runs `worker` on a new current-thread runtime with a ring on this thread.
///
/// The runtime parks in tokio's `epoll_wait`, so the ring must wake it. A
/// deferred ring signals an eventfd registered with it when completion
/// work arrives while the list was empty; other rings run their task work
/// on the thread (interrupting the wait) and their fd turns readable.
/// Either fd is registered edge-triggered with tokio's reactor, so every
/// signal wakes the reader once; the eventfd's counter is never read (it
/// cannot reach its 2^64 - 1 limit).
pub fn run(ring: Ring, worker: impl Future<Output = ()>) -> io::Result<()> {
    let Ring { ring, deferred } = ring;
    let ring_fd = ring.as_raw_fd();
    let eventfd = if deferred {
        let fd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        ring.submitter().register_eventfd(fd.as_raw_fd())?;
        Some(fd)
    } else {
        None
    };
    DRIVER.with(|d| {
        *d.borrow_mut() = Some(Driver {
            ring,
            deferred,
            slots: Slab::with_capacity(256),
            wakers: Vec::new(),
        })
    });
    let result = (|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(flush_and_reap)
            .build()?;
        let local = tokio::task::LocalSet::new();
        // The eventfd where there is one, else the ring's fd.
        let wake_fd = eventfd.as_ref().map_or(ring_fd, |fd| fd.as_raw_fd());
        let ready = {
            let _guard = rt.enter();
            // SAFETY: the ring's fd stays open until `teardown`, and the
            // eventfd until this function returns; both outlive this task
            // (which owns the AsyncFd), dropped with `local`.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    RingFd(wake_fd),
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
    let waiting: Vec<usize> = driver
        .slots
        .iter()
        .filter(|(_, s)| matches!(s, Slot::Waiting(_)))
        .map(|(k, _)| k)
        .collect();
    for key in waiting {
        driver.cancel(key);
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
    }
    if driver.in_flight() {
        tracing::warn!("io_uring teardown: operations still in flight; leaking their buffers");
        std::mem::forget(driver);
    }
}

/// One operation in flight. `R` is what the kernel may touch until it
/// completes; the future gives it back with the result.
pub struct Op<R: 'static> {
    key: Option<usize>,
    resources: Option<R>,
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
        let key = with_driver(|d| {
            let key = d.slots.insert(Slot::Waiting(None));
            match d.push(&entry.user_data(key as u64)) {
                Ok(()) => Some(key),
                Err(_) => {
                    d.slots.remove(key);
                    None
                }
            }
        })
        .flatten();
        Self {
            key,
            resources: Some(resources),
        }
    }
}

impl<R: Unpin + 'static> Future for Op<R> {
    /// The kernel's result (negative: `-errno`), and the resources.
    type Output = (io::Result<u32>, R);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let result = match this.key {
            None => Err(io::Error::other(
                "io_uring: the operation could not be queued (no ring on this thread, or submission failed)",
            )),
            Some(key) => match with_driver(|d| match &mut d.slots[key] {
                Slot::Done(res) => {
                    let res = *res;
                    d.slots.remove(key);
                    Some(res)
                }
                Slot::Waiting(waker) => {
                    if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *waker = Some(cx.waker().clone());
                    }
                    None
                }
                Slot::Orphan(_) => None,
            }) {
                Some(None) => return Poll::Pending,
                Some(Some(res)) if res < 0 => Err(io::Error::from_raw_os_error(-res)),
                Some(Some(res)) => Ok(res as u32),
                None => Err(io::Error::other("io_uring is not running")),
            },
        };
        this.key = None;
        let resources = this.resources.take().expect("Op polled after completion");
        Poll::Ready((result, resources))
    }
}

impl<R: 'static> Drop for Op<R> {
    fn drop(&mut self) {
        let Some(key) = self.key else {
            return;
        };
        let mut resources = self.resources.take();
        with_driver(|d| {
            if matches!(d.slots.get(key), Some(Slot::Done(_))) {
                d.slots.remove(key);
                drop(resources.take());
                return;
            }
            d.slots[key] = Slot::Orphan(Box::new(resources.take()));
            d.cancel(key);
        });
        // Still here: the driver is gone (thread teardown) while the kernel
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
        with_driver(|d| d.slots.len()).unwrap_or(0)
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
    /// `epoll_wait` wake it, every one of them: more at once than the
    /// kernel runs in one pass of deferred work (20). The writer waits
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
}
