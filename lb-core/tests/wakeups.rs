//! Guards against late wake-ups, on both engines. A worker that sleeps in
//! its runtime must run again within microseconds when a socket it waits on
//! turns readable; a wake-up that waits for a timer tick or a kernel grace
//! period instead makes every message on an idle connection tens of
//! milliseconds late while throughput still looks fine. The bounds here are
//! about 100 times what a healthy engine takes: these are correctness
//! guards, not performance assertions (performance lives in `benches/`).

use std::time::Duration;

use lb_config::EngineChoice;
use lb_core::engine::wakeup::{self, parked_wakeups, Wakeup};
use lb_core::engine::{epoll::Epoll, uring::IoUring};

const SAMPLES: usize = 64;

/// The median of 64 wake-ups of a parked worker is under 5 ms, and the
/// worker was seen asleep before nearly every one of them (so what was
/// measured is the wake-up from the parked state).
fn parked_worker_wakes_promptly(engine: EngineChoice) {
    let samples: Vec<Wakeup> = match engine {
        EngineChoice::IoUring => parked_wakeups::<IoUring>(SAMPLES),
        _ => parked_wakeups::<Epoll>(SAMPLES),
    }
    .expect("the measurement runs");
    let parked = samples.iter().filter(|s| s.parked).count();
    let median = wakeup::median(&samples);
    let all: Vec<String> = samples
        .iter()
        .map(|s| format!("{:.2}", s.latency.as_secs_f64() * 1e3))
        .collect();
    assert_eq!(
        samples.len(),
        SAMPLES,
        "a wake-up was lost (over {:?}); ms: {all:?}",
        wakeup::SAMPLE_TIMEOUT
    );
    assert!(
        parked >= SAMPLES * 9 / 10,
        "the worker was asleep before only {parked} of {SAMPLES} writes"
    );
    assert!(
        median < Duration::from_millis(5),
        "median parked wake-up {median:?} (healthy: tens of microseconds); ms: {all:?}"
    );
}

mod epoll {
    #[test]
    fn parked_worker_wakes_promptly() {
        super::parked_worker_wakes_promptly(lb_config::EngineChoice::Epoll)
    }
}

mod io_uring {
    #[test]
    fn parked_worker_wakes_promptly() {
        super::parked_worker_wakes_promptly(lb_config::EngineChoice::IoUring)
    }
}
