//! A worker's own state, on its thread only: its id, what it shares with
//! the others, its random numbers, and its pools of buffers and pipes.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use super::shared::Shared;
use crate::balance::hash;
use crate::engine::splice::Pipe;

/// Bytes per copy buffer.
pub const BUF_SIZE: usize = 64 * 1024;
/// Idle buffers a worker keeps for reuse.
const POOL_MAX: usize = 256;

/// One worker's state.
pub struct Worker {
    pub(crate) id: usize,
    pub(crate) shared: Arc<Shared>,
    pub(super) rng: Cell<u64>,
    pub(super) buffers: RefCell<Vec<Vec<u8>>>,
    /// Idle pipes for the next bulk transfer (counted in
    /// `shared.pipes_idle`; every pipe open in `shared.pipes_open`).
    pub(super) pipes: RefCell<Vec<Pipe>>,
}

impl Worker {
    pub(crate) fn random(&self) -> u64 {
        let x = self.rng.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.rng.set(x);
        hash::fmix64(x)
    }

    /// A copy buffer from the pool (or a new one).
    pub(crate) fn take_buffer(&self) -> Vec<u8> {
        let buf = self
            .buffers
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BUF_SIZE));
        buf
    }

    /// Returns a copy buffer to the pool.
    pub(crate) fn give_buffer(&self, mut buf: Vec<u8>) {
        let mut pool = self.buffers.borrow_mut();
        if buf.capacity() >= BUF_SIZE && pool.len() < POOL_MAX {
            buf.clear();
            pool.push(buf);
        }
    }
}
