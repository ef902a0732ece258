//! What the controller knows of the forwarders' progress: set once, at the
//! end of the start-up, and read by reconciles (the condition, releases)
//! and by the reports' handling.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;

use crate::publish::Progress;
use crate::status::ForwarderView;

/// Each forwarder's name and progress, shared with its publisher.
pub(super) type Board = Arc<[(String, Arc<Progress>)]>;

/// Read side: the forwarders' progress, once the start-up has set it.
#[derive(Clone)]
pub(super) struct Forwarders(watch::Receiver<Option<Board>>);

/// Write side, for the start-up.
pub(super) struct SetForwarders(watch::Sender<Option<Board>>);

/// A pair: nothing known yet.
pub(super) fn forwarders() -> (SetForwarders, Forwarders) {
    let (tx, rx) = watch::channel(None);
    (SetForwarders(tx), Forwarders(rx))
}

impl SetForwarders {
    /// Sets the board; whoever waits in [`Forwarders::primed`] goes on.
    pub(super) fn set(self, board: Board) {
        self.0.send_replace(Some(board));
    }
}

impl Forwarders {
    /// Waits until the start-up is over.
    pub(super) async fn primed(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(Option::is_some).await;
    }

    fn board(&self) -> Board {
        self.0.borrow().clone().unwrap_or_else(|| Arc::new([]))
    }

    /// What every forwarder has acknowledged, for the condition.
    pub(super) fn views(&self) -> Vec<ForwarderView> {
        self.board()
            .iter()
            .map(|(name, p)| ForwarderView {
                name: name.clone(),
                acked: p.acked.load(Ordering::Acquire),
                error: p.last_error.lock().unwrap().clone(),
            })
            .collect()
    }

    /// Whether every reachable forwarder runs a state without a Service
    /// removed at `version` (`None`: not built yet). With no forwarders
    /// nothing waits.
    pub(super) fn settled(&self, version: Option<u64>) -> bool {
        let board = self.board();
        board.is_empty() || version.is_some_and(|v| board.iter().all(|(_, p)| p.settled(v)))
    }
}
