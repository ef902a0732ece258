//! The measurements of `lb-bench run`. A `Bench` runs every scenario
//! through every peer in interleaved rounds and keeps a figure per peer and
//! scenario, and the runs that failed with why. This file holds what every
//! scenario shares: the rounds, and a measurement run again when the
//! hypervisor stole from it. The scenarios are in two files because they
//! run in two ways: `throughput` runs free, many scenarios per start of a
//! peer, each retried on its own; `latency` holds the client, the backend
//! and the proxy to CPUs and starts the peer afresh for every attempt.
//! Starting the backends, choosing worker counts and writing the table are
//! not here (`run`, `report`).

mod latency;
mod throughput;

use crate::load;
use crate::peers::{self, Peer};
use crate::stats::{figure, Figure, Sample};
use crate::steal;

/// One measured value of a scenario, or why there is none, with the steal
/// during the attempt it came from and how many attempts were made.
struct Measured {
    scenario: &'static str,
    unit: &'static str,
    value: anyhow::Result<f64>,
    steal: Option<f64>,
    attempts: usize,
}

/// `retry.run(measure)`, saying on stderr when `what` took more than one
/// attempt.
fn retried<T>(what: &str, retry: steal::Retry, measure: impl FnMut() -> T) -> steal::Attempts<T> {
    let kept = retry.run(measure);
    if kept.made > 1 {
        eprintln!(
            "  {what}: {} attempts (steal above {:.0}%); kept one with {:.1}% steal",
            kept.made,
            retry.limit * 100.0,
            kept.steal.unwrap_or(f64::NAN) * 100.0
        );
    }
    kept
}

/// One `lb-bench run`'s measurements: what each run takes, where the
/// peers run, and the figures and failures gathered so far.
pub struct Bench {
    /// Measured runs (rounds) per figure; a latency figure takes at least
    /// 5 (`latency_runs`).
    pub runs: usize,
    /// Seconds per measured run.
    pub seconds: u64,
    /// Where the peers and backends run, and how many idle connections
    /// the memory figure opens.
    pub site: peers::Site,
    /// Counts the datagrams of the one-way UDP scenario.
    pub sink: load::UdpSink,
    /// The processes of the HTTP backend (nginx), held to their CPUs
    /// during the latency runs.
    pub backend: Vec<u32>,
    /// The CPUs this run may use.
    pub cpus: Vec<usize>,
    /// The figures so far, in the order measured (the table's order).
    pub figures: Vec<Figure>,
    /// Runs, or scenarios within runs, that produced no figure, and why.
    pub failures: Vec<String>,
}

impl Bench {
    /// Runs `measure` `runs` times through every peer, interleaved (run 1
    /// of every peer, then run 2, ...), so a slow spell of a shared machine
    /// lands on every peer alike instead of on whichever one it was
    /// measuring; then adds a figure per peer and scenario. `measure`
    /// runs again whatever was stolen from (see `steal::Retry`).
    fn interleaved(
        &mut self,
        peers: &[Peer],
        workers: usize,
        runs: usize,
        measure: impl Fn(&Self, &Peer, usize) -> anyhow::Result<Vec<Measured>>,
    ) {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); peers.len()];
        let mut failures = Vec::new();
        for run in 0..runs {
            for (peer, acc) in peers.iter().zip(samples.iter_mut()) {
                let what = format!("{} ({workers} workers), run {}", peer.name(), run + 1);
                eprintln!("{what}");
                let mut failed = |e: anyhow::Error| {
                    eprintln!("  {e:#}");
                    failures.push(format!("{what}: {e:#}"));
                };
                match measure(self, peer, run) {
                    Ok(measured) => {
                        for Measured {
                            scenario,
                            unit,
                            value,
                            steal,
                            attempts,
                        } in measured
                        {
                            let value = value
                                .map_err(|e| failed(e.context(scenario)))
                                .ok()
                                .filter(|v| v.is_finite());
                            let i = match acc.iter().position(|s| s.scenario == scenario) {
                                Some(i) => i,
                                None => {
                                    acc.push(Sample {
                                        scenario,
                                        unit,
                                        runs: vec![None; runs],
                                        steal: vec![None; runs],
                                        attempts: vec![0; runs],
                                    });
                                    acc.len() - 1
                                }
                            };
                            acc[i].runs[run] = value;
                            acc[i].steal[run] = steal;
                            acc[i].attempts[run] = attempts;
                        }
                    }
                    Err(e) => failed(e),
                }
            }
        }
        self.failures.extend(failures);
        for (peer, acc) in peers.iter().zip(samples) {
            for s in acc {
                self.figures.push(figure(workers, peer, s));
            }
        }
    }
}
