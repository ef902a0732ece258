//! Batches of datagrams: draining a socket after a receive, and sending a
//! flow's datagrams in segmented runs (see docs/design/0009-udp-batches.md).
//! Used by both directions of [`super`]; knows nothing of flows or routes.

use std::cell::Cell;
use std::io::{self, IoSlice};
use std::net::SocketAddr;

use crate::engine::{gso, Datagram};

/// Receive buffer: larger than any non-jumbo datagram, so nothing is cut
/// silently; anything above `MAX_DATAGRAM` is counted and dropped.
pub(super) const RECV_BUF: usize = 65_536;
/// Datagrams taken from a listener socket per wake-up, at most.
pub(super) const BATCH: usize = 32;
/// A receiver's buffer: a batch appends datagrams while a whole
/// [`RECV_BUF`] is spare. Pages are touched only as datagrams fill them.
pub(super) const BATCH_BUF: usize = 2 * RECV_BUF;
/// While drains find nothing, one receive in this many still tries one.
const PROBE_EVERY: u32 = 8;

/// One received datagram: `buf[start..start + len]`, from `from`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Item {
    pub(super) start: usize,
    pub(super) len: usize,
    pub(super) from: SocketAddr,
}

/// The datagrams of one batch, and when to drain a socket after a
/// receive: while the last drain found datagrams waiting, and on every
/// [`PROBE_EVERY`]th receive otherwise (a drain that finds nothing costs a
/// syscall).
#[derive(Debug, Default)]
pub(super) struct Drainer {
    /// The batch: the received datagram, then the drained ones.
    pub(super) items: Vec<Item>,
    draining: bool,
    receives: u32,
}

impl Drainer {
    /// Starts a batch with the datagram just received into `buf[..len]`.
    pub(super) fn start(&mut self, len: usize, from: SocketAddr) {
        self.items.clear();
        self.items.push(Item {
            start: 0,
            len,
            from,
        });
    }

    /// Counts a receive; whether to drain after it.
    pub(super) fn due(&mut self) -> bool {
        self.receives = self.receives.wrapping_add(1);
        self.draining || self.receives.is_multiple_of(PROBE_EVERY)
    }

    /// Appends the datagrams waiting on `socket` to `buf` and the batch,
    /// without waiting. Stops while less than a whole [`RECV_BUF`] is
    /// spare, so no datagram is ever cut. Returns the error that ended the
    /// drain, unless it was `WouldBlock`.
    pub(super) fn drain(&mut self, socket: &impl Datagram, buf: &mut Vec<u8>) -> Option<io::Error> {
        let items = &mut self.items;
        let before = items.len();
        let mut failed = None;
        while items.len() < BATCH && buf.capacity() - buf.len() >= RECV_BUF {
            let start = buf.len();
            match socket.try_recv_from(buf) {
                Ok((len, from)) => items.push(Item { start, len, from }),
                Err(e) => {
                    failed = (e.kind() != io::ErrorKind::WouldBlock).then_some(e);
                    break;
                }
            }
        }
        self.draining = self.items.len() > before;
        failed
    }
}

