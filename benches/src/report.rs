//! The table: renders the figures as the markdown of RESULTS.md, with
//! lbd's ratio to the peer each figure's target names (round by round),
//! the targets and whether they were met, the header's line on CPU steal
//! and the runs that failed; and `version`, a tool's version line for the
//! header. It measures nothing (that is `scenarios`) and makes no figure
//! (that is `stats`).

use std::collections::BTreeMap;
use std::process::Command;

use crate::peers::Peer;
use crate::stats::{summary, Figure};
use crate::steal;

/// A value as the table shows it: as many decimals as its unit needs, a
/// dash for none.
fn fmt_value(v: f64, unit: &str) -> String {
    if v.is_nan() {
        return "–".into();
    }
    match unit {
        "Gbit/s" | "s/GB" | "µs/req" => format!("{v:.2}"),
        "µs/conn" | "µs" => format!("{v:.1}"),
        _ => format!("{v:.0}"),
    }
}

/// `peer`'s figure over its reference's, round by round: median, min and
/// max of the ratios of the rounds both measured. Rounds are interleaved,
/// so the two runs of a round were minutes apart, and a drift of the shared
/// machine over a longer time cancels out of each ratio.
fn ratio(
    figures: &[Figure],
    scenario: &str,
    workers: usize,
    peer: &str,
) -> Option<(f64, f64, f64)> {
    paired(figures, scenario, workers, peer, |a, b| {
        (b > 0.0).then(|| a / b)
    })
}

/// `peer`'s figure minus its reference's, round by round (median, min,
/// max). For figures that are themselves differences, such as latency
/// added over the direct path: those can be zero or below by noise, where
/// a ratio means nothing.
fn difference(
    figures: &[Figure],
    scenario: &str,
    workers: usize,
    peer: &str,
) -> Option<(f64, f64, f64)> {
    paired(figures, scenario, workers, peer, |a, b| Some(a - b))
}

/// `compare(ours, theirs)` for each round both `peer` and the reference
/// measured, summarised.
fn paired(
    figures: &[Figure],
    scenario: &str,
    workers: usize,
    peer: &str,
    compare: impl Fn(f64, f64) -> Option<f64>,
) -> Option<(f64, f64, f64)> {
    let runs_of = |name: &str| {
        figures
            .iter()
            .find(|g| g.scenario == scenario && g.workers == workers && g.peer == name)
            .map(|g| &g.runs)
    };
    let (ours, theirs) = (runs_of(peer)?, runs_of(reference(scenario))?);
    let compared = ours
        .iter()
        .zip(theirs)
        .filter_map(|(a, b)| compare((*a)?, (*b)?));
    let (median, min, max) = summary(compared);
    median.is_finite().then_some((median, min, max))
}

/// The peer a figure's target compares with: HAProxy with splice for
/// bulk transfers (and their CPU cost), nginx stream for UDP (HAProxy has
/// none), HAProxy otherwise.
fn reference(scenario: &str) -> &'static str {
    if scenario.starts_with("bulk") || scenario.starts_with("CPU seconds per GB") {
        "haproxy-splice"
    } else if scenario.starts_with("UDP") {
        "nginx-stream"
    } else {
        "haproxy"
    }
}

/// How a target bounds lbd against its reference.
#[derive(Clone, Copy)]
enum Bound {
    /// lbd / reference at least this.
    AtLeast(f64),
    /// lbd / reference at most this.
    AtMost(f64),
    /// lbd − reference at most zero, in the figure's unit: for figures that
    /// are differences themselves (latency added over direct).
    NoMoreThanReference,
}

/// The performance targets (issue 6, restated in issue 29): figure
/// prefix and bound.
const TARGETS: &[(&str, Bound)] = &[
    ("keep-alive requests/s", Bound::AtLeast(1.0)),
    ("new connections/s", Bound::AtLeast(1.0)),
    ("bulk Gbit/s", Bound::AtLeast(1.1)),
    ("latency p99 at", Bound::AtMost(1.0)),
    ("latency added over direct", Bound::NoMoreThanReference),
    ("UDP datagrams/s", Bound::AtLeast(1.5)),
    ("memory per idle connection", Bound::AtMost(1.0)),
];

