//! Where the benchmark's parts run: all on loopback, or in three network
//! namespaces joined by veth pairs, so that every packet crosses a link
//! with a 1,500-byte MTU as it does between real hosts:
//!
//! ```text
//!  clients            proxy                          backends
//!  10.77.1.1 ─veth─ 10.77.1.2 | 10.77.2.1 ─veth─ 10.77.2.2
//! ```
//!
//! The namespaces are this run's own (no link leads out of them), so no
//! packet can leave the machine or reach an address outside them. The
//! direct path (no proxy) is the proxy namespace's kernel routing.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::process::Command;

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

/// One side of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Load generators (wrk, iperf3's client, `lb-bench`'s own clients).
    Client,
    /// The proxy under test.
    Proxy,
    /// nginx, iperf3's server, the UDP echo server, sink and source.
    Backend,
}

/// The benchmark's namespaces are `weir-bench-client`, `-proxy` and
/// `-backend`.
const PREFIX: &str = "weir-bench";
/// The veth interfaces (each inside its namespace): client, proxy towards
/// the clients, proxy towards the backends, backend.
const LINKS: [&str; 4] = ["wb-client", "wb-proxy-c", "wb-proxy-b", "wb-backend"];
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
const PROXY_FRONT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
const PROXY_BACK_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 1);
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 2);

/// The topology of one run.
pub struct Topology {
    /// The three namespaces (client, proxy, backend), or none on loopback.
    namespaces: Option<[File; 3]>,
    /// Their names.
    names: [String; 3],
}

impl Topology {
    /// Everything on loopback: clients and proxies on 127.0.0.1, backends
    /// on 127.0.0.2.
    pub fn loopback() -> Self {
        Self {
            namespaces: None,
            names: Default::default(),
        }
    }

    /// Creates the three namespaces and two veth pairs (removing any left
    /// by an earlier run that did not end cleanly). Needs CAP_NET_ADMIN and
    /// CAP_SYS_ADMIN.
    pub fn netns() -> anyhow::Result<Self> {
        Self::netns_named(PREFIX)
    }

