//! The throughput scenarios, measured with each peer running free:
//! keep-alive requests, new connections, bulk TCP with 1 and 8 streams and
//! UDP three ways (request/response, one-way, download), each run again
//! when stolen from; the CPU the proxy spent per request, connection or
//! GB in the same run; and memory per idle connection. Latency, measured
//! on fixed CPUs, is in `latency`.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use super::{retried, Bench, Measured};
use crate::load;
use crate::peers::{self, Peer};
use crate::steal;
use crate::tools::{iperf, wrk};
use crate::topo::Side;

impl Bench {
    /// Throughput figures of every peer, each run on a fresh start with a
    /// discarded warm-up. Memory per idle connection is measured in the
    /// first run only (it does not vary by run).
    pub fn throughput(&mut self, peers: &[Peer], workers: usize) {
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
                "UDP datagrams/s (one-way, reached the sink)",
                "dgram/s",
                || load::udp_oneway(peer.oneway_target(topo), &self.sink, 4, d),
            );
            let source = topo.backend(peers::BACKEND_UDP_SOURCE_PORT);
            scenario(
                &mut out,
                "UDP datagrams/s (download, reached the clients)",
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
        crate::procs::wait_for(Duration::from_secs(30), || {
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