/// One cell of the targets table: lbd against the reference, the spread
/// over rounds, and the verdict.
fn target_cell(figures: &[Figure], f: &Figure, bound: Bound, peer: &str) -> String {
    let compared = match bound {
        Bound::NoMoreThanReference => difference(figures, f.scenario, f.workers, peer),
        _ => ratio(figures, f.scenario, f.workers, peer),
    };
    let Some((v, lo, hi)) = compared else {
        return "–".into();
    };
    let meets = |x: f64| match bound {
        Bound::AtLeast(b) => x >= b,
        Bound::AtMost(b) => x <= b,
        Bound::NoMoreThanReference => x <= 0.0,
    };
    let (value, spread) = match bound {
        Bound::NoMoreThanReference => (
            format!("{v:+.1} {}", f.unit),
            format!(" ({lo:+.1}–{hi:+.1})"),
        ),
        _ => (format!("{v:.2}×"), format!(" ({lo:.2}–{hi:.2})")),
    };
    // Firm when every round falls on the same side as the median.
    let firm = meets(lo) == meets(hi);
    format!(
        "{value}{} {}{}",
        if lo < hi { spread.as_str() } else { "" },
        if meets(v) { "met" } else { "not met" },
        if firm { "" } else { ", not firm" }
    )
}

/// A table of every target, per figure, worker count and engine.
fn targets(figures: &[Figure]) -> String {
    let mut out = String::from(
        "\n## Targets\n\n| figure | workers | target | lbd-io_uring | lbd-epoll |\n|---|---|---|---|---|\n",
    );
    let mut seen: Vec<(&str, usize)> = Vec::new();
    for f in figures {
        let Some(&(_, bound)) = TARGETS.iter().find(|t| f.scenario.starts_with(t.0)) else {
            continue;
        };
        if seen.contains(&(f.scenario, f.workers)) {
            continue;
        }
        seen.push((f.scenario, f.workers));
        let target = match bound {
            Bound::AtLeast(b) => format!("≥ {b}× {}", reference(f.scenario)),
            Bound::AtMost(b) => format!("≤ {b}× {}", reference(f.scenario)),
            Bound::NoMoreThanReference => format!("≤ {}'s", reference(f.scenario)),
        };
        out.push_str(&format!(
            "| {} | {} | {target} | {} | {} |\n",
            f.scenario,
            f.workers,
            target_cell(figures, f, bound, "lbd-io_uring"),
            target_cell(figures, f, bound, "lbd-epoll"),
        ));
    }
    out
}

/// Steal during the measurements behind the figures `of` picks: median
/// and max, reruns, and how many were kept above `retry`'s limit.
fn steal_summary(
    figures: &[Figure],
    of: impl Fn(&Figure) -> bool,
    retry: steal::Retry,
) -> Option<String> {
    let picked = || figures.iter().filter(|f| of(f));
    let steals: Vec<f64> = picked()
        .flat_map(|f| f.steal.iter().flatten().copied())
        .collect();
    let above = steals.iter().filter(|&&s| s > retry.limit).count();
    let reruns: usize = picked()
        .flat_map(|f| f.attempts.iter())
        .map(|a| a.saturating_sub(1))
        .sum();
    let (median, _, max) = summary(steals.iter().copied());
    median.is_finite().then(|| {
        format!(
            "median {:.1}%, max {:.1}% over {}; {reruns} rerun(s); {above} kept above {:.0}%",
            median * 100.0,
            max * 100.0,
            steals.len(),
            retry.limit * 100.0
        )
    })
}

