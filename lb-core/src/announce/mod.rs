//! VIP announcement (`[announce]`): in BGP mode `lbd` keeps a host route
//! (/32, /128) for each VIP on a dedicated interface exactly while the VIP
//! should attract traffic, and BIRD's `protocol direct` exports them;
//! removing the address is the withdrawal. Local delivery does not depend
//! on it: every VIP of a listener also has a `local` route through the
//! interface (which BIRD does not export), so a withdrawn VIP still
//! accepts on this host and its established connections go on.
//!
//! In L2 mode `lbd` adds the VIPs the controller's owner map gives it to
//! the LAN interface (the kernel answers ARP/NDP for them), announces each
//! at takeover and periodically, and removes the ones it no longer owns.
//! Every VIP of a listener keeps its `local` route through `lo` on every
//! host, owner or not, so a VIP that moves still accepts where clients'
//! neighbour caches point until they learn the new owner; with
//! `arp_ignore = 1` only the owner answers ARP for it.
//!
//! - [`decide`]: which VIPs to announce, from values and `now` (pure);
//! - [`garp`]: the L2 announcement frames and their schedule (pure);
//! - [`link`]: the interface and its addresses over rtnetlink (the shell);
//! - [`packet`]: raw frames on the LAN interface (the shell);
//! - [`lan`]: L2 mode's LAN interface, its state and its claim receivers;
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
pub mod garp;
pub mod lan;
pub mod link;
pub mod packet;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_api::wire::{AnnounceStatus, VipStatus};
use lb_config::{Announce, L2State};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::{watch, Notify};

use self::decide::{
    changes, decide, decide_l2, delivery, yielded, Decisions, L2Life, Lifecycle, OwnerMap,
    VipHealth,
};
use self::garp::Schedule;
use self::lan::L2;
pub use self::lan::{open_lan, Lan};
use self::link::{host_prefix, Link, Placed};
use crate::lock;
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
    /// When each placed VIP is announced next (L2).
    schedule: Schedule,
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
    l2: Option<L2>,
}

