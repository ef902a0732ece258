//! Two network namespaces of the chaos run's own, for the backend faults:
//! lbd, its clients and two backends in one (on its own loopback), the
//! third backend in the other, behind a veth pair:
//!
//! ```text
//!  weir-chaos-lb                      weir-chaos-backend
//!  lbd, clients, 127.0.0.2-3   10.79.0.1 ─veth─ 10.79.0.2   the faulted backend
//! ```
//!
//! A link between hosts can then lose packets silently, which loopback
//! cannot: [`Pair::blackhole`] drops every TCP packet arriving at the
//! backend, so connects and requests to it time out instead of failing
//! fast. No link leads out of the namespaces; they are deleted on drop.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::Arc;

const NAMES: [&str; 2] = ["weir-chaos-lb", "weir-chaos-backend"];
const LINKS: [&str; 2] = ["wc-lb", "wc-backend"];
const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);
/// The faulted backend's address.
pub const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 2);

/// How packets to the backend are made to vanish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hole {
    /// `iptables -I INPUT -p tcp -j DROP` inside the backend's namespace.
    Iptables,
    /// The backend's end of the veth pair set down: lbd's end keeps its
    /// route and sends into a link nobody receives on.
    LinkDown,
}

impl Hole {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Iptables => "every TCP packet to it dropped (iptables DROP in its namespace)",
            Self::LinkDown => "its end of the veth pair down (packets to it lost)",
        }
    }
}

/// The two namespaces.
pub struct Pair {
    lb: Arc<File>,
    backend: Arc<File>,
}

fn names() -> Vec<String> {
    NAMES.iter().map(|n| (*n).to_owned()).collect()
}

fn ip(args: &str) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .map_err(|e| anyhow::anyhow!("ip (iproute2) could not run: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Pair {
    /// Creates the namespaces and the veth pair (removing any left by a run
    /// that was killed). Needs root.
    pub fn create() -> anyhow::Result<Self> {
        let names = names();
        crate::procs::remove_namespaces(&names);
        crate::interrupt::track_namespaces(&names);
        let [lb, backend] = NAMES;
        let [l_lb, l_backend] = LINKS;
        let steps = [
            format!("netns add {lb}"),
            format!("netns add {backend}"),
            format!("link add {l_lb} netns {lb} type veth peer name {l_backend} netns {backend}"),
            format!("-n {lb} addr add {LB_IP}/24 dev {l_lb}"),
            format!("-n {backend} addr add {BACKEND_IP}/24 dev {l_backend}"),
            format!("-n {lb} link set {l_lb} up"),
            format!("-n {backend} link set {l_backend} up"),
            format!("-n {lb} link set lo up"),
            format!("-n {backend} link set lo up"),
        ];
        for step in &steps {
            if let Err(e) = ip(step) {
                crate::procs::remove_namespaces(&names);
                crate::interrupt::untrack_namespaces(&names);
                return Err(e);
            }
        }
        let open = |name: &str| -> anyhow::Result<Arc<File>> {
            Ok(Arc::new(File::open(format!("/run/netns/{name}"))?))
        };
        Ok(Self {
            lb: open(lb)?,
            backend: open(backend)?,
        })
    }

    /// lbd's namespace (to start it there).
    pub fn lb(&self) -> Arc<File> {
        self.lb.clone()
    }

    /// Runs `f` in lbd's namespace (threads it starts stay there).
    pub fn within_lb<T>(&self, f: impl FnOnce() -> T) -> anyhow::Result<T> {
        crate::topo::within_namespace(&self.lb, NAMES[0], f)
    }

    /// Runs `f` in the faulted backend's namespace.
    pub fn within_backend<T>(&self, f: impl FnOnce() -> T) -> anyhow::Result<T> {
        crate::topo::within_namespace(&self.backend, NAMES[1], f)
    }

    /// The faulted backend's address.
    pub fn backend_ip(&self) -> IpAddr {
        IpAddr::V4(BACKEND_IP)
    }

    /// Makes packets to the backend vanish, the first way that works here.
    pub fn blackhole(&self) -> anyhow::Result<Hole> {
        let drop_rule = Command::new("ip")
            .args([
                "netns", "exec", NAMES[1], "iptables", "-I", "INPUT", "-p", "tcp", "-j", "DROP",
            ])
            .output();
        if drop_rule.is_ok_and(|o| o.status.success()) {
            return Ok(Hole::Iptables);
        }
        ip(&format!("-n {} link set {} down", NAMES[1], LINKS[1]))?;
        Ok(Hole::LinkDown)
    }

    /// Undoes [`Pair::blackhole`].
    pub fn heal(&self, hole: Hole) -> anyhow::Result<()> {
        match hole {
            Hole::Iptables => {
                let out = Command::new("ip")
                    .args([
                        "netns", "exec", NAMES[1], "iptables", "-D", "INPUT", "-p", "tcp", "-j",
                        "DROP",
                    ])
                    .output()?;
                anyhow::ensure!(
                    out.status.success(),
                    "iptables -D: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok(())
            }
            Hole::LinkDown => ip(&format!("-n {} link set {} up", NAMES[1], LINKS[1])),
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let names = names();
        crate::procs::remove_namespaces(&names);
        crate::interrupt::untrack_namespaces(&names);
    }
}
