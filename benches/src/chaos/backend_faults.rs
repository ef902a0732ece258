//! Scenario 3: one backend of three fails under steady load, three ways in
//! turn: killed (SIGKILL of its process: connects are refused), frozen
//! (SIGSTOP: its kernel still completes handshakes, nothing answers) and
//! black-holed (packets to it vanish: connects and requests time out).
//! Counts what clients saw fail and measures the time from the fault to
//! lbd's ejection of the backend (`healthy: false` in `GET /v1/status`),
//! then heals the fault and waits for the backend's return.
//!
//! The faulted backend is a child process (`lb-bench chaos-backend`) so it
//! can be killed and stopped as a whole; with root it sits in a network
//! namespace of its own behind a veth pair (`netns`), which a black hole
//! needs. Without, the first two faults run on loopback and the third is
//! reported as not run.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::backends::HttpServer;
use super::netns::{Hole, Pair};
use super::plan::Case;
use super::report::{Row, Verdict};
use super::rig::Lbd;
use super::state::{tcp_listener, toml_listeners};
use super::traffic::{as_json, describe, Load};

/// How long ejection and return may take before the scenario gives up on
/// them (with these checks, a few seconds is expected).
const PATIENCE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Freeze,
    Blackhole,
}

/// The faulted backend's process.
struct Victim {
    addr: SocketAddr,
    child: Option<Child>,
}

impl Victim {
    fn start(addr: SocketAddr, place: Option<&Pair>) -> anyhow::Result<Self> {
        let mut v = Self { addr, child: None };
        v.respawn(place)?;
        Ok(v)
    }

    fn respawn(&mut self, place: Option<&Pair>) -> anyhow::Result<()> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["chaos-backend", "--addr", &self.addr.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let child = match place {
            Some(p) => p.within_backend(|| cmd.spawn())??,
            None => cmd.spawn()?,
        };
        crate::interrupt::track_group(child.id());
        self.child = Some(child);
        Ok(())
    }

    fn signal(&self, sig: rustix::process::Signal) -> anyhow::Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no backend process"))?;
        let pid = rustix::process::Pid::from_child(child);
        rustix::process::kill_process(pid, sig)?;
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            crate::interrupt::untrack_group(c.id());
        }
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        // A stopped process dies of SIGKILL all the same.
        self.kill();
    }
}