impl std::fmt::Debug for Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcer")
            .field("interface", &self.config.interface)
            .finish()
    }
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
    /// [`open_interface`], or [`open_lan`] with its [`Lan`] in L2 mode),
    /// reading VIPs from `shared`'s routing snapshot and readiness from
    /// `ready`. Registers its metrics in `registry`.
    pub fn start(
        config: &Announce,
        link: Link,
        lan: Option<Lan>,
        shared: Arc<Shared>,
        ready: Arc<AtomicBool>,
        registry: &Registry,
    ) -> Arc<Self> {
        let kind = link.kind.clone();
        let (l2, receivers) = match lan {
            Some(lan) => {
                let (l2, receivers) = L2::new(lan);
                (Some(l2), receivers)
            }
            None => (None, Vec::new()),
        };
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
                schedule: Schedule::default(),
            }),
            metrics: AnnounceMetrics::register(registry),
            kind,
            l2,
        });
        if let Some(l2) = &this.l2 {
            lan::spawn_receivers(&this, l2, receivers);
        }
        tokio::spawn(this.clone().run());
        this
    }

    /// L2: the owner map of the state now in force; `from_controller`: it
    /// came in a `PUT /v1/state` (not from the state persisted before a
    /// restart).
    pub fn set_l2(&self, map: Option<L2State>, from_controller: bool) {
        if let Some(l2) = &self.l2 {
            if from_controller {
                l2.confirmed.store(true, Ordering::SeqCst);
                lock(&l2.given_up).clear();
            }
            let map = map.as_ref().map(|m| Arc::new(OwnerMap::from(m)));
            *lock(&l2.watched) = map.as_ref().map(|m| m.mine()).unwrap_or_default();
            *lock(&l2.map) = map;
            l2.adopt.store(true, Ordering::SeqCst);
            self.poke();
        }
    }

    /// L2: the controller was heard from (a readiness probe, a state).
    pub fn contact(&self) {
        if let Some(l2) = &self.l2 {
            *lock(&l2.last_contact) = Instant::now();
        }
    }

    async fn run(self: Arc<Self>) {
        // The loop holds the announcer weakly between rounds, so that the
        // ARP receiver, which stops when the announcer is gone, can stop.
        let this = Arc::downgrade(&self);
        drop(self);
        loop {
            let Some(this) = this.upgrade() else { return };
            let epoch = this.requested.load(Ordering::SeqCst);
            this.evaluate(Instant::now());
            this.done.send_replace(epoch);
            tokio::select! {
                () = this.poke.notified() => {}
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
        if let Some(l2) = &self.l2 {
            let mut since = lock(&l2.drain_since);
            *since = if draining {
                Some(since.unwrap_or_else(Instant::now))
            } else {
                None
            };
        }
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
        let decisions = match &self.l2 {
            None => decide(&st.decisions, &vips, self.config.when, life, now),
            Some(l2) => {
                let map = lock(&l2.map).clone();
                if l2.adopt.swap(false, Ordering::SeqCst) {
                    self.adopt(&mut st, map.as_deref());
                }
                let grace_over = lock(&l2.drain_since)
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.withdraw_grace());
                let lease = map.as_ref().map_or(Duration::MAX, |m| m.lease);
                let last = *lock(&l2.last_contact);
                {
                    let mine = lock(&l2.watched);
                    lock(&l2.claims).retain(|vip, _| mine.contains(vip));
                }
                let newly = yielded(&lock(&l2.claims), last, lease, now);
                let mut given_up = lock(&l2.given_up);
                for vip in newly {
                    if given_up.insert(vip) {
                        tracing::warn!(%vip, "cut off from the controller and another host claims the VIP: giving it up until the controller sends a state");
                    }
                }
                let gone = given_up.clone();
                drop(given_up);
                let confirmed = l2.confirmed.load(Ordering::SeqCst)
                    || now.saturating_duration_since(l2.started) >= lease;
                let at = L2Life {
                    life,
                    grace_over,
                    confirmed,
                };
                decide_l2(&st.decisions, &vips, map.as_deref(), at, &gone, now)
            }
        };
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
                    st.schedule.removed(vip);
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
                    if self.l2.is_some() {
                        st.schedule.placed(vip, now);
                    }
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
        if let Some(l2) = &self.l2 {
            for vip in st.schedule.take_due(now) {
                if let Err(e) = l2.sender.send(&garp::announcement(vip, l2.mac)) {
                    tracing::warn!(%vip, error = %e, "cannot send the VIP's announcement");
                }
            }
        }
    }

    /// Takes the host addresses on the interface that `map` names as VIPs
    /// as placed (an earlier run left them), so that those this lbd does
    /// not own are removed. No other address of the LAN interface is
    /// touched.
    fn adopt(&self, st: &mut State, map: Option<&OwnerMap>) {
        let Some(map) = map else { return };
        let on = match st.link.addresses() {
            Ok(on) => on,
            Err(e) => {
                tracing::error!(error = %e, "cannot list the LAN interface's addresses");
                return;
            }
        };
        for p in on {
            let named = map.owner_of(p.ip).is_some();
            if named && p.prefix == host_prefix(p.ip) && st.placed.insert(p.ip) {
                tracing::info!(vip = %p.ip, "VIP found on the LAN interface (left by an earlier run)");
            }
        }
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
                let owner = self.l2.as_ref().and_then(|l2| {
                    let map = lock(&l2.map);
                    map.as_ref()?.owner_of(vip).cloned()
                });
                VipStatus {
                    vip,
                    announced,
                    reason,
                    for_ms: now.saturating_duration_since(v.since).as_millis() as u64,
                    owner: owner.as_ref().map(|o| o.0.clone()),
                    epoch: owner.map(|o| o.1),
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
