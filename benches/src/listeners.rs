//! `lb-bench listeners`: one `lbd` programmed with thousands of listeners
//! through its control socket, the shape a controller gives it (500
//! Services × 4 ports is a normal cluster): 3 backends each, Maglev, HTTP
//! health checks on kube-proxy's port shared by every listener. Measures:
//!
//! - resident memory after the first full state and after full changes;
//! - how long a `PUT /v1/state` takes that changes one listener, and one
//!   that changes every listener's backends (each selector rebuilt);
//! - the p99 round trip on an untouched listener while full changes are
//!   applied back to back, against its p99 when nothing is applied.
//!
//! Writes `benches/RESULTS-listeners.md`. Only loopback: listeners on
//! 127.1.0.0/16, backends on 127.0.0.2-4.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{common_port, control, machine, sibling, spawn, spread, wait_until};

/// `listeners` options.
#[derive(clap::Args)]
pub struct Args {
    /// Listeners in the state.
    #[arg(long, default_value_t = 2000)]
    listeners: usize,
    /// Applies measured per kind (one listener changed, all changed).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// lbd's workers (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Seconds of each latency run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds of latency runs (each: one idle, one during applies).
    #[arg(long, default_value_t = 5)]
    latency_rounds: usize,
    /// Where the markdown goes.
    #[arg(long, default_value = "benches/RESULTS-listeners.md")]
    out: PathBuf,
}

const BACKEND_IPS: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];

/// HTTP/1.1 servers on every backend address at `port`, answering every
/// request on a keep-alive connection with a 6-byte body, until `stop`.
fn http_servers(port: u16, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    for ip in BACKEND_IPS {
        let listener = TcpListener::bind((ip, port))?;
        let stop = stop.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(match stream.try_clone() {
                        Ok(s) => s,
                        Err(_) => return,
                    });
                    let mut writer = stream;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => {
                                let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n";
                                if writer.write_all(reply).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                        }
                    }
                });
            }
        });
    }
    Ok(())
}

/// The state: `n` listeners, listener 0 on the real servers at `traffic`,
/// the others on NodePorts nobody serves (their checks all go to the
/// shared health port, as kube-proxy's do); `weight` for every backend
/// but listener 0's, and `odd` for the last listener's.
fn state(n: usize, version: u64, traffic: u16, health: u16, weight: u32, odd: u32) -> Value {
    let listeners: Vec<Value> = (0..n)
        .map(|i| {
            let (port, w) = match i {
                0 => (traffic, 1),
                i if i == n - 1 => (30_000 + i as u16 % 30_000, odd),
                i => (30_000 + i as u16 % 30_000, weight),
            };
            let backends: Vec<Value> = BACKEND_IPS
                .iter()
                .map(|ip| json!({ "addr": format!("{ip}:{port}"), "weight": w }))
                .collect();
            json!({
                "name": format!("svc-{i:05}"),
                "bind": format!("127.1.{}.{}:80", i / 250, i % 250 + 1),
                "backends": backends,
                "health": { "kind": "http", "port": health, "path": "/healthz" },
            })
        })
        .collect();
    json!({ "version": version, "listeners": listeners })
}

/// A state's JSON text cut where its version goes, so that each apply
/// of the same listeners costs one copy instead of a rebuild.
struct Versioned {
    head: String,
    tail: String,
}

/// Cuts `state` (whose version is 0) at its version.
fn versioned(state: Value) -> Versioned {
    let text = state.to_string();
    let at = text
        .rfind("\"version\":0")
        .expect("the state has a version")
        + "\"version\":".len();
    Versioned {
        head: text[..at].to_owned(),
        tail: text[at + 1..].to_owned(),
    }
}

impl Versioned {
    fn with(&self, version: u64) -> String {
        format!("{}{version}{}", self.head, self.tail)
    }
}

fn rss_mib(pid: u32) -> f64 {
    crate::peers::rss_kib(&[pid]) as f64 / 1024.0
}

