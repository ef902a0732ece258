//! What a connection holds from its worker while it forwards: a pipe
//! leased for a bulk transfer, and the bytes counted as held.

use std::sync::atomic::{AtomicU64, Ordering};

use super::context::Worker;
use crate::engine::splice::{self, Pipe};

/// A pipe leased by one direction of a connection. Given back to the
/// worker's pool only empty: one dropped with bytes in it (the connection
/// ended mid-transfer) is closed, bytes and all.
pub struct PipeLease<'a> {
    worker: &'a Worker,
    pipe: Option<Pipe>,
    /// The pipe holds no bytes (set by the user as it fills and drains).
    pub empty: bool,
    _held: BytesHeld<'a>,
}

impl<'a> PipeLease<'a> {
    fn new(worker: &'a Worker, pipe: Pipe, held: BytesHeld<'a>) -> Self {
        Self {
            worker,
            pipe: Some(pipe),
            empty: true,
            _held: held,
        }
    }

    /// The leased pipe.
    pub fn pipe(&self) -> &Pipe {
        self.pipe.as_ref().expect("present until dropped")
    }
}

impl Drop for PipeLease<'_> {
    fn drop(&mut self) {
        let Some(pipe) = self.pipe.take() else {
            return;
        };
        let (worker, id) = (self.worker, self.worker.id);
        let mut pool = worker.pipes.borrow_mut();
        if self.empty && pool.len() < splice::POOL_MAX {
            pool.push(pipe);
            worker.shared.pipes_idle[id]
                .0
                .fetch_add(1, Ordering::Relaxed);
        } else {
            drop(pipe);
            worker.shared.pipes_open[id]
                .0
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Counts a buffer's bytes as held until dropped (also when the connection
/// is cancelled mid-read and the buffer goes with it).
pub struct BytesHeld<'a>(&'a AtomicU64, u64);

impl<'a> BytesHeld<'a> {
    /// Adds `bytes` to `counter` until dropped.
    pub fn new(counter: &'a AtomicU64, bytes: usize) -> Self {
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
        Self(counter, bytes as u64)
    }
}

impl Drop for BytesHeld<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// A pipe for a bulk transfer, if splicing is on and one is free or
/// can be opened within the worker's share.
pub fn lease_pipe(worker: &Worker) -> Option<PipeLease<'_>> {
    if !worker.shared.splice {
        return None;
    }
    let open = &worker.shared.pipes_open[worker.id].0;
    let pipe = match worker.pipes.borrow_mut().pop() {
        Some(pipe) => {
            worker.shared.pipes_idle[worker.id]
                .0
                .fetch_sub(1, Ordering::Relaxed);
            pipe
        }
        None if open.load(Ordering::Relaxed) >= splice::PIPES_PER_WORKER => return None,
        None => match Pipe::new() {
            Ok(pipe) => {
                open.fetch_add(1, Ordering::Relaxed);
                pipe
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot open a pipe; copying instead");
                return None;
            }
        },
    };
    // What the pipe may pin counts as held, as a buffer would.
    let held = BytesHeld::new(&worker.shared.buffer_bytes[worker.id].0, pipe.capacity());
    Some(PipeLease::new(worker, pipe, held))
}