/// The header's line on CPU steal, or nothing where it was not readable.
fn steal_note(figures: &[Figure]) -> String {
    let (throughput, latency) = (steal::Retry::THROUGHPUT, steal::Retry::LATENCY);
    let parts: Vec<String> = [
        // Each throughput scenario has its own steal, and a CPU cost figure
        // shares its run's.
        steal_summary(
            figures,
            |f| !f.scenario.starts_with("latency") && !f.scenario.starts_with("CPU "),
            throughput,
        )
        .map(|s| format!("throughput measurements: {s}")),
        // The quantiles of a latency run share its steal: count one.
        steal_summary(
            figures,
            |f| f.scenario == "latency p99 at fixed load",
            latency,
        )
        .map(|s| format!("latency runs: {s}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        return String::new();
    }
    format!(
        "- CPU steal (the share of this machine's CPU time its hypervisor gave to others; a stall it causes sets a tail latency figure by itself and lowers throughput): {}. \
         A measurement with more steal than its limit was run again, keeping the least stolen attempt: a throughput scenario above {:.0}% up to {} attempts, a latency run (from a fresh start) above {:.0}% up to {}\n",
        parts.join("; "),
        throughput.limit * 100.0,
        throughput.attempts,
        latency.limit * 100.0,
        latency.attempts,
    )
}

/// RESULTS.md: `header`, the line on CPU steal, a row per figure and
/// worker count with a column per peer of `peers` and lbd's ratios, the
/// targets, then the peers `missing` and the runs that `failures` lists.
pub fn render(
    figures: &[Figure],
    peers: &[Peer],
    missing: &[String],
    failures: &[String],
    header: &str,
) -> String {
    let mut out = String::from(header);
    out.push_str(&steal_note(figures));
    let names: Vec<String> = peers.iter().map(Peer::name).collect();
    out.push_str(&format!(
        "\n| figure | workers | {} | vs | lbd-io_uring / vs | lbd-epoll / vs |\n",
        names.join(" | ")
    ));
    out.push_str(&format!(
        "|---|---|{}---|---|---|\n",
        "---|".repeat(names.len())
    ));
    let mut rows: BTreeMap<(usize, &str, usize), Vec<&Figure>> = BTreeMap::new();
    let order = |s: &str| figures.iter().position(|f| f.scenario == s).unwrap_or(0);
    for f in figures {
        rows.entry((order(f.scenario), f.scenario, f.workers))
            .or_default()
            .push(f);
    }
    for ((_, scenario, workers), fs) in rows {
        let unit = fs[0].unit;
        let get = |name: &str| fs.iter().find(|f| f.peer == name);
        let cells: Vec<String> = names
            .iter()
            .map(|n| match get(n) {
                Some(f) if f.runs.iter().flatten().count() > 1 => format!(
                    "{} ({}–{})",
                    fmt_value(f.median, unit),
                    fmt_value(f.min, unit),
                    fmt_value(f.max, unit)
                ),
                Some(f) => fmt_value(f.median, unit),
                None => "n/a".into(),
            })
            .collect();
        let reference = reference(scenario);
        let ratio = |n: &str| match ratio(figures, scenario, workers, n) {
            Some((r, _, _)) => format!("{r:.2}×"),
            None => "–".into(),
        };
        out.push_str(&format!(
            "| {scenario} ({unit}) | {workers} | {} | {reference} | {} | {} |\n",
            cells.join(" | "),
            ratio("lbd-io_uring"),
            ratio("lbd-epoll")
        ));
    }
    out.push_str(&targets(figures));
    if !missing.is_empty() {
        out.push_str(&format!(
            "\nMissing peers (not measured): {}.\n",
            missing.join("; ")
        ));
    }
    if !failures.is_empty() {
        out.push_str("\nRuns that failed (left out of their figures):\n\n");
        for f in failures {
            out.push_str(&format!("- {f}\n"));
        }
    }
    out
}

/// The first line `cmd args` prints (on stdout, or on stderr where stdout
/// is empty), or "missing" where it does not run.
pub fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|_| "missing".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{figure, sample};

    #[test]
    fn each_figure_is_compared_with_the_peer_its_target_names() {
        assert_eq!(reference("keep-alive requests/s"), "haproxy");
        assert_eq!(reference("new connections/s"), "haproxy");
        assert_eq!(reference("bulk Gbit/s, 1 stream"), "haproxy-splice");
        assert_eq!(reference("CPU seconds per GB (1 stream)"), "haproxy-splice");
        assert_eq!(
            reference("UDP datagrams/s (one-way, reached the sink)"),
            "nginx-stream"
        );
        assert_eq!(
            reference("UDP datagrams/s (download, reached the clients)"),
            "nginx-stream"
        );
    }

    /// The header says how much CPU time was stolen during the measurements
    /// behind the throughput and latency figures, how many were run again
    /// and how many stayed above their limit; nothing where steal could not
    /// be read.
    #[test]
    fn steal_is_summarised_per_kind_of_run() {
        let lbd = Peer::Lbd("epoll");
        let mut lat = sample(
            "latency p99 at fixed load",
            "µs",
            vec![Some(300.0); 3],
            vec![Some(0.002), Some(0.004), Some(0.03)],
        );
        lat.attempts = vec![1, 2, 3];
        let mut bulk = sample(
            "bulk Gbit/s, 8 streams",
            "Gbit/s",
            vec![Some(9.0)],
            vec![Some(0.01)],
        );
        bulk.attempts = vec![2];
        // Shares the bulk run's steal and attempts: not counted twice.
        let mut cpu = sample(
            "CPU seconds per GB (1 stream)",
            "s/GB",
            vec![Some(0.5)],
            vec![Some(0.5)],
        );
        cpu.attempts = vec![2];
        let figures = [
            figure(
                1,
                &lbd,
                sample(
                    "keep-alive requests/s",
                    "req/s",
                    vec![Some(1.0)],
                    vec![Some(0.1)],
                ),
            ),
            figure(1, &lbd, bulk),
            figure(1, &lbd, cpu),
            figure(
                1,
                &lbd,
                sample(
                    "memory per idle connection",
                    "bytes",
                    vec![Some(2000.0)],
                    vec![None],
                ),
            ),
            figure(1, &lbd, lat),
        ];
        let note = steal_note(&figures);
        assert!(
            note.contains("throughput measurements: median 5.5%, max 10.0% over 2; 1 rerun(s); 1 kept above 2%"),
            "{note}"
        );
        assert!(
            note.contains(
                "latency runs: median 0.4%, max 3.0% over 3; 3 rerun(s); 1 kept above 1%"
            ),
            "{note}"
        );
        assert!(note.contains("above 2% up to 2 attempts"), "{note}");
        assert!(note.contains("above 1% up to 3"), "{note}");
        assert!(render(&figures, &[Peer::Lbd("epoll")], &[], &[], "").contains(&note));
        let unread = [figure(
            1,
            &lbd,
            sample(
                "keep-alive requests/s",
                "req/s",
                vec![Some(1.0)],
                vec![None],
            ),
        )];
        assert_eq!(steal_note(&unread), "");
    }

    /// A figure left out because its run failed is listed with the reason,
    /// next to the table that shows it as missing.
    #[test]
    fn failed_runs_are_listed_with_their_reason() {
        let peers = [Peer::Lbd("epoll"), Peer::Haproxy { splice: true }];
        let figures = vec![figure(
            1,
            &peers[0],
            sample(
                "keep-alive requests/s",
                "req/s",
                vec![Some(50_000.0)],
                vec![None],
            ),
        )];
        let failures =
            ["haproxy-splice (1 workers), run 1: 127.0.0.1:20080 never accepted".to_owned()];
        let table = render(&figures, &peers, &[], &failures, "");
        assert!(
            table.contains("| keep-alive requests/s (req/s) | 1 | 50000 | n/a |"),
            "{table}"
        );
        assert!(table.contains("Runs that failed"), "{table}");
        assert!(table.contains(&format!("- {}", failures[0])), "{table}");
        assert!(!render(&figures, &peers, &[], &[], "").contains("Runs that failed"));
    }

    /// Ratios pair the runs of one round, skip rounds either side lacks,
    /// and report their median and spread (here the ratio of the medians
    /// would be 45 / 50 = 0.9, though lbd led in two of three rounds).
    #[test]
    fn ratios_pair_runs_of_the_same_round() {
        let lbd = Peer::Lbd("epoll");
        let haproxy = Peer::Haproxy { splice: false };
        let fig = |peer, runs: Vec<_>| {
            let steal = vec![None; runs.len()];
            figure(
                1,
                peer,
                sample("keep-alive requests/s", "req/s", runs, steal),
            )
        };
        let figures = [
            fig(&lbd, vec![Some(60.0), Some(30.0), Some(45.0), Some(99.0)]),
            fig(&haproxy, vec![Some(50.0), Some(25.0), Some(50.0), None]),
        ];
        let (median, min, max) = ratio(&figures, "keep-alive requests/s", 1, "lbd-epoll").unwrap();
        assert!((median - 1.2).abs() < 1e-9, "{median}");
        assert!((min - 0.9).abs() < 1e-9, "{min}");
        assert!((max - 1.2).abs() < 1e-9, "{max}");
        assert_eq!(
            ratio(&figures, "keep-alive requests/s", 2, "lbd-epoll"),
            None
        );
        let targets = targets(&figures);
        // A spread that crosses the target (1.0×) makes the verdict not firm.
        assert!(
            targets.contains("| 1.20× (0.90–1.20) met, not firm |"),
            "{targets}"
        );
        let above = [
            fig(&lbd, vec![Some(65.0), Some(44.0)]),
            fig(&haproxy, vec![Some(50.0), Some(40.0)]),
        ];
        let targets = super::targets(&above);
        assert!(targets.contains("| 1.20× (1.10–1.30) met |"), "{targets}");
    }

    /// What lbd adds over the direct path is compared with what HAProxy
    /// adds as a difference, round by round: a proxy can add nothing or
    /// "less than nothing" by noise, where a ratio would mean nothing (a
    /// negative ratio once read as "met").
    #[test]
    fn added_latency_is_compared_as_a_difference_round_by_round() {
        let added = |peer: &Peer, runs: Vec<Option<f64>>| {
            let steal = vec![None; runs.len()];
            let name = "latency added over direct, p50";
            figure(1, peer, sample(name, "µs", runs, steal))
        };
        let haproxy = added(
            &Peer::Haproxy { splice: false },
            vec![Some(20.0), Some(-2.0), Some(20.0), None],
        );
        let lbd = |runs| added(&Peer::Lbd("io_uring"), runs);
        let name = "latency added over direct, p50";
        let figures = [
            lbd(vec![Some(15.0), Some(1.0), Some(10.0), None]),
            haproxy.clone(),
        ];
        let (d, lo, hi) = difference(&figures, name, 1, "lbd-io_uring").unwrap();
        assert_eq!((d, lo, hi), (-5.0, -10.0, 3.0));
        let table = targets(&figures);
        assert!(table.contains("| ≤ haproxy's |"), "{table}");
        assert!(
            table.contains("| -5.0 µs (-10.0–+3.0) met, not firm |"),
            "{table}"
        );
        // Adding more than HAProxy in every round is not met, firmly.
        let worse = [lbd(vec![Some(25.0), Some(0.0), Some(30.0), None]), haproxy];
        let table = targets(&worse);
        assert!(
            table.contains("| +5.0 µs (+2.0–+10.0) not met |"),
            "{table}"
        );
    }
}
