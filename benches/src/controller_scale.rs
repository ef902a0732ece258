//! `lb-bench controller-scale`: lb-controller with a burst of LoadBalancer
//! Services created one after another, against lb-controller's in-memory
//! API server, with a real `lbd` as the forwarder. Writes the figures to
//! `benches/RESULTS-controller.md`.
//!
//! Per run, everything starts afresh: API server, `lbd`, and (but for the
//! first scenario) the `lb-controller` binary. A warm-up Service is
//! programmed first, so the controller is past its start-up. Then N
//! Services are created over HTTP, one request after another on one
//! keep-alive connection (as a client such as `kubectl apply` does), and:
//!
//! - the create time: from the first create sent to the last one
//!   answered, i.e. the API server's time for the creates, under whatever
//!   else it is doing;
//! - for Weir's Services, the time from the last create answered until
//!   every Service has its address in status and the forwarder runs a
//!   listener for each.
//!
//! Scenarios: no controller (the server alone); the controller running
//! while the N Services are of another class (it watches them and ignores
//! them: the baseline); the N Services of Weir's class. "What the
//! controller adds to the API server's time" is the last create time over
//! the baseline's: the same creates, the same watches, the only difference
//! being the controller's own writes.
//!
//! Only loopback: the API server on 127.0.0.1, `lbd`'s VIPs in 127.0.8.0/22.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::{load_average, machine, median, sibling, spawn, spread, wait_until};
use lb_controller::test_apiserver::{lb_service, node, ApiServer, Release, NODES, SERVICES};
use serde_json::{json, Value};

/// `controller-scale` options.
#[derive(clap::Args)]
pub struct Args {
    /// Services created per run.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Runs per scenario (median and min–max reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Storage commit latencies to model, in ms per write (0: none).
    #[arg(long, value_delimiter = ',', default_value = "0,2")]
    storage_latency_ms: Vec<u64>,
    /// Where the markdown goes.
    #[arg(long, default_value = "benches/RESULTS-controller.md")]
    out: PathBuf,
}

/// Who handles the Services created.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scenario {
    NoController,
    OtherClass,
    Ours,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Self::NoController => "no controller (the server alone)",
            Self::OtherClass => "controller running, Services of another class (baseline)",
            Self::Ours => "controller running, Services of Weir's class",
        }
    }
}

/// One run's figures.
struct Sample {
    create: Duration,
    /// From the last create to every address and listener in place.
    converged: Option<Duration>,
    /// The controller's writes (all kinds) per Service created.
    writes_per_service: Option<f64>,
    /// The controller's CPU seconds from the first create to the end.
    controller_cpu: Option<f64>,
}

const CLASS: &str = "weir.dev/lb";

/// One keep-alive HTTP/1.1 connection to the API server.
struct Http {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Http {
    fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let writer = TcpStream::connect(addr)?;
        writer.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(writer.try_clone()?),
            writer,
        })
    }

    /// POSTs `body` to `path`; the answer's status code.
    fn post(&mut self, path: &str, body: &Value) -> anyhow::Result<u16> {
        let body = body.to_string();
        write!(
            self.writer,
            "POST {path} HTTP/1.1\r\nHost: apiserver\r\nAuthorization: Bearer bench\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let code: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("bad status line {line:?}"))?;
        let mut length = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse()?;
                }
            }
        }
        let mut rest = vec![0; length];
        self.reader.read_exact(&mut rest)?;
        Ok(code)
    }
}

/// How many listeners `lbd` runs (`GET /v1/state` on its control socket).
fn lbd_listeners(socket: &Path) -> Option<usize> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /v1/state HTTP/1.0\r\nHost: lbd\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    let state: Value = serde_json::from_str(body).ok()?;
    state["listeners"].as_array().map(Vec::len)
}

fn has_address(svc: &Value) -> bool {
    svc["status"]["loadBalancer"]["ingress"][0]["ip"].is_string()
}