    /// [`Topology::netns`] with namespaces named `{prefix}-client`,
    /// `-proxy` and `-backend`.
    fn netns_named(prefix: &str) -> anyhow::Result<Self> {
        let names = ["client", "proxy", "backend"].map(|side| format!("{prefix}-{side}"));
        crate::procs::remove_namespaces(&names);
        crate::interrupt::track_namespaces(&names);
        let [client, proxy, backend] = &names;
        let [l_client, l_proxy_c, l_proxy_b, l_backend] = LINKS;
        let steps: Vec<Vec<String>> = [
            format!("netns add {client}"),
            format!("netns add {proxy}"),
            format!("netns add {backend}"),
            format!("link add {l_client} netns {client} type veth peer name {l_proxy_c} netns {proxy}"),
            format!("link add {l_proxy_b} netns {proxy} type veth peer name {l_backend} netns {backend}"),
            format!("-n {client} addr add {CLIENT_IP}/24 dev {l_client}"),
            format!("-n {proxy} addr add {PROXY_FRONT_IP}/24 dev {l_proxy_c}"),
            format!("-n {proxy} addr add {PROXY_BACK_IP}/24 dev {l_proxy_b}"),
            format!("-n {backend} addr add {BACKEND_IP}/24 dev {l_backend}"),
            format!("-n {client} link set {l_client} mtu 1500 up"),
            format!("-n {proxy} link set {l_proxy_c} mtu 1500 up"),
            format!("-n {proxy} link set {l_proxy_b} mtu 1500 up"),
            format!("-n {backend} link set {l_backend} mtu 1500 up"),
            format!("-n {client} link set lo up"),
            format!("-n {proxy} link set lo up"),
            format!("-n {backend} link set lo up"),
            // The direct path: clients reach the backends through the
            // proxy namespace's routing.
            format!("-n {client} route add {BACKEND_IP}/32 via {PROXY_FRONT_IP}"),
            format!("-n {backend} route add {CLIENT_IP}/32 via {PROXY_BACK_IP}"),
        ]
        .iter()
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .collect();
        for args in steps {
            let out = Command::new("ip")
                .args(&args)
                .output()
                .map_err(|e| anyhow::anyhow!("ip (apt-get install iproute2) could not run: {e}"))?;
            if !out.status.success() {
                crate::procs::remove_namespaces(&names);
                crate::interrupt::untrack_namespaces(&names);
                anyhow::bail!(
                    "ip {}: {} (the netns setup needs root)",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        let open = |name: &str| {
            File::open(format!("/run/netns/{name}"))
                .map_err(|e| anyhow::anyhow!("/run/netns/{name}: {e}"))
        };
        let namespaces = Some([open(client)?, open(proxy)?, open(backend)?]);
        let topo = Self {
            namespaces,
            names: names.clone(),
        };
        // Every namespace starts with the kernel's defaults. The proxy
        // namespace routes the direct path. The connecting sides (wrk, the
        // proxies) may reuse a port in TIME_WAIT for a new connection, as
        // loopback traffic may by default (tcp_tw_reuse = 2): without it,
        // wrk's 28,000 ephemeral ports, each held 60 s after its close,
        // cap new connections at about 470/s after the first run.
        let settings = [
            (Side::Proxy, "ip_forward"),
            (Side::Client, "tcp_tw_reuse"),
            (Side::Proxy, "tcp_tw_reuse"),
        ];
        for (side, name) in settings {
            topo.within(side, || {
                std::fs::write(format!("/proc/sys/net/ipv4/{name}"), "1")
                    .map_err(|e| anyhow::anyhow!("net.ipv4.{name} in the {side:?} namespace: {e}"))
            })??;
        }
        Ok(topo)
    }

    /// Whether this is the namespace setup.
    pub fn is_netns(&self) -> bool {
        self.namespaces.is_some()
    }

    /// The address proxies listen on (clients connect to it).
    pub fn front(&self, port: u16) -> SocketAddr {
        let ip = match self.namespaces {
            None => Ipv4Addr::LOCALHOST,
            Some(_) => PROXY_FRONT_IP,
        };
        SocketAddr::new(IpAddr::V4(ip), port)
    }

    /// The address of a backend service.
    pub fn backend(&self, port: u16) -> SocketAddr {
        let ip = match self.namespaces {
            None => Ipv4Addr::new(127, 0, 0, 2),
            Some(_) => BACKEND_IP,
        };
        SocketAddr::new(IpAddr::V4(ip), port)
    }

    /// One line for the results: what the figures were measured over.
    pub fn label(&self) -> String {
        match self.namespaces {
            None => "loopback (127.0.0.0/8), client, proxy and backends on one machine".into(),
            Some(_) => format!(
                "three network namespaces on one machine joined by veth pairs at MTU 1500 \
                 (clients {CLIENT_IP} | proxy {PROXY_FRONT_IP}, {PROXY_BACK_IP} | backends {BACKEND_IP}; \
                 the direct path is the proxy namespace's kernel routing)"
            ),
        }
    }

    /// Runs `f` on this thread inside `side`'s namespace, then returns the
    /// thread to the namespace it was in. Sockets `f` creates, and
    /// processes and threads it starts, stay in `side`'s namespace. On
    /// loopback, just runs `f`.
    pub fn within<T>(&self, side: Side, f: impl FnOnce() -> T) -> anyhow::Result<T> {
        let Some(namespaces) = &self.namespaces else {
            return Ok(f());
        };
        within_namespace(
            &namespaces[side as usize],
            &format!("the {side:?} namespace"),
            f,
        )
    }
}

/// Runs `f` on this thread inside the network namespace `ns` (an open
/// `/run/netns/NAME`), then returns the thread to the namespace it was in,
/// even when `f` panics. Sockets `f` creates, and processes and threads it
/// starts, stay in `ns`.
pub fn within_namespace<T>(ns: &File, what: &str, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    let back = File::open("/proc/thread-self/ns/net")?;
    let net = Some(LinkNameSpaceType::Network);
    move_into_link_name_space(ns.as_fd(), net)
        .map_err(|e| anyhow::anyhow!("entering {what}: {e}"))?;
    // Returns even when `f` panics: the rest of the run must not go on
    // in the wrong namespace.
    struct Restore(File);
    impl Drop for Restore {
        fn drop(&mut self) {
            move_into_link_name_space(self.0.as_fd(), Some(LinkNameSpaceType::Network))
                .expect("return to the namespace this thread came from");
        }
    }
    let _restore = Restore(back);
    Ok(f())
}

impl Drop for Topology {
    fn drop(&mut self) {
        if self.namespaces.take().is_some() {
            crate::procs::remove_namespaces(&self.names);
            crate::interrupt::untrack_namespaces(&self.names);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::time::Duration;

    fn current_namespace() -> std::path::PathBuf {
        std::fs::read_link("/proc/thread-self/ns/net").unwrap()
    }

    /// Packets between the sides cross the veth pairs (they arrive from the
    /// client's address, not loopback), the direct path is routed through
    /// the proxy namespace, the thread returns to its namespace after each
    /// visit, and the namespaces are gone once the topology is dropped.
    #[test]
    fn sides_talk_across_the_veth_pairs() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: network namespaces need root (CI runs as root)");
            return;
        }
        let home = current_namespace();
        let prefix = format!("weir-test-{}", std::process::id());
        let topo = Topology::netns_named(&prefix).unwrap();
        let within = |side, f: &dyn Fn() -> std::io::Result<()>| {
            topo.within(side, f).unwrap().unwrap();
            assert_eq!(current_namespace(), home, "back home after {side:?}");
        };

        // Client to proxy: TCP to the front address.
        let listener = topo
            .within(Side::Proxy, || TcpListener::bind(topo.front(0)))
            .unwrap()
            .unwrap();
        let front = listener.local_addr().unwrap();
        within(Side::Client, &|| TcpStream::connect(front).map(drop));
        let (_, from) = listener.accept().unwrap();
        assert_eq!(from.ip(), IpAddr::V4(CLIENT_IP));

        // Client to backend, the direct path: UDP through the proxy
        // namespace's routing.
        let backend = topo
            .within(Side::Backend, || UdpSocket::bind(topo.backend(0)))
            .unwrap()
            .unwrap();
        backend
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let to = backend.local_addr().unwrap();
        within(Side::Client, &|| {
            UdpSocket::bind("0.0.0.0:0")?
                .send_to(b"direct", to)
                .map(drop)
        });
        let mut buf = [0u8; 16];
        let (n, from) = backend.recv_from(&mut buf).unwrap();
        assert_eq!(
            (&buf[..n], from.ip()),
            (&b"direct"[..], IpAddr::V4(CLIENT_IP))
        );

        // Clients and proxies reuse ports in TIME_WAIT, as on loopback.
        for side in [Side::Client, Side::Proxy] {
            let reuse = topo
                .within(side, || {
                    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_tw_reuse")
                })
                .unwrap()
                .unwrap();
            assert_eq!(reuse.trim(), "1", "{side:?}");
        }

        drop(topo);
        for side in ["client", "proxy", "backend"] {
            let path = format!("/run/netns/{prefix}-{side}");
            assert!(!std::path::Path::new(&path).exists(), "{path} is left");
        }
    }
}
