//! `lb-bench`: runs `lbd` (io_uring and epoll), HAProxy (splice on and
//! off), nginx stream and a direct path on this machine, in one run with
//! the same worker count, and prints one markdown table with ratios; writes
//! the raw figures as JSON and the table to `benches/RESULTS.md`.
//!
//! Every figure is labelled with its setup (loopback or network
//! namespaces, workers). Traffic goes to 127.0.0.0/8, or with `--setup
//! netns` to addresses inside the three namespaces the run creates, only.

mod interrupt;
mod load;
mod peers;
mod placement;
mod report;
mod stats;
mod steal;
mod tools;
mod topo;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use peers::Peer;
use report::{render, version};
use stats::{added_over_direct, figure, Figure, Sample, FLOOR};
use tools::{iperf, wrk};
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
    /// held to the CPUs of `placement` meanwhile (see `placement`).
    fn latency(&mut self, peers: &[Peer], workers: usize, rate: f64) {
        self.with_placement(workers, "latency", |b, place| {
            b.interleaved(peers, workers, latency_runs(b.runs), |b, peer, _| {
                let d = Duration::from_secs(b.seconds);
                let (lat, kept) = b.placed(peer, workers, place, "latency", |http| {
                    load::http_latency(http, rate, 16, d)
                })?;
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
        });
    }

    /// Holds the HTTP backend to its CPUs of the placement for `workers`
    /// while `runs` measures, and gives it every CPU back afterwards.
    fn with_placement(
        &mut self,
        workers: usize,
        what: &str,
        runs: impl FnOnce(&mut Self, Option<&placement::Placement>),
    ) {
        let place = placement::Placement::plan(&self.cpus, workers);
        if let Some(place) = &place {
            if let Err(e) = placement::pin(&self.backend, &place.backend) {
                self.failures
                    .push(format!("{what} ({workers} workers): {e:#}"));
                return;
            }
        }
        runs(self, place.as_ref());
        if place.is_some() {
            if let Err(e) = placement::pin(&self.backend, &self.cpus) {
                self.failures.push(format!(
                    "backend CPUs after {what} ({workers} workers): {e:#}"
                ));
            }
        }
    }
}

impl Bench {
    /// Starts `peer` afresh, holds it (and the client, which runs `measure`
    /// against the peer's HTTP target) to the CPUs of `place`, and returns
    /// what `measure` gave, run again from a fresh start when stolen from
    /// (`steal::Retry::LATENCY`), with the attempt's steal.
    fn placed<T>(
        &self,
        peer: &Peer,
        workers: usize,
        place: Option<&placement::Placement>,
        what: &str,
        measure: impl Fn(SocketAddr) -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, steal::Attempts<()>)> {
        let kept = retried(what, steal::Retry::LATENCY, || {
            let running = peers::start(peer, workers, &self.site)?;
            let (http, _, _) = peer.targets(&self.site.topo);
            if let (Some(place), Some(running)) = (place, &running) {
                placement::pin(&running.pids(), &place.proxy)?;
            }
            let client = place.map_or(&self.cpus[..], |p| &p.client[..]);
            self.site
                .topo
                .within(Side::Client, || placement::on(client, || measure(http)))??
        });
        let value = kept.value?;
        Ok((
            value,
            steal::Attempts {
                value: (),
                steal: kept.steal,
                made: kept.made,
            },
        ))
    }

    /// The latency floor: one connection, one request at a time, through
    /// every peer (at least 5 runs, placed like the fixed-load latency
    /// runs): p50 and p99 of the round trip, then what each proxy adds
    /// over the direct path, round by round.
    fn latency_floor(&mut self, peers: &[Peer], workers: usize) {
        self.with_placement(workers, "latency floor", |b, place| {
            b.interleaved(peers, workers, latency_runs(b.runs), |b, peer, _| {
                let d = Duration::from_secs(b.seconds);
                let (trips, kept) = b.placed(peer, workers, place, "latency floor", |http| {
                    load::round_trips(http, d)
                })?;
                Ok(FLOOR
                    .iter()
                    .map(|&(scenario, q)| Measured {
                        scenario,
                        unit: "µs",
                        value: Ok(load::quantile(&trips, q) / 1e3),
                        steal: kept.steal,
                        attempts: kept.made,
                    })
                    .collect())
            });
        });
        let added = added_over_direct(&self.figures, workers);
        self.figures.extend(added);
    }
}

/// Latency runs: at least 5, the tail being the noisiest figure.
fn latency_runs(runs: usize) -> usize {
    runs.max(5)
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
        eprintln!("latency floor");
        bench.latency_floor(&peers, w);
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
         - latency floor: one keep-alive connection, one request at a time (the next sent when the response is whole), for the run's duration; p50 and p99 of the round trip, and what each proxy adds over the direct path (round by round); placed like the latency runs\n\
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
