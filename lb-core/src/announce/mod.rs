//! VIP announcement (`[announce]`): in BGP mode `lbd` keeps a host route
//! (/32, /128) for each VIP on a dedicated interface exactly while the VIP
//! should attract traffic, and BIRD's `protocol direct` exports them;
//! removing the address is the withdrawal. Local delivery does not depend
//! on it: every VIP of a listener also has a `local` route through the
//! interface (which BIRD does not export), so a withdrawn VIP still
//! accepts on this host and its established connections go on.
//!
//! - [`decide`]: which VIPs to announce, from values and `now` (pure);
//! - [`link`]: the interface and its addresses over rtnetlink (the shell);
//! - [`arp`]: whether the host's LAN interfaces would answer ARP for VIPs;
//! - [`Announcer`]: the loop that gathers the VIPs' health from the routing
//!   snapshot, decides, and applies only the changes.
//!
//! The loop runs when poked (an apply, a drain, an undrain: the callers
//! can wait until the result is on the interface) and every [`TICK`]
//! otherwise, which is how backend health flips reach it: reading every
//! listener's health cells costs microseconds, and leaves the health
//! checks and the data path (where passive failures flip cells) untouched.

pub mod arp;
pub mod decide;
pub mod link;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lb_api::wire::{AnnounceStatus, VipStatus};
use lb_config::Announce;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::{watch, Notify};

use self::decide::{changes, decide, delivery, Decisions, Lifecycle, VipHealth};
use self::link::{Link, Placed};
use crate::routing::Routing;
use crate::worker::Shared;

pub use self::link::LinkError;

/// The longest a health flip waits before the loop sees it.
pub const TICK: Duration = Duration::from_millis(50);

/// Above this many changes in one round, one summary line is logged
/// instead of one line per VIP (a start with 1,000 VIPs).
const LOG_EACH: usize = 16;

/// Every VIP bound by a listener in `routing`, with its health. Wildcard
/// and loopback binds are not VIPs.
pub fn gather(routing: &Routing) -> BTreeMap<IpAddr, VipHealth> {
    let mut vips: BTreeMap<IpAddr, VipHealth> = BTreeMap::new();
    for route in routing.routes.values() {
        let ip = route.listener.bind.ip().to_canonical();
        if ip.is_unspecified() || ip.is_loopback() {
            continue;
        }
        let entry = vips.entry(ip).or_default();
        entry.listeners += 1;
        entry.backends_up += route
            .backends
            .iter()
            .zip(&route.listener.backends)
            .filter(|(h, b)| b.weight > 0 && h.health.load().is_up())
            .count();
    }
    vips
}

/// The announcement metrics.
#[derive(Clone)]
struct AnnounceMetrics {
    announced: IntGaugeVec,
    changes: IntCounterVec,
}

impl AnnounceMetrics {
    fn register(registry: &Registry) -> Self {
        let announced = IntGaugeVec::new(
            Opts::new(
                "weir_vip_announced",
                "1 while the VIP's host route is on the announce interface.",
            ),
            &["vip"],
        )
        .expect("static metric");
        let changes = IntCounterVec::new(
            Opts::new(
                "weir_vip_announce_changes_total",
                "VIP announcements and withdrawals applied.",
            ),
            &["vip", "action"],
        )
        .expect("static metric");
        let _ = registry.register(Box::new(announced.clone()));
        let _ = registry.register(Box::new(changes.clone()));
        Self { announced, changes }
    }
}

struct State {
    link: Link,
    /// What lbd has placed on the interface.
    placed: BTreeSet<IpAddr>,
    /// The VIPs lbd has local routes for.
    delivered: BTreeSet<IpAddr>,
    decisions: Decisions,
    /// The last netlink error per VIP, until a change succeeds.
    errors: BTreeMap<IpAddr, String>,
    /// Every address was removed for good (exit).
    released: bool,
}

/// The announcement loop's handle.
pub struct Announcer {
    config: Announce,
    shared: Arc<Shared>,
    ready: Arc<AtomicBool>,
    draining: AtomicBool,
    poke: Notify,
    requested: AtomicU64,
    done: watch::Sender<u64>,
    state: Mutex<State>,
    metrics: AnnounceMetrics,
    kind: String,
}

impl std::fmt::Debug for Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcer")
            .field("interface", &self.config.interface)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens (or creates) the announce interface and removes every address on
