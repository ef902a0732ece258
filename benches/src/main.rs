//! `lb-bench`: runs `lbd` (io_uring and epoll), HAProxy (splice on and
//! off), nginx stream and a direct path on this machine, in one run with
//! the same worker count, and prints one markdown table with ratios; writes
//! the raw figures as JSON and the table to `benches/RESULTS.md`.
//!
//! Every figure is labelled with its setup (loopback or network
//! namespaces, workers). Traffic goes to 127.0.0.0/8, or with `--setup
//! netns` to addresses inside the three namespaces the run creates, only.
//!
//! This file is the command line and its dispatch, nothing else. `run`
//! runs the benchmark, `scenarios` measures, `stats` makes the figures and
//! `report` the table; `peers` starts the proxies and backends, `tools` and
//! `load` are the clients, and the standalone subcommands below call
//! `load` directly. `chaos` runs lbd under faults (its own module).

mod chaos;
mod controller_scale;
mod interrupt;
mod listeners;
mod load;
mod peers;
mod placement;
mod procs;
mod report;
mod run;
mod scenarios;
mod stats;
mod steal;
mod support;
mod tools;
mod topo;

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use topo::Topology;

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
    /// lbd on both engines under faults (applies, reloads, backend
    /// failures, descriptor exhaustion, hostile control clients, a UDP
    /// flood, kill -9); writes benches/RELIABILITY.md.
    Chaos(chaos::Args),
    /// A chaos backend as a process of its own (killed or stopped by the
    /// chaos run): an HTTP server answering every request at once.
    #[command(hide = true)]
    ChaosBackend {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// lb-controller with a burst of Services against its in-memory API
    /// server and a real lbd; writes benches/RESULTS-controller.md.
    ControllerScale(controller_scale::Args),
    /// lbd with thousands of listeners: memory, apply times, and latency
    /// on an untouched listener during applies.
    Listeners(listeners::Args),
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

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Chaos(args) => chaos::run(args),
        Cmd::ChaosBackend { addr } => chaos::serve_forever(addr),
        Cmd::ControllerScale(args) => controller_scale::run(args),
        Cmd::Listeners(args) => listeners::run(args),
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
            run::run(workers, runs, seconds, idle, topo, &out)
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