fn programmed(svc: &Value) -> bool {
    svc["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["status"] == "True"))
}

fn one_run(
    dir: &Path,
    release: Release,
    latency: Duration,
    scenario: Scenario,
    n: usize,
) -> anyhow::Result<Sample> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("state"))?;
    let api = ApiServer::start_on_own_runtime(release)?;
    api.set_write_latency(latency);
    for (i, ip) in ["127.0.0.2", "127.0.0.3", "127.0.0.4"].iter().enumerate() {
        api.create(NODES, "", node(&format!("node-{i}"), ip));
    }
    let socket = dir.join("lbd.sock");
    let lbd_cfg = dir.join("lbd.toml");
    std::fs::write(
        &lbd_cfg,
        format!(
            "[runtime]\nworkers = 1\n\n[admin]\nmetrics = \"off\"\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\n",
            socket.display(),
            dir.join("state").display()
        ),
    )?;
    let lbd_cfg = lbd_cfg.display().to_string();
    // At the lowest priority: the forwarders run on edge hosts, not next to
    // the API server; here they share its CPUs, and lbd's applies of a
    // 1,000-listener state would otherwise slow the creates measured.
    let _lbd = spawn(
        "nice",
        &["-n", "19", &sibling("lbd")?, "run", "--config", &lbd_cfg],
        &dir.join("lbd.log"),
    )?;
    wait_until("lbd's control socket", || lbd_listeners(&socket).is_some())?;
    let kubeconfig = api.kubeconfig(dir, "ctl");
    let ctl_cfg = dir.join("lb-controller.toml");
    std::fs::write(
        &ctl_cfg,
        format!(
            "[kubernetes]\nkubeconfig = \"{}\"\nload_balancer_class = \"{CLASS}\"\n\n\
             [leader_election]\nenabled = false\n\n[admin]\nmetrics = \"off\"\n\n\
             [health]\ncluster = \"tcp\"\n\n\
             [[pool]]\nname = \"bench\"\naddresses = [\"127.0.8.0/22\"]\navoid_buggy_ips = true\n\n\
             [[forwarder]]\nname = \"edge\"\nurl = \"unix://{}\"\n",
            kubeconfig.display(),
            socket.display()
        ),
    )?;
    let ctl_cfg = ctl_cfg.display().to_string();
    let _ctl = match scenario {
        Scenario::NoController => None,
        _ => Some(spawn(
            &sibling("lb-controller")?,
            &["run", "--config", &ctl_cfg, "--identity", "bench"],
            &dir.join("lb-controller.log"),
        )?),
    };
    let service = |name: &str, class: &str| {
        let mut svc = lb_service(name, &[(8080, 0)]);
        svc["spec"]["loadBalancerClass"] = json!(class);
        svc
    };
    if scenario != Scenario::NoController {
        // Warm-up: the controller is past its start when this is programmed.
        api.create(SERVICES, "default", service("warm-up", CLASS));
        wait_until("the warm-up Service", || {
            api.get(SERVICES, "default", "warm-up")
                .is_some_and(|s| has_address(&s) && programmed(&s))
                && lbd_listeners(&socket) == Some(1)
        })?;
    }
    let class = if scenario == Scenario::Ours {
        CLASS
    } else {
        "other.example/lb"
    };
    let writes_before = api.writes().iter().filter(|w| w.user == "ctl").count();
    let controller_pid = _ctl.as_ref().map(|p| p.0.id());
    let cpu = || controller_pid.map(|pid| crate::peers::cpu_seconds(&[pid]));
    let cpu_before = cpu();
    let mut http = Http::connect(api.addr)?;
    let started = Instant::now();
    for i in 0..n {
        let code = http.post(
            "/api/v1/namespaces/default/services",
            &service(&format!("svc-{i:04}"), class),
        )?;
        anyhow::ensure!(code == 201, "create svc-{i:04}: HTTP {code}");
    }
    let last = Instant::now();
    let mut sample = Sample {
        create: last - started,
        converged: None,
        writes_per_service: None,
        controller_cpu: None,
    };
    if scenario == Scenario::Ours {
        let addresses = wait_until("every address", || {
            api.count(SERVICES, has_address) == n + 1
        })?;
        let listeners = wait_until("every listener on the forwarder", || {
            lbd_listeners(&socket) == Some(n + 1)
        })?;
        sample.converged = Some(addresses.max(listeners) - last);
        // Let the conditions settle (True once the forwarder acknowledged)
        // so that the writes counted are all the creates cost.
        wait_until("every condition True", || {
            api.count(SERVICES, programmed) == n + 1
        })?;
        let writes = api.writes().iter().filter(|w| w.user == "ctl").count() - writes_before;
        sample.writes_per_service = Some(writes as f64 / n as f64);
    }
    sample.controller_cpu = cpu().zip(cpu_before).map(|(after, before)| after - before);
    Ok(sample)
}

