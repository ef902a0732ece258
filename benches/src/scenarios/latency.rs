//! The latency scenarios: latency at a fixed offered load (p50, p99,
//! p99.9), and the latency floor (one connection, one request at a time)
//! with what each proxy adds to it over the direct path. Every attempt
//! starts the peer afresh and holds the client, the backend and the proxy
//! to their CPUs (`placement`), and is run again when stolen from. The
//! throughput scenarios, measured with the peers running free, are in
//! `throughput`.

use std::net::SocketAddr;
use std::time::Duration;

use super::{retried, Bench, Measured};
use crate::load;
use crate::peers::{self, Peer};
use crate::placement;
use crate::stats::{added_over_direct, FLOOR};
use crate::steal;
use crate::topo::Side;

impl Bench {
    /// Latency runs: at least 5, the tail being the noisiest figure.
    pub fn latency_runs(&self) -> usize {
        self.runs.max(5)
    }

    /// Latency at a fixed offered load, at least 5 runs per peer; a run
    /// that was stolen from is run again, from a fresh start (see
    /// `steal::Retry::LATENCY`). The client, the backend and the proxy are
    /// held to the CPUs of `placement` meanwhile (see `placement`).
    pub fn latency(&mut self, peers: &[Peer], workers: usize, rate: f64) {
        self.with_placement(workers, "latency", |b, place| {
            b.interleaved(peers, workers, b.latency_runs(), |b, peer, _| {
                let d = Duration::from_secs(b.seconds);
                let (lat, kept) = b.placed(peer, workers, place, "latency", |http| {
                    load::http_latency(http, rate, 16, d)
                })?;
                Ok([
                    ("latency p50 at fixed load", 0.50),
                    ("latency p99 at fixed load", 0.99),
                    ("latency p99.9 at fixed load", 0.999),
                ]
                .into_iter()
                .map(|(scenario, q)| Measured {
                    scenario,
                    unit: "µs",
                    value: Ok(load::quantile(&lat, q)),
                    steal: kept.steal,
                    attempts: kept.made,
                })
                .collect())
            });
        });
    }

    /// The latency floor: one connection, one request at a time, through
    /// every peer (at least 5 runs, placed like the fixed-load latency
    /// runs): p50 and p99 of the round trip, then what each proxy adds
    /// over the direct path, round by round.
    pub fn latency_floor(&mut self, peers: &[Peer], workers: usize) {
        self.with_placement(workers, "latency floor", |b, place| {
            b.interleaved(peers, workers, b.latency_runs(), |b, peer, _| {
                let d = Duration::from_secs(b.seconds);
                let (trips, kept) = b.placed(peer, workers, place, "latency floor", |http| {
                    load::round_trips(http, d)
                })?;
                Ok(FLOOR
                    .iter()
                    .map(|&(scenario, q)| Measured {
                        scenario,
                        unit: "µs",
                        value: Ok(load::quantile(&trips, q) / 1e3),
                        steal: kept.steal,
                        attempts: kept.made,
                    })
                    .collect())
            });
        });
        let added = added_over_direct(&self.figures, workers);
        self.figures.extend(added);
    }

    /// Holds the HTTP backend to its CPUs of the placement for `workers`
    /// while `runs` measures, and gives it every CPU back afterwards.
    fn with_placement(
        &mut self,
        workers: usize,
        what: &str,
        runs: impl FnOnce(&mut Self, Option<&placement::Placement>),
    ) {
        let place = placement::Placement::plan(&self.cpus, workers);
        if let Some(place) = &place {
            if let Err(e) = placement::pin(&self.backend, &place.backend) {
                self.failures
                    .push(format!("{what} ({workers} workers): {e:#}"));
                return;
            }
        }
        runs(self, place.as_ref());
        if place.is_some() {
            if let Err(e) = placement::pin(&self.backend, &self.cpus) {
                self.failures.push(format!(
                    "backend CPUs after {what} ({workers} workers): {e:#}"
                ));
            }
        }
    }

    /// Starts `peer` afresh, holds it (and the client, which runs `measure`
    /// against the peer's HTTP target) to the CPUs of `place`, and returns
    /// what `measure` gave, run again from a fresh start when stolen from
    /// (`steal::Retry::LATENCY`), with the attempt's steal.
    fn placed<T>(
        &self,
        peer: &Peer,
        workers: usize,
        place: Option<&placement::Placement>,
        what: &str,
        measure: impl Fn(SocketAddr) -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, steal::Attempts<()>)> {
        let kept = retried(what, steal::Retry::LATENCY, || {
            let running = peers::start(peer, workers, &self.site)?;
            let (http, _, _) = peer.targets(&self.site.topo);
            if let (Some(place), Some(running)) = (place, &running) {
                placement::pin(&running.pids(), &place.proxy)?;
            }
            let client = place.map_or(&self.cpus[..], |p| &p.client[..]);
            self.site
                .topo
                .within(Side::Client, || placement::on(client, || measure(http)))??
        });
        let value = kept.value?;
        Ok((
            value,
            steal::Attempts {
                value: (),
                steal: kept.steal,
                made: kept.made,
            },
        ))
    }
}
