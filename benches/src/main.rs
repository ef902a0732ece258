//! `lb-bench`: runs `lbd` (io_uring and epoll), HAProxy (splice on and
//! off), nginx stream and a direct path on this machine, in one run with
//! the same worker count, and prints one markdown table with ratios; writes
//! the raw figures as JSON and the table to `benches/RESULTS.md`.
//!
//! Every figure is labelled with its setup (loopback or network
//! namespaces, workers). Traffic goes to 127.0.0.0/8, or with `--setup
//! netns` to addresses inside the three namespaces the run creates, only.

mod controller_scale;
mod interrupt;
mod load;
mod peers;
mod placement;
mod steal;
mod topo;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::{Parser, Subcommand};
use peers::Peer;
use serde::Serialize;
use topo::{Side, Topology};

#[derive(Parser)]
#[command(
    name = "lb-bench",
    about = "Weir against HAProxy and nginx, side by side"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// lb-controller with a burst of Services against its in-memory API
    /// server and a real lbd; writes benches/RESULTS-controller.md.
    ControllerScale(controller_scale::Args),
    /// Run every scenario for every peer and print the table.
    Run {
        /// Worker counts to compare (same for every proxy).
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        workers: Vec<usize>,
        /// Measured runs per figure (median and spread are reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds per measured run.
        #[arg(long, default_value_t = 5)]
        duration: u64,
        /// Idle connections for the memory figure.
        #[arg(long, default_value_t = 10_000)]
        idle: usize,
        /// Where clients, proxies and backends run: all on loopback, or in
        /// three network namespaces joined by veth pairs at MTU 1500 (needs
        /// root).
        #[arg(long, value_enum, default_value_t = Setup::Loopback)]
        setup: Setup,
        /// Where the markdown table goes [default: benches/RESULTS.md, or
        /// benches/RESULTS-netns.md for `--setup netns`].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// UDP echo server (the UDP backend).
    UdpEcho {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// Closed-loop UDP request/response against one target; prints datagrams/s.
    UdpRr {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 32)]
        clients: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// One-way UDP senders against one target, counted at a sink this
    /// command binds (where the target forwards); prints datagrams/s.
    UdpOneway {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "127.0.0.2:15354")]
        sink: SocketAddr,
        #[arg(long, default_value_t = 4)]
        senders: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// UDP download clients against one target; a source this command binds
    /// (where the target forwards) floods each client with replies; prints
    /// the datagrams/s the clients received.
    UdpDownload {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "127.0.0.2:15355")]
        source: SocketAddr,
        #[arg(long, default_value_t = 4)]
        clients: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Fixed-rate HTTP keep-alive client against one target; prints p50, p99
    /// and p99.9 latency in µs (the latency figure's client, on its own).
    HttpLatency {
        #[arg(long)]
        target: SocketAddr,
        /// Requests per second, over all connections.
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Loopback,
    Netns,
}

#[derive(Serialize, Clone)]
struct Figure {
    scenario: &'static str,
    unit: &'static str,
    workers: usize,
    peer: String,
    /// One per round of interleaved runs; none where that run failed.
    runs: Vec<Option<f64>>,
    /// The share of CPU time the hypervisor stole during each round's
    /// measurement (`None`: not readable, not measured, or the run failed
    /// to start).
    steal: Vec<Option<f64>>,
    /// How many attempts each round's measurement took (one stolen from is
    /// run again; see `steal::Retry`).
    attempts: Vec<usize>,
    median: f64,
    min: f64,
    max: f64,
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
fn summary(values: impl IntoIterator<Item = f64>) -> (f64, f64, f64) {
    let mut sorted: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let edge = |v: Option<&f64>| v.copied().unwrap_or(f64::NAN);
    (median(&sorted), edge(sorted.first()), edge(sorted.last()))
}

fn figure(workers: usize, peer: &Peer, sample: Sample) -> Figure {
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

/// Requests (or connections, with `close`) per second, and how many were
/// completed.
fn wrk(target: SocketAddr, seconds: u64, close: bool) -> anyhow::Result<(f64, f64)> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "-c64", &format!("-d{seconds}s")]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(format!("http://{target}/")).output()?;
    wrk_figures(&String::from_utf8_lossy(&out.stdout))
}

