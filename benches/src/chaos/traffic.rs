//! The steady load a chaos scenario holds on a listener while it injects
//! faults: one new connection per request (`Connection: close`), so every
//! accept, backend pick and connect of lbd is exercised, at a fixed rate
//! over a few closed-loop threads. Every request is recorded with when it
//! started, how long it took and how it ended, so a scenario can count the
//! failures by kind and find the outage window around a fault.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// What the load asks for.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// The listener.
    pub target: SocketAddr,
    /// Requests in flight at most (one thread each).
    pub concurrency: usize,
    /// New connections per second, over all threads.
    pub rate: f64,
    /// A request not answered whole within this is a failure.
    pub timeout: Duration,
}

/// How a request failed, as the client sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The connect was refused (nothing listening).
    Refused,
    /// The connect did not complete in time.
    ConnectTimeout,
    /// The connection was reset.
    Reset,
    /// The connection closed before the whole answer.
    Closed,
    /// Connected, but no whole answer in time.
    Timeout,
    /// An answer other than 200.
    Status,
    /// Anything else (an unexpected OS error).
    Other,
}

impl Failure {
    /// The name used in tables.
    pub fn label(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::ConnectTimeout => "connect timeout",
            Self::Reset => "reset",
            Self::Closed => "closed early",
            Self::Timeout => "no answer in time",
            Self::Status => "non-200",
            Self::Other => "other",
        }
    }
}

/// One request: seconds from the load's start to its start, its duration,
/// and how it ended.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub start: f64,
    pub took: f64,
    pub result: Result<(), Failure>,
}

impl Sample {
    /// Seconds from the load's start to its end.
    pub fn end(&self) -> f64 {
        self.start + self.took
    }
}

/// A running load; [`Load::finish`] stops it and returns what it saw.
pub struct Load {
    spec: Spec,
    base: Instant,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Sample>>>,
}

/// No load runs longer than this, whatever the scenario does.
const LONGEST: Duration = Duration::from_secs(20 * 60);

impl Load {
    /// Starts the threads (in the calling thread's network namespace).
    pub fn start(spec: Spec) -> Self {
        let base = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let n = spec.concurrency.max(1);
        let interval = Duration::from_secs_f64(n as f64 / spec.rate.max(1.0));
        let threads = (0..n)
            .map(|i| {
                let stop = stop.clone();
                // Staggered, so the requests arrive evenly.
                let first = base + interval.mul_f64(i as f64 / n as f64);
                std::thread::spawn(move || client(spec, base, first, interval, &stop))
            })
            .collect();
        Self {
            spec,
            base,
            stop,
            threads,
        }
    }

    /// Seconds since the start, at `at`.
    pub fn offset(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.base).as_secs_f64()
    }

    /// Stops the threads (each finishes its request in flight) and returns
    /// every request, in order of their start.
    pub fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let seconds = self.base.elapsed().as_secs_f64();
        let mut samples: Vec<Sample> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_default())
            .collect();
        samples.sort_by(|a, b| a.start.total_cmp(&b.start));
        Tally {
            spec: self.spec,
            seconds,
            samples,
        }
    }
}

fn client(
    spec: Spec,
    base: Instant,
    first: Instant,
    interval: Duration,
    stop: &AtomicBool,
) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut next = first;
    while !stop.load(Ordering::Relaxed) && base.elapsed() < LONGEST {
        let now = Instant::now();
        if next > now {
            // Pacing to the asked rate, not waiting for a condition.
            std::thread::sleep(next - now);
        }
        // Behind schedule (a slow answer): go on from now, no burst.
        next = (next + interval).max(Instant::now());
        let started = Instant::now();
        let result = request(spec.target, spec.timeout);
        out.push(Sample {
            start: started.duration_since(base).as_secs_f64(),
            took: started.elapsed().as_secs_f64(),
            result,
        });
    }
    out
}

/// A request on a connection of its own (lbd's accept, pick and connect
/// every time).
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: chaos\r\nConnection: close\r\n\r\n";
/// A request that keeps its connection open afterwards.
pub const KEEP_ALIVE: &[u8] = b"GET / HTTP/1.1\r\nHost: chaos\r\n\r\n";

/// One request on a new connection.
fn request(target: SocketAddr, timeout: Duration) -> Result<(), Failure> {
    let mut s = connect(target, timeout)?;
    exchange(&mut s, REQUEST, timeout)
}

/// A connection to `target`, or how connecting failed.
pub fn connect(target: SocketAddr, timeout: Duration) -> Result<TcpStream, Failure> {
    TcpStream::connect_timeout(&target, timeout).map_err(|e| match e.kind() {
        ErrorKind::ConnectionRefused => Failure::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Failure::ConnectTimeout,
        ErrorKind::ConnectionReset => Failure::Reset,
        _ => Failure::Other,
    })
}

