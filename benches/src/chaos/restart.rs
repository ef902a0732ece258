//! Scenario 7: `kill -9` of lbd under load, and an immediate restart with
//! the same file and state directory. The listener under load exists only
//! in the dynamic state (one `PUT /v1/state` before the first kill), so
//! every answer after a restart shows that lbd serves the persisted state
//! again without a new PUT. Measures the outage each time: from the last
//! answer before the kill to the first after it.

use std::time::Instant;

use serde_json::json;

use super::backends::{free_addr, Trio};
use super::plan::Case;
use super::report::{Row, Verdict};
use super::state::{state, tcp_listener};
use super::traffic::{as_json, describe, Load};

/// The state version the scenario puts (any will do; not 1, to tell it
/// from a fresh state).
const VERSION: u64 = 7;

pub fn run(case: &Case) -> anyhow::Result<Vec<Row>> {
    let trio = Trio::start()?;
    let traffic = free_addr()?;
    let mut lbd = case.lbd("restart")?;
    lbd.write_config(&lbd.admin(""))?;
    lbd.launch()?;
    let listener = tcp_listener("traffic", traffic, &trio.weighted(1, 1));
    lbd.put_state(&state(VERSION, vec![listener]))?;
    let load = Load::start(case.plan.steady(traffic));
    std::thread::sleep(case.plan.settle);
    let (mut kills, mut restarts, mut versions) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..case.plan.kills {
        let killed = Instant::now();
        lbd.kill9();
        let took = lbd.launch()?;
        kills.push((load.offset(killed), load.offset(Instant::now())));
        restarts.push(took.as_secs_f64() * 1e3);
        versions.push(lbd.state_version()?);
        std::thread::sleep(case.plan.settle);
    }
    let tally = load.finish();
    // The outage: the longest stretch without an answer from the kill to
    // the restarted lbd's readiness.
    let outages: Vec<Option<(f64, f64)>> = kills
        .iter()
        .map(|&(killed, ready)| tally.longest_gap(killed, ready))
        .collect();
    let outage_ms: Vec<f64> = outages
        .iter()
        .map(|o| o.map_or(f64::INFINITY, |(a, b)| (b - a) * 1e3))
        .collect();
    // Failures that belong to a kill: requests that ended within its outage.
    let in_outages: Vec<usize> = outages
        .iter()
        .map(|o| {
            o.map_or(0, |(a, b)| {
                tally.failures_ending_between(a, b).values().sum::<usize>()
            })
        })
        .collect();
    let failures = tally.failures();
    let failed: usize = failures.values().sum();
    let outside = failed - in_outages.iter().sum::<usize>().min(failed);
    let served = versions.iter().all(|&v| v == VERSION) && outages.iter().all(Option::is_some);
    let panics = lbd.panics();
    let mut row = case.row(format!("kill -9 of lbd and restart, ×{}", case.plan.kills));
    row.load = tally.held();
    row.faults = format!(
        "{} × SIGKILL, restarted at once (start to ready: {} ms)",
        case.plan.kills,
        list(&restarts)
    );
    row.failures = describe(&failures);
    row.lost = format!(
        "outage {} ms (longest time without an answer, kill to restart); state after restart: version {} {}",
        list(&outage_ms),
        versions.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
        if served { "(the PUT one, served without a new PUT)" } else { "(NOT the PUT one)" }
    );
    row.expected = "failures only within the outage; the persisted state served again".into();
    row.verdict = Verdict::of(served && outside == 0 && panics.is_empty());
    row.figures = json!({
        "requests": tally.samples.len(), "ok": tally.ok(), "failures": as_json(&failures),
        "outage_ms": outage_ms, "restart_ms": restarts, "failures_per_outage": in_outages,
        "failures_outside_outages": outside, "versions_after_restart": versions, "put_version": VERSION,
        "panics": panics,
    });
    Ok(vec![row])
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}
