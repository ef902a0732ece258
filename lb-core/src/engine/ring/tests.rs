//! Tests of the driver and its operations, on a real ring.

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
            let entry = opcode::PollAdd::new(types::Fd(a.as_raw_fd()), libc::POLLIN as u32).build();
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
        let poll = || opcode::PollAdd::new(types::Fd(a.as_raw_fd()), libc::POLLIN as u32).build();
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