/// Sends `request` on `s` and reads one whole answer, within `timeout`.
pub fn exchange(s: &mut TcpStream, request: &[u8], timeout: Duration) -> Result<(), Failure> {
    let deadline = Instant::now() + timeout;
    let io = |e: std::io::Error| match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => Failure::Reset,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Failure::Timeout,
        _ => Failure::Other,
    };
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    s.write_all(request).map_err(io)?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(len) = crate::load::response_len(&buf) {
            let ok = buf[..len].starts_with(b"HTTP/1.1 200 ");
            return if ok { Ok(()) } else { Err(Failure::Status) };
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::Timeout);
        }
        s.set_read_timeout(Some(left)).map_err(io)?;
        match s.read(&mut chunk) {
            Ok(0) => return Err(Failure::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
}

/// Requests on new connections to `target` until one is answered, or
/// `within` has passed; how long that took.
pub fn first_answer(target: SocketAddr, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if request(target, Duration::from_secs(1)).is_ok() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Everything a load saw.
pub struct Tally {
    pub spec: Spec,
    /// How long it ran.
    pub seconds: f64,
    /// Every request, in order of start.
    pub samples: Vec<Sample>,
}

impl Tally {
    /// Requests answered.
    pub fn ok(&self) -> usize {
        self.samples.iter().filter(|s| s.result.is_ok()).count()
    }

    /// Failures by kind, of the requests that started in `[from, to)`.
    pub fn failures_between(&self, from: f64, to: f64) -> BTreeMap<Failure, usize> {
        self.failures_where(|s| (from..to).contains(&s.start))
    }

    /// Failures by kind, of the requests that ended in `[from, to]`.
    pub fn failures_ending_between(&self, from: f64, to: f64) -> BTreeMap<Failure, usize> {
        self.failures_where(|s| (from..=to).contains(&s.end()))
    }

    /// Failures by kind, of the requests `pick` chooses.
    pub fn failures_where(&self, pick: impl Fn(&Sample) -> bool) -> BTreeMap<Failure, usize> {
        let mut by = BTreeMap::new();
        for s in self.samples.iter().filter(|s| pick(s)) {
            if let Err(f) = s.result {
                *by.entry(f).or_insert(0) += 1;
            }
        }
        by
    }

    /// Failures by kind, of every request.
    pub fn failures(&self) -> BTreeMap<Failure, usize> {
        self.failures_between(f64::MIN, f64::MAX)
    }

    /// What the load held: threads, asked and achieved rate, duration.
    pub fn held(&self) -> String {
        format!(
            "{} conns in flight max, {:.0} new conns/s asked, {:.0}/s done, {:.0} s",
            self.spec.concurrency,
            self.spec.rate,
            self.samples.len() as f64 / self.seconds.max(1e-9),
            self.seconds
        )
    }

    /// The longest stretch between two consecutive answers (their ends,
    /// in seconds from the start) that overlaps `[from, to]`; `None` when
    /// nothing was answered after `from`.
    pub fn longest_gap(&self, from: f64, to: f64) -> Option<(f64, f64)> {
        let mut ends: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.result.is_ok())
            .map(Sample::end)
            .collect();
        ends.sort_by(f64::total_cmp);
        let mut previous = 0.0;
        let mut longest: Option<(f64, f64)> = None;
        for &end in &ends {
            let overlaps = end > from && previous < to;
            if overlaps && longest.is_none_or(|(a, b)| end - previous > b - a) {
                longest = Some((previous, end));
            }
            previous = end;
        }
        longest
    }

    /// The `q` quantile of answered requests' durations, in ms.
    pub fn latency_ms(&self, q: f64) -> f64 {
        let mut ms: Vec<u64> = self
            .samples
            .iter()
            .filter(|s| s.result.is_ok())
            .map(|s| (s.took * 1e6) as u64)
            .collect();
        ms.sort_unstable();
        crate::load::quantile(&ms, q) / 1e3
    }
}

/// "0", or "N: a x, b y" for failures by kind.
pub fn describe(failures: &BTreeMap<Failure, usize>) -> String {
    let total: usize = failures.values().sum();
    if total == 0 {
        return "0".into();
    }
    let kinds: Vec<String> = failures
        .iter()
        .map(|(f, n)| format!("{} {n}", f.label()))
        .collect();
    format!("{total} ({})", kinds.join(", "))
}

/// Failures by kind as JSON (`{"refused": 3, ...}`).
pub fn as_json(failures: &BTreeMap<Failure, usize>) -> serde_json::Value {
    serde_json::to_value(failures).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(start: f64, took: f64, ok: bool) -> Sample {
        let result = if ok { Ok(()) } else { Err(Failure::Refused) };
        Sample {
            start,
            took,
            result,
        }
    }

    /// The outage is measured between answers, around the fault.
    #[test]
    fn outage_spans_the_answers_around_a_fault() {
        let tally = Tally {
            spec: Spec {
                target: "127.0.0.1:1".parse().unwrap(),
                concurrency: 1,
                rate: 1.0,
                timeout: Duration::from_secs(1),
            },
            seconds: 10.0,
            samples: vec![
                sample(1.0, 0.1, true),
                sample(2.0, 0.1, true),
                sample(3.0, 0.0, false),
                sample(4.0, 0.0, false),
                sample(5.0, 0.2, true),
            ],
        };
        assert_eq!(tally.longest_gap(2.5, 2.6), Some((2.1, 5.2)));
        assert_eq!(tally.longest_gap(0.0, 10.0), Some((2.1, 5.2)));
        assert_eq!(tally.longest_gap(1.5, 1.6), Some((1.1, 2.1)));
        assert_eq!(tally.longest_gap(6.0, 7.0), None);
        assert_eq!(describe(&tally.failures()), "2 (refused 2)");
        assert_eq!(describe(&tally.failures_between(0.0, 3.5)), "1 (refused 1)");
        assert_eq!(tally.ok(), 3);
    }
}
