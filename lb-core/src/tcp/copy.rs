//! The copy loop of one direction of a connection: wait without a buffer,
//! read, write; a bulk transfer moves through a kernel pipe while data
//! keeps waiting; end of stream is passed on as a half-close.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use tokio::time::Instant;

use crate::engine::Conn;
use crate::worker::context::Worker;
use crate::worker::pools::{lease_pipe, BytesHeld, PipeLease};

/// Copies `from` → `to` until EOF (then half-closes `to`) or an error.
/// `one_way_done` is shared by the two directions of a connection.
pub(super) async fn pump<C: Conn>(
    worker: &Worker,
    from: &C,
    to: &C,
    bytes: &AtomicU64,
    activity: &Cell<Instant>,
    one_way_done: &Cell<bool>,
) -> io::Result<()> {
    let mut can_splice = true;
    // Whether `from` is known readable (a wait that ran during the last
    // write ended).
    let mut readable = false;
    loop {
        // Wait without a buffer: idle connections hold none.
        if !readable {
            from.ready().await?;
        }
        readable = false;
        let buf = worker.take_buffer();
        let capacity = buf.capacity();
        let held = BytesHeld::new(&worker.shared.buffer_bytes[worker.id].0, capacity);
        let (read, buf) = from.read(buf).await;
        let n = match read {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Not readable after all: wait without holding the buffer.
                worker.give_buffer(buf);
                continue;
            }
            Err(e) => {
                worker.give_buffer(buf);
                return Err(e);
            }
        };
        if n == 0 {
            worker.give_buffer(buf);
            return end_of_stream(to, one_way_done);
        }
        activity.set(Instant::now());
        // A short read is a message, not a bulk transfer: where the engine
        // gains by it, start waiting for the next one before writing this
        // one (docs/design/0007). The wait holds no buffer.
        let next = if n < capacity {
            from.ready_while_writing()
        } else {
            None
        };
        let mut next = std::pin::pin!(next);
        // One poll queues the wait (and may already find it done).
        let mut early = Poll::Pending;
        if let Some(wait) = next.as_mut().as_pin_mut() {
            early = futures::poll!(wait);
        }
        let (written, buf) = to.write_all(buf).await;
        worker.give_buffer(buf);
        drop(held);
        written?;
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        activity.set(Instant::now());
        if let Some(wait) = next.as_mut().as_pin_mut() {
            match early {
                Poll::Ready(r) => r?,
                Poll::Pending => wait.await?,
            }
            readable = true;
            continue;
        }
        if n < capacity || !can_splice {
            continue;
        }
        // The read filled the buffer: a bulk transfer. While data keeps
        // waiting, move it through a pipe instead of copying it.
        let Some(mut pipe) = lease_pipe(worker) else {
            continue;
        };
        // Boxed: its state lives only while splicing, so the future that
        // every connection holds (idle ones too) stays as small as before.
        match Box::pin(splice_while_waiting(&mut pipe, from, to, bytes, activity)).await {
            Ok(Spliced::Drained) => {}
            Ok(Spliced::Eof) => return end_of_stream(to, one_way_done),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && pipe.empty => {
                // This socket cannot splice (nothing was moved): copy.
                tracing::debug!(error = %e, "splice refused; copying instead");
                can_splice = false;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How a spell of splicing ended.
enum Spliced {
    /// Nothing waits any more; the pipe is empty.
    Drained,
    /// `from` reached end of stream; the pipe is empty.
    Eof,
}

/// Moves what waits on `from` to `to` through `pipe` until nothing waits.
async fn splice_while_waiting<C: Conn>(
    pipe: &mut PipeLease<'_>,
    from: &C,
    to: &C,
    bytes: &AtomicU64,
    activity: &Cell<Instant>,
) -> io::Result<Spliced> {
    loop {
        let n = match from.splice_in(pipe.pipe(), pipe.pipe().capacity()) {
            Ok(0) => return Ok(Spliced::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Spliced::Drained),
            Err(e) => return Err(e),
        };
        pipe.empty = false;
        activity.set(Instant::now());
        let mut left = n;
        while left > 0 {
            match to.splice_out(pipe.pipe(), left) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                Err(e) => return Err(e),
            }
        }
        pipe.empty = true;
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        activity.set(Instant::now());
        // Such a loop never has to wait: let the worker's other tasks run
        // whenever this task's budget is spent.
        tokio::task::coop::consume_budget().await;
    }
}

/// `from` finished sending: passes the FIN on, or ends the connection if
/// the other way ended first.
fn end_of_stream<C: Conn>(to: &C, one_way_done: &Cell<bool>) -> io::Result<()> {
    if one_way_done.replace(true) {
        // The other way ended first: the connection is over, and
        // closing `to` sends its FIN without a shutdown call.
        return Ok(());
    }
    // Keep the other way open. ENOTCONN means the other side is already
    // gone; nothing to tell.
    match to.shutdown_write() {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}