/// it that is not the kernel's own IPv6 link-local one: at start lbd owns
/// none, so anything there was left by a crash. Nothing else is touched.
pub fn open_interface(config: &Announce) -> Result<Link, LinkError> {
    let mut link = Link::open(&config.interface, config.create_interface)?;
    if link.created {
        tracing::info!(interface = %link.name, kind = %link.kind, "announce interface created");
    } else {
        tracing::info!(interface = %link.name, kind = %link.kind, "announce interface found");
    }
    let netlink = |name: &str, error| LinkError::Netlink {
        name: name.to_owned(),
        error,
    };
    let left: Vec<Placed> = link
        .addresses()
        .map_err(|e| netlink(&config.interface, e))?
        .into_iter()
        .filter(|p| !p.is_link_local())
        .collect();
    for p in &left {
        link.remove(*p).map_err(|e| netlink(&config.interface, e))?;
    }
    let routes = link
        .local_routes()
        .map_err(|e| netlink(&config.interface, e))?;
    for ip in &routes {
        link.remove_local(*ip)
            .map_err(|e| netlink(&config.interface, e))?;
    }
    if !left.is_empty() || !routes.is_empty() {
        let list: Vec<String> = left
            .iter()
            .map(|p| format!("{}/{}", p.ip, p.prefix))
            .chain(routes.iter().map(|ip| format!("local {ip}")))
            .collect();
        tracing::warn!(interface = %link.name, addresses = %list.join(" "), "removed addresses left on the announce interface (by an lbd that did not stop cleanly?)");
    }
    match arp::exposed_interfaces(&config.interface) {
        Some(exposed) => {
            for iface in exposed {
                tracing::warn!(
                    interface = %iface,
                    "net.ipv4.conf.{iface}.arp_ignore is 0 (and so is .all): this host answers ARP there for the VIPs on {}; set net.ipv4.conf.all.arp_ignore = 1 and arp_announce = 2 (deploy/bird/sysctl-weir.conf)",
                    config.interface
                );
            }
        }
        None => tracing::info!(
            "cannot read net.ipv4.conf.*.arp_ignore (/proc/sys is hidden from lbd): make sure net.ipv4.conf.all.arp_ignore = 1 (deploy/bird/sysctl-weir.conf), or the LAN gets ARP answers for the VIPs"
        ),
    }
    Ok(link)
}

impl Announcer {
    /// Starts the loop on the current runtime over `link` (from
    /// [`open_interface`]), reading VIPs from `shared`'s routing snapshot
    /// and readiness from `ready`. Registers its metrics in `registry`.
    pub fn start(
        config: &Announce,
        link: Link,
        shared: Arc<Shared>,
        ready: Arc<AtomicBool>,
        registry: &Registry,
    ) -> Arc<Self> {
        let kind = link.kind.clone();
        let this = Arc::new(Self {
            config: config.clone(),
            shared,
            ready,
            draining: AtomicBool::new(false),
            poke: Notify::new(),
            requested: AtomicU64::new(0),
            done: watch::Sender::new(0),
            state: Mutex::new(State {
                link,
                placed: BTreeSet::new(),
                delivered: BTreeSet::new(),
                decisions: Decisions::new(),
                errors: BTreeMap::new(),
                released: false,
            }),
            metrics: AnnounceMetrics::register(registry),
            kind,
        });
        tokio::spawn(this.clone().run());
        this
    }

