//! The figures of a run and the statistics behind them: a `Sample` (the
//! runs of one scenario through one peer) becomes a `Figure` (median, min
//! and max of its rounds), and the latency floor's figures give what each
//! proxy adds over the direct path. Pure: nothing here measures, starts a
//! process or formats the table (that is `scenarios` and `report`).

use serde::Serialize;

use crate::peers::Peer;

/// The runs of one scenario through one peer at one worker count, and
/// their median, min and max: a cell of the table.
#[derive(Serialize, Clone)]
pub struct Figure {
    pub scenario: &'static str,
    pub unit: &'static str,
    pub workers: usize,
    pub peer: String,
    /// One per round of interleaved runs; none where that run failed.
    pub runs: Vec<Option<f64>>,
    /// The share of CPU time the hypervisor stole during each round's
    /// measurement (`None`: not readable, not measured, or the run failed
    /// to start).
    pub steal: Vec<Option<f64>>,
    /// How many attempts each round's measurement took (one stolen from is
    /// run again; see `steal::Retry`).
    pub attempts: Vec<usize>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The runs of one scenario through one peer.
#[derive(Clone)]
pub struct Sample {
    pub scenario: &'static str,
    pub unit: &'static str,
    /// Indexed by round, as are `steal` and `attempts`.
    pub runs: Vec<Option<f64>>,
    pub steal: Vec<Option<f64>>,
    pub attempts: Vec<usize>,
}

/// `sample`, measured through `peer` with `workers` workers, summarised.
pub fn figure(workers: usize, peer: &Peer, sample: Sample) -> Figure {
    let (median, min, max) = summary(sample.runs.iter().flatten().copied());
    Figure {
        scenario: sample.scenario,
        unit: sample.unit,
        workers,
        peer: peer.name(),
        min,
        max,
        median,
        runs: sample.runs,
        steal: sample.steal,
        attempts: sample.attempts,
    }
}

/// The median of sorted values (the mean of the middle two for an even
/// count), NaN for none.
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Median, min and max of the finite values (NaN each for none).
pub fn summary(values: impl IntoIterator<Item = f64>) -> (f64, f64, f64) {
    let mut sorted: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let edge = |v: Option<&f64>| v.copied().unwrap_or(f64::NAN);
    (median(&sorted), edge(sorted.first()), edge(sorted.last()))
}

/// The latency floor's quantiles.
pub const FLOOR: [(&str, f64); 2] = [
    (
        "latency floor p50 (1 connection, 1 request at a time)",
        0.50,
    ),
    (
        "latency floor p99 (1 connection, 1 request at a time)",
        0.99,
    ),
];

/// What each proxy adds to the latency floor over the direct path, round
/// by round (the rounds are interleaved, so a drift of the machine lands
/// on both sides of each difference).
pub fn added_over_direct(figures: &[Figure], workers: usize) -> Vec<Figure> {
    let names = [
        ("latency added over direct, p50", FLOOR[0].0),
        ("latency added over direct, p99", FLOOR[1].0),
    ];
    let mut out = Vec::new();
    for (added, floor) in names {
        let of = |f: &&Figure| f.scenario == floor && f.workers == workers;
        let Some(direct) = figures.iter().filter(of).find(|f| f.peer == "direct") else {
            continue;
        };
        for f in figures.iter().filter(of).filter(|f| f.peer != "direct") {
            let runs: Vec<Option<f64>> = f
                .runs
                .iter()
                .zip(&direct.runs)
                .map(|(a, b)| Some((*a)? - (*b)?))
                .collect();
            let (median, min, max) = summary(runs.iter().flatten().copied());
            out.push(Figure {
                scenario: added,
                unit: "µs",
                workers,
                peer: f.peer.clone(),
                runs,
                steal: f.steal.clone(),
                attempts: f.attempts.clone(),
                median,
                min,
                max,
            });
        }
    }
    out
}

/// The runs of a sample of `scenario`, one attempt each (for tests).
#[cfg(test)]
pub fn sample(
    scenario: &'static str,
    unit: &'static str,
    runs: Vec<Option<f64>>,
    steal: Vec<Option<f64>>,
) -> Sample {
    Sample {
        scenario,
        unit,
        attempts: vec![1; runs.len()],
        runs,
        steal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_no_runs() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
        assert!(median(&[]).is_nan());
    }

    /// What a proxy adds over the direct path is taken round by round, and
    /// a round either side missed is left out.
    #[test]
    fn added_latency_is_the_difference_of_each_round() {
        let floor = |peer: &Peer, runs: Vec<Option<f64>>| {
            let steal = vec![None; runs.len()];
            figure(1, peer, sample(FLOOR[0].0, "µs", runs, steal))
        };
        let figures = [
            floor(&Peer::Direct, vec![Some(20.0), Some(30.0), None]),
            floor(
                &Peer::Lbd("io_uring"),
                vec![Some(35.0), Some(40.0), Some(50.0)],
            ),
            floor(
                &Peer::Haproxy { splice: false },
                vec![Some(40.0), Some(50.0), Some(60.0)],
            ),
        ];
        let added = added_over_direct(&figures, 1);
        assert_eq!(added.len(), 2, "one per proxy, p50 only here");
        let lbd = added.iter().find(|f| f.peer == "lbd-io_uring").unwrap();
        assert_eq!(lbd.scenario, "latency added over direct, p50");
        assert_eq!(lbd.runs, vec![Some(15.0), Some(10.0), None]);
        assert!((lbd.median - 12.5).abs() < 1e-9, "{}", lbd.median);
        assert!(added_over_direct(&figures, 2).is_empty(), "no such workers");
    }
}