/// Sends one flow's datagrams (`mine`, in order) on `socket`, to `to` or
/// the socket's peer, in runs: consecutive datagrams of one size, the last
/// possibly shorter, leave in one segmented send. A socket or path that
/// cannot segment gets them one by one, and `gso` (the listener's switch)
/// turns off. Returns the datagrams and bytes sent.
pub(super) async fn send_runs(
    socket: &impl Datagram,
    to: Option<SocketAddr>,
    buf: &[u8],
    mine: &[Item],
    gso: &Cell<bool>,
) -> (usize, usize) {
    let slice = |it: &Item| IoSlice::new(&buf[it.start..it.start + it.len]);
    // Grown only for runs of more than one: a lone datagram (request and
    // response traffic, mostly) is sent from the stack.
    let mut parts = Vec::new();
    let (mut datagrams, mut bytes) = (0, 0);
    let mut k = 0;
    while k < mine.len() {
        let end = run_end(mine, k, gso.get());
        let run = &mine[k..end];
        k = end;
        let segment = (run.len() > 1).then(|| run[0].len as u16);
        let sent = if segment.is_some() {
            parts.clear();
            parts.extend(run.iter().map(slice));
            socket.send_parts(&parts, segment, to).await
        } else {
            socket.send_parts(&[slice(&run[0])], None, to).await
        };
        match sent {
            Ok(n) => {
                datagrams += run.len();
                bytes += n;
            }
            Err(e) if segment.is_some() && gso::unsupported(&e) => {
                tracing::debug!(error = %e, "udp segmentation unavailable; sending datagrams one by one");
                gso.set(false);
                for item in run {
                    match socket.send_parts(&[slice(item)], None, to).await {
                        Ok(n) => {
                            datagrams += 1;
                            bytes += n;
                        }
                        Err(e) => tracing::debug!(error = %e, "udp send failed"),
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "udp send failed"),
        }
    }
    (datagrams, bytes)
}

/// Where the run that starts at `mine[k]` ends (exclusive): datagrams of
/// `mine[k]`'s size, then at most one shorter one, within the segmentation
/// limits. A run of one when `segment` is off or the size is 0.
pub(super) fn run_end(mine: &[Item], k: usize, segment: bool) -> usize {
    let size = mine[k].len;
    let mut end = k + 1;
    if !segment || size == 0 {
        return end;
    }
    let mut bytes = size;
    while end < mine.len()
        && end - k < gso::MAX_SEGMENTS
        && mine[end].len <= size
        && bytes + mine[end].len <= gso::MAX_BYTES
    {
        bytes += mine[end].len;
        end += 1;
        if mine[end - 1].len < size {
            break;
        }
    }
    end
}

/// The listener's scratch buffer, leased; given back when dropped, also
/// when the task holding it is aborted.
pub(super) struct Scratch<'a> {
    slot: &'a Cell<Option<Vec<u8>>>,
    pub(super) buf: Vec<u8>,
}

impl<'a> Scratch<'a> {
    /// The buffer, empty, with room for a batch; `None` while leased.
    pub(super) fn lease(slot: &'a Cell<Option<Vec<u8>>>) -> Option<Self> {
        let mut buf = slot.take()?;
        if buf.capacity() < BATCH_BUF {
            buf = Vec::with_capacity(BATCH_BUF);
        }
        buf.clear();
        Some(Self { slot, buf })
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        self.slot.set(Some(std::mem::take(&mut self.buf)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lengths of the runs `run_end` cuts datagrams of `lens` into.
    fn runs(lens: &[usize], segment: bool) -> Vec<usize> {
        let client = SocketAddr::from(([127, 0, 0, 1], 9));
        let mine: Vec<Item> = lens
            .iter()
            .map(|&len| Item {
                start: 0,
                len,
                from: client,
            })
            .collect();
        let (mut k, mut out) = (0, Vec::new());
        while k < mine.len() {
            let end = run_end(&mine, k, segment);
            out.push(end - k);
            k = end;
        }
        out
    }

    #[test]
    fn runs_are_one_size_then_at_most_one_shorter() {
        assert_eq!(runs(&[200, 200, 200, 37, 200, 200], true), [4, 2]);
        assert_eq!(runs(&[200, 1200, 1200, 200], true), [1, 3]);
        assert_eq!(runs(&[37, 37, 200], true), [2, 1]);
        // Empty datagrams cannot be segments.
        assert_eq!(runs(&[0, 0, 5], true), [1, 1, 1]);
        assert_eq!(runs(&[200, 200, 37], false), [1, 1, 1]);
    }

    #[test]
    fn runs_stay_within_the_segmentation_limits() {
        assert_eq!(runs(&[100; 70], true), [gso::MAX_SEGMENTS, 6]);
        let per_run = gso::MAX_BYTES / 1_200;
        assert_eq!(runs(&[1_200; 60], true), [per_run, 60 - per_run]);
        assert_eq!(runs(&[super::super::MAX_DATAGRAM; 2], true), [1, 1]);
    }
}
