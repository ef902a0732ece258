//! One io_uring operation as a future: it owns what the kernel may touch
//! until the completion arrives, and on an early drop hands that to its
//! slot and queues a cancel (see the driver, [`super`]).

use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use io_uring::squeue;

use super::{with_driver, OpId, State};

/// One operation in flight. `R` is what the kernel may touch until it
/// completes; the future gives it back with the result.
///
/// Not `Send`: it belongs to the ring of the thread that created it.
pub struct Op<R: 'static> {
    /// The ring, and the operation's slot in it (`None`: not queued).
    pub(super) at: Option<(u64, OpId)>,
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