/// Polls lbd's status until the backend `addr` is (or is not) healthy;
/// when it was first seen so.
fn wait_health(lbd: &Lbd, addr: SocketAddr, healthy: bool) -> Option<Instant> {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        let seen = lbd.status().ok().and_then(|s| {
            s.listeners
                .iter()
                .flat_map(|l| l.backends.iter())
                .find(|b| b.addr == addr)
                .map(|b| b.healthy)
        });
        if seen == Some(healthy) {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Runs the three faults on one lbd.
pub fn run(case: &Case) -> anyhow::Result<Vec<Row>> {
    let pair = Pair::create();
    let place = pair.as_ref().ok();
    let within = |f: &mut dyn FnMut() -> anyhow::Result<HttpServer>| match place {
        Some(p) => p.within_lb(f)?,
        None => f(),
    };
    let port = crate::support::common_port(&["127.0.0.2", "127.0.0.3", "127.0.0.4"])?;
    let healthy_addrs: Vec<SocketAddr> = ["127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|ip| SocketAddr::new(ip.parse().expect("IPv4"), port))
        .collect();
    let _healthy = healthy_addrs
        .iter()
        .map(|a| within(&mut || HttpServer::start(*a)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let victim_ip = place.map_or_else(|| "127.0.0.4".parse().expect("IPv4"), Pair::backend_ip);
    let mut victim = Victim::start(SocketAddr::new(victim_ip, port), place)?;
    let traffic = super::backends::free_addr()?;
    let mut lbd = case.lbd("backends")?;
    if let Some(p) = place {
        lbd = lbd.in_namespace(p.lb());
    }
    let backends: Vec<(SocketAddr, u32)> = healthy_addrs
        .iter()
        .chain([&victim.addr])
        .map(|a| (*a, 1))
        .collect();
    let listener = tcp_listener("traffic", traffic, &backends);
    lbd.write_config(&format!("{}{}", lbd.admin(""), toml_listeners(&[listener])))?;
    lbd.launch()?;
    let mut rows = Vec::new();
    for fault in [Fault::Kill, Fault::Freeze, Fault::Blackhole] {
        let name = match fault {
            Fault::Kill => "backend killed",
            Fault::Freeze => "backend frozen",
            Fault::Blackhole => "backend black-holed",
        };
        if let (Fault::Blackhole, Err(e)) = (fault, &pair) {
            let why = format!("no network namespace for the black hole ({e:#}); loopback cannot drop packets silently");
            rows.push(Row::not_run(case.engine, name, &why));
            continue;
        }
        let mut stage = Stage {
            lbd: &lbd,
            victim: &mut victim,
            place,
            traffic,
        };
        let row = one_fault(case, &mut stage, fault, name).unwrap_or_else(|e| {
            let mut r = Row::not_run(case.engine, name, &format!("{e:#}"));
            r.failures = format!("scenario failed: {e:#}");
            r.verdict = Verdict::NotMet;
            r
        });
        rows.push(row);
    }
    Ok(rows)
}

/// What one fault works on: lbd, the faulted backend and where it runs.
struct Stage<'a> {
    lbd: &'a Lbd,
    victim: &'a mut Victim,
    place: Option<&'a Pair>,
    traffic: SocketAddr,
}

impl Stage<'_> {
    /// Injects `fault`; what was done, and the black hole to undo.
    fn strike(&mut self, fault: Fault) -> anyhow::Result<(String, Option<Hole>)> {
        Ok(match fault {
            Fault::Kill => {
                self.victim.kill();
                ("SIGKILL of its process".into(), None)
            }
            Fault::Freeze => {
                self.victim.signal(rustix::process::Signal::STOP)?;
                ("SIGSTOP of its process".into(), None)
            }
            Fault::Blackhole => {
                let p = self.place.ok_or_else(|| anyhow::anyhow!("no namespace"))?;
                let hole = p.blackhole()?;
                (hole.describe().into(), Some(hole))
            }
        })
    }

    /// Undoes [`Stage::strike`].
    fn heal(&mut self, fault: Fault, hole: Option<Hole>) -> anyhow::Result<()> {
        match (fault, hole, self.place) {
            (Fault::Kill, _, place) => self.victim.respawn(place),
            (Fault::Freeze, _, _) => self.victim.signal(rustix::process::Signal::CONT),
            (Fault::Blackhole, Some(hole), Some(p)) => p.heal(hole),
            (Fault::Blackhole, _, _) => Ok(()),
        }
    }
}

fn one_fault(case: &Case, stage: &mut Stage, fault: Fault, name: &str) -> anyhow::Result<Row> {
    let (lbd, addr) = (stage.lbd, stage.victim.addr);
    wait_health(lbd, addr, true)
        .ok_or_else(|| anyhow::anyhow!("{addr} never healthy before the fault"))?;
    let spec = case.plan.steady(stage.traffic);
    let load = match stage.place {
        Some(p) => p.within_lb(|| Load::start(spec))?,
        None => Load::start(spec),
    };
    // Steady load first: the backend's checks confirm it meanwhile.
    std::thread::sleep(case.plan.settle);
    let addr_label = addr.to_string();
    let labels = [("backend", addr_label.as_str())];
    let errors_before = lbd.metric("weir_backend_connect_errors_total", &labels)?;
    let struck = Instant::now();
    let (how, hole) = stage.strike(fault)?;
    let ejected = wait_health(lbd, addr, false);
    let errors_at_ejection = lbd.metric("weir_backend_connect_errors_total", &labels)?;
    // Ejected: the load goes on over the two others.
    std::thread::sleep(case.plan.settle);
    let healed = Instant::now();
    stage.heal(fault, hole)?;
    let back = wait_health(lbd, addr, true);
    std::thread::sleep(case.plan.settle);
    let (struck_s, healed_s) = (load.offset(struck), load.offset(healed));
    let ejected_s = ejected.map(|t| load.offset(t));
    let tally = load.finish();
    // Requests that failed before the fault owe nothing to it; those in
    // flight at the fault or started before the ejection are its price;
    // any started after the ejection (or after healing) are not expected.
    let ejected_or_healed = ejected_s.unwrap_or(healed_s);
    let before = tally.failures_where(|s| s.end() < struck_s);
    let until_ejection =
        tally.failures_where(|s| s.end() >= struck_s && s.start < ejected_or_healed);
    let after = tally.failures_between(ejected_or_healed, healed_s);
    let after_heal = tally.failures_between(healed_s, f64::MAX);
    let unexpected: usize = [&before, &after, &after_heal]
        .iter()
        .flat_map(|m| m.values())
        .sum();
    let mut row = case.row(format!("{name} (1 of 3)"));
    row.load = format!(
        "{}; p99 {:.0} ms, max {:.0} ms",
        tally.held(),
        tally.latency_ms(0.99),
        tally.latency_ms(1.0)
    );
    row.faults = format!(
        "1: {how}; healed {:.1} s later",
        (healed - struck).as_secs_f64()
    );
    row.failures = format!(
        "{} before ejection, {} after it, {} after healing",
        describe(&until_ejection),
        describe(&after),
        describe(&after_heal)
    );
    row.lost = format!(
        "{} requests (in flight on it at the fault, or sent to it before the ejection){}",
        until_ejection.values().sum::<usize>(),
        if before.is_empty() {
            String::new()
        } else {
            format!("; {} before the fault", describe(&before))
        }
    );
    row.ejection = match ejected {
        Some(t) => format!(
            "{:.0} ms ({} failed connects to it meanwhile); back {}",
            (t - struck).as_secs_f64() * 1e3,
            errors_at_ejection - errors_before,
            back.map_or("never (30 s)".into(), |b| format!(
                "{:.1} s after healing",
                (b - healed).as_secs_f64()
            ))
        ),
        None => "not ejected within 30 s".into(),
    };
    row.expected =
        "failures only before the ejection (checks every 1 s, 500 ms timeout, fall 3); 0 after"
            .into();
    let panics = lbd.panics();
    row.verdict =
        Verdict::of(ejected.is_some() && back.is_some() && unexpected == 0 && panics.is_empty());
    row.figures = json!({
        "requests": tally.samples.len(), "ok": tally.ok(),
        "failures_before_ejection": as_json(&until_ejection), "failures_after_ejection": as_json(&after),
        "failures_after_healing": as_json(&after_heal), "failures_before_fault": as_json(&before),
        "ejection_ms": ejected.map(|t| (t - struck).as_secs_f64() * 1e3),
        "back_after_heal_ms": back.map(|b| (b - healed).as_secs_f64() * 1e3),
        "connect_errors_until_ejection": errors_at_ejection - errors_before, "panics": panics,
    });
    Ok(row)
}
