//! Scenario 4: lbd out of descriptors. It runs under `prlimit
//! --nofile=N:N` while clients hold more keep-alive connections through
//! it than N allows, on top of the steady load; then they let go. Twice:
//! with the connection cap lbd derives from N (it refuses at the cap,
//! reason `limit`, before descriptors run out), and with
//! `runtime.max_connections` set far above what N allows (connects to
//! backends fail with EMFILE, reason `local_error`, and accepts back off).
//! Either way no backend may be ejected for this host's shortage, and
//! service must resume once the load drops.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

use super::backends::{free_addr, Trio};
use super::plan::{Case, REQUEST_TIMEOUT};
use super::report::{Row, Verdict};
use super::state::{tcp_listener, toml_listeners};
use super::traffic::{
    as_json, connect, describe, exchange, first_answer, Failure, Load, KEEP_ALIVE,
};

/// `runtime.max_connections` of the second variant: far beyond any
/// descriptor budget this scenario gives.
const CONFIGURED: u64 = 10_000;
/// How long the connections are held once open.
const EXHAUSTED: Duration = Duration::from_secs(5);
/// Threads opening the held connections.
const HOLDERS: usize = 32;

pub fn run(case: &Case) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for configured in [None, Some(CONFIGURED)] {
        let name = match configured {
            None => format!("descriptors: nofile {}, derived cap", case.plan.nofile),
            Some(c) => format!(
                "descriptors: nofile {}, max_connections = {c}",
                case.plan.nofile
            ),
        };
        rows.push(variant(case, configured, &name).unwrap_or_else(|e| {
            let mut r = Row::not_run(case.engine, &name, &format!("{e:#}"));
            r.failures = format!("scenario failed: {e:#}");
            r.verdict = Verdict::NotMet;
            r
        }));
    }
    Ok(rows)
}

/// Opens `count` keep-alive connections to `target`, each with one
/// answered request; the ones that got their answer, and how the others
/// failed.
fn hold(target: SocketAddr, count: usize) -> (Vec<TcpStream>, BTreeMap<Failure, usize>) {
    let held = Mutex::new(Vec::with_capacity(count));
    let failed = Mutex::new(BTreeMap::new());
    std::thread::scope(|scope| {
        for t in 0..HOLDERS {
            let (held, failed) = (&held, &failed);
            scope.spawn(move || {
                let mine = count / HOLDERS + usize::from(t < count % HOLDERS);
                for _ in 0..mine {
                    let result = connect(target, REQUEST_TIMEOUT).and_then(|mut s| {
                        exchange(&mut s, KEEP_ALIVE, REQUEST_TIMEOUT).map(|()| s)
                    });
                    match result {
                        Ok(s) => held.lock().expect("holders do not panic").push(s),
                        Err(f) => {
                            *failed
                                .lock()
                                .expect("holders do not panic")
                                .entry(f)
                                .or_insert(0) += 1
                        }
                    }
                }
            });
        }
    });
    (
        held.into_inner().unwrap_or_default(),
        failed.into_inner().unwrap_or_default(),
    )
}