/// The rate and the count of completed requests in wrk's report.
fn wrk_figures(text: &str) -> anyhow::Result<(f64, f64)> {
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:").map(str::trim))
        .ok_or_else(|| anyhow::anyhow!("wrk printed no rate: {text}"))?
        .parse::<f64>()?;
    let done = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").map(|(n, _)| n))
        .ok_or_else(|| anyhow::anyhow!("wrk printed no request count: {text}"))?
        .parse::<f64>()?;
    Ok((rate, done))
}

/// Gbit/s and bytes received through `target` with `streams` parallel streams.
fn iperf(target: SocketAddr, seconds: u64, streams: usize) -> anyhow::Result<(f64, f64)> {
    let out = Command::new("iperf3")
        .args([
            "-c",
            &target.ip().to_string(),
            "-p",
            &target.port().to_string(),
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let sum = &v["end"]["sum_received"];
    let bps = sum["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("iperf3: {}", v["error"]))?;
    Ok((bps / 1e9, sum["bytes"].as_f64().unwrap_or(0.0)))
}

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

/// Measures one throughput scenario into `out`, run again when stolen from.
fn scenario(
    out: &mut Vec<Measured>,
    scenario: &'static str,
    unit: &'static str,
    measure: impl FnMut() -> anyhow::Result<f64>,
) {
    let kept = retried(scenario, steal::Retry::THROUGHPUT, measure);
    out.push(Measured {
        scenario,
        unit,
        value: kept.value,
        steal: kept.steal,
        attempts: kept.made,
    });
}

/// Measures a throughput scenario (run again when stolen from) whose run
/// also says how much work it moved (requests, connections, bytes), and
/// the CPU the proxy's processes (`pids`) spent on it, as `cost(cpu
/// seconds, work)`: two figures from one run, sharing its steal. No cost
/// figure for the direct path (no `pids`) or a run that failed.
fn scenario_with_cost(
    out: &mut Vec<Measured>,
    pids: &[u32],
    (scenario, unit): (&'static str, &'static str),
    (cost_scenario, cost_unit): (&'static str, &'static str),
    cost: fn(f64, f64) -> f64,
    mut measure: impl FnMut() -> anyhow::Result<(f64, f64)>,
) {
    let kept = retried(scenario, steal::Retry::THROUGHPUT, || {
        let before = peers::cpu_seconds(pids);
        let run = measure();
        let spent = match &run {
            Ok((_, work)) if !pids.is_empty() && *work > 0.0 => {
                Some(cost(peers::cpu_seconds(pids) - before, *work))
            }
            _ => None,
        };
        (run.map(|r| r.0), spent)
    });
    let ((value, spent), steal, attempts) = (kept.value, kept.steal, kept.made);
    out.push(Measured {
        scenario,
        unit,
        value,
        steal,
        attempts,
    });
    if let Some(spent) = spent {
        out.push(Measured {
            scenario: cost_scenario,
            unit: cost_unit,
            value: Ok(spent),
            steal,
            attempts,
        });
    }
}

/// CPU microseconds per request (or connection).
fn micros_per(cpu: f64, done: f64) -> f64 {
    cpu * 1e6 / done
}

/// CPU seconds per GB.
fn seconds_per_gb(cpu: f64, bytes: f64) -> f64 {
    cpu / (bytes / 1e9)
}

/// The runs of one scenario through one peer.
#[derive(Clone)]
struct Sample {
    scenario: &'static str,
    unit: &'static str,
    /// Indexed by round, as are `steal` and `attempts`.
    runs: Vec<Option<f64>>,
    steal: Vec<Option<f64>>,
    attempts: Vec<usize>,
}

struct Bench {
    runs: usize,
    seconds: u64,
    site: peers::Site,
    sink: load::UdpSink,
    /// The processes of the HTTP backend (nginx), held to their CPUs
    /// during the latency runs.
    backend: Vec<u32>,
    /// The CPUs this run may use.
    cpus: Vec<usize>,
    figures: Vec<Figure>,
    /// Runs, or scenarios within runs, that produced no figure, and why.
    failures: Vec<String>,
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

    /// Throughput figures of every peer, each run on a fresh start with a
    /// discarded warm-up. Memory per idle connection is measured in the
    /// first run only (it does not vary by run).
    fn throughput(&mut self, peers: &[Peer], workers: usize) {
        self.interleaved(peers, workers, self.runs, |b, peer, run| {
            b.throughput_once(peer, workers, run == 0)
        });
    }

    /// One run of every throughput scenario through `peer`.
    fn throughput_once(
        &self,
        peer: &Peer,
        workers: usize,
        memory: bool,
    ) -> anyhow::Result<Vec<Measured>> {
        let running = peers::start(peer, workers, &self.site)?;
        self.site.topo.within(Side::Client, || {
            self.measure_throughput(peer, running.as_ref(), memory)
        })?
    }

    /// The throughput scenarios through `peer` (started as `running`), from
    /// the client side, each run again when stolen from.
    fn measure_throughput(
        &self,
        peer: &Peer,
        running: Option<&peers::Running>,
        memory: bool,
    ) -> anyhow::Result<Vec<Measured>> {
        let topo = &self.site.topo;
        let (http, bulk, udp) = peer.targets(topo);
        let s = self.seconds;
        let mut out = Vec::new();
        let _ = wrk(http, 1, false); // warm-up, discarded

        // Each run gives its rate and, from the proxy's CPU over the same
        // run, what one unit of it cost.
        let pids = running.map(|r| r.pids()).unwrap_or_default();
        scenario_with_cost(
            &mut out,
            &pids,
            ("keep-alive requests/s", "req/s"),
            ("CPU µs per request (keep-alive)", "µs/req"),
            micros_per,
            || wrk(http, s, false),
        );
        scenario_with_cost(
            &mut out,
            &pids,
            ("new connections/s", "conn/s"),
            ("CPU µs per new connection", "µs/conn"),
            micros_per,
            || wrk(http, s, true),
        );
        scenario_with_cost(
            &mut out,
            &pids,
            ("bulk Gbit/s, 1 stream", "Gbit/s"),
            ("CPU seconds per GB (1 stream)", "s/GB"),
            seconds_per_gb,
            || iperf(bulk, s, 1),
        );
        scenario(&mut out, "bulk Gbit/s, 8 streams", "Gbit/s", || {
            iperf(bulk, s, 8).map(|r| r.0)
        });
        if !matches!(peer, Peer::Haproxy { .. }) {
            let d = Duration::from_secs(s);
            scenario(
                &mut out,
                "UDP datagrams/s (request/response)",
                "dgram/s",
                || load::udp_rr(udp, 32, d),
            );
            scenario(
                &mut out,
                "UDP datagrams/s (one-way, delivered)",
                "dgram/s",
                || load::udp_oneway(peer.oneway_target(topo), &self.sink, 4, d),
            );
            let source = topo.backend(peers::BACKEND_UDP_SOURCE_PORT);
            scenario(
                &mut out,
                "UDP datagrams/s (download, delivered)",
                "dgram/s",
                || {
                    topo.within(Side::Backend, || UdpSocket::bind(source))
                        .and_then(|bound| bound.map_err(Into::into))
                        .and_then(|src| load::udp_download(peer.download_target(topo), src, 4, d))
                },
            );
        }
        if let (true, Some(r)) = (memory, running) {
            // A size, not a rate: steal does not bend it, so it is neither
            // measured nor retried.
            out.push(Measured {
                scenario: "memory per idle connection",
                unit: "bytes",
                value: self.idle_memory(r, http),
                steal: None,
                attempts: 1,
            });
        }
        Ok(out)
    }

    /// RSS growth of `proxy`'s processes per idle connection, with
    /// `site.idle` connections held open through `http`. Measured once the
    /// backend has accepted every one of them from the proxy: a proxy that
    /// left some in its accept queue, or refused them, would look cheaper.
    /// Runs on the client side.
    fn idle_memory(&self, proxy: &peers::Running, http: SocketAddr) -> anyhow::Result<f64> {
        let (idle, topo) = (self.site.idle, &self.site.topo);
        let backend = topo.backend(peers::BACKEND_HTTP_PORT);
        // The backend's connection table is its namespace's.
        let established = || topo.within(Side::Backend, || load::established_at(backend))?;
        let base = established()?;
        let before = peers::rss_kib(&proxy.pids());
        let conns = load::idle_connections(http, idle)?;
        // Stops early on an error reading the table, which is then returned.
        let mut counted = Ok(0);
        peers::wait_for(Duration::from_secs(30), || {
            counted = established().map(|n| n.saturating_sub(base));
            counted.as_ref().map_or(true, |&n| n >= idle)
        });
        let proxied = counted?;
        anyhow::ensure!(
            proxied >= idle,
            "only {proxied} of {idle} idle connections reached the backend within 30 s"
        );
        // Let lazily allocated per-connection state settle before sampling.
        std::thread::sleep(Duration::from_secs(1));
        let after = peers::rss_kib(&proxy.pids());
        drop(conns);
        Ok((after.saturating_sub(before) as f64 * 1024.0) / idle as f64)
    }

    /// Latency at a fixed offered load, at least 5 runs per peer; a run
    /// that was stolen from is run again, from a fresh start (see
    /// `steal::Retry::LATENCY`). The client, the backend and the proxy are
    /// held to the CPUs of `placement` meanwhile (see `placement`); the
    /// backend gets all of them back afterwards.
    fn latency(&mut self, peers: &[Peer], workers: usize, rate: f64) {
        let place = placement::Placement::plan(&self.cpus, workers);
        if let Some(place) = &place {
            if let Err(e) = placement::pin(&self.backend, &place.backend) {
                self.failures
                    .push(format!("latency ({workers} workers): {e:#}"));
                return;
            }
        }
        self.interleaved(peers, workers, latency_runs(self.runs), |b, peer, _| {
            let kept = retried("latency", steal::Retry::LATENCY, || {
                let running = peers::start(peer, workers, &b.site)?;
                let (http, _, _) = peer.targets(&b.site.topo);
                let d = Duration::from_secs(b.seconds);
                if let (Some(place), Some(running)) = (&place, &running) {
                    placement::pin(&running.pids(), &place.proxy)?;
                }
                let client = place.as_ref().map_or(&b.cpus[..], |p| &p.client[..]);
                let measure = || load::http_latency(http, rate, 16, d);
                b.site
                    .topo
                    .within(Side::Client, || placement::on(client, measure))??
            });
            let lat = kept.value?;
            Ok([
                ("latency p50 at fixed load", 0.50),
                ("latency p99 at fixed load", 0.99),
                ("latency p99.9 at fixed load", 0.999),
            ]
            .into_iter()
            .map(|(scenario, q)| Measured {
                scenario,
                unit: "µs",
                value: Ok(load::quantile(&lat, q)),
                steal: kept.steal,
                attempts: kept.made,
            })
            .collect())
        });
        if place.is_some() {
            if let Err(e) = placement::pin(&self.backend, &self.cpus) {
                self.failures.push(format!(
                    "backend CPUs after latency ({workers} workers): {e:#}"
                ));
            }
        }
    }
}

fn version(cmd: &str, args: &[&str]) -> String {
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

fn fmt_value(v: f64, unit: &str) -> String {
    if v.is_nan() {
        return "–".into();
    }
    match unit {
        "Gbit/s" | "s/GB" | "µs/req" => format!("{v:.2}"),
        "µs/conn" => format!("{v:.1}"),
        _ => format!("{v:.0}"),
    }
}

/// Latency runs: at least 5, the tail being the noisiest figure.
fn latency_runs(runs: usize) -> usize {
    runs.max(5)
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
    let runs_of = |name: &str| {
        figures
            .iter()
            .find(|g| g.scenario == scenario && g.workers == workers && g.peer == name)
            .map(|g| &g.runs)
    };
    let (ours, theirs) = (runs_of(peer)?, runs_of(reference(scenario))?);
    let ratios = ours.iter().zip(theirs).filter_map(|(a, b)| {
        let (a, b) = ((*a)?, (*b)?);
        (b > 0.0).then(|| a / b)
    });
    let (median, min, max) = summary(ratios);
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

/// The performance targets (issue 6): figure prefix, and the bound on
/// lbd / reference (`true`: at least, `false`: at most).
const TARGETS: &[(&str, f64, bool)] = &[
    ("keep-alive requests/s", 1.25, true),
    ("new connections/s", 1.25, true),
    ("bulk Gbit/s", 1.1, true),
    ("latency p99 at", 0.8, false),
    ("UDP datagrams/s", 1.5, true),
    ("memory per idle connection", 1.0, false),
];

/// A table of every target, per figure, worker count and engine.
fn targets(figures: &[Figure]) -> String {
    let mut out = String::from(
        "\n## Targets\n\n| figure | workers | target | lbd-io_uring | lbd-epoll |\n|---|---|---|---|---|\n",
    );
    let mut seen: Vec<(&str, usize)> = Vec::new();
    for f in figures {
        let Some(&(_, bound, at_least)) = TARGETS.iter().find(|t| f.scenario.starts_with(t.0))
        else {
            continue;
        };
        if seen.contains(&(f.scenario, f.workers)) {
            continue;
        }
        seen.push((f.scenario, f.workers));
        let cell = |peer: &str| match ratio(figures, f.scenario, f.workers, peer) {
            Some((r, lo, hi)) => {
                let meets = |v: f64| if at_least { v >= bound } else { v <= bound };
                let spread = if lo < hi {
                    format!(" ({lo:.2}–{hi:.2})")
                } else {
                    String::new()
                };
                // Firm when every round falls on the same side as the median.
                let firm = meets(lo) == meets(hi);
                format!(
                    "{r:.2}×{spread} {}{}",
                    if meets(r) { "met" } else { "not met" },
                    if firm { "" } else { ", not firm" }
                )
            }
            None => "–".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} {bound}× {} | {} | {} |\n",
            f.scenario,
            f.workers,
            if at_least { "≥" } else { "≤" },
            reference(f.scenario),
            cell("lbd-io_uring"),
            cell("lbd-epoll"),
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

fn render(
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

fn run(
    workers: Vec<usize>,
    runs: usize,
    seconds: u64,
    idle: usize,
    topo: Topology,
    out: &Path,
) -> anyhow::Result<()> {
    for tool in ["wrk", "iperf3", "nginx"] {
        anyhow::ensure!(
            peers::have(tool),
            "{tool} is needed: apt-get install wrk iperf3 nginx-light libnginx-mod-stream haproxy"
        );
    }
    let lbd = std::env::current_exe()?.with_file_name("lbd");
    anyhow::ensure!(
        lbd.exists(),
        "{} not found: build it first (cargo build --release --workspace)",
        lbd.display()
    );
    let all = [
        Peer::Direct,
        Peer::Lbd("io_uring"),
        Peer::Lbd("epoll"),
        Peer::Haproxy { splice: true },
        Peer::Haproxy { splice: false },
        Peer::Nginx,
    ];
    let mut missing = Vec::new();
    let peers: Vec<Peer> = all
        .into_iter()
        .filter(|p| match p.requirement() {
            Some((bin, pkg)) if !peers::have(bin) => {
                missing.push(format!("{} (apt-get install {pkg})", p.name()));
                false
            }
            _ => true,
        })
        .collect();
    let mut site = peers::Site {
        dir: peers::work_dir()?,
        lbd: lbd.clone(),
        idle,
        topo,
    };
    let idle_note = site.fit_open_files()?;
    if let Some(note) = &idle_note {
        eprintln!("note: --idle lowered to {}: {note}", site.idle);
    }
    let idle = site.idle;
    let idle_note = idle_note.map(|n| format!(" ({n})")).unwrap_or_default();
    let backends = peers::start_backends(&site)?;
    // The first is the HTTP backend (nginx: master and worker).
    let backend = backends
        .first()
        .map(peers::Running::pids)
        .unwrap_or_default();
    let sink = site.topo.within(Side::Backend, || {
        load::UdpSink::start(site.topo.backend(peers::BACKEND_UDP_SINK_PORT))
    })??;
    let mut bench = Bench {
        runs,
        seconds,
        site,
        sink,
        backend,
        cpus: placement::allowed()?,
        figures: Vec::new(),
        failures: Vec::new(),
    };
    for &w in &workers {
        bench.throughput(&peers, w);
        // Fixed load: half of the slowest proxy's keep-alive maximum.
        let slowest = bench
            .figures
            .iter()
            .filter(|f| {
                f.workers == w
                    && f.scenario == "keep-alive requests/s"
                    && f.peer != "direct"
                    && f.median.is_finite()
            })
            .map(|f| f.median)
            .fold(f64::INFINITY, f64::min);
        if slowest.is_finite() {
            let rate = (slowest / 2.0).floor();
            eprintln!("latency at {rate} req/s");
            bench.latency(&peers, w, rate);
        }
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let lat_runs = latency_runs(runs);
    let placed = workers
        .iter()
        .filter_map(|&w| {
            placement::Placement::plan(&bench.cpus, w)
                .map(|p| format!("{w} worker(s): {}", p.describe()))
        })
        .collect::<Vec<_>>();
    let placed = if placed.is_empty() {
        "no CPU placement (fewer than 2 CPUs)".to_owned()
    } else {
        format!(
            "during these runs each part is held to its CPUs ({}), the same for every peer, so the scheduler cannot stack them differently from run to run",
            placed.join("; ")
        )
    };
    let setup = bench.site.topo.label();
    let setup_flag = if bench.site.topo.is_netns() {
        " --setup netns"
    } else {
        ""
    };
    let header = format!(
        "# Weir benchmark results\n\n\
         Generated by `lb-bench run{setup_flag}` (do not edit by hand). Setup: {setup}; \
         same worker count for every proxy; logs off; \
         {runs} measured run(s) of {seconds}s per figure, interleaved across peers, each on a fresh start after a discarded warm-up; median (min–max). \
         A ratio is the median of the round-by-round ratios (run k of lbd over run k of the reference), \
         with their min–max in the Targets table.\n\n\
         - date: {}\n- CPU: {cpu} ({} cores)\n- kernel: {}\n- lbd: {}\n- HAProxy: {}\n- nginx: {}\n- wrk: {}\n- iperf3: {}\n\
         - latency: fixed offered load of half the slowest proxy's keep-alive maximum, 16 connections whose schedules are staggered so requests arrive evenly, driven by one thread on a 50 µs tick, timed from each request's scheduled start; {lat_runs} runs interleaved across peers; {placed}\n\
         - memory: RSS growth of the proxy's processes with {idle} idle proxied connections open (each checked to have reached the backend), per connection{idle_note}\n\
         - UDP (HAProxy has no UDP): request/response: 32 closed-loop clients of 64-byte datagrams, echo backend; one-way: 4 senders of 64-byte datagrams as fast as they can, counted at the sink; \
         download: 4 clients each send one request and a source answers each with {}-byte datagrams as fast as it can, counted at the clients\n",
        version("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        version("uname", &["-r"]),
        version(lbd.to_str().unwrap_or("lbd"), &["--version"]),
        version("haproxy", &["-v"]),
        version("nginx", &["-v"]),
        version("wrk", &["-v"]),
        version("iperf3", &["-v"]),
        load::DOWNLOAD_SIZE,
    );
    let table = render(&bench.figures, &peers, &missing, &bench.failures, &header);
    println!("{table}");
    std::fs::write(out, &table)?;
    std::fs::write(
        out.with_extension("json"),
        serde_json::to_vec_pretty(&bench.figures)?,
    )?;
    eprintln!(
        "wrote {} and {}",
        out.display(),
        out.with_extension("json").display()
    );
    let _ = std::fs::remove_dir_all(&bench.site.dir);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::ControllerScale(args) => controller_scale::run(args),
        Cmd::Run {
            workers,
            runs,
            duration,
            idle,
            setup,
            out,
        } => {
            // Before the first namespace or peer exists.
            interrupt::install()?;
            let (topo, default_out) = match setup {
                Setup::Loopback => (Topology::loopback(), "benches/RESULTS.md"),
                Setup::Netns => (Topology::netns()?, "benches/RESULTS-netns.md"),
            };
            let out = out.unwrap_or_else(|| default_out.into());
            let (runs, seconds, idle) = (runs.max(1), duration.max(1), idle.max(1));
            run(workers, runs, seconds, idle, topo, &out)
        }
        Cmd::UdpEcho { addr } => load::udp_echo(addr, 1),
        Cmd::UdpRr {
            target,
            clients,
            seconds,
        } => {
            anyhow::ensure!(target.ip().is_loopback(), "loopback targets only");
            println!(
                "{:.0}",
                load::udp_rr(target, clients, Duration::from_secs(seconds))?
            );
            Ok(())
        }
        Cmd::UdpOneway {
            target,
            sink,
            senders,
            seconds,
        } => {
            anyhow::ensure!(
                target.ip().is_loopback() && sink.ip().is_loopback(),
                "loopback targets only"
            );
            let sink = load::UdpSink::start(sink)?;
            let d = Duration::from_secs(seconds);
            println!("{:.0}", load::udp_oneway(target, &sink, senders, d)?);
            Ok(())
        }
        Cmd::UdpDownload {
            target,
            source,
            clients,
            seconds,
        } => {
            anyhow::ensure!(
                target.ip().is_loopback() && source.ip().is_loopback(),
                "loopback targets only"
            );
            let (d, source) = (Duration::from_secs(seconds), UdpSocket::bind(source)?);
            println!("{:.0}", load::udp_download(target, source, clients, d)?);
            Ok(())
        }
        Cmd::HttpLatency {
            target,
            rate,
            connections,
            seconds,
        } => {
            anyhow::ensure!(target.ip().is_loopback(), "loopback targets only");
            anyhow::ensure!(
                rate > 0.0 && connections > 0,
                "rate and connections must be positive"
            );
            let (lat, steal) = steal::measured(|| {
                load::http_latency(target, rate, connections, Duration::from_secs(seconds))
            });
            let lat = lat?;
            println!(
                "p50 {:.0} p99 {:.0} p99.9 {:.0} (µs, {} requests; CPU steal {})",
                load::quantile(&lat, 0.50),
                load::quantile(&lat, 0.99),
                load::quantile(&lat, 0.999),
                lat.len(),
                steal.map_or("unknown".into(), |s| format!("{:.1}%", s * 100.0))
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wrk 4.1's report: the count comes from "N requests in", the rate
    /// from "Requests/sec:"; a report without them is an error.
    #[test]
    fn wrk_report_gives_rate_and_count() {
        let report = "Running 5s test @ http://127.0.0.1:20080/\n  1 threads and 64 connections\n\
            \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
            \x20   Latency   561.36us  132.26us   4.11ms   87.51%\n\
            \x20 584321 requests in 5.00s, 85.26MB read\n\
            Requests/sec: 116853.41\nTransfer/sec:     17.05MB\n";
        assert_eq!(wrk_figures(report).unwrap(), (116853.41, 584321.0));
        assert!(wrk_figures("Requests/sec: 5\n").is_err());
        assert!(wrk_figures("unable to connect to 127.0.0.1:20080\n").is_err());
    }

    #[test]
    fn median_of_odd_even_and_no_runs() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn each_figure_is_compared_with_the_peer_its_target_names() {
        assert_eq!(reference("keep-alive requests/s"), "haproxy");
        assert_eq!(reference("new connections/s"), "haproxy");
        assert_eq!(reference("bulk Gbit/s, 1 stream"), "haproxy-splice");
        assert_eq!(reference("CPU seconds per GB (1 stream)"), "haproxy-splice");
        assert_eq!(
            reference("UDP datagrams/s (one-way, delivered)"),
            "nginx-stream"
        );
        assert_eq!(
            reference("UDP datagrams/s (download, delivered)"),
            "nginx-stream"
        );
    }

    /// The runs of a sample of `scenario`, one attempt each.
    fn sample(
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
        assert!(
            targets.contains("| 1.20× (0.90–1.20) not met |"),
            "{targets}"
        );
        // A spread that crosses the target makes the verdict not firm.
        let crossing = [
            fig(&lbd, vec![Some(60.0), Some(30.0)]),
            fig(&haproxy, vec![Some(40.0), Some(30.0)]),
        ];
        let targets = super::targets(&crossing);
        assert!(
            targets.contains("| 1.25× (1.00–1.50) met, not firm |"),
            "{targets}"
        );
    }
}
