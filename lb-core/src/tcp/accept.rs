//! Accepting TCP connections on a worker's listening socket, and handing
//! each to the worker that serves it.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use super::connection::serve;
use crate::engine::{Conn, Engine};
use crate::routing::BindKey;
use crate::worker::context::Worker;
use crate::worker::handoff::{place, Handoff};

/// Accepts on `listener` until `stop`, dispatching each connection.
pub async fn accept_loop<E: Engine>(
    worker: Rc<Worker>,
    key: BindKey,
    listener: E::Listener,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            E::close_listener(&listener);
            return;
        }
        tokio::select! {
            biased;
            changed = stop.changed() => if changed.is_err() {
                E::close_listener(&listener);
                return; // the control side is gone
            },
            accepted = E::accept(&listener) => match accepted {
                Ok((stream, peer)) => dispatch::<E>(&worker, key, stream, peer),
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: back off briefly instead of spinning.
                    tracing::debug!(bind = %key.addr, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
        }
    }
}

/// Serves a connection this worker accepted, or hands it to the worker
/// [`place`] picks.
fn dispatch<E: Engine>(
    worker: &Rc<Worker>,
    key: BindKey,
    stream: std::net::TcpStream,
    peer: SocketAddr,
) {
    let shared = &worker.shared;
    let to = place(&shared.worker_conns, worker.id);
    // Counted now, so the next accept anywhere sees it.
    shared.worker_conns[to].0.fetch_add(1, Ordering::Relaxed);
    if to == worker.id {
        adopt::<E>(worker, Handoff { key, stream, peer });
    } else if shared.handoff[to]
        .send(Handoff { key, stream, peer })
        .is_ok()
    {
        shared.handed_off[worker.id]
            .0
            .fetch_add(1, Ordering::Relaxed);
    } else {
        // That worker is gone (shutting down): the connection closes.
        shared.worker_conns[to].0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves a connection counted for this worker, accepted here or handed
/// over.
pub fn adopt<E: Engine>(worker: &Rc<Worker>, handoff: Handoff) {
    let Handoff { key, stream, peer } = handoff;
    match E::Conn::from_std(stream) {
        Ok(conn) => {
            tokio::task::spawn_local(serve::<E>(worker.clone(), key, conn, peer));
        }
        Err(e) => {
            worker.shared.worker_conns[worker.id]
                .0
                .fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(bind = %key.addr, error = %e, "cannot serve an accepted connection");
        }
    }
}
