//! A worker: one thread, one runtime, its own listening sockets and the
//! connections it serves. The command loop takes sockets from the control
//! side and connections handed over by other workers; what a TCP
//! connection or a UDP flow then does is in [`crate::tcp`] and
//! [`crate::udp`].

pub mod context;
pub mod handoff;
pub mod pools;
pub mod shared;

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use crate::balance::hash;
use crate::engine::Engine;
use crate::routing::BindKey;

use context::Worker;
use handoff::Handoff;
pub use shared::Shared;

/// A command from the control side to a worker.
#[derive(Debug)]
pub enum WorkerCmd {
    /// Start accepting on this socket until `stop` becomes true.
    Listen {
        /// Which listener this socket serves.
        key: BindKey,
        /// Bound, listening, non-blocking.
        socket: std::net::TcpListener,
        /// Becomes true when the listener is removed or the process stops.
        stop: watch::Receiver<bool>,
    },
    /// Start serving UDP on this socket until `stop` becomes true.
    ListenUdp {
        /// Which listener this socket serves.
        key: BindKey,
        /// Bound, non-blocking.
        socket: std::net::UdpSocket,
        /// The bound address (replies come from it; PROXY v2 names it).
        local: SocketAddr,
        /// Becomes true when the listener is removed or the process stops.
        stop: watch::Receiver<bool>,
    },
    /// Answer at once: the worker's runtime still runs its tasks (the
    /// systemd watchdog, `crate::watchdog`).
    Ping(tokio::sync::oneshot::Sender<()>),
}

/// Runs worker `id` on this thread until the command channel closes.
/// `started` is called once the worker's runtime runs; an error before
/// that is returned.
pub fn run_worker<E: Engine>(
    id: usize,
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<WorkerCmd>,
    mut handoffs: mpsc::UnboundedReceiver<Handoff>,
    started: impl FnOnce(),
) -> io::Result<()> {
    E::run(async move {
        started();
        let seed = hash::fmix64(
            id as u64 ^ Instant::now().elapsed().as_nanos() as u64 ^ std::process::id() as u64,
        );
        let worker = Rc::new(Worker {
            id,
            shared,
            rng: Cell::new(seed),
            buffers: RefCell::new(Vec::new()),
            pipes: RefCell::new(Vec::new()),
        });
        loop {
            let cmd = tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => cmd,
                    None => return, // the control side is gone: stop
                },
                Some(handoff) = handoffs.recv() => {
                    crate::tcp::adopt::<E>(&worker, handoff);
                    continue;
                }
            };
            match cmd {
                WorkerCmd::Listen { key, socket, stop } => match E::listener(socket) {
                    Ok(listener) => {
                        tokio::task::spawn_local(crate::tcp::accept_loop::<E>(
                            worker.clone(),
                            key,
                            listener,
                            stop,
                        ));
                    }
                    Err(e) => {
                        tracing::error!(bind = %key.addr, error = %e, worker = id, "cannot use listener socket")
                    }
                },
                WorkerCmd::ListenUdp {
                    key,
                    socket,
                    local,
                    stop,
                } => match <E::Udp as crate::engine::Datagram>::from_std(socket) {
                    Ok(socket) => {
                        tokio::task::spawn_local(crate::udp::serve::<E>(
                            worker.clone(),
                            key,
                            socket,
                            local,
                            stop,
                        ));
                    }
                    Err(e) => {
                        tracing::error!(bind = %key.addr, error = %e, worker = id, "cannot use udp socket")
                    }
                },
                WorkerCmd::Ping(reply) => {
                    let _ = reply.send(());
                }
            }
        }
    })
}