fn variant(case: &Case, configured: Option<u64>, name: &str) -> anyhow::Result<Row> {
    let plan = case.plan;
    let trio = Trio::start()?;
    let traffic = free_addr()?;
    let dir = if configured.is_some() {
        "fds-configured"
    } else {
        "fds-derived"
    };
    let mut lbd = case.lbd(dir)?.with_nofile(plan.nofile);
    let runtime = configured.map_or(String::new(), |c| {
        format!("[runtime]\nmax_connections = {c}\n\n")
    });
    let listener = tcp_listener("traffic", traffic, &trio.weighted(1, 1));
    lbd.write_config(&format!(
        "{runtime}{}{}",
        lbd.admin(""),
        toml_listeners(&[listener])
    ))?;
    lbd.launch()?;
    // What lbd derives (server/limits.rs): 256 kept back, two per splice
    // pipe (64 per worker), two per connection.
    let derived = plan
        .nofile
        .saturating_sub(256 + 2 * 64 * plan.workers as u64)
        / 2;
    let to_hold = plan.nofile as usize * 3 / 5;
    let load = Load::start(plan.steady(traffic));
    std::thread::sleep(plan.settle);
    let held_at = Instant::now();
    let (held, hold_failures) = hold(traffic, to_hold);
    let held_n = held.len();
    // Out of descriptors for a while: long enough for every health check
    // to run a few times and for clients to give up on queued connects.
    std::thread::sleep(EXHAUSTED);
    let status_during = match lbd.status_within(REQUEST_TIMEOUT) {
        Ok(s) => {
            let b = s.listeners.iter().flat_map(|l| &l.backends);
            format!(
                "{}/{} healthy",
                b.clone().filter(|b| b.healthy).count(),
                b.count()
            )
        }
        Err(_) => format!("unknown (status not answered within {REQUEST_TIMEOUT:?})"),
    };
    let released = Instant::now();
    drop(held);
    let recovered = first_answer(traffic, Duration::from_secs(30));
    std::thread::sleep(plan.settle);
    let (held_s, released_s) = (load.offset(held_at), load.offset(released));
    let resumed_s = released_s + recovered.map_or(f64::MAX, |d| d.as_secs_f64());
    let tally = load.finish();
    let reason = |r: &str| {
        lbd.metric("weir_connections_rejected_total", &[("reason", r)])
            .unwrap_or(f64::NAN)
    };
    let (limit, local, no_backend) = (reason("limit"), reason("local_error"), reason("no_backend"));
    let passive = lbd
        .metric("weir_health_passive_failures_total", &[])
        .unwrap_or(f64::NAN);
    let after = lbd.status()?;
    let backends: Vec<_> = after.listeners.iter().flat_map(|l| &l.backends).collect();
    let healthy_after = backends.iter().filter(|b| b.healthy).count();
    let downs = lbd.log_lines("backend down");
    let before = tally.failures_between(f64::MIN, held_s);
    let during = tally.failures_between(held_s, released_s);
    let after_recovery = tally.failures_between(resumed_s, f64::MAX);
    let mut row = case.row(name.to_owned());
    row.load = format!(
        "{}; plus {to_hold} keep-alive connections held ({held_n} got through)",
        tally.held()
    );
    row.faults = format!(
        "1: lbd under prlimit --nofile={n}:{n} (derived cap {derived}{}); {to_hold} held at once",
        configured.map_or(String::new(), |c| format!(", configured {c}")),
        n = plan.nofile
    );
    row.failures = format!(
        "refused by lbd: limit {limit}, local_error {local}, no_backend {no_backend}; \
         holders: {}; steady load: {} while held, {} before, {} after recovery",
        describe(&hold_failures),
        describe(&during),
        describe(&before),
        describe(&after_recovery)
    );
    row.lost = format!(
        "the connections beyond the limit; backends {status_during} while exhausted, \
         {healthy_after}/{} after, {passive} passive failures, {} 'backend down' logged; \
         service back {} after the load dropped",
        backends.len(),
        downs.len(),
        recovered.map_or("never (30 s)".into(), |d| format!(
            "{:.0} ms",
            d.as_secs_f64() * 1e3
        ))
    );
    row.expected = "refusals counted by reason; no backend ejected; service resumes".into();
    let panics = lbd.panics();
    row.verdict = Verdict::of(
        recovered.is_some()
            && healthy_after == backends.len()
            && downs.is_empty()
            && passive == 0.0
            && after_recovery.is_empty()
            && before.is_empty()
            && panics.is_empty(),
    );
    row.figures = json!({
        "nofile": plan.nofile, "derived_cap": derived, "configured_cap": configured,
        "to_hold": to_hold, "held": held_n, "hold_failures": as_json(&hold_failures),
        "rejected": { "limit": limit, "local_error": local, "no_backend": no_backend },
        "failures_before": as_json(&before), "failures_while_held": as_json(&during),
        "failures_after_recovery": as_json(&after_recovery),
        "recovered_ms": recovered.map(|d| d.as_secs_f64() * 1e3),
        "status_while_exhausted": status_during, "healthy_after": healthy_after,
        "passive_failures": passive, "backend_down_logged": downs, "panics": panics,
    });
    Ok(row)
}