/// How the tables name a release.
fn release_name(release: Release) -> &'static str {
    match release {
        Release::V1_28 => "1.28 (drops `ipMode`)",
        Release::V1_29 => "1.29",
        Release::V1_30 => "1.30 (keeps `ipMode`)",
    }
}

/// Runs every scenario `runs` times (interleaved: run 1 of each, then run
/// 2, ...) for each release and storage latency, and writes the tables.
pub fn run(args: Args) -> anyhow::Result<()> {
    let n = args.services.max(1);
    let runs = args.runs.max(1);
    anyhow::ensure!(n <= 1000, "the pool (127.0.8.0/22) holds 1,016 addresses");
    let dir = std::env::temp_dir().join(format!("weir-controller-scale-{}", std::process::id()));
    let scenarios = [Scenario::NoController, Scenario::OtherClass, Scenario::Ours];
    let latencies: Vec<String> = args
        .storage_latency_ms
        .iter()
        .map(ToString::to_string)
        .collect();
    let load_at_start = load_average();
    let mut text = format!(
        "# lb-controller at scale\n\n\
         Generated by `lb-bench controller-scale --services {n} --runs {runs} \
         --storage-latency-ms {}` (build: `cargo build --release -p lb-core -p lb-controller \
         -p lb-bench`, then `./target/release/lb-bench controller-scale`). Never edit by \
         hand: rerun.\n\n\
         Machine: {}. The API server (lb-controller's in-memory one, \
         `test_apiserver`), the `lb-controller` binary, one `lbd` (1 worker) and \
         the client share it.\n\n",
        latencies.join(","),
        machine()
    );
    let mut verdicts = Vec::new();
    for release in [Release::V1_28, Release::V1_30] {
        for &latency_ms in &args.storage_latency_ms {
            let latency = Duration::from_millis(latency_ms);
            let mut samples: Vec<Vec<Sample>> = scenarios.iter().map(|_| Vec::new()).collect();
            for r in 0..runs {
                for (i, &scenario) in scenarios.iter().enumerate() {
                    eprintln!(
                        "{release:?}, storage {latency_ms} ms: {} (run {})",
                        scenario.label(),
                        r + 1
                    );
                    samples[i].push(one_run(&dir, release, latency, scenario, n)?);
                }
            }
            let create_median = |s: &[Sample]| {
                median(&mut s.iter().map(|s| s.create.as_secs_f64()).collect::<Vec<_>>()).0
            };
            let baseline = create_median(&samples[1]);
            let overhead = (create_median(&samples[2]) / baseline - 1.0) * 100.0;
            // A run that never converged counts as infinitely slow.
            let slowest = samples[2]
                .iter()
                .map(|s| s.converged.map_or(f64::INFINITY, |d| d.as_secs_f64()))
                .fold(0.0, f64::max);
            let met = |ok: bool| if ok { "met" } else { "not met" };
            verdicts.push(format!(
                "| {} | {} | {overhead:+.1}%: {} | {slowest:.2} s: {} |\n",
                release_name(release),
                if latency_ms == 0 {
                    "none (CPU only)".to_owned()
                } else {
                    format!("{latency_ms} ms")
                },
                if latency_ms == 0 {
                    "not judged".to_owned()
                } else {
                    met(overhead <= 10.0).to_owned()
                },
                met(slowest < 10.0),
            ));
            text.push_str(&format!(
                "## Kubernetes {}, storage latency {}\n\n\
                 | scenario | {n} creates (s) | vs baseline | last create → all addresses and listeners (s) | controller writes per Service | controller CPU (s) |\n\
                 |---|---|---|---|---|---|\n",
                release_name(release),
                if latency_ms == 0 {
                    "none".to_owned()
                } else {
                    format!("{latency_ms} ms per write")
                }
            ));
            for (scenario, samples) in scenarios.iter().zip(&samples) {
                let versus = match scenario {
                    Scenario::OtherClass => "baseline".to_owned(),
                    Scenario::NoController => {
                        format!("{:+.1}%", (create_median(samples) / baseline - 1.0) * 100.0)
                    }
                    Scenario::Ours => {
                        format!(
                            "**{:+.1}%**",
                            (create_median(samples) / baseline - 1.0) * 100.0
                        )
                    }
                };
                let converged = spread(
                    samples
                        .iter()
                        .filter_map(|s| s.converged.map(|d| d.as_secs_f64()))
                        .collect(),
                    2,
                );
                text.push_str(&format!(
                    "| {} | {} | {versus} | {} | {} | {} |\n",
                    scenario.label(),
                    spread(samples.iter().map(|s| s.create.as_secs_f64()).collect(), 2),
                    if converged == "–" {
                        converged
                    } else {
                        format!("**{converged}**")
                    },
                    spread(
                        samples
                            .iter()
                            .filter_map(|s| s.writes_per_service)
                            .collect(),
                        2
                    ),
                    spread(samples.iter().filter_map(|s| s.controller_cpu).collect(), 2),
                ));
            }
            text.push('\n');
        }
    }
    text.push_str(&format!(
        "## Against the targets\n\n\
         Targets: with {n} Services, every address and listener within 10 s of the last \
         create (slowest run shown), and the controller adds at most 10% to the API \
         server's time for the creates (median). The overhead is judged where a storage \
         latency is modelled: without one, a create costs the in-memory server about \
         0.1 ms of CPU, far below any real API server, and each of the controller's \
         writes costs the server as much CPU as a create, so the figure says how busy \
         this machine's CPUs are, not what a cluster would see.\n\n\
         | release | storage latency | controller's overhead ≤ 10% | slowest convergence < 10 s |\n\
         |---|---|---|---|\n"
    ));
    for v in &verdicts {
        text.push_str(v);
    }
    text.push('\n');
    text.push_str(&format!(
        "Load average (1, 5, 15 min) of the machine at the start of the run: {load_at_start}; \
         at the end: {}. Other work on the machine takes CPU from every figure.\n\n",
        load_average()
    ));
    text.push_str(&format!(
        "Median of {runs} runs (min–max). Each run starts a fresh API server, `lbd` and \
         controller, programs one warm-up Service, then sends the {n} creates one after \
         another on one keep-alive HTTP/1.1 connection.\n\n\
         - **{n} creates**: from the first create sent to the last one answered: the API \
         server's time for the creates, with whatever else it serves meanwhile.\n\
         - **vs baseline**: the baseline is the same {n} creates while the controller runs \
         and watches every Service, but the Services are of another class, which it \
         ignores. The difference with Weir's class is what the controller's own work \
         (its finalizer, status and Event writes, and the CPU it takes from the same \
         machine) adds to the server's time for the same creates.\n\
         - **last create → all addresses and listeners**: from the last create answered \
         until every Service has its address in `status.loadBalancer` and `lbd` runs a \
         listener for each (its `GET /v1/state`), polled every 20 ms. The controller \
         runs with its defaults (200 ms debounce, 10 s publish timeout).\n\
         - **controller writes per Service**: every write the controller made (finalizer, \
         status, Events) from the first create until every condition is True, divided by {n}.\n\
         - **controller CPU**: user + system CPU seconds of the `lb-controller` process \
         over the same span.\n\
         - **storage latency**: the in-memory server answers a write as soon as it has \
         stored it; a real API server first waits for etcd to commit it. With a latency \
         per write modelled (each write request waits that long, concurrently, before it \
         is carried out), the creates take the time they would take against a real \
         server, and the controller competes with them for storage round trips rather \
         than for CPU. Without it, every figure is CPU contention between the server, \
         the controller, `lbd` and the client on this machine's CPUs.\n"
    ));
    std::fs::write(&args.out, &text)?;
    eprintln!("wrote {}", args.out.display());
    print!("{text}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
