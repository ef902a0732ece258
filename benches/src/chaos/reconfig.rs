//! Reconfiguration under load: back-to-back `PUT /v1/state` (scenario 1)
//! and back-to-back reloads of the file on SIGHUP (scenario 2), each
//! alternating two configurations that change a weight of the listener
//! under load and add or remove an unrelated listener. lbd's promise: a
//! change never fails a connection, new or established.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::backends::{free_addr, Trio};
use super::plan::Case;
use super::report::{Row, Verdict};
use super::state::{state, tcp_listener, toml_listeners};
use super::traffic::{as_json, describe, Load};

/// How long a reload may take to show in `GET /v1/status`.
const RELOAD_SEEN: Duration = Duration::from_secs(10);

/// The two configurations: A has weights 1/1/1 and the extra listener, B
/// has weights 2/1/1 and not it.
fn listeners(trio: &Trio, traffic: SocketAddr, extra: SocketAddr, a: bool) -> Vec<Value> {
    if a {
        vec![
            tcp_listener("traffic", traffic, &trio.weighted(1, 1)),
            tcp_listener("extra", extra, &trio.weighted(1, 1)[..1]),
        ]
    } else {
        vec![tcp_listener("traffic", traffic, &trio.weighted(2, 1))]
    }
}

/// "median x ms, max y ms" of durations.
fn times(d: &[Duration]) -> String {
    if d.is_empty() {
        return "none".into();
    }
    let mut ms: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    let (median, _, max) = crate::support::median(&mut ms);
    format!("median {median:.1} ms, max {max:.0} ms")
}

/// Scenario 1: `plan.applies` applies under steady load.
pub fn applies(case: &Case) -> anyhow::Result<Vec<Row>> {
    let trio = Trio::start()?;
    let (traffic, extra) = (free_addr()?, free_addr()?);
    let mut lbd = case.lbd("applies")?;
    lbd.write_config(&lbd.admin(""))?;
    lbd.launch()?;
    lbd.put_state(&state(1, listeners(&trio, traffic, extra, true)))?;
    let load = Load::start(case.plan.steady(traffic));
    std::thread::sleep(case.plan.settle);
    let (mut took, mut errors) = (Vec::new(), Vec::new());
    for i in 0..case.plan.applies {
        let version = i as u64 + 2;
        let body = state(version, listeners(&trio, traffic, extra, i % 2 == 1));
        match lbd.put_state(&body) {
            Ok(t) => took.push(t),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    std::thread::sleep(case.plan.settle);
    let tally = load.finish();
    let failures = tally.failures();
    let failed: usize = failures.values().sum();
    let crashed = lbd.exited();
    let panics = lbd.panics();
    let mut row = case.row(format!(
        "{} applies (PUT /v1/state: weight 1↔2, a listener added and removed)",
        case.plan.applies
    ));
    row.load = tally.held();
    row.faults = format!(
        "{} applies, {} answered 200 ({})",
        case.plan.applies,
        took.len(),
        times(&took)
    );
    row.failures = describe(&failures);
    row.lost = lost(failed, &errors, &crashed, &panics);
    row.expected = "0 failed connections, every apply 200".into();
    row.verdict =
        Verdict::of(failed == 0 && errors.is_empty() && crashed.is_none() && panics.is_empty());
    row.figures = json!({
        "requests": tally.samples.len(), "ok": tally.ok(), "failures": as_json(&failures),
        "applies": case.plan.applies, "applied": took.len(), "apply_errors": errors,
        "p99_ms": tally.latency_ms(0.99), "panics": panics, "served": trio.served(),
    });
    Ok(vec![row])
}

/// Scenario 2: `plan.sighups` reloads of the file under steady load, each
/// waited for (the generation in `GET /v1/status` moves) before the next.
pub fn sighups(case: &Case) -> anyhow::Result<Vec<Row>> {
    let trio = Trio::start()?;
    let (traffic, extra) = (free_addr()?, free_addr()?);
    let mut lbd = case.lbd("sighups")?;
    let file = |a: bool| {
        format!(
            "{}{}",
            lbd.admin(""),
            toml_listeners(&listeners(&trio, traffic, extra, a))
        )
    };
    let (file_a, file_b) = (file(true), file(false));
    lbd.write_config(&file_a)?;
    lbd.launch()?;
    let load = Load::start(case.plan.steady(traffic));
    std::thread::sleep(case.plan.settle);
    let mut generation = lbd.status()?.generation;
    let (mut took, mut unseen) = (Vec::new(), 0usize);
    for i in 0..case.plan.sighups {
        lbd.write_config(if i % 2 == 0 { &file_b } else { &file_a })?;
        let sent = Instant::now();
        lbd.sighup()?;
        let seen = loop {
            match lbd.status() {
                Ok(s) if s.generation > generation => break Some(s.generation),
                _ if sent.elapsed() > RELOAD_SEEN => break None,
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        match seen {
            Some(g) => {
                generation = g;
                took.push(sent.elapsed());
            }
            None => unseen += 1,
        }
    }
    std::thread::sleep(case.plan.settle);
    let tally = load.finish();
    let rejected = lbd
        .metric("weir_config_reloads_total", &[("result", "rejected")])
        .unwrap_or(f64::NAN);
    let failures = tally.failures();
    let failed: usize = failures.values().sum();
    let crashed = lbd.exited();
    let panics = lbd.panics();
    let mut row = case.row(format!(
        "{} SIGHUPs (file reload: weight 1↔2, a listener added and removed)",
        case.plan.sighups
    ));
    row.load = tally.held();
    row.faults = format!(
        "{} SIGHUPs, {} reloads seen ({}), {} not seen within {RELOAD_SEEN:?}, {rejected} rejected",
        case.plan.sighups,
        took.len(),
        times(&took),
        unseen
    );
    row.failures = describe(&failures);
    let errors: Vec<String> = (0..unseen).map(|_| "reload not seen".to_owned()).collect();
    row.lost = lost(failed, &errors, &crashed, &panics);
    row.expected = "0 failed connections, every reload applied".into();
    row.verdict = Verdict::of(
        failed == 0 && unseen == 0 && rejected == 0.0 && crashed.is_none() && panics.is_empty(),
    );
    row.figures = json!({
        "requests": tally.samples.len(), "ok": tally.ok(), "failures": as_json(&failures),
        "sighups": case.plan.sighups, "reloads_seen": took.len(), "rejected": rejected,
        "p99_ms": tally.latency_ms(0.99), "panics": panics, "served": trio.served(),
    });
    Ok(vec![row])
}

/// What a reconfiguration scenario lost: requests, changes, the process.
fn lost(failed: usize, errors: &[String], crashed: &Option<String>, panics: &[String]) -> String {
    let mut parts = Vec::new();
    if failed > 0 {
        parts.push(format!("{failed} requests"));
    }
    if !errors.is_empty() {
        parts.push(format!("{} changes ({})", errors.len(), errors[0]));
    }
    if let Some(how) = crashed {
        parts.push(format!("lbd exited: {how}"));
    }
    if !panics.is_empty() {
        parts.push(format!("{} panics: {}", panics.len(), panics[0]));
    }
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join("; ")
    }
}
