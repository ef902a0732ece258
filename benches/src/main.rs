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
mod scenarios;
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
use scenarios::Bench;
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
    let lat_runs = bench.latency_runs();
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
