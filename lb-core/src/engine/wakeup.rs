//! How long a worker that sleeps in its runtime takes to wake when a
//! socket it waits on turns readable. Every message that reaches an idle
//! worker pays this, so a late wake-up (one that waits for a timer tick or
//! an RCU grace period instead of being immediate) makes every round trip
//! slow while throughput tests still look fine.
//!
//! [`parked_wakeups`] measures it on a real worker of either engine over a
//! loopback TCP connection; [`check`] compares the io_uring engine with
//! the epoll engine at start, so `engine = "auto"` chooses by evidence on
//! the host at hand. The tests use the same measurement.

use std::io::{self, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{epoll::Epoll, uring::IoUring, Conn, Engine};

/// How long one sample waits for the worker to wake before it counts as
/// lost (and is recorded as this long).
pub const SAMPLE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long to wait for the worker to fall asleep before a sample.
const SLEEP_WAIT: Duration = Duration::from_secs(1);

/// One measured wake-up.
#[derive(Clone, Copy, Debug)]
pub struct Wakeup {
    /// From the write that made the socket readable to the worker running
    /// again (capped at [`SAMPLE_TIMEOUT`]).
    pub latency: Duration,
    /// The worker thread was seen asleep before the write, so this was a
    /// wake-up from the parked state.
    pub parked: bool,
}

/// The median of `samples`' latencies (zero for none).
pub fn median(samples: &[Wakeup]) -> Duration {
    let mut l: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    l.sort();
    l.get(l.len() / 2).copied().unwrap_or_default()
}

/// Runs a worker of engine `E` that waits on one end of a loopback TCP
/// connection, and `samples` times: waits until the worker thread sleeps,
/// writes one byte to the other end, and records how long the worker took
/// to run again.
pub fn parked_wakeups<E: Engine>(samples: usize) -> io::Result<Vec<Wakeup>> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let writer = TcpStream::connect(listener.local_addr()?)?;
    writer.set_nodelay(true)?;
    let (waiter, _) = listener.accept()?;
    // As the epoll engine's accept hands sockets over; the io_uring
    // engine's operations do not depend on the mode.
    waiter.set_nonblocking(true)?;
    drop(listener);
    let (tid_tx, tid_rx) = mpsc::channel();
    let (woke_tx, woke_rx) = mpsc::channel::<Instant>();
    let worker = std::thread::Builder::new()
        .name("lbd-wake-probe".into())
        .spawn(move || {
            E::run(async move {
                let _ = tid_tx.send(rustix::thread::gettid());
                let Ok(conn) = E::Conn::from_std(waiter) else {
                    return;
                };
                let mut buf = Vec::with_capacity(64);
                loop {
                    if conn.ready().await.is_err() {
                        return;
                    }
                    let woke = Instant::now();
                    let (read, b) = conn.read(buf).await;
                    buf = b;
                    buf.clear();
                    match read {
                        Ok(0) => return,
                        Ok(_) => {
                            if woke_tx.send(woke).is_err() {
                                return;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
            })
        })?;
    let tid = tid_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| io::Error::other("the wake-up probe's worker did not start"))?;
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let parked = wait_asleep(tid.as_raw_nonzero().get(), SLEEP_WAIT);
        let sent = Instant::now();
        (&writer).write_all(b"x")?;
        let latency = match woke_rx.recv_timeout(SAMPLE_TIMEOUT) {
            Ok(woke) => woke.saturating_duration_since(sent),
            Err(_) => SAMPLE_TIMEOUT,
        };
        out.push(Wakeup { latency, parked });
        if latency >= SAMPLE_TIMEOUT {
            break; // no point waiting a second per sample
        }
    }
    // End of stream ends the worker. If wake-ups are lost, it may never see
    // it: then the thread is left behind rather than joined forever.
    drop(writer);
    let deadline = Instant::now() + SAMPLE_TIMEOUT;
    while !worker.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if worker.is_finished() {
        let _ = worker.join();
    }
    Ok(out)
}

/// Waits (up to `limit`) until thread `tid` of this process is asleep.
/// False if it was not seen asleep (or `/proc` cannot tell).
fn wait_asleep(tid: i32, limit: Duration) -> bool {
    let stat = format!("/proc/self/task/{tid}/stat");
    let asleep = || {
        std::fs::read_to_string(&stat)
            .ok()
            .and_then(|s| Some(s.rsplit_once(") ")?.1.starts_with('S')))
            .unwrap_or(false)
    };
    let deadline = Instant::now() + limit;
    while !asleep() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

/// Samples per engine in [`check`].
const CHECK_SAMPLES: usize = 7;
/// A median below this is prompt whatever the epoll engine does.
const PROMPT: Duration = Duration::from_millis(2);
/// How many times epoll's median the io_uring engine may take.
const TOLERANCE: u32 = 10;

/// Whether a worker of the io_uring engine wakes promptly on this host:
/// `Err` with the figures when its median wake-up is above both
/// [`PROMPT`] and [`TOLERANCE`] times the epoll engine's (measured the same
/// way, so a busy host slows both alike). A measurement that cannot run
/// (no loopback) is not evidence against io_uring: `Ok` with the reason.
pub fn check() -> Result<String, String> {
    let (uring, epoll) = match (
        parked_wakeups::<IoUring>(CHECK_SAMPLES),
        parked_wakeups::<Epoll>(CHECK_SAMPLES),
    ) {
        (Ok(u), Ok(e)) => (u, e),
        (Err(e), _) | (_, Err(e)) => return Ok(format!("wake-up check skipped: {e}")),
    };
    let (u, e) = (median(&uring), median(&epoll));
    let figures = format!(
        "parked wake-up median {:.0} us on io_uring, {:.0} us on epoll",
        u.as_secs_f64() * 1e6,
        e.as_secs_f64() * 1e6
    );
    if u <= PROMPT.max(e * TOLERANCE) {
        Ok(figures)
    } else {
        Err(format!(
            "io_uring wakes a parked worker late here: {figures}"
        ))
    }
}
