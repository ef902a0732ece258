//! `lb-bench run` from start to end: checks the tools and finds the peers
//! this machine has, starts the backends, measures every worker count
//! (throughput, then latency at half the slowest proxy's rate, then the
//! latency floor), and writes the table with its header and the figures
//! as JSON. The measurements themselves are in `scenarios` and the table
//! in `report`; parsing the command line is `main`'s.

use std::path::Path;

use crate::load;
use crate::peers::{self, Peer};
use crate::placement;
use crate::report::{render, version};
use crate::scenarios::Bench;
use crate::topo::{Side, Topology};

/// `lb-bench run`: measures every scenario through every peer found on
/// this machine, for each of `workers`, with `runs` rounds of `seconds`
/// each and `idle` connections for the memory figure, in `topo`; prints
/// the table and writes it to `out`, and the figures as JSON next to it.
pub fn run(
    workers: Vec<usize>,
    runs: usize,
    seconds: u64,
    idle: usize,
    topo: Topology,
    out: &Path,
) -> anyhow::Result<()> {
    const INSTALL: &str = "apt-get install wrk iperf3 nginx-light libnginx-mod-stream haproxy";
    for tool in ["wrk", "iperf3", "nginx"] {
        anyhow::ensure!(peers::have(tool), "{tool} is needed: {INSTALL}");
    }
    // Without it every nginx-stream run fails after the peer times out,
    // half an hour later; say so now.
    anyhow::ensure!(
        Path::new(peers::NGINX_STREAM_MODULE).exists(),
        "nginx's stream module ({}) is needed: {INSTALL}",
        peers::NGINX_STREAM_MODULE
    );
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
         download: 4 clients each send one request and a source answers each with {}-byte datagrams as fast as it can, counted at the clients; \
         a datagram counts when it reaches the sink or a client, received or dropped by its full socket (`SO_MEMINFO`): the proxy's forwarding, not the CPU share the receiver won\n",
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