/// Runs the scenario and writes the table.
pub fn run(args: Args) -> anyhow::Result<()> {
    let n = args.listeners.max(2);
    anyhow::ensure!(
        n <= 60_000,
        "listeners take addresses of 127.1.0.0/16, 250 per /24"
    );
    let dir = std::env::temp_dir().join(format!("weir-listeners-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("state"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (traffic, health) = (common_port(&BACKEND_IPS)?, common_port(&BACKEND_IPS)?);
    http_servers(traffic, stop.clone())?;
    http_servers(health, stop.clone())?;
    let socket = dir.join("lbd.sock");
    let cfg = dir.join("lbd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[runtime]\nworkers = {}\n\n[admin]\nmetrics = \"off\"\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\n",
            args.workers,
            socket.display(),
            dir.join("state").display()
        ),
    )?;
    let lbd = spawn(
        &sibling("lbd")?,
        &["run", "--config", &cfg.display().to_string()],
        &dir.join("lbd.log"),
    )?;
    let pid = lbd.0.id();
    wait_until("lbd's control socket", || {
        control(&socket, "GET", "/readyz", None).is_ok_and(|(c, _)| c == 200)
    })?;
    let rss_empty = rss_mib(pid);
    let mut version = 0;
    let mut put = |weight: u32, odd: u32| -> anyhow::Result<Duration> {
        version += 1;
        let body = state(n, version, traffic, health, weight, odd).to_string();
        let started = Instant::now();
        let (code, reply) = control(&socket, "PUT", "/v1/state", Some(&body))?;
        let took = started.elapsed();
        anyhow::ensure!(code == 200, "PUT of version {version}: {code} {reply}");
        Ok(took)
    };
    eprintln!("first state: {n} listeners");
    let first = put(1, 1)?;
    let rss_first = rss_mib(pid);
    let mut one = Vec::new();
    let mut all = Vec::new();
    for r in 0..args.rounds {
        eprintln!("round {}: one listener, then every listener", r + 1);
        one.push(put(1, if r % 2 == 0 { 2 } else { 1 })?.as_secs_f64() * 1e3);
        all.push(put(if r % 2 == 0 { 2 } else { 1 }, 1)?.as_secs_f64() * 1e3);
    }
    let rss_after = rss_mib(pid);
    // Latency on listener 0 (untouched by every change): alone, then with
    // full changes applied back to back.
    let vip: SocketAddr = "127.1.0.1:80".parse()?;
    let seconds = Duration::from_secs(args.seconds);
    let rate = 2_000.0;
    // Both bodies are built before the clock starts, so that the applier
    // spends its CPU sending them, not making them: what is measured is
    // lbd's cost, not this harness's.
    let bodies = Arc::new([1, 2].map(|w| versioned(state(n, 0, traffic, health, w, 1))));
    // Rounds of idle then busy runs, interleaved so that drift of the
    // machine falls on both; each pair's ratio counts, their median is
    // the verdict.
    let p99 = |lat: &[u64]| crate::load::quantile(lat, 0.99) / 1e3;
    let mut pairs = Vec::new();
    let mut applied = 0;
    for r in 0..args.latency_rounds.max(1) {
        eprintln!("latency round {}: nothing applied", r + 1);
        let idle = crate::load::http_latency(vip, rate, 4, seconds)?;
        eprintln!("latency round {}: full changes applied back to back", r + 1);
        let busy_flag = Arc::new(AtomicBool::new(true));
        let applier = {
            let (busy, socket, bodies) = (busy_flag.clone(), socket.clone(), bodies.clone());
            let start_version = version;
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut v = start_version;
                while busy.load(Ordering::Relaxed) {
                    v += 1;
                    let body = bodies[(v % 2) as usize].with(v);
                    let (code, reply) = control(&socket, "PUT", "/v1/state", Some(&body))?;
                    anyhow::ensure!(code == 200, "PUT of version {v}: {code} {reply}");
                }
                Ok(v)
            })
        };
        let busy = crate::load::http_latency(vip, rate, 4, seconds);
        busy_flag.store(false, Ordering::Relaxed);
        let reached = applier
            .join()
            .map_err(|_| anyhow::anyhow!("the applier panicked"))??;
        applied += reached - version;
        version = reached;
        pairs.push((p99(&idle), p99(&busy?)));
    }
    stop.store(true, Ordering::Relaxed);
    drop(lbd);
    let _ = std::fs::remove_dir_all(&dir);

    let verdict = |ok: bool| if ok { "met" } else { "not met" };
    let median = |v: &[f64]| crate::support::median(&mut v.to_vec()).0;
    let p99_idle = median(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    let p99_busy = median(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
    let ratio = median(&pairs.iter().map(|p| p.1 / p.0).collect::<Vec<_>>());
    let rounds = pairs
        .iter()
        .map(|(idle, busy)| format!("{idle:.2} → {busy:.2} ms ({:.2}×)", busy / idle))
        .collect::<Vec<_>>()
        .join("; ");
    let text = format!(
        "# lbd with {n} listeners\n\n\
         Generated by `lb-bench listeners --listeners {n} --rounds {} --workers {} --seconds {} \
         --latency-rounds {}` \
         (build: `cargo build --release -p lb-core -p lb-bench`). Never edit by hand: rerun.\n\n\
         Machine: {}. One `lbd` ({} workers), programmed over its control socket with {n} \
         listeners of 3 backends each (Maglev, HTTP checks on one shared health port: 3 \
         probers), the shape lb-controller gives it; the backends of listener 0 are real HTTP \
         servers, the others' ports are unserved.\n\n\
         | figure | value | target |\n|---|---|---|\n\
         | resident memory, no listener | {rss_empty:.1} MiB | |\n\
         | resident memory after the first state | {rss_first:.1} MiB | ≤ 150 MiB: {} |\n\
         | resident memory after {} full changes | {rss_after:.1} MiB | ≤ 150 MiB: {} |\n\
         | first state ({n} new listeners), PUT to answer | {:.0} ms | |\n\
         | one listener changed, PUT to answer | {} ms | ≤ 100 ms: {} |\n\
         | every listener's backends changed, PUT to answer | {} ms | ≤ 500 ms: {} |\n\
         | p99 round trip on an untouched listener, nothing applied (median of rounds) | {p99_idle:.2} ms | |\n\
         | p99 round trip on an untouched listener, {applied} full changes applied meanwhile (median) | {p99_busy:.2} ms | ≤ 2× idle (median ratio {ratio:.2}×): {} |\n\n\
         Latency rounds (idle → during applies): {rounds}.\n\n\
         PUT times are measured by the client: reading and validating the body, binding \
         new sockets, persisting the state (fsync) and publishing it. Latency: `http_latency` \
         at {rate:.0} requests/s over 4 connections for {} s each, listener 0 only; the \
         applier sends bodies built beforehand, so that building them does not compete \
         with lbd.\n",
        args.rounds,
        args.workers,
        args.seconds,
        pairs.len(),
        machine(),
        if args.workers == 0 { "one per CPU".to_owned() } else { args.workers.to_string() },
        verdict(rss_first <= 150.0),
        args.rounds,
        verdict(rss_after <= 150.0),
        first.as_secs_f64() * 1e3,
        spread(one.clone(), 1),
        verdict(median(&one) <= 100.0),
        spread(all.clone(), 1),
        verdict(median(&all) <= 500.0),
        verdict(ratio <= 2.0),
        args.seconds,
    );
    print!("{text}");
    std::fs::write(&args.out, &text)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