    async fn run(self: Arc<Self>) {
        loop {
            let epoch = self.requested.load(Ordering::SeqCst);
            self.evaluate(Instant::now());
            self.done.send_replace(epoch);
            tokio::select! {
                () = self.poke.notified() => {}
                () = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// Asks the loop to run now.
    pub fn poke(&self) {
        self.poke.notify_one();
    }

    /// Runs the loop now and waits until its result is on the interface.
    pub async fn settle(&self) {
        let epoch = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut done = self.done.subscribe();
        self.poke.notify_one();
        let _ = done.wait_for(|&d| d >= epoch).await;
    }

    /// Starts or ends a drain (every VIP withheld while draining); returns
    /// how many VIPs were announced just before. [`Announcer::settle`]
    /// applies it.
    pub fn set_draining(&self, draining: bool) -> usize {
        self.draining.store(draining, Ordering::SeqCst);
        lock(&self.state).placed.len()
    }

    /// `withdraw_grace` of the configuration.
    pub fn withdraw_grace(&self) -> Duration {
        self.config.withdraw_grace.get()
    }

    /// Decides and applies the changes.
    fn evaluate(&self, now: Instant) {
        let vips = gather(&self.shared.routing.load());
        let life = Lifecycle {
            ready: self.ready.load(Ordering::SeqCst),
            draining: self.draining.load(Ordering::SeqCst),
        };
        let mut st = lock(&self.state);
        if st.released {
            return;
        }
        let decisions = decide(&st.decisions, &vips, self.config.when, life, now);
        // Delivery first for new VIPs, last for VIPs that are gone.
        let deliver = delivery(&st.delivered, &vips);
        for vip in deliver.add {
            match st.link.add_local(vip) {
                Ok(()) => {
                    st.delivered.insert(vip);
                }
                Err(e) => self.failed(&mut st, vip, "deliver", &e),
            }
        }
        let todo = changes(&st.placed, &decisions);
        let each = todo.add.len() + todo.remove.len() <= LOG_EACH;
        let (mut added, mut removed) = (0, 0);
        for vip in todo.remove {
            match st.link.remove_host(vip) {
                Ok(()) => {
                    st.placed.remove(&vip);
                    st.errors.remove(&vip);
                    removed += 1;
                    self.count(vip, false);
                    if each {
                        let reason = decisions
                            .get(&vip)
                            .and_then(|v| v.withheld)
                            .map_or("no listener", |w| w.reason());
                        tracing::info!(%vip, interface = %self.config.interface, reason, "VIP withdrawn");
                    }
                }
                Err(e) => self.failed(&mut st, vip, "withdraw", &e),
            }
        }
        for vip in todo.add {
            match st.link.add(vip) {
                Ok(()) => {
                    st.placed.insert(vip);
                    st.errors.remove(&vip);
                    added += 1;
                    self.count(vip, true);
                    if each {
                        tracing::info!(%vip, interface = %self.config.interface, "VIP announced");
                    }
                }
                Err(e) => self.failed(&mut st, vip, "announce", &e),
            }
        }
        for vip in deliver.remove {
            match st.link.remove_local(vip) {
                Ok(()) => {
                    st.delivered.remove(&vip);
                }
                Err(e) => {
                    tracing::error!(%vip, error = %e, "cannot remove the VIP's local route; retrying")
                }
            }
        }
        if !each {
            tracing::info!(
                announced = added,
                withdrawn = removed,
                interface = %self.config.interface,
                "VIPs announced and withdrawn"
            );
        }
        for gone in st.decisions.keys().filter(|v| !decisions.contains_key(v)) {
            let _ = self
                .metrics
                .announced
                .remove_label_values(&[&gone.to_string()]);
        }
        for vip in decisions.keys().filter(|v| !st.decisions.contains_key(v)) {
            if !st.placed.contains(vip) {
                self.metrics
                    .announced
                    .with_label_values(&[&vip.to_string()])
                    .set(0);
            }
        }
        st.errors.retain(|vip, _| decisions.contains_key(vip));
        st.decisions = decisions;
    }

    /// Records an applied announcement or withdrawal in the metrics.
    fn count(&self, vip: IpAddr, announced: bool) {
        let label = vip.to_string();
        self.metrics
            .announced
            .with_label_values(&[&label])
            .set(i64::from(announced));
        let action = if announced { "announce" } else { "withdraw" };
        self.metrics
            .changes
            .with_label_values(&[&label, action])
            .inc();
    }

    fn failed(&self, st: &mut State, vip: IpAddr, action: &str, e: &std::io::Error) {
        let text = format!("{action} failed: {e}");
        if st.errors.get(&vip) != Some(&text) {
            tracing::error!(%vip, interface = %self.config.interface, error = %e, "cannot {action} the VIP; retrying");
            st.errors.insert(vip, text);
        }
    }

    /// Every VIP's announcement now, for `GET /v1/status`.
    pub fn status(&self, now: Instant) -> AnnounceStatus {
        let st = lock(&self.state);
        let vips = st
            .decisions
            .iter()
            .map(|(&vip, v)| {
                let announced = st.placed.contains(&vip);
                let reason = if announced {
                    None
                } else if let Some(e) = st.errors.get(&vip) {
                    Some(e.clone())
                } else {
                    Some(v.withheld.map_or("pending", |w| w.reason()).to_owned())
                };
                VipStatus {
                    vip,
                    announced,
                    reason,
                    for_ms: now.saturating_duration_since(v.since).as_millis() as u64,
                }
            })
            .collect();
        AnnounceStatus {
            mode: self.config.mode.name().to_owned(),
            interface: self.config.interface.clone(),
            kind: self.kind.clone(),
            vips,
        }
    }

    /// Removes every placed address and local route for good (exit). The
    /// interface stays.
    pub fn release(&self) {
        let mut st = lock(&self.state);
        let placed: Vec<IpAddr> = st.placed.iter().copied().collect();
        for vip in placed {
            match st.link.remove_host(vip) {
                Ok(()) => {
                    st.placed.remove(&vip);
                    tracing::info!(%vip, "VIP withdrawn (exit)");
                }
                Err(e) => {
                    tracing::error!(%vip, error = %e, "cannot withdraw the VIP at exit")
                }
            }
        }
        let delivered: Vec<IpAddr> = st.delivered.iter().copied().collect();
        for vip in delivered {
            if st.link.remove_local(vip).is_ok() {
                st.delivered.remove(&vip);
            }
        }
        st.released = true;
    }
}
